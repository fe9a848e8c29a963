"""The distribution-shift figure: detector logits per precision, one panel per generator."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from qdd.report.palette import color, order_generators, order_precisions
from qdd.report.style import RC, new_figure


def density_curve(ax: Axes, values: np.ndarray, grid: np.ndarray, **style: object) -> None:
    """A Gaussian KDE; one value (or all equal) is drawn as a vertical marker instead."""
    from scipy.stats import gaussian_kde

    if len(np.unique(values)) < 2:
        ax.axvline(values[0], linestyle=":", linewidth=2, **style)
        return
    ax.plot(grid, gaussian_kde(values)(grid), linewidth=1.8, **style)


def plot_kde(scores: pd.DataFrame, detector: str, threshold: float = 0.0) -> Figure:
    """Per generator, a KDE of logits for each precision and for the real images."""
    import matplotlib.pyplot as plt

    fakes = scores[scores["label"] == 1]
    real = scores.loc[scores["label"] == 0, "logit"].to_numpy()
    generators = order_generators(fakes["generator"].dropna().unique()) or ["(no fakes)"]
    lo, hi = scores["logit"].min(), scores["logit"].max()
    pad = 0.1 * max(hi - lo, 1.0)
    grid = np.linspace(lo - pad, hi + pad, 400)
    fig, axes = new_figure(len(generators))
    with plt.rc_context(RC):
        for ax, generator in zip(axes[0], generators, strict=True):
            rows = fakes[fakes["generator"] == generator]
            for precision in order_precisions(rows["precision"].dropna().unique()):
                values = rows.loc[rows["precision"] == precision, "logit"].to_numpy()
                density_curve(ax, values, grid, color=color(precision), label=precision)
            if len(real):
                density_curve(ax, real, grid, color=color("real"), label="real")
                ax.lines[-1].set_linestyle("--")
            ax.axvline(threshold, color="black", linewidth=0.8, alpha=0.6)
            ax.set_title(generator)
            ax.set_xlabel("logit (> 0: fake)")
            ax.set_ylim(bottom=0)
        axes[0][0].set_ylabel("density")
        axes[0][-1].legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.suptitle(f"{detector}: detector scores by precision (threshold at {threshold:g})")
    return fig
