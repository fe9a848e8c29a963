"""Matplotlib set-up shared by every figure: Agg, print-readable sizes, reproducible files."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

RC = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "svg.hashsalt": "qdd",  # stable element ids: the same data gives the same SVG
    "svg.fonttype": "none",
}


def new_figure(ncols: int, nrows: int = 1, panel: tuple[float, float] = (3.6, 2.8)) -> tuple:
    with plt.rc_context(RC):
        fig, axes = plt.subplots(
            nrows, ncols, figsize=(panel[0] * ncols, panel[1] * nrows), squeeze=False,
            layout="constrained",
        )  # fmt: skip
    return fig, axes


def save(fig: Figure, out: Path, stem: str) -> list[Path]:
    """PNG (200 dpi) and SVG, without dates or version stamps so reruns are identical."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    with plt.rc_context(RC):
        for suffix, metadata in ((".png", {"Software": None}), (".svg", {"Date": None})):
            path = out / f"{stem}{suffix}"
            fig.savefig(path, dpi=200, metadata=metadata)
            paths.append(path)
    plt.close(fig)
    return paths
