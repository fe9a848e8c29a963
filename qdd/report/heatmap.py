"""Generator × precision heatmaps of one metric, one panel per detector, one colour scale."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from qdd.report.palette import order_generators, order_precisions
from qdd.report.style import RC, new_figure

LABELS = {"fake_acc": "fake accuracy", "auroc": "AUROC vs real images",
          "balanced_acc": "balanced accuracy", "ap": "average precision"}  # fmt: skip


def plot_heatmap(table: pd.DataFrame, metric: str) -> Figure:
    """Cells annotated with values; missing cells hatched; the colour scale fixed to [0, 1]."""
    import matplotlib.pyplot as plt

    detectors = sorted(table["detector"].unique())
    generators = order_generators(table["generator"].unique())
    precisions = order_precisions(table["precision"].unique())
    panel = (0.75 * len(precisions) + 1.6, 0.5 * len(generators) + 1.4)
    fig, axes = new_figure(len(detectors), panel=panel)
    with plt.rc_context(RC):
        image = None
        for ax, detector in zip(axes[0], detectors, strict=True):
            rows = table[table["detector"] == detector]
            grid = rows.pivot_table(
                index="generator", columns="precision", values=metric, aggfunc="first"
            ).reindex(index=generators, columns=precisions)
            values = grid.to_numpy(dtype=float)
            image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0, vmax=1,
                              aspect="auto")  # fmt: skip
            ax.set_facecolor("#dddddd")
            for (i, j), value in np.ndenumerate(values):
                text = "–" if np.isnan(value) else f"{value:.2f}"
                shade = "black" if np.isnan(value) or value > 0.6 else "white"
                ax.text(j, i, text, ha="center", va="center", color=shade, fontsize=9)
            ax.set_xticks(range(len(precisions)), precisions, rotation=45, ha="right")
            ax.set_yticks(range(len(generators)), generators)
            ax.spines[:].set_visible(False)
            ax.set_title(detector)
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.9, label=LABELS.get(metric, metric))
    return fig
