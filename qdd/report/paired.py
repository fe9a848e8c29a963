"""The paired view: each quantized image's logit against its full-precision twin.

Keys are shared across precisions (same prompt, same seed), so the shift a format causes
is measured image by image, not only as a change of averages.
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from qdd.report.palette import PRECISION_ORDER, color, order_generators
from qdd.report.style import RC, new_figure

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def pair_precision(scores: pd.DataFrame) -> str | None:
    """The precision to pair with fp32: fp4 if present, else the lowest-bit one present."""
    present = set(scores.loc[scores["label"] == 1, "precision"].dropna())
    if "fp32" not in present:
        return None
    for precision in ("fp4", "nf4", "nvfp4", "mxfp4", "fp8", "fp16"):
        if precision in present:
            return precision
    others = sorted(present - set(PRECISION_ORDER))
    return others[0] if others else None


def paired_logits(scores: pd.DataFrame, precision: str) -> pd.DataFrame:
    """Rows (generator, key, fp32, <precision>) for keys that have both images."""
    fakes = scores[scores["label"] == 1]
    wide = fakes[fakes["precision"].isin(["fp32", precision])].pivot_table(
        index=["generator", "key"], columns="precision", values="logit", aggfunc="first"
    )
    return wide.dropna().reset_index()


def plot_paired(scores: pd.DataFrame, detector: str, threshold: float = 0.0) -> Figure | None:
    """Scatter of twin logits with the diagonal, and the mean shift per generator."""
    import matplotlib.pyplot as plt

    precision = pair_precision(scores)
    if precision is None:
        return None
    pairs = paired_logits(scores, precision)
    if pairs.empty:
        return None
    generators = order_generators(pairs["generator"].unique())
    fig, axes = new_figure(2, panel=(3.8, 3.4))
    scatter, bars = axes[0]
    with plt.rc_context(RC):
        lo = min(pairs["fp32"].min(), pairs[precision].min())
        hi = max(pairs["fp32"].max(), pairs[precision].max())
        pad = 0.05 * max(hi - lo, 1e-6)
        scatter.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="black", linewidth=0.8)
        scatter.axhline(threshold, color="grey", linewidth=0.6, linestyle=":")
        scatter.axvline(threshold, color="grey", linewidth=0.6, linestyle=":")
        for i, generator in enumerate(generators):
            rows = pairs[pairs["generator"] == generator]
            scatter.scatter(rows["fp32"], rows[precision], s=16, alpha=0.75,
                            marker=MARKERS[i % len(MARKERS)], label=generator,
                            color=f"C{i}")  # fmt: skip
        scatter.set_xlabel("logit of the FP32 image")
        scatter.set_ylabel(f"logit of its {precision.upper()} twin")
        scatter.legend(frameon=False, fontsize=8)
        shift = pairs.assign(shift=pairs[precision] - pairs["fp32"]).groupby("generator")["shift"]
        means, errors = shift.mean().reindex(generators), shift.sem().reindex(generators)
        bars.bar(range(len(generators)), means, yerr=errors.fillna(0), capsize=3,
                 color=color(precision))  # fmt: skip
        bars.axhline(0, color="black", linewidth=0.8)
        bars.set_xticks(range(len(generators)), generators, rotation=30, ha="right")
        bars.set_ylabel(f"mean logit shift {precision} − fp32")
        bars.set_title("per generator (± s.e.m.)")
        fig.suptitle(f"{detector}: {precision.upper()} vs FP32, image by image "
                     f"({len(pairs)} pairs)")  # fmt: skip
    return fig
