"""Decision thresholds calibrated on validation logits (never on test data).

Detectors such as NPR are miscalibrated at logit 0 (they over-call "fake" on real photos),
so ``qdd-cli fit`` fits a threshold on its validation split and `Calibration` keeps it in
buffers, so it travels in the checkpoint's state_dict (anomalib's post-processor does the
same); ``qdd-cli test`` reports accuracy at logit 0 and at that threshold side by side.
A fit starts uncalibrated: a threshold belongs to the weights it was fitted for.

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

#: Where checkpoints written before `Calibration` existed kept the fitted threshold.
LEGACY_KEY = "qdd_calibration"
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


class Calibration(torch.nn.Module):
    """The threshold fitted on validation logits by ``rule``, or none yet.

    ``threshold`` and ``fitted`` are buffers; the rule and the validation statistics of the
    fit are the module's extra state, so all of it is in ``state_dict()``.
    """

    def __init__(self, rule: str = "balanced_acc") -> None:
        super().__init__()
        parse_rule(rule)  # a bad rule fails now, not after the first epoch
        self.rule = rule
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.details: dict[str, Any] = {}

    def reset(self) -> None:
        """Forget the threshold: new weights need their own."""
        self.threshold.zero_()
        self.fitted.fill_(False)
        self.details = {}

    def fit(self, logits: torch.Tensor, labels: torch.Tensor) -> float:
        """Fit ``rule`` on validation ``logits``/``labels``; returns the threshold."""
        self.load(fit_threshold(logits, labels, self.rule))
        return float(self.threshold)

    def load(self, summary: dict[str, Any] | None) -> None:
        """Take the threshold of a `summary` (None: no threshold)."""
        if summary is None:
            self.reset()
            return
        details = dict(summary)
        self.threshold.fill_(float(details.pop("threshold")))
        self.fitted.fill_(True)
        self.details = details

    @property
    def value(self) -> float | None:
        """The fitted threshold, or None."""
        return float(self.threshold) if bool(self.fitted) else None

    def summary(self) -> dict[str, Any] | None:
        """What `fit_threshold` returned (rule, threshold, validation counts and accuracies)."""
        return None if self.value is None else {"threshold": self.value, **self.details}

    def get_extra_state(self) -> dict[str, Any]:
        return self.details

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.details = dict(state)


def calibration_state(summary: dict[str, Any] | None, prefix: str) -> dict[str, Any]:
    """A `Calibration`'s state_dict entries (under ``prefix``) holding ``summary``."""
    calibration = Calibration()
    calibration.load(summary)
    return {f"{prefix}{k}": v for k, v in calibration.state_dict().items()}


def stored_calibration(checkpoint: dict[str, Any], prefix: str = "calibration.") -> Any:
    """The calibration summary in a Lightning checkpoint of ``qdd-cli fit`` (None if none);
    checkpoints of older qdd kept it under `LEGACY_KEY`."""
    state = checkpoint.get("state_dict", {})
    if f"{prefix}threshold" not in state:
        return checkpoint.get(LEGACY_KEY)
    calibration = Calibration()
    calibration.load_state_dict({k.removeprefix(prefix): v for k, v in state.items()
                                 if k.startswith(prefix)})  # fmt: skip
    return calibration.summary()


def accuracy_note(
    detector: str, trainable: bool, threshold: float, calibrated: float | None
) -> str | None:
    """What a test run must say about its accuracies when logit 0 means nothing.

    A training-free detector's logits (RIGID: −cosine, AEROBLADE: −LPIPS) are not centred on
    0: at threshold 0 it calls (nearly) every image real. Uncalibrated, and with no
    threshold of your own (``--model.threshold``), its accuracies are left out; calibrated,
    ``acc_calibrated`` is the accuracy to read. None: nothing to say (a trained detector, or
    a threshold you chose).
    """
    if trainable or threshold != 0.0:
        return None
    at_zero = "acc, real_acc, fake_acc and balanced_acc at logit 0"
    if calibrated is None:
        return (
            f"{detector} is training-free and uncalibrated: its logits are not centred on 0, "
            f"so {at_zero} are not meaningful and are left out (AUROC, AP and TPR at a fixed "
            f"FPR are); calibrate a threshold with `qdd-cli fit --detector {detector} --data "
            "SHARDS` and test with its --ckpt_path, or pass --model.threshold"
        )
    return (
        f"{detector} is training-free: {at_zero} are not meaningful (its logits are not "
        "centred on 0); acc_calibrated, at the threshold calibrated on held-out images, is "
        "the accuracy to read"
    )
