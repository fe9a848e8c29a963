"""Detection metrics per group (generator × precision against the pooled real images).

One torchmetrics `Metric` keeps every sample's (logit, label, group) as ``cat`` states, so
under DDP the states are gathered and every number is computed once over all samples —
never an average of per-rank averages. Groups are indices into a vocabulary that every
rank knows in advance (the manifests' group names); ``qdd-cli test`` keeps one such metric
per perturbation pass.

Ranking metrics (AUROC, AP, TPR at fixed FPR) depend only on the order of the scores, so
logits are mapped to their normalised rank in [0, 1] before torchmetrics sees them: that
is exact, keeps ties, and avoids both torchmetrics' "inputs in [0, 1] are probabilities"
rule and the float saturation of sigmoid for large logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_roc,
)
from torchmetrics.utilities import dim_zero_cat

from qdd.identity import group_label

METRICS: tuple[str, ...] = (
    "acc",
    "real_acc",
    "fake_acc",
    "balanced_acc",
    "auroc",
    "ap",
    "tpr_at_fpr1",
    "tpr_at_fpr5",
)


def batch_groups(meta: dict[str, list[Any]]) -> list[str]:
    """Each row's group (`qdd.identity.group_label`) from a batch's collated metadata."""
    fields = ("label", "source", "generator", "precision", "quant_backend")
    rows = zip(*(meta[f] for f in fields), strict=True)
    return [group_label(dict(zip(fields, row, strict=True))) for row in rows]


def rank_scores(logits: torch.Tensor) -> torch.Tensor:
    """Monotone, tie-preserving map of logits onto [0, 1] (dense rank)."""
    values, inverse = torch.unique(logits, return_inverse=True)
    return inverse.double() / max(len(values) - 1, 1)


def tpr_at_fpr(scores: torch.Tensor, labels: torch.Tensor, max_fpr: float) -> float:
    """Highest true-positive rate whose false-positive rate is at most ``max_fpr``."""
    fpr, tpr, _ = binary_roc(scores, labels)
    return float(tpr[fpr <= max_fpr + 1e-12].max())


def detection_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    threshold: float | None = 0.0,
    calibrated: float | None = None,
) -> dict:
    """All metrics of one real-vs-fake set; ``None`` where a class is missing.

    ``acc``, ``real_acc``, ``fake_acc`` and ``balanced_acc`` are taken at ``threshold``
    (``None``: no meaningful threshold, they are ``None`` too: an uncalibrated
    training-free detector); ``acc_calibrated`` (beside the `METRICS`) at the
    validation-calibrated threshold ``calibrated`` (``None`` when the weights carry none).
    """
    labels = labels.long()
    real, fake = labels == 0, labels == 1
    nan = math.nan
    real_acc = fake_acc = accuracy = nan
    if threshold is not None:
        predicted = (logits > threshold).long()
        real_acc = float((predicted[real] == 0).float().mean()) if real.any() else nan
        fake_acc = float((predicted[fake] == 1).float().mean()) if fake.any() else nan
        accuracy = float((predicted == labels).float().mean()) if len(labels) else nan
    result = {
        "acc": accuracy,
        "acc_calibrated": nan,
        "real_acc": real_acc,
        "fake_acc": fake_acc,
        "balanced_acc": (real_acc + fake_acc) / 2,
        "auroc": nan,
        "ap": nan,
        "tpr_at_fpr1": nan,
        "tpr_at_fpr5": nan,
    }
    if calibrated is not None and len(labels):
        result["acc_calibrated"] = float(((logits > calibrated).long() == labels).float().mean())
    if real.any() and fake.any():
        scores = rank_scores(logits)
        result["auroc"] = float(binary_auroc(scores, labels))
        result["ap"] = float(binary_average_precision(scores, labels))
        result["tpr_at_fpr1"] = tpr_at_fpr(scores, labels, 0.01)
        result["tpr_at_fpr5"] = tpr_at_fpr(scores, labels, 0.05)
    return {name: None if math.isnan(value) else value for name, value in result.items()}


class GroupedDetectionMetrics(Metric):
    """Overall and per-group metrics; a fake group is scored against all real images."""

    full_state_update = False

    def __init__(
        self,
        groups: Sequence[str],
        threshold: float | None = 0.0,
        calibrated: float | None = None,
    ) -> None:
        super().__init__()
        self.groups = list(groups)
        self.threshold = threshold
        self.calibrated = calibrated
        self.add_state("logits", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("group_ids", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, labels: torch.Tensor, group_ids: torch.Tensor) -> None:
        self.logits.append(logits.detach().float().flatten())
        self.labels.append(labels.detach().long().flatten())
        self.group_ids.append(group_ids.detach().long().flatten())

    def ensure_state(self) -> None:
        """Give a rank that saw no sample an empty update, so the DDP gather still works."""
        if not self.logits:
            empty = torch.zeros(0, device=self.device)
            self.update(empty, empty, empty)

    def compute(self) -> dict:
        return grouped_metrics(
            dim_zero_cat(self.logits).cpu(),
            dim_zero_cat(self.labels).cpu(),
            dim_zero_cat(self.group_ids).cpu(),
            self.groups,
            self.threshold,
            self.calibrated,
        )


def grouped_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    group_ids: torch.Tensor,
    groups: Sequence[str],
    threshold: float | None = 0.0,
    calibrated: float | None = None,
) -> dict:
    """``{"n", "overall", "groups"}``: overall metrics, and each fake group (index into
    ``groups``; -1 for none) against all real images. ``calibrated``: the threshold of
    ``acc_calibrated`` (see `detection_metrics`)."""
    logits, labels, group_ids = logits.float(), labels.long(), group_ids.long()
    real = labels == 0
    result = {
        "n": len(labels),
        "overall": detection_metrics(logits, labels, threshold, calibrated),
        "groups": {},
    }
    for index, name in enumerate(groups):
        fake = (group_ids == index) & (labels == 1)
        if not fake.any():
            continue
        chosen = fake | real
        metrics = detection_metrics(logits[chosen], labels[chosen], threshold, calibrated)
        result["groups"][name] = {
            "n_fake": int(fake.sum()),
            "n_real": int(real.sum()),
            **metrics,
        }
    return result
