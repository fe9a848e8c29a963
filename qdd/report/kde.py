"""The distribution-shift figure: detector logits per precision, one panel per generator.

Each panel overlays one density per precision (palette colours) on the real images'
density (grey, dashed) with the decision threshold marked, so a reader sees how far a
format pushes fakes towards — or past — the threshold.
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


def density_curve(ax: Axes, values: np.ndarray, grid: np.ndarray, **style: object) -> Line2D:
    """A Gaussian KDE; fewer than two distinct values become a short vertical marker.

    `gaussian_kde` needs spread (its covariance is singular otherwise), so one image or
    constant logits are drawn where they are instead of being estimated.
    """
    from scipy.stats import gaussian_kde

    values = values[np.isfinite(values)]
    if len(np.unique(values)) < 2:
        where = values[0] if len(values) else np.nan
        return ax.axvline(where, ymax=0.35, linewidth=3.0, solid_capstyle="butt", **style)
    (line,) = ax.plot(grid, gaussian_kde(values)(grid), linewidth=1.8, **style)
    return line


def logit_grid(logits: np.ndarray, threshold: float) -> np.ndarray:
    """x values covering every logit and the threshold, with a margin for the tails."""
    finite = logits[np.isfinite(logits)]
    lo = min(finite.min(), threshold) if len(finite) else threshold - 1
    hi = max(finite.max(), threshold) if len(finite) else threshold + 1
    pad = 0.1 * max(hi - lo, 1.0)
    return np.linspace(lo - pad, hi + pad, GRID_POINTS)


def plot_kde(scores: pd.DataFrame, detector: str, threshold: float = 0.0) -> Figure:
    """Per generator, a KDE of logits for each precision, and the real images as reference.

    Panels are titled by generator; in each, the curves are labelled by precision in
    palette order, then ``real``; the threshold line is labelled ``_threshold``.
    """
    fakes = scores[scores["label"] == 1]
    real = scores.loc[scores["label"] == 0, "logit"].to_numpy(dtype=float)
    generators = order_generators(fakes["generator"].dropna().unique())
    grid = logit_grid(scores["logit"].to_numpy(dtype=float), threshold)
    fig, axes = panel_grid(len(generators), sharex=True)
    shown: set[str] = set()
    with mpl.rc_context(RC):
        for ax, generator in zip(axes, generators or ["no fake images"], strict=True):
            rows = fakes[fakes["generator"] == generator]
            for precision in order_precisions(rows["precision"].dropna().unique()):
                values = rows.loc[rows["precision"] == precision, "logit"].to_numpy(dtype=float)
                density_curve(ax, values, grid, color=color(precision), label=precision)
                shown.add(precision)
            if len(real):  # listed last, drawn beneath the fakes: the reference
                density_curve(ax, real, grid, color=color("real"), linestyle="--", label="real",
                              zorder=1.5)  # fmt: skip
            ax.axvline(threshold, color="black", linewidth=0.9, linestyle=":", label="_threshold")
            ax.set_title(generator)
            ax.set_ylim(bottom=0)
            ax.set_xlim(grid[0], grid[-1])
        for ax in axes:
            if ax.get_subplotspec().is_last_row():
                ax.set_xlabel("logit (> threshold: fake)")
            if ax.get_subplotspec().is_first_col():
                ax.set_ylabel("density")
        handles = [Line2D([], [], color=color(p), linewidth=1.8) for p in order_precisions(shown)]
        labels = order_precisions(shown)
        if len(real):
            handles.append(Line2D([], [], color=color("real"), linestyle="--", linewidth=1.8))
            labels.append("real")
        handles.append(Line2D([], [], color="black", linestyle=":", linewidth=0.9))
        labels.append(f"threshold ({threshold:g})")
        width, height = fig.get_size_inches()
        fig.set_size_inches(width + 1.2, height)  # room for the legend, outside the panels
        fig.legend(handles, labels, loc="outside right center", frameon=False)
        fig.suptitle(f"{detector}: logit distribution per precision (real images: {len(real)})")
    return fig
