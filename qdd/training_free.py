"""A training-free detector's ``fit``: no training, a threshold calibrated on held-out images.

RIGID and AEROBLADE have nothing to learn, and their logits are not centred on 0 (RIGID:
−cosine, AEROBLADE: −LPIPS), so accuracy at logit 0 means nothing for them. ``qdd-cli fit
--detector rigid --data SHARDS`` therefore runs no training step: one validation pass over
the calibration set — every image of the validation folders outside their test split
(`qdd.datamodules.split.CALIBRATION`: there is nothing to train on, so the train split
joins it) — fits the threshold by ``--model.calibration`` (`qdd.calibration`), and
``checkpoints/last.ckpt`` keeps what a trained fit's checkpoint keeps: the detector and its
``detector_args``, the sha256 of its weight files, the threshold and rule, and the units it
calibrated on (`qdd.checkpoint`). ``qdd-cli test --ckpt_path last.ckpt`` then reports
``acc_calibrated`` beside ``acc``, refuses a detector built from other files, and refuses
(or counts, ``--data.allow_train_overlap``) the calibration images exactly as it refuses a
fit's training images; the held-out split (``--data.split=test``, same fractions) is
disjoint from them.

A calibration starts from nothing: ``--ckpt_path`` and ``--weights`` are refused. Flags
that only steer training (``--trainer.max_epochs``, ``--model.lr``, …) change nothing here:
they are named in one warning line (`warn_ignored`), not silently dropped.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from qdd.callbacks import RunSummary
from qdd.callbacks.summary import model_summary
from qdd.errors import QddError

log = logging.getLogger(__name__)

#: Trainer settings that only steer training steps: a calibration (one validation pass) has
#: none, so giving one changes nothing.
TRAINING_ONLY_TRAINER = (
    "max_epochs", "min_epochs", "max_steps", "min_steps", "max_time",
    "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm",
    "limit_train_batches", "check_val_every_n_epoch", "val_check_interval",
    "reload_dataloaders_every_n_epochs",
)  # fmt: skip
#: Model settings that only steer training (the optimizer's learning rate).
TRAINING_ONLY_MODEL = ("lr",)

#: Logged by the validation pass but meaningless for a training-free detector: accuracy at
#: sigmoid 0.5 (logit 0) and the BCE loss of uncalibrated logits.
AT_LOGIT_ZERO = ("val_acc", "val_loss")


def is_training_free(detector: str) -> bool:
    """Whether ``detector`` (a registered name) has nothing to train."""
    from qdd.detectors import detector_class

    return not detector_class(detector).card.trainable


def check_start(config: Any, command: str) -> None:
    """Refuse a training-free ``fit`` that names a checkpoint or weights to start from."""
    detector = config.model.get("detector")
    if command != "fit" or not detector or not is_training_free(detector):
        return
    weights = config.model.get("weights")  # an official file: refused by `load_detector`
    start = config.get("ckpt_path") or (weights if str(weights).endswith(".ckpt") else None)
    if start:
        flag = "--ckpt_path" if config.get("ckpt_path") else "--weights"
        raise QddError(
            f"{detector} is training-free: `qdd-cli fit` only calibrates its threshold, from "
            f"nothing, and takes no {flag} ({start}); drop it (to evaluate that calibration: "
            f"qdd-cli test --ckpt_path {start})"
        )


def warn_ignored(detector: str, model: dict[str, Any], trainer: dict[str, Any]) -> list[str]:
    """Name, in one warning line, the training-only flags given to a training-free ``fit``
    (``model``, ``trainer``: the values you set, without defaults); returns them."""
    flags = [f"--model.{k}" for k in TRAINING_ONLY_MODEL if model.get(k) is not None]
    flags += [f"--trainer.{k}" for k in TRAINING_ONLY_TRAINER if trainer.get(k) is not None]
    if flags:
        log.warning("%s is training-free: `qdd-cli fit` only calibrates its threshold in one "
                    "validation pass, so %s change nothing and are ignored", detector,
                    ", ".join(flags))  # fmt: skip
    return flags


def calibrate(trainer: Any, model: Any, datamodule: Any) -> Path:
    """The ``fit`` of a training-free detector: one validation pass over the calibration
    set fits ``model.calibration``; writes ``last.ckpt`` and metrics.json; returns the
    checkpoint's path."""
    datamodule.calibrate_only()
    model.calibration.reset()
    trainer.validate(model, datamodule=datamodule, verbose=False)
    if model.calibration.value is None:  # e.g. --trainer.limit_val_batches=0
        raise QddError(
            f"{model.hparams.detector}: no calibration image was scored, so no threshold was "
            "fitted: drop --trainer.limit_val_batches=0 (the calibration is the validation pass)"
        )
    callback = trainer.checkpoint_callback
    folder = Path(callback.dirpath) if callback and callback.dirpath else (
        Path(trainer.default_root_dir) / "checkpoints")  # fmt: skip
    path = folder / "last.ckpt"
    trainer.save_checkpoint(path, weights_only=False)  # as ModelCheckpoint writes last.ckpt
    if callback is not None:  # what `qdd.api` returns as the fit's checkpoints
        callback.best_model_path = callback.last_model_path = str(path)
    summaries = [c for c in trainer.callbacks if isinstance(c, RunSummary)]
    if trainer.is_global_zero and summaries:
        summary = model_summary(trainer, model)
        summary["metrics"] = {k: v for k, v in summary["metrics"].items()
                              if k not in AT_LOGIT_ZERO}  # fmt: skip
        summaries[0].write(trainer, {
            **summary,
            "training_free": True,
            "epochs": 0,
            "steps": 0,
            "stopped_by": "training-free: calibration only (no training)",
            "best_checkpoint": str(path),
            "last_checkpoint": str(path),
        })  # fmt: skip
    return path
