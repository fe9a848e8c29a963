"""Decision thresholds calibrated on validation logits (never on test data).

Detectors such as NPR are miscalibrated at logit 0 (they over-call "fake" on real photos),
so ``qdd-cli fit`` fits a threshold on its validation split and stores it in the
checkpoint; ``qdd-cli test`` reports accuracy at logit 0 and at that threshold side by side.

Rules (``--model.calibration``):

- ``balanced_acc``: the threshold that maximises balanced accuracy (mean of real and fake
  accuracy) on validation; candidates are midpoints between neighbouring distinct logits;
  among equal optima the one closest to 0 (move from the default only as far as needed).
- ``fpr@P`` (e.g. ``fpr@0.05``): the lowest threshold at which at most a fraction ``P`` of
  the validation real images score above it (the false-positive rate a deployment fixes).

An image is called fake when its logit is strictly greater than the threshold.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from qdd.errors import QddError

RULES = ("balanced_acc", "fpr@P")


def parse_rule(rule: str) -> tuple[str, float | None]:
    """``"balanced_acc"`` → (name, None); ``"fpr@0.05"`` → ("fpr", 0.05); else an error."""
    if rule == "balanced_acc":
        return rule, None
    name, _, value = rule.partition("@")
    if name == "fpr":
        try:
            target = float(value)
        except ValueError:
            target = math.nan
        if 0 <= target < 1:
            return name, target
    raise QddError(
        f"unknown calibration rule {rule!r}: use balanced_acc or fpr@P with 0 ≤ P < 1 "
        "(e.g. fpr@0.05)"
    )


def fit_threshold(logits: torch.Tensor, labels: torch.Tensor, rule: str) -> dict[str, Any]:
    """The threshold of ``rule`` on validation ``logits`` / ``labels`` and what it achieves."""
    name, target = parse_rule(rule)
    logits = logits.detach().double().flatten().cpu()
    labels = labels.detach().long().flatten().cpu()
    real, fake = logits[labels == 0], logits[labels == 1]
    if not len(real) or not len(fake):
        raise QddError(
            f"cannot calibrate a threshold: the validation split has {len(real)} real and "
            f"{len(fake)} fake images; it needs both (check data.val / val_fraction)"
        )
    if name == "fpr":
        ordered = torch.sort(real, descending=True).values
        allowed = math.floor(target * len(real) + 1e-9)
        threshold = float(ordered[allowed]) if allowed < len(ordered) else -math.inf
        if math.isinf(threshold):
            threshold = float(ordered[-1]) - 1.0
    else:
        values = torch.unique(logits)
        candidates = torch.cat(
            [values[:1] - 1.0, (values[1:] + values[:-1]) / 2, values[-1:] + 1.0]
        )
        real_acc = (real[None, :] <= candidates[:, None]).double().mean(1)
        fake_acc = (fake[None, :] > candidates[:, None]).double().mean(1)
        score = (real_acc + fake_acc) / 2
        best = torch.isclose(score, score.max(), rtol=0, atol=1e-12)
        options = candidates[best]
        threshold = float(options[options.abs().argmin()])
    real_acc = float((real <= threshold).double().mean())
    fake_acc = float((fake > threshold).double().mean())
    return {
        "rule": rule,
        "threshold": threshold,
        "n_real": len(real),
        "n_fake": len(fake),
        "val_real_acc": real_acc,
        "val_fake_acc": fake_acc,
        "val_balanced_acc": (real_acc + fake_acc) / 2,
    }
