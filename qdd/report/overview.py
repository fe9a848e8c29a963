"""The study's question in one figure: which detectors, which families, hold as bits drop.

One panel per generator (rows) and metric (columns: fake accuracy, AUROC), precision along
x (palette order, the denoiser × decoder swaps left to their own view), one line per
detector: the marker says its family, the colour the detector (`qdd.report.families`),
and the legend lists them family by family. Lines are shifted a little sideways so that
detectors with equal values (all at 1.0 on FP32, say) stay visible. The figure grows with
the number of precisions and generators, never squeezing them.
"""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from qdd.report.families import detector_styles
from qdd.report.heatmap import LABELS
from qdd.report.palette import order_generators, order_precisions
from qdd.report.runs import NONE
from qdd.report.style import RC
from qdd.report.swap import VAE_LABEL

ROWS = ("fake_acc", "auroc")
#: The widest sideways spread of one precision's markers (in steps of the x axis).
SPREAD = 0.5


def offsets(n: int) -> np.ndarray:
    """Sideways shifts of ``n`` lines, centred on 0, at most `SPREAD` from first to last."""
    step = min(0.06, SPREAD / max(n - 1, 1))
    return (np.arange(n) - (n - 1) / 2) * step


def plot_overview(table: pd.DataFrame, lined_up: Mapping[str, str]) -> Figure | None:
    """Metric against precision per generator, one line per detector of ``lined_up``
    (report name → family, in the order to list them); None without unperturbed fakes."""
    rows = table[(table["perturbation"] == NONE) & table["detector"].isin(list(lined_up))]
    rows = rows[rows["precision"].astype(str).str.match(VAE_LABEL) == False]  # noqa: E712
    if rows.empty:
        return None
    generators = order_generators(rows["generator"].unique())
    precisions = order_precisions(rows["precision"].unique())
    detectors = [d for d in lined_up if d in set(rows["detector"])]
    styles = detector_styles({d: lined_up[d] for d in detectors})
    shift = dict(zip(detectors, offsets(len(detectors)), strict=True))
    metrics = [m for m in ROWS if m in rows.columns and rows[m].notna().any()]
    if not metrics:
        return None
    width = max(3.2, 0.38 * len(precisions) + 1.0)
    with mpl.rc_context(RC):
        # generators down, metrics across: the figure grows downwards with generators and
        # stays printable across (two panels wide)
        fig = Figure(figsize=(width * len(metrics) + 2.4, 2.5 * len(generators) + 1.6),
                     layout="constrained")  # fmt: skip
        axes = fig.subplots(len(generators), len(metrics), squeeze=False, sharex=True,
                            sharey="col")  # fmt: skip
        x = np.arange(len(precisions))
        for row, generator in enumerate(generators):
            part = rows[rows["generator"] == generator]
            for column, metric in enumerate(metrics):
                ax = axes[row, column]
                for detector in detectors:
                    values = part[part["detector"] == detector].set_index("precision")[metric]
                    y = values.reindex(precisions).to_numpy(dtype=float)
                    colour, marker, linestyle = styles[detector]
                    ax.plot(x + shift[detector], y, color=colour, marker=marker,
                            linestyle=linestyle, markersize=4, linewidth=1.2,
                            label=detector)  # fmt: skip
                ax.set_xticks(x, precisions, rotation=45, ha="right", rotation_mode="anchor")
                ax.tick_params(labelbottom=row == len(generators) - 1)
                ax.set_ylim(-0.03 if metric != "auroc" else 0.0, 1.03)
                ax.grid(axis="y", alpha=0.3, linewidth=0.5)
                if metric == "auroc":
                    ax.axhline(0.5, color="#999999", linewidth=0.8, linestyle=":")
                ax.set_ylabel(LABELS.get(metric, metric).split(" (")[0])
                ax.set_title(generator)
        handles = [
            Line2D([], [], color=styles[d][0], marker=styles[d][1], linestyle=styles[d][2],
                   markersize=5, label=f"{d} ({lined_up[d]})")
            for d in detectors
        ]  # fmt: skip
        fig.legend(handles=handles, loc="outside right center", frameon=False,
                   title="detector (family)\nmarker = family")  # fmt: skip
        fig.suptitle("Which detectors hold as precision drops: each generator's fakes against "
                     "the real images\n(unperturbed; AUROC 0.5 dotted = chance; intervals in "
                     "tables/groups)")  # fmt: skip
    return fig
