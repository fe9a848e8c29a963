"""The paired view: each quantized image's logit against its full-precision twin.

Keys are shared across precisions (same prompt, same seed), so the shift a format causes
is measured image by image, not only as a change of averages. FP4 is paired with FP32;
without FP4 images the lowest-bit precision present stands in, and the title says so.
"""

from __future__ import annotations

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from qdd.report.palette import PRECISION_ORDER, bits, color, generator_style, order_generators
from qdd.report.style import RC, panel_grid

REFERENCE = "fp32"
TARGET = "fp4"


def pair_precision(scores: pd.DataFrame) -> str | None:
    """fp4 if present, else the fewest-bit precision present; None without fp32 fakes."""
    present = set(scores.loc[scores["label"] == 1, "precision"].dropna()) - {REFERENCE}
    if REFERENCE not in set(scores["precision"].dropna()) or not present:
        return None
    if TARGET in present:
        return TARGET
    rank = {p: i for i, p in enumerate(PRECISION_ORDER)}
    return min(present, key=lambda p: (bits(p) or 99, rank.get(p, len(rank)), p))


def paired_logits(scores: pd.DataFrame, precision: str) -> pd.DataFrame:
    """Rows (generator, key, fp32, <precision>) for keys that have both images."""
    fakes = scores[(scores["label"] == 1) & scores["precision"].isin([REFERENCE, precision])]
    if fakes.empty:
        return pd.DataFrame(columns=["generator", "key", REFERENCE, precision])
    wide = fakes.pivot_table(index=["generator", "key"], columns="precision", values="logit",
                             aggfunc="first")  # fmt: skip
    wide = wide.reindex(columns=[REFERENCE, precision])
    wide.columns.name = None
    return wide.dropna().reset_index()


def shift_table(scores: pd.DataFrame, detector: str, threshold: float = 0.0) -> pd.DataFrame:
    """Per generator: pairs, mean and s.e.m. of the logit shift, fakes turned "real"."""
    columns = ["detector", "generator", "precision", "pairs", "mean_shift", "sem_shift",
               "median_shift", "flipped_to_real", "flipped_to_fake"]  # fmt: skip
    precision = pair_precision(scores)
    if precision is None:
        return pd.DataFrame(columns=columns)
    pairs = paired_logits(scores, precision)
    rows = []
    for generator in order_generators(pairs["generator"].unique()):
        part = pairs[pairs["generator"] == generator]
        delta = part[precision] - part[REFERENCE]
        was_fake, is_fake = part[REFERENCE] > threshold, part[precision] > threshold
        rows.append({"detector": detector, "generator": generator, "precision": precision,
                     "pairs": len(part), "mean_shift": float(delta.mean()),
                     "sem_shift": float(delta.sem()) if len(part) > 1 else float("nan"),
                     "median_shift": float(delta.median()),
                     "flipped_to_real": int((was_fake & ~is_fake).sum()),
                     "flipped_to_fake": int((~was_fake & is_fake).sum())})  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def plot_paired(scores: pd.DataFrame, detector: str, threshold: float = 0.0) -> Figure | None:
    """Scatter of twin logits around the diagonal, and the mean shift per generator.

    Left: one point per key (one scatter collection per generator), the diagonal (no
    change) and the threshold on both axes; the corner of fakes the format turned "real"
    is shaded. Right: one bar per generator, the mean shift ± s.e.m. None without pairs.
    """
    precision = pair_precision(scores)
    if precision is None:
        return None
    pairs = paired_logits(scores, precision)
    if pairs.empty:
        return None
    generators = order_generators(pairs["generator"].unique())
    styles = generator_style(generators)
    shifts = shift_table(scores, detector, threshold).set_index("generator")
    fig, (scatter, bars) = panel_grid(2, panel=(3.7, 3.5))
    with mpl.rc_context(RC):
        values = np.concatenate([pairs[REFERENCE], pairs[precision], [threshold]])
        lo, hi = values.min(), values.max()
        pad = 0.06 * max(hi - lo, 1.0)
        lo, hi = lo - pad, hi + pad
        # A patch, not a collection: the axes' collections are the generators' scatters.
        corner = Rectangle((threshold, lo), hi - threshold, threshold - lo, linewidth=0,
                           color=color(precision), alpha=0.08, label="_flipped")  # fmt: skip
        scatter.add_patch(corner)
        scatter.text(hi, lo, "fake → real ", ha="right", va="bottom", fontsize=8,
                     color=color(precision))  # fmt: skip
        scatter.plot([lo, hi], [lo, hi], color="black", linewidth=0.8, label="_diagonal")
        scatter.axhline(threshold, color="grey", linewidth=0.7, linestyle=":", label="_threshold")
        scatter.axvline(threshold, color="grey", linewidth=0.7, linestyle=":", label="_threshold")
        for generator in generators:
            rows = pairs[pairs["generator"] == generator]
            colour, marker = styles[generator]
            scatter.scatter(rows[REFERENCE], rows[precision], s=14, alpha=0.7, marker=marker,
                            color=colour, linewidths=0, label=generator)  # fmt: skip
        scatter.set_xlim(lo, hi)
        scatter.set_ylim(lo, hi)
        scatter.set_aspect("equal", adjustable="box")
        scatter.set_xlabel(f"logit of the {REFERENCE.upper()} image")
        scatter.set_ylabel(f"logit of its {precision.upper()} twin")
        scatter.set_title("each point: one prompt and seed")
        scatter.legend(loc="best", frameon=False, fontsize=8, handletextpad=0.2)

        means = shifts["mean_shift"].reindex(generators).to_numpy(dtype=float)
        errors = np.nan_to_num(shifts["sem_shift"].reindex(generators).to_numpy(dtype=float))
        x = np.arange(len(generators))
        bars.bar(x, means, yerr=errors, capsize=3, width=0.65, color=color(precision),
                 error_kw={"linewidth": 1.0})  # fmt: skip
        bars.axhline(0, color="black", linewidth=0.8)
        for i, generator in enumerate(generators):
            flipped = int(shifts.loc[generator, "flipped_to_real"])
            n = int(shifts.loc[generator, "pairs"])
            end = means[i] - errors[i] if means[i] < 0 else means[i] + errors[i]
            mean = (f"{means[i]:+.2f}" if abs(means[i]) >= 0.1 else f"{means[i]:+.2g}").replace(
                "-", "\N{MINUS SIGN}"
            )
            bars.annotate(f"{mean}\n{flipped}/{n} → real", (x[i], end),
                          xytext=(0, -3 if means[i] < 0 else 3), textcoords="offset points",
                          ha="center", va="top" if means[i] < 0 else "bottom",
                          fontsize=7.5)  # fmt: skip
        bars.margins(y=0.25)
        bars.set_xlim(-0.8, len(generators) - 0.2)
        bars.set_xticks(x, generators, rotation=30, ha="right", rotation_mode="anchor")
        bars.set_ylabel(f"mean logit shift, {precision} − {REFERENCE}")
        bars.set_title("per generator (± s.e.m.)")
        title = f"{detector}: {precision.upper()} vs {REFERENCE.upper()} twins ({len(pairs)} pairs)"
        if precision != TARGET:
            title += f"\nno FP4 images: {precision.upper()} is the lowest-bit precision present"
        fig.suptitle(title)
    return fig
