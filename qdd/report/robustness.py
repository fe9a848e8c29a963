"""Robustness curves: a metric against perturbation strength, one line per precision.

Does FP4 make a detector more fragile under JPEG? For each perturbation kind (the part of
``jpeg:75`` before the colon) one panel shows the metric at the unperturbed pass (``none``)
and at each strength, one line per precision with every generator's fakes pooled against
the real images of the same perturbation; the accuracy row adds the real images' accuracy
(grey, dashed), since a perturbation can also turn real photographs "fake".
"""

from __future__ import annotations

import math

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from qdd.perturb import kind_of, severity
from qdd.report.palette import color, order_precisions
from qdd.report.runs import NONE, DetectorResults
from qdd.report.stats import BOOTSTRAP, group_metrics
from qdd.report.style import RC

ROWS = (("fake_acc", "fake accuracy"), ("auroc", "AUROC"))
#: Horizontal shift between neighbouring precisions' markers (in steps): equal values, common
#: when quantization changes nothing, would otherwise hide every line but the last drawn.
DODGE = 0.05


#: The widest spread of one step's markers: a dozen precisions stay beside their step.
SPREAD = 0.5


def dodge(n: int) -> np.ndarray:
    """Offsets of ``n`` lines, centred on 0, `DODGE` apart, or closer where ``n`` lines
    would spread wider than `SPREAD`."""
    return (np.arange(n) - (n - 1) / 2) * min(DODGE, SPREAD / max(n - 1, 1))


#: (line style, marker) of a precision, then of each label beside it in palette order.
LOOKS = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (1, 3)), "v"))


def line_styles(precisions: list[str]) -> dict[str, tuple[object, str]]:
    """(line style, marker) per precision label: labels beside one precision
    (``fp4``, ``fp4-vaefp32``, ``fp4@emulate``) share its colour, so each gets its own
    dashes and markers, the plain precision solid with circles."""
    from qdd.identity import base_precision

    seen: dict[str, int] = {}
    looks = {}
    for label in sorted(precisions, key=lambda p: base_precision(p) != p):
        k = seen[base_precision(label)] = seen.get(base_precision(label), -1) + 1
        looks[label] = LOOKS[k % len(LOOKS)]
    return looks


def strength(spec: str) -> float:
    """The number after the colon (``jpeg:75`` → 75.0); NaN when there is none."""
    try:
        return float(spec.partition(":")[2])
    except ValueError:
        return math.nan


def spec_rank(spec: str) -> tuple:
    """``none`` first, then by kind, weakest first."""
    if spec == NONE:
        return (0, "", 0.0, spec)
    return (1, kind_of(spec), severity(spec), spec)


def ordered_specs(kind: str, specs: list[str]) -> list[str]:
    """One kind's specs, weakest first."""
    return sorted(specs, key=spec_rank)


def kinds(perturbations: list[str]) -> dict[str, list[str]]:
    """Perturbation specs grouped by kind, each list weakest first (``none`` left out)."""
    grouped: dict[str, list[str]] = {}
    for spec in perturbations:
        if spec != NONE:
            grouped.setdefault(kind_of(spec), []).append(spec)
    return {k: ordered_specs(k, v) for k, v in sorted(grouped.items())}


def precision_table(
    results: dict[str, DetectorResults], resamples: int = BOOTSTRAP
) -> pd.DataFrame:
    """Per detector × perturbation × precision: all generators' fakes vs the real images."""
    rows = []
    for name, entry in sorted(results.items()):
        for perturbation, scores in entry.scores.groupby("perturbation", sort=True):
            real = scores.loc[scores["label"] == 0, "logit"].to_numpy(dtype=float)
            fakes = scores[scores["label"] == 1]
            for precision, part in fakes.groupby("precision"):
                fake = part["logit"].to_numpy(dtype=float)
                rows.append({"detector": name, "perturbation": perturbation,
                             "kind": kind_of(perturbation),
                             "strength": strength(perturbation), "precision": precision,
                             **group_metrics(real, fake, entry.threshold, resamples)})  # fmt: skip
    return pd.DataFrame(rows)


def plot_robustness(table: pd.DataFrame, detector: str) -> Figure | None:
    """Rows: fake accuracy (with real accuracy) and AUROC; columns: perturbation kinds.

    Each panel's labelled lines are the precisions in palette order (then ``real`` in the
    accuracy row); x is ``none`` then the kind's strengths, weakest first, each precision
    shifted a little sideways so that equal curves stay visible. None when the detector
    was tested without perturbations.
    """
    rows = table[table["detector"] == detector]
    groups = kinds(list(rows["perturbation"].unique()))
    if not groups:
        return None
    precisions = order_precisions(rows["precision"].unique())
    looks = line_styles(precisions)
    with mpl.rc_context(RC):
        fig = Figure(figsize=(3.4 * len(groups) + 1.4, 2.6 * len(ROWS) + 0.6),
                     layout="constrained")  # fmt: skip
        axes = fig.subplots(len(ROWS), len(groups), squeeze=False, sharey="row")
        for column, (kind, specs) in enumerate(groups.items()):
            steps = [NONE, *specs]
            x = np.arange(len(steps))
            for row, (metric, label) in enumerate(ROWS):
                ax = axes[row, column]
                for precision, shift in zip(precisions, dodge(len(precisions)), strict=True):
                    part = rows[rows["precision"] == precision].set_index("perturbation")
                    y = part[metric].reindex(steps).to_numpy(dtype=float)
                    linestyle, marker = looks[precision]
                    ax.plot(x + shift, y, marker=marker, markersize=3.5, linewidth=1.5,
                            linestyle=linestyle, color=color(precision),
                            label=precision)  # fmt: skip
                if metric == "fake_acc":
                    real = rows.drop_duplicates("perturbation").set_index("perturbation")
                    y = real["real_acc"].reindex(steps).to_numpy(dtype=float)
                    ax.plot(x, y, marker="s", markersize=3, linewidth=1.2, linestyle="--",
                            color=color("real"), label="real")  # fmt: skip
                ax.set_xticks(x, ["none", *(f"{strength(s):g}" for s in specs)])
                if metric == "fake_acc":
                    ax.set_ylim(-0.03, 1.03)
                if row == len(ROWS) - 1:
                    ax.set_xlabel(f"{kind} strength (weakest first)")
                if column == 0:
                    ax.set_ylabel(label if metric != "fake_acc" else "accuracy (real: dashed)")
                if row == 0:
                    ax.set_title(kind)
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right center", frameon=False)
        fig.suptitle(f"{detector}: robustness per precision\n(all generators pooled)")
    return fig
