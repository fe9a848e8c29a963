"""Generator × precision heatmaps of one metric, one panel per detector (and perturbation).

Each cell shows the value, its 95 % interval and the number of fake images; all panels of a
figure share one colour scale. Accuracies map [0, 1] linearly. Ranking metrics (AUROC,
AP) map [0.5, 1] with 0.9 at the middle of the colour bar, so that the differences between
good detectors (0.90–1.00) are visible and not one flat colour; the range is written on
the colour bar. Cells whose generator had less than `LOW_FRACTION` of its quantized
components' parameters quantized are marked: a "4-bit" SD1.5 is mostly half precision.
"""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, Normalize, TwoSlopeNorm
from matplotlib.figure import Figure

from qdd.report.palette import order_generators, order_precisions
from qdd.report.runs import NONE
from qdd.report.style import RC, bar_aspect, panel_grid

LABELS = {"fake_acc": "fake accuracy", "auroc": "AUROC (fakes vs real images)",
          "balanced_acc": "balanced accuracy", "ap": "average precision",
          "real_acc": "real accuracy", "acc": "accuracy", "acc_calibrated":
          "accuracy at the calibrated threshold",
          "tpr_at_fpr1": "TPR at 1 % FPR", "tpr_at_fpr5": "TPR at 5 % FPR"}  # fmt: skip
#: Metrics whose differences matter near 1: three decimals and a stretched top of the scale.
RANKING = ("auroc", "ap")
#: Precisions that quantize nothing.
UNQUANTIZED = ("fp32", "fp16")
#: Quantized share below which a cell is marked.
LOW_FRACTION = 0.5
LOW_MARK = "▼"
CMAP = "viridis"
#: Widest figure (inches) that still reads when scaled to a page or screen width.
MAX_WIDTH = 18.0
MISSING = "#e4e4e4"


def digits(metric: str) -> int:
    return 3 if metric in RANKING else 2


def norm_for(metric: str) -> Normalize:
    """[0, 1] for accuracies; [0.5, 1] with 0.9 in the middle for AUROC and AP."""
    if metric in RANKING:
        return TwoSlopeNorm(vmin=0.5, vcenter=0.9, vmax=1.0)
    return Normalize(vmin=0.0, vmax=1.0)


def scale_note(metric: str) -> str:
    """The colour bar's statement of its range."""
    if metric in RANKING:
        return "colour: 0.5–1.0, 0.9–1.0 is the upper half; below 0.5 as 0.5"
    return "colour: 0–1, linear"


def metric_grid(
    table: pd.DataFrame, column: str, generators: list[str], precisions: list[str]
) -> np.ndarray:
    """``column`` of one panel's rows as a generators × precisions array, NaN where absent."""
    if column not in table.columns or table.empty:
        return np.full((len(generators), len(precisions)), np.nan)
    grid = table.pivot_table(index="generator", columns="precision", values=column,
                             aggfunc="first", dropna=False)  # fmt: skip
    return grid.reindex(index=generators, columns=precisions).to_numpy(dtype=float)


def low_fraction(table: pd.DataFrame, generators: list[str], precisions: list[str]) -> np.ndarray:
    """True where a quantized precision left most of the scoped parameters unquantized."""
    fraction = metric_grid(table, "quant_fraction", generators, precisions)
    quantized = np.array([p not in UNQUANTIZED for p in precisions])[None, :]
    return quantized & (fraction < LOW_FRACTION)  # NaN (not recorded) compares False


def has_low_fraction(table: pd.DataFrame) -> bool:
    """Whether any quantized cell of ``table`` is marked as under `LOW_FRACTION`."""
    if table.empty:
        return False
    quantized = ~table["precision"].isin(UNQUANTIZED)
    return bool((quantized & (table["quant_fraction"] < LOW_FRACTION)).any())


def text_colour(cmap: Colormap, norm: Normalize, value: float) -> str:
    """Black on light cells, white on dark ones (the cell colour's relative luminance)."""
    r, g, b, _ = cmap(norm(value))
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white"


def label_grid(ax: Axes, generators: list[str], precisions: list[str]) -> None:
    """Precisions along x (slanted), generators along y; no tick marks, no frame."""
    ax.set_xticks(range(len(precisions)), precisions, rotation=45, ha="right",
                  rotation_mode="anchor")  # fmt: skip
    ax.set_yticks(range(len(generators)), generators)
    ax.tick_params(length=0)
    ax.spines[:].set_visible(False)


def cell_text(value: float, lo: float, hi: float, n: float, metric: str) -> str:
    d = digits(metric)
    text = f"{value:.{d}f}"
    if np.isfinite(lo):
        text += f"\n[{lo:.{d}f}, {hi:.{d}f}]"
    return text + (f"\nn={int(n)}" if np.isfinite(n) else "")


def real_note(rows: pd.DataFrame) -> str:
    """The real images' accuracy (the same for every cell of a panel), for the panel title."""
    if rows.empty or rows["real_acc"].isna().all():
        return ""
    first = rows.iloc[0]
    return (f"\nreal acc {first['real_acc']:.2f} [{first['real_acc_lo']:.2f}, "
            f"{first['real_acc_hi']:.2f}], n={int(first['n_real'])}")  # fmt: skip


def plot_heatmap(
    table: pd.DataFrame,
    metric: str,
    perturbations: list[str] | None = None,
    lined_up: Mapping[str, str] | None = None,
) -> Figure:
    """One annotated panel per detector (rows: generators, columns: precisions).

    ``lined_up`` (report name → family, `qdd.report.families.lineup`) orders the panels
    family by family and names each panel's family; without it, detectors go by name.
    With several ``perturbations`` (one detector's, as the report draws them) the panels
    go perturbation by perturbation. Cells a detector was not run on are light grey with
    a dash. Panels are as wide as their precisions need; the figure keeps to two columns,
    and to one where two would be wider than `MAX_WIDTH`.
    """
    perturbations = perturbations or [NONE]
    table = table[table["perturbation"].isin(perturbations)]
    present = set(table["detector"].unique())
    detectors = [d for d in lined_up if d in present] if lined_up else sorted(present)
    detectors += sorted(present - set(detectors))
    generators = order_generators(table["generator"].unique())
    precisions = order_precisions(table["precision"].unique())
    panels = [(p, d) for p in perturbations for d in detectors]
    size = (0.95 * len(precisions) + 1.6, 0.62 * len(generators) + 1.5)
    max_cols = max(1, min(2, int(MAX_WIDTH // size[0])))
    fig, axes = panel_grid(len(panels), panel=size, max_cols=max_cols)
    cmap, norm = mpl.colormaps[CMAP], norm_for(metric)
    missing = marked = False
    with mpl.rc_context(RC):
        image = None
        for ax, (perturbation, detector) in zip(axes, panels, strict=True):
            rows = table[(table["detector"] == detector) & (table["perturbation"] == perturbation)]
            values = metric_grid(rows, metric, generators, precisions)
            lo = metric_grid(rows, f"{metric}_lo", generators, precisions)
            hi = metric_grid(rows, f"{metric}_hi", generators, precisions)
            n = metric_grid(rows, "n_fake", generators, precisions)
            low = low_fraction(rows, generators, precisions)
            image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto",
                              interpolation="nearest")  # fmt: skip
            ax.set_facecolor(MISSING)
            for (i, j), value in np.ndenumerate(values):
                if np.isnan(value):
                    missing = True
                    ax.text(j, i, "–", ha="center", va="center", color="#555555", fontsize=9)
                    continue
                shade = text_colour(cmap, norm, value)
                ax.text(j, i, cell_text(value, lo[i, j], hi[i, j], n[i, j], metric),
                        ha="center", va="center", color=shade, fontsize=7,
                        linespacing=1.1)  # fmt: skip
                if low[i, j]:
                    marked = True
                    ax.text(j + 0.46, i - 0.44, LOW_MARK, ha="right", va="top", color=shade,
                            fontsize=6, gid="low_fraction")  # fmt: skip
            label_grid(ax, generators, precisions)
            name = detector if perturbation == NONE else f"{detector} · {perturbation}"
            if len(perturbations) > 1 and perturbation == NONE:
                name += " · none"
            if lined_up and detector in lined_up:
                name += f" ({lined_up[detector]})"
            ax.set_title(name + (real_note(rows) if metric != "auroc" else ""), fontsize=9)
        label = LABELS.get(metric, metric)
        bar = fig.colorbar(image, ax=axes, shrink=0.85, aspect=bar_aspect(fig, 0.85), pad=0.02,
                           extend="min" if metric in RANKING else "neither")  # fmt: skip
        if metric in RANKING:
            bar.set_ticks([0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0])
        bar.set_label(f"{label}\n({scale_note(metric)})")
        bar.outline.set_visible(False)
        interval = "bootstrap" if metric in ("auroc", "balanced_acc") else "Wilson"
        has_interval = f"{metric}_lo" in table.columns
        notes = [f"cells: value, 95 % {interval} interval, n fakes" if has_interval
                 else "cells: value, n fakes"]  # fmt: skip
        if missing:
            notes.append("–: not measured")
        if marked:
            notes.append(f"{LOW_MARK}: under {LOW_FRACTION:.0%} of the scoped parameters quantized")
        fig.suptitle(f"{label} per generator × precision\n" + "\n".join(notes))
    return fig
