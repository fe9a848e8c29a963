"""Matplotlib set-up shared by every figure: no GUI, print-readable sizes, stable files.

Figures are built with `matplotlib.figure.Figure`, never through pyplot: nothing touches the
user's backend or pyplot's global figure list, and saving renders with Agg (PNG) and the
SVG backend. The same data always gives byte-identical files.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib as mpl
from matplotlib.axes import Axes
from matplotlib.figure import Figure

#: Sizes in points at the figure's own size; panels are ~3 in wide, so a figure printed at
#: page width keeps text at 7 pt or more.
RC = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "figure.titlesize": 12,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "svg.hashsalt": "qdd",  # stable element ids: the same data gives the same SVG
    "svg.fonttype": "none",  # text stays text: searchable, editable, small
    "path.simplify": False,
}
DPI = 200


def columns_for(n: int, max_cols: int = 3) -> int:
    """A near-square grid: 4 panels as 2×2, 7 as 3+3+1, never wider than ``max_cols``."""
    return n if n <= max_cols else min(max_cols, math.ceil(math.sqrt(n)))


def panel_grid(
    n: int, panel: tuple[float, float] = (3.2, 2.5), max_cols: int = 3, **subplots: object
) -> tuple[Figure, list[Axes]]:
    """A figure of ``n`` panels in rows of at most ``max_cols``; unused cells are removed."""
    ncols = columns_for(max(n, 1), max_cols)
    nrows = math.ceil(max(n, 1) / ncols)
    with mpl.rc_context(RC):
        fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
        grid = fig.subplots(nrows, ncols, squeeze=False, **subplots)
    axes = list(grid.flat)
    for ax in axes[max(n, 1) :]:
        fig.delaxes(ax)
    return fig, axes[: max(n, 1)]


def bar_aspect(fig: Figure, shrink: float, width: float = 0.2) -> float:
    """The colour-bar aspect (length / width) that keeps a bar spanning ``shrink`` of the
    figure's height ``width`` inches wide: a bar beside ten rows of panels must not grow
    wide and take their room."""
    return max(10.0, shrink * fig.get_size_inches()[1] / width)


def save(fig: Figure, out: Path, stem: str) -> list[Path]:
    """``stem``.png (200 dpi) and ``stem``.svg, without dates or version stamps."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    with mpl.rc_context(RC):
        for suffix, metadata in (
            (".png", {"Software": None}),
            (".svg", {"Date": None, "Creator": None}),
        ):
            path = out / f"{stem}{suffix}"
            fig.savefig(path, dpi=DPI, metadata=metadata)
            paths.append(path)
            # The layout is solved once, for the PNG; the SVG reuses it (the slow part of
            # saving text-heavy figures is constrained layout measuring every label).
            fig.set_layout_engine("none")
    return paths
