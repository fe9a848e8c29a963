"""Generator × precision heatmaps of one metric, one panel per detector, one colour scale.

Every panel maps [0, 1] to the same colours, so a cell in one panel can be compared with
a cell in another by colour alone; the values are printed in the cells as well.
"""

from __future__ import annotations

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from qdd.report.palette import order_generators, order_precisions
from qdd.report.style import RC, panel_grid

LABELS = {"fake_acc": "fake accuracy", "auroc": "AUROC (fakes vs real images)",
          "balanced_acc": "balanced accuracy", "ap": "average precision",
          "real_acc": "real accuracy", "acc": "accuracy",
          "tpr_at_fpr1": "TPR at 1 % FPR", "tpr_at_fpr5": "TPR at 5 % FPR"}  # fmt: skip
CMAP = "viridis"
MISSING = "#e4e4e4"


def metric_grid(
    table: pd.DataFrame, detector: str, metric: str, generators: list[str], precisions: list[str]
) -> np.ndarray:
    """The detector's values as a generators × precisions array, NaN where not measured."""
    rows = table[table["detector"] == detector]
    if metric not in rows.columns:
        return np.full((len(generators), len(precisions)), np.nan)
    grid = rows.pivot_table(index="generator", columns="precision", values=metric,
                            aggfunc="first", dropna=False)  # fmt: skip
    return grid.reindex(index=generators, columns=precisions).to_numpy(dtype=float)


def plot_heatmap(table: pd.DataFrame, metric: str) -> Figure:
    """One annotated panel per detector (rows: generators, columns: precisions).

    The colour scale is fixed to [0, 1] and shared by one colour bar; cells a detector
    was not run on are light grey with a dash.
    """
    detectors = sorted(table["detector"].unique())
    generators = order_generators(table["generator"].unique())
    precisions = order_precisions(table["precision"].unique())
    panel = (0.52 * len(precisions) + 1.5, 0.38 * len(generators) + 1.2)
    fig, axes = panel_grid(len(detectors), panel=panel, max_cols=2)
    cmap = mpl.colormaps[CMAP]
    with mpl.rc_context(RC):
        image = None
        for ax, detector in zip(axes, detectors, strict=True):
            values = metric_grid(table, detector, metric, generators, precisions)
            image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=1,
                              aspect="auto", interpolation="nearest")  # fmt: skip
            ax.set_facecolor(MISSING)
            for (i, j), value in np.ndenumerate(values):
                if np.isnan(value):
                    ax.text(j, i, "–", ha="center", va="center", color="#555555", fontsize=9)
                    continue
                r, g, b, _ = cmap(value)
                shade = "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white"
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", color=shade, fontsize=9)
            ax.set_xticks(range(len(precisions)), precisions, rotation=45, ha="right",
                          rotation_mode="anchor")  # fmt: skip
            ax.set_yticks(range(len(generators)), generators)
            ax.tick_params(length=0)
            ax.spines[:].set_visible(False)
            ax.set_title(detector)
        label = LABELS.get(metric, metric)
        bar = fig.colorbar(image, ax=axes, shrink=0.85, aspect=25, pad=0.02)
        bar.set_label(label)
        bar.outline.set_visible(False)
        fig.suptitle(f"{label} per generator × precision  (– : not measured)")
    return fig
