"""The distribution-shift figure: detector logits per precision, one panel per generator.

Each panel is a ridge plot: one row per precision (palette colours, FP32 at the top) and the
real images at the bottom (grey), so no curve hides another. Every precision's ridge below
FP32 also carries FP32's density as a thin dashed outline, so the shift a format causes is
read against its full-precision twin. All ridges of all panels share one density scale, each
row is labelled with its image count, and the decision threshold is a dotted line.
"""

from __future__ import annotations

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from qdd.report.palette import color, order_generators, order_precisions
from qdd.report.style import RC, panel_grid

GRID_POINTS = 512
REFERENCE = "fp32"
#: Ridge spacing as a share of the tallest density: no ridge reaches into the next row.
SPACING = 1.0


def density(values: np.ndarray, grid: np.ndarray) -> np.ndarray | None:
    """A Gaussian KDE on ``grid``; None for fewer than two distinct values.

    `gaussian_kde` needs spread (its covariance is singular otherwise), so one image or
    constant logits are drawn where they are (a vertical tick) instead of being estimated.
    """
    from scipy.stats import gaussian_kde

    values = values[np.isfinite(values)]
    if len(np.unique(values)) < 2:
        return None
    return gaussian_kde(values)(grid)


def ridge(
    ax: Axes,
    values: np.ndarray,
    curve: np.ndarray | None,
    grid: np.ndarray,
    base: float,
    height: float,
    **style: object,
) -> Line2D:
    """One ridge at ``base``: a filled density, or a tick where constant values lie."""
    values = values[np.isfinite(values)]
    if curve is None:
        where = values[0] if len(values) else np.nan
        (line,) = ax.plot([where, where], [base, base + 0.6 * height], linewidth=3.0,
                          solid_capstyle="butt", **style)  # fmt: skip
        return line
    ax.fill_between(grid, base, base + curve, color=style["color"], alpha=0.3, linewidth=0)
    (line,) = ax.plot(grid, base + curve, linewidth=1.5, **style)
    return line


def logit_grid(logits: np.ndarray, threshold: float) -> np.ndarray:
    """x values covering every logit and the threshold, with a margin for the tails."""
    finite = logits[np.isfinite(logits)]
    lo = min(finite.min(), threshold) if len(finite) else threshold - 1
    hi = max(finite.max(), threshold) if len(finite) else threshold + 1
    pad = 0.1 * max(hi - lo, 1.0)
    return np.linspace(lo - pad, hi + pad, GRID_POINTS)


def plot_kde(scores: pd.DataFrame, detector: str, threshold: float = 0.0) -> Figure:
    """Per generator, a ridge per precision (top: fp32) and the real images (bottom).

    Panels are titled by generator; each panel's labelled lines are its precisions in
    palette order, then ``real``; FP32 outlines are labelled ``_fp32 reference`` and the
    threshold line ``_threshold``. Tick labels give each ridge's image count.
    """
    fakes = scores[scores["label"] == 1]
    real = scores.loc[scores["label"] == 0, "logit"].to_numpy(dtype=float)
    generators = order_generators(fakes["generator"].dropna().unique())
    grid = logit_grid(scores["logit"].to_numpy(dtype=float), threshold)
    panels = []  # (generator, [(name, values, density)])
    for generator in generators:
        rows = fakes[fakes["generator"] == generator]
        ridges = []
        for precision in order_precisions(rows["precision"].dropna().unique()):
            values = rows.loc[rows["precision"] == precision, "logit"].to_numpy(dtype=float)
            ridges.append((precision, values, density(values, grid)))
        if len(real):
            ridges.append(("real", real, density(real, grid)))
        panels.append((generator, ridges))
    tallest = max([c.max() for _, r in panels for _, _, c in r if c is not None] or [1.0])
    step = SPACING * tallest
    rows_max = max([len(r) for _, r in panels] or [1])
    # no sharey: each panel has its own ridge labels; the same limits give one scale
    fig, axes = panel_grid(len(panels), panel=(3.4, 0.55 * rows_max + 1.0), sharex=True)
    with mpl.rc_context(RC):
        for ax, (generator, ridges) in zip(axes, panels or [("no fake images", [])], strict=True):
            reference = next((r for r in ridges if r[0] == REFERENCE), None)
            ticks, labels = [], []
            for k, (name, values, curve) in enumerate(ridges):
                base = (len(ridges) - 1 - k) * step  # real images at the bottom
                ridge(ax, values, curve, grid, base, step, color=color(name), label=name,
                      zorder=2 + k)  # fmt: skip
                if (
                    reference is not None
                    and name not in (REFERENCE, "real")
                    and reference[2] is not None
                ):
                    # only where FP32 has mass: a dashed baseline would hide the ridge's own
                    outline = np.where(reference[2] > 0.005 * tallest, reference[2], np.nan)
                    ax.plot(grid, base + outline, color=color(REFERENCE), linewidth=0.8,
                            linestyle="--", label=f"_{REFERENCE} reference",
                            zorder=2.5 + k)  # fmt: skip
                ticks.append(base)
                labels.append(f"{name}  n={len(values)}")
            ax.axvline(threshold, color="black", linewidth=0.9, linestyle=":", label="_threshold")
            ax.set_title(generator)
            ax.set_yticks(ticks, labels)
            ax.tick_params(axis="y", length=0)
            ax.set_ylim(-0.05 * step, (rows_max - 1) * step + 1.15 * tallest)
            ax.set_xlim(grid[0], grid[-1])
            ax.spines["left"].set_visible(False)
        for ax in axes:
            if ax.get_subplotspec().is_last_row():
                ax.set_xlabel("logit (> threshold: fake)")
        shown = order_precisions({n for _, r in panels for n, _, _ in r} - {"real"})
        handles = [Line2D([], [], color=color(p), linewidth=1.8) for p in shown]
        labels = list(shown)
        if len(real):
            handles.append(Line2D([], [], color=color("real"), linewidth=1.8))
            labels.append("real")
        if any(r[0] == REFERENCE for _, ridges in panels for r in ridges) and len(shown) > 1:
            handles.append(Line2D([], [], color=color(REFERENCE), linestyle="--", linewidth=0.8))
            labels.append(f"{REFERENCE} (reference)")
        handles.append(Line2D([], [], color="black", linestyle=":", linewidth=0.9))
        labels.append(f"threshold ({threshold:g})")
        width, height = fig.get_size_inches()
        fig.set_size_inches(width + 1.3, height)  # room for the legend, outside the panels
        fig.legend(handles, labels, loc="outside right center", frameon=False)
        fig.suptitle(f"{detector}: logit distribution per precision "
                     "(one density scale for every ridge)")  # fmt: skip
    return fig
