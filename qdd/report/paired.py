"""The paired view: each lower-precision image's logit against its full-precision twin.

Keys are shared across precisions (same prompt, same seed), so the shift a format causes
is measured image by image, not only as a change of averages. Every precision below FP32
(fp16, fp8, fp4, …) gets its own scatter panel against FP32; one bar panel below gives the
mean shift per precision and generator (bars in the generator's colour) with the flips in
both directions: fakes the format turned "real" (↓) and the ones it turned "fake" (↑).
"""

from __future__ import annotations

import math

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from qdd.report.palette import generator_style, order_generators, order_precisions
from qdd.report.style import RC

REFERENCE = "fp32"
#: Scatter panels per row.
MAX_COLS = 3


def lower_precisions(scores: pd.DataFrame) -> list[str]:
    """Fake precisions other than fp32, in palette order; empty without fp32 fakes."""
    present = set(scores.loc[scores["label"] == 1, "precision"].dropna())
    if REFERENCE not in present:
        return []
    return order_precisions(present - {REFERENCE, "unknown"})


def paired_logits(scores: pd.DataFrame, precision: str) -> pd.DataFrame:
    """Rows (generator, model_id, key, fp32, <precision>) for the images that have their
    twin: the same `qdd.identity.twin_id` (scores.parquet's ``twin``: generator, model,
    prompt, seed, steps, guidance, size) and key; older scores without it: same generator,
    model and key. The precision is a label, so ``fp4@emulate`` is paired apart from ``fp4``."""
    fakes = scores[(scores["label"] == 1) & scores["precision"].isin([REFERENCE, precision])]
    if fakes.empty:
        return pd.DataFrame(columns=["generator", "model_id", "key", REFERENCE, precision])
    filled = {
        c: (fakes[c] if c in fakes.columns else pd.Series("", fakes.index)).fillna("").astype(str)
        for c in ("model_id", "twin")
    }
    fakes = fakes.assign(**filled)
    wide = fakes.pivot_table(index=["generator", "model_id", "key", "twin"], columns="precision",
                             values="logit", aggfunc="first")  # fmt: skip
    wide = wide.reset_index("twin", drop=True)
    wide = wide.reindex(columns=[REFERENCE, precision])
    wide.columns.name = None
    return wide.dropna().reset_index()


SHIFT_COLUMNS = ["detector", "precision", "generator", "pairs", "mean_shift", "shift_lo",
                 "shift_hi", "median_shift", "p_shift", "flipped_to_real",
                 "flipped_to_fake", "p_flips"]  # fmt: skip


def shift_table(scores: pd.DataFrame, detector: str, threshold: float = 0.0) -> pd.DataFrame:
    """Per lower precision × generator: the paired logit shift and the flips, with tests.

    ``shift_lo``/``shift_hi``: 95 % t-interval of the mean shift; ``p_shift``: Wilcoxon
    signed-rank p (is the shift centred on 0?); ``p_flips``: exact McNemar p (are flips to
    "real" and to "fake" equally likely? — i.e. did fake accuracy change?). Neither p is
    corrected for the number of groups tested.
    """
    from qdd.report.stats import mcnemar_p, mean_interval, signed_rank_p

    rows = []
    for precision in lower_precisions(scores):
        pairs = paired_logits(scores, precision)
        for generator in order_generators(pairs["generator"].unique()):
            part = pairs[pairs["generator"] == generator]
            delta = (part[precision] - part[REFERENCE]).to_numpy(dtype=float)
            was_fake, is_fake = part[REFERENCE] > threshold, part[precision] > threshold
            to_real, to_fake = int((was_fake & ~is_fake).sum()), int((~was_fake & is_fake).sum())
            lo, hi = mean_interval(delta)
            rows.append({"detector": detector, "precision": precision, "generator": generator,
                         "pairs": len(part), "mean_shift": float(delta.mean()),
                         "shift_lo": lo, "shift_hi": hi,
                         "median_shift": float(np.median(delta)),
                         "p_shift": signed_rank_p(delta),
                         "flipped_to_real": to_real, "flipped_to_fake": to_fake,
                         "p_flips": mcnemar_p(to_real, to_fake)})  # fmt: skip
    return pd.DataFrame(rows, columns=SHIFT_COLUMNS)


def plot_paired(scores: pd.DataFrame, detector: str, threshold: float = 0.0) -> Figure | None:
    """Scatter panels (one per lower precision) over one bar panel; None without pairs.

    Each scatter panel: one point per key (one collection per generator, labelled by it),
    the diagonal (no change), the threshold on both axes, and the two flip corners shaded.
    The bar panel: one bar per precision × generator (generator colours), the mean shift
    with its 95 % t-interval, annotated ``↓a`` / ``↑b`` where pairs flipped (fake → real,
    real → fake).
    All scatters share axes.
    """
    shifts = shift_table(scores, detector, threshold)
    if shifts.empty:
        return None
    precisions = order_precisions(shifts["precision"].unique())
    pairs = {p: paired_logits(scores, p) for p in precisions}
    generators = order_generators(shifts["generator"].unique())
    styles = generator_style(generators)
    ncols = min(MAX_COLS, len(precisions))
    nrows = math.ceil(len(precisions) / ncols)
    with mpl.rc_context(RC):
        fig = Figure(figsize=(3.3 * ncols + 1.4, 3.1 * nrows + 3.2), layout="constrained")
        grid = fig.add_gridspec(nrows + 1, ncols, height_ratios=[3.1] * nrows + [3.0])
        values = np.concatenate([np.r_[p[REFERENCE], p[q]] for q, p in pairs.items()]
                                + [[threshold]])  # fmt: skip
        lo, hi = values.min(), values.max()
        pad = 0.06 * max(hi - lo, 1.0)
        lo, hi = lo - pad, hi + pad
        first = None
        for index, precision in enumerate(precisions):
            ax = fig.add_subplot(grid[index // ncols, index % ncols], sharex=first, sharey=first)
            first = first or ax
            # patches, not collections: the axes' collections are the generators' scatters
            for corner in ((threshold, lo, hi - threshold, threshold - lo),
                           (lo, threshold, threshold - lo, hi - threshold)):  # fmt: skip
                ax.add_patch(Rectangle(corner[:2], *corner[2:], linewidth=0, color="#999999",
                                       alpha=0.12, label="_flipped"))  # fmt: skip
            ax.text(hi, lo, "fake → real ", ha="right", va="bottom", fontsize=7, color="#555555")
            ax.text(lo, hi, " real → fake", ha="left", va="top", fontsize=7, color="#555555")
            ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8, label="_diagonal")
            ax.axhline(threshold, color="grey", linewidth=0.7, linestyle=":", label="_threshold")
            ax.axvline(threshold, color="grey", linewidth=0.7, linestyle=":", label="_threshold")
            part = pairs[precision]
            for generator in order_generators(part["generator"].unique()):
                rows = part[part["generator"] == generator]
                colour, marker = styles[generator]
                ax.scatter(rows[REFERENCE], rows[precision], s=12, alpha=0.75, marker=marker,
                           color=colour, linewidths=0, label=generator)  # fmt: skip
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
            ax.set_aspect("equal", adjustable="box")
            ax.set_title(f"{precision.upper()} vs {REFERENCE.upper()} ({len(part)} pairs)")
            ax.set_xlabel(f"logit of the {REFERENCE.upper()} image")
            ax.set_ylabel(f"logit of its {precision.upper()} twin")
            if index == 0:
                ax.legend(loc="upper left", bbox_to_anchor=(0, 0.93), frameon=False, fontsize=7,
                          handletextpad=0.2)  # fmt: skip
        bars = fig.add_subplot(grid[nrows, :])
        plot_shift_bars(bars, shifts, precisions, generators, styles)
        fig.suptitle(f"{detector}: each lower precision against its FP32 twin "
                     f"(threshold {threshold:g})")  # fmt: skip
    return fig


def flip_note(to_real: int, to_fake: int) -> str:
    """``↓a`` / ``↑b`` for the flips that happened (empty when none did)."""
    return "\n".join(t for t, n in ((f"↓{to_real}", to_real), (f"↑{to_fake}", to_fake)) if n)


def plot_shift_bars(
    ax: object,
    shifts: pd.DataFrame,
    precisions: list[str],
    generators: list[str],
    styles: dict[str, tuple[str, str]],
) -> None:
    """Grouped bars: precisions along x, one bar per generator, flips written above."""
    width = 0.8 / len(generators)
    table = shifts.set_index(["precision", "generator"])
    for g, generator in enumerate(generators):
        x, means, errors, notes = [], [], [], []
        for i, precision in enumerate(precisions):
            if (precision, generator) not in table.index:
                continue
            row = table.loc[(precision, generator)]
            x.append(i - 0.4 + width * (g + 0.5))
            means.append(row["mean_shift"])
            half = row["shift_hi"] - row["mean_shift"]  # the t-interval is symmetric
            errors.append(0.0 if np.isnan(half) else half)
            notes.append(flip_note(int(row["flipped_to_real"]), int(row["flipped_to_fake"])))
        ax.bar(x, means, yerr=errors, width=width * 0.9, color=styles[generator][0],
               capsize=2, error_kw={"linewidth": 0.8}, label=generator)  # fmt: skip
        for xi, mean, error, note in zip(x, means, errors, notes, strict=True):
            if not note:
                continue
            end = mean - error if mean < 0 else mean + error
            ax.annotate(note, (xi, end), xytext=(0, -2 if mean < 0 else 2),
                        textcoords="offset points", ha="center",
                        va="top" if mean < 0 else "bottom", fontsize=6.5,
                        linespacing=0.95)  # fmt: skip
    ax.axhline(0, color="black", linewidth=0.8)
    ax.margins(y=0.3)
    # the names alone, slanted when many: "fp4-vaefp32 − fp32" side by side overlapped
    many = len(precisions) > 5
    slant = {"rotation": 30, "ha": "right", "rotation_mode": "anchor"} if many else {}
    ax.set_xticks(range(len(precisions)), precisions, **slant)
    ax.set_xlabel(f"precision (each image's logit minus its {REFERENCE} twin's)")
    ax.set_xlim(-0.6, len(precisions) - 0.4)
    ax.set_ylabel("mean logit shift\n(95 % t-interval)")
    flips = int(shifts["flipped_to_real"].sum() + shifts["flipped_to_fake"].sum())
    ax.set_title("mean shift per precision and generator · "
                 + ("↓n: n pairs turned real, ↑n: turned fake" if flips
                    else "no pair crossed the threshold"))  # fmt: skip
    ax.legend(loc="best", frameon=False, fontsize=7,
              ncols=min(len(generators), 4))  # fmt: skip
