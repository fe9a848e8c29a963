"""`AttributionModule`: a trainable detector's backbone with a multi-class head that names
the precision (or precision family) that made an image (``qdd-cli fit --task attribution``).

The classes are decided from the training split when a fit starts (`qdd.attribution`),
kept in the hyper-parameters (so in every checkpoint) and rebuilt from there by ``test
--ckpt_path``. The detector's one-output head (its last trainable ``Linear`` with one
output, e.g. NPR's ``fc1``, Corvi's and CLIPDet's ``fc``) is replaced by one with an
output per class; the backbone, its preprocessing and its optimizer recipe are kept.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback
from torch import Tensor, nn
from torchmetrics import MeanMetric

from qdd.attribution import check_attribute, check_known, class_of, decide_classes
from qdd.errors import QddError
from qdd.metrics import batch_groups
from qdd.modules.detector import DetectorModule


class AttributionModule(DetectorModule):
    """Train or evaluate a precision classifier on a registered detector's backbone.

    Args (beyond `DetectorModule`'s):
        attribute: ``precision`` (each registry precision a class) or ``family``
            (32-bit, 16-bit, 8-bit, 4-bit weight-only, 4-bit W4A4, GGUF).
        include_real: real images are a class of their own (else they are left out).
        classes: set by the fit from its training data; given only by a checkpoint.
    """

    def __init__(
        self,
        detector: str = "npr",
        weights: str | None = None,
        random_weights: bool = False,
        detector_args: dict[str, Any] | None = None,
        lr: float | None = None,
        attribute: str = "precision",
        include_real: bool = False,
        classes: list[str] | None = None,
    ) -> None:
        check_attribute(attribute)
        super().__init__(detector, weights, random_weights, detector_args, lr)

    # -- the head ----------------------------------------------------------------------------
    def prepare_head(self, saved: dict[str, Any] | None) -> None:
        """Before a checkpoint's weights are applied: an attribution checkpoint's head."""
        classes = self.hparams.classes or (saved or {}).get("classes")
        if classes and (saved is None or saved.get("classes")):
            self.hparams.classes = list(classes)
            widen_head(self.detector, len(classes))

    @property
    def classes(self) -> list[str]:
        return list(self.hparams.classes or [])

    def _class_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    def _targets(self, meta: dict[str, Any], device: torch.device) -> tuple[Tensor, Tensor]:
        """(rows with a class, their class indices); rows of no class (reals when reals
        are not a class) are left out."""
        index, hp = self._class_index(), self.hparams
        names = [class_of(g, hp.attribute, hp.include_real) for g in batch_groups(meta)]
        rows = [i for i, name in enumerate(names) if name is not None]
        targets = [index[names[i]] for i in rows]
        return (torch.tensor(rows, dtype=torch.long, device=device),
                torch.tensor(targets, dtype=torch.long, device=device))  # fmt: skip

    def setup(self, stage: str) -> None:
        data = self.trainer.datamodule if self._trainer is not None else None
        if data is None or stage not in ("fit", "validate"):
            return
        hp = self.hparams
        if stage == "validate":  # the classes come from the checkpoint
            if not self.classes:
                raise QddError(
                    "no attribution classes: validate --task attribution needs --ckpt_path "
                    "of a `qdd-cli fit --task attribution` checkpoint"
                )
            val = [s.group for s in data.split.get("val", []) if s.group]
            check_known(val, self.classes, hp.attribute, hp.include_real, stage="validate")
            return
        train = [s.group for s in data.split.get("train", []) if s.group and s.readable]
        found = decide_classes(train, hp.attribute, hp.include_real)
        if hp.classes is None:
            hp.classes = found
            widen_head(self.detector, len(found))
        elif list(hp.classes) != found:
            raise QddError(
                f"the starting weights attribute {', '.join(hp.classes)}, the training data "
                f"holds {', '.join(found)}: train on the same classes or start afresh"
            )
        val = [s.group for s in data.split.get("val", []) if s.group]
        check_known(val, self.classes, hp.attribute, hp.include_real, stage="fit")

    # -- losses and metrics -------------------------------------------------------------------
    def configure_losses(self) -> None:
        self.criterion = nn.CrossEntropyLoss()

    def configure_metrics(self) -> None:
        self.train_acc, self.val_acc, self.val_loss = MeanMetric(), MeanMetric(), MeanMetric()

    def configure_callbacks(self) -> list[Callback]:
        from qdd.callbacks.attribution import AttributionSummary

        return [AttributionSummary()]

    def class_logits(self, images: Tensor) -> Tensor:
        logits = self(images)
        if logits.ndim != 2 or logits.shape[1] != len(self.classes):
            raise QddError(
                f"{self.hparams.detector} returns scores of shape {tuple(logits.shape)}, not "
                f"one per class ({len(self.classes)}): it cannot be used for attribution"
            )
        return logits

    # -- fit ----------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        images, _, meta = batch
        rows, targets = self._targets(meta, images.device)
        if len(rows) == 0:
            return self._empty_batch_loss()
        logits = self.class_logits(images[rows])
        loss = self.criterion(logits, targets)
        self.train_acc.update((logits.argmax(1) == targets).double())
        self._log_loss(loss, batch_size=len(rows))
        return loss

    def on_train_epoch_end(self) -> None:
        if self.train_acc.update_count:
            self.log("train_acc", float(self.train_acc.compute()))
        self.train_acc.reset()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, _, meta = batch
        rows, targets = self._targets(meta, images.device)
        if len(rows) == 0:
            return
        logits = self.class_logits(images[rows])
        self.val_loss.update(self.criterion(logits, targets), weight=len(rows))
        self.val_acc.update((logits.argmax(1) == targets).double())

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking and self.val_acc.update_count:
            self.log("val_loss", float(self.val_loss.compute()), prog_bar=True)
            self.log("val_acc", float(self.val_acc.compute()), prog_bar=True)
        self.val_loss.reset()
        self.val_acc.reset()

    # -- test and predict: class probabilities (kept and measured by AttributionSummary) -------
    def on_test_epoch_start(self) -> None:
        if not self.classes:
            raise QddError(
                "no attribution classes: test --task attribution needs --ckpt_path of a "
                "`qdd-cli fit --task attribution` checkpoint"
            )
        data = self.trainer.datamodule
        if data is not None:
            check_known(data.groups, self.classes, self.hparams.attribute,
                        self.hparams.include_real)  # fmt: skip

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.predict_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        pass  # measured from the gathered rows by AttributionSummary

    def on_predict_epoch_start(self) -> None:
        if not self.classes:
            raise QddError("no attribution classes: pass --ckpt_path of an attribution fit")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        images = batch[0]
        if len(images) == 0:
            return images.new_zeros((0, len(self.classes)))
        return torch.softmax(self.class_logits(images).float(), dim=1)


def widen_head(detector: nn.Module, outputs: int) -> None:
    """Replace the detector's one-output head (its last trainable one-output ``Linear``)
    with a freshly initialised one of ``outputs`` outputs."""
    frozen = tuple(getattr(detector, "frozen_prefixes", ()))
    heads = [
        name for name, module in detector.named_modules()
        if isinstance(module, nn.Linear) and module.out_features == 1
        and not f"{name}.".startswith(frozen or ("\0",))
    ]  # fmt: skip
    if not heads:
        name = getattr(detector, "name", type(detector).__name__)
        raise QddError(
            f"{name} has no trainable one-output head to widen: attribution needs a "
            "trainable detector (npr, corvi, clipd, univfd, ...)"
        )
    path = heads[-1]
    parent_name, _, attr = path.rpartition(".")
    parent = detector.get_submodule(parent_name) if parent_name else detector
    old = getattr(parent, attr)
    new = nn.Linear(old.in_features, outputs, bias=old.bias is not None)
    setattr(parent, attr, new.to(device=old.weight.device, dtype=old.weight.dtype))
