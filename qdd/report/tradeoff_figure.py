"""The trade-off figure: memory saved against detection, coloured by quality.

Precision labels crowd where formats of one size meet (fp4, nf4, mxfp4, nvfp4 all save
87.5 % of the nominal bits): points at one place get one label (``fp4, nf4``), and the
labels are then moved apart by adjustText, on the figure's final layout, until no two
overlap (a thin line joins a moved label to its point).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.text import Text

from qdd.report.palette import generator_style
from qdd.report.tradeoff import CMAP, KEEP_MEASURE, KEEP_SSIM, memory_saved

#: adjustText's iteration cap: a fixed count (not its default time limit) keeps the figure
#: the same on a fast and a loaded host.
LABEL_ITERATIONS = 500
LABEL_SIZE = 7


def _labels(ax: Axes, points: list[tuple[float, float, str]]) -> list[Text]:
    """One text per distinct point (names of coincident points joined), in data coords."""
    merged: dict[tuple[float, float], list[str]] = {}
    for x, y, name in points:
        names = merged.setdefault((round(x, 6), round(y, 6)), [])
        if name not in names:
            names.append(name)
    texts = []
    for (x, y), names in merged.items():
        text = ax.text(x, y, ", ".join(names), fontsize=LABEL_SIZE, ha="left", va="bottom")
        text.set_in_layout(False)  # placed after the layout, so it must not change it
        texts.append(text)
    return texts


def place_labels(fig: Figure, placements: list[tuple[Axes, list[Text], np.ndarray]]) -> None:
    """Solve the figure's layout, then move each panel's labels apart (adjustText)."""
    from adjustText import adjust_text
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.canvas.draw()  # the constrained layout, and with it each panel's final size
    for ax, texts, xy in placements:
        if not texts:
            continue
        adjust_text(
            texts,
            x=xy[:, 0],
            y=xy[:, 1],
            ax=ax,
            iter_lim=LABEL_ITERATIONS,
            expand=(1.1, 1.3),
            arrowprops={"arrowstyle": "-", "color": "#777777", "lw": 0.5},
        )


def plot_tradeoff(table: pd.DataFrame, detector: str, reference: str = "fp32") -> Figure:
    """Memory saved (x) against the detector's fake accuracy and AUROC (two panels), one
    marker shape per generator, marker colour = SSIM against the reference twin (grey: not
    measured), each point labelled with its precision; a generator's precisions joined by
    a thin line. A generator without recorded denoiser bytes is placed by nominal bits and
    marked so in the legend."""
    import matplotlib as mpl
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D

    from qdd.report.style import RC, panel_grid

    saved, measured = memory_saved(table, reference)
    frame = table.assign(_saved=saved * 100, _measured=measured)
    frame = frame[frame[f"{detector}_fake_acc"].notna() & frame["_saved"].notna()]
    quality = frame[KEEP_MEASURE].where(frame["precision"] != reference, 1.0)  # its own twin
    frame = frame.assign(_ssim=quality.astype(float))
    finite = frame["_ssim"].dropna()
    low = min(float(finite.min()), KEEP_SSIM - 0.05) if len(finite) else 0.0
    norm, cmap = Normalize(vmin=max(0.0, low), vmax=1.0), mpl.colormaps[CMAP]
    styles = generator_style(frame["generator"].unique())
    nominal = [g for g in styles if not frame.loc[frame["generator"] == g, "_measured"].all()]
    metrics = (
        ("fake_acc", "fake accuracy\n(lower: evades more)"),
        ("auroc", "AUROC\n(lower: evades more)"),
    )
    if not nominal:
        xlabel = f"denoiser memory saved vs {reference} (%)"
    elif len(nominal) == len(styles):
        xlabel = f"nominal weight bits saved vs {reference} (%)"
    else:
        xlabel = f"memory saved vs {reference} (%): bytes, or nominal bits where marked"
    placements = []
    with mpl.rc_context(RC):
        fig, axes = panel_grid(2, panel=(3.6, 3.2), max_cols=2)
        for ax, (metric, label) in zip(axes, metrics, strict=True):
            points = []
            for generator, part in frame.groupby("generator", sort=False):
                part = part.sort_values("_saved")
                colour, marker = styles[generator]
                values = part[f"{detector}_{metric}"].astype(float)
                ax.plot(part["_saved"], values, color="#BBBBBB", lw=0.8, zorder=1,
                        label=f"_{generator} path")  # fmt: skip
                faces = [cmap(norm(s)) if np.isfinite(s) else "#DDDDDD" for s in part["_ssim"]]
                ax.scatter(part["_saved"], values, c=faces, marker=marker, s=60,
                           edgecolors="black", linewidths=0.6, zorder=2,
                           label=generator)  # fmt: skip
                points += list(zip(part["_saved"], values, part["precision"], strict=True))
            ax.set_ylim(-0.05, 1.05)
            ax.set_xlim(-5, 100)
            ax.set_ylabel(label)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3, lw=0.5)
            xy = np.array([(x, y) for x, y, _ in points], dtype=float).reshape(-1, 2)
            placements.append((ax, _labels(ax, points), xy))
        handles = [
            Line2D([], [], ls="", marker=m, markerfacecolor="white", markeredgecolor="black",
                   label=f"{g} (nominal bits)" if g in nominal and len(nominal) < len(styles)
                   else g)  # fmt: skip
            for g, (_, m) in styles.items()
        ]
        fig.legend(handles=handles, loc="outside lower center", ncols=max(1, len(handles)),
                   title="generator", frameon=False)  # fmt: skip
        bar = fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, shrink=0.9)
        grey = " (grey: not measured)" if frame["_ssim"].isna().any() else ""
        bar.set_label(f"{KEEP_MEASURE.upper()} vs {reference} twin{grey}")
        bar.ax.axhline(KEEP_SSIM, color="white", lw=1.5, label="_keeps quality")
        title = f"{detector}: what each precision saves, costs in quality, and hides"
        if nominal and len(nominal) == len(styles):
            title += "\n(denoiser bytes not recorded by these shards: nominal bits shown)"
        elif nominal:
            title += f"\n(denoiser bytes not recorded for {', '.join(nominal)}: nominal bits)"
        fig.suptitle(title)
        place_labels(fig, placements)
    return fig
