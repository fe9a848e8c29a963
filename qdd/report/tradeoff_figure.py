"""The trade-off figure: memory saved against detection, coloured by quality.

Precision labels crowd where formats of one size meet (fp4, nf4, mxfp4, nvfp4 all save
87.5 % of the nominal bits): points at one place get one label (``fp4, nf4``), and on the
figure's final layout each label takes the nearest free place around its point (a thin
line joins a label set farther off), so that no two labels overlap. A deterministic
search, not a force simulation: the same data gives the same figure on any host.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox

from qdd.report.palette import generator_style
from qdd.report.tradeoff import CMAP, KEEP_MEASURE, KEEP_SSIM, memory_saved

LABEL_SIZE = 7
#: A panel title listing the labels that found no room wraps at this many characters.
TITLE_CHARS = 70
#: Where a label may sit, tried in order: rings around its point (points), and on each
#: ring eight directions, nearest to the upper right first.
RINGS = (3, 8, 14, 22, 32, 44, 58, 74, 92, 112, 134)
DIRECTIONS = ((1, 1), (1, 0), (1, -1), (0, 1), (0, -1), (-1, 1), (-1, 0), (-1, -1))
#: Room kept around each label (points), so that labels never touch.
GAP = 1.0
#: Half the side of the box a marker (s=60 pt²) occupies, in points.
MARKER = 5.0


def _merged(points: list[tuple[float, float, str]]) -> dict[tuple[float, float], str]:
    """One label per distinct point: the names of coincident points joined."""
    merged: dict[tuple[float, float], list[str]] = {}
    for x, y, name in points:
        names = merged.setdefault((float(x), float(y)), [])
        if name not in names:
            names.append(name)
    return {xy: ", ".join(names) for xy, names in merged.items()}


def _box(px: float, py: float, ox: float, oy: float, w: float, h: float, d: tuple) -> Bbox:
    """The box of a w×h label offset by (ox, oy) from (px, py), on the side ``d`` points to."""
    left = px + ox - (0 if d[0] > 0 else w if d[0] < 0 else w / 2)
    bottom = py + oy - (0 if d[1] > 0 else h if d[1] < 0 else h / 2)
    return Bbox.from_bounds(left, bottom, w, h)


def place_labels(fig: Figure, ax: Axes, points: list[tuple[float, float, str]]) -> list[str]:
    """Label each point so that no two labels overlap, nor a label cover a marker; returns
    the labels that found no free place in the panel (none but in a crowded panel).

    Call it on the drawn figure (its layout solved; labels are kept out of the layout).
    Each label takes the first free place on rings around its point, with a thin line to
    the point when it sits off the nearest rings. Where every place is taken, a label may
    cover a marker, never another label.
    """
    renderer = fig.canvas.get_renderer()
    scale = fig.dpi / 72.0
    frame = ax.get_window_extent(renderer)
    labels = _merged(points)
    anchors = {xy: ax.transData.transform(xy) for xy in labels}
    half = MARKER * scale
    markers = [Bbox.from_extents(px - half, py - half, px + half, py + half)
               for px, py in anchors.values()]  # fmt: skip
    taken: list[Bbox] = []
    unplaced = []
    for (x, y), text in sorted(labels.items(), key=lambda item: (-item[0][1], item[0][0])):
        probe = ax.text(0, 0, text, fontsize=LABEL_SIZE)
        extent = probe.get_window_extent(renderer)
        probe.remove()
        px, py = anchors[(x, y)]
        choice = None
        for avoid_markers, ring, d in [
            (m, r, d) for m in (True, False) for r in RINGS for d in DIRECTIONS
        ]:
            norm = (d[0] ** 2 + d[1] ** 2) ** 0.5
            ox, oy = ring * scale * d[0] / norm, ring * scale * d[1] / norm
            box = _box(px, py, ox, oy, extent.width, extent.height, d).padded(GAP * scale)
            inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
            if not inside or any(box.overlaps(b) for b in taken):
                continue
            if avoid_markers and any(box.overlaps(m) for m in markers):
                continue
            choice = (ring, d, box)
            break
        if choice is None:
            unplaced.append(text)
            continue
        ring, d, box = choice
        taken.append(box)
        norm = (d[0] ** 2 + d[1] ** 2) ** 0.5
        ha = "left" if d[0] > 0 else "right" if d[0] < 0 else "center"
        va = "bottom" if d[1] > 0 else "top" if d[1] < 0 else "center"
        line = {"arrowstyle": "-", "color": "#777777", "lw": 0.5} if ring > RINGS[1] else None
        note = ax.annotate(text, (x, y), xytext=(ring * d[0] / norm, ring * d[1] / norm),
                           textcoords="offset points", fontsize=LABEL_SIZE, ha=ha, va=va,
                           arrowprops=line, annotation_clip=False)  # fmt: skip
        note.set_in_layout(False)  # placed after the layout, so it must not change it
    return unplaced


def panel_size(frame: pd.DataFrame) -> tuple[float, float]:
    """Room for the labels: 4-bit formats all save 87.5 % of the bits, so their points
    stack at one x; each panel grows with the largest stack and the number of points."""
    crowd = int(frame.groupby(frame["_saved"].round(1)).size().max()) if len(frame) else 0
    return (max(3.6, 2.4 + 0.06 * len(frame)), max(3.2, 1.4 + 0.2 * crowd))


def plot_tradeoff(table: pd.DataFrame, detector: str, reference: str = "fp32") -> Figure:
    """Memory saved (x) against the detector's fake accuracy and AUROC (two panels), one
    marker shape per generator, marker colour = SSIM against the reference twin (grey: not
    measured), each point labelled with its precision; a generator's precisions joined by
    a thin line. A generator without recorded denoiser bytes is placed by nominal bits and
    marked so in the legend."""
    import matplotlib as mpl
    from matplotlib.backends.backend_agg import FigureCanvasAgg
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
        xlabel = f"memory saved vs {reference} (%)"  # the title and legend say which is which
    placements = []
    with mpl.rc_context(RC):
        fig, axes = panel_grid(2, panel=panel_size(frame), max_cols=2)
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
            placements.append((ax, points))
        handles = [
            Line2D(
                [],
                [],
                ls="",
                marker=m,
                markerfacecolor="white",
                markeredgecolor="black",
                label=f"{g} (nominal bits)" if g in nominal and len(nominal) < len(styles) else g,
            )  # fmt: skip
            for g, (_, m) in styles.items()
        ]
        fig.legend(handles=handles, loc="outside lower center", ncols=max(1, len(handles)),
                   title="generator", frameon=False)  # fmt: skip
        bar = fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, shrink=0.9)
        grey = "\n(grey: not measured)" if frame["_ssim"].isna().any() else ""
        bar.set_label(f"{KEEP_MEASURE.upper()} vs {reference} twin{grey}")
        bar.ax.axhline(KEEP_SSIM, color="white", lw=1.5, label="_keeps quality")
        title = f"{detector}: what each precision saves, costs in quality, and hides"
        if nominal and len(nominal) == len(styles):
            title += "\n(denoiser bytes not recorded by these shards: nominal bits shown)"
        elif nominal:
            title += f"\n(denoiser bytes not recorded for {', '.join(nominal)}: nominal bits)"
        fig.suptitle(title)
        FigureCanvasAgg(fig)
        fig.canvas.draw()  # the constrained layout, and with it each panel's final size
        for ax, points in placements:
            unplaced = place_labels(fig, ax, points)
            if unplaced:
                note = f"no room to label {len(unplaced)} point(s): {'; '.join(unplaced)}"
                ax.set_title(textwrap.fill(note, TITLE_CHARS), fontsize=LABEL_SIZE)
    return fig
