"""`DetectorModule`: any registered detector, for fit, validate, test and predict.

Follows torchgeo's trainer shape: ``configure_models`` / ``configure_losses`` /
``configure_metrics`` hooks, one metric collection per stage. The module computes logits
and metrics; the run's files (``scores.parquet``, ``metrics.json``, the tables) are written
by the callbacks it brings along (`configure_callbacks`, as anomalib does).

Weights: ``weights`` is an official file, or a Lightning checkpoint of a previous ``fit``
(``*.ckpt``); ``None`` means the detector's official file under ``checkpoints/``. A
detector without weights refuses to run unless ``random_weights=True``. Frozen backbones
(CLIP detectors) are kept out of saved checkpoints: they are rebuilt from
``detector_args`` (the backbone weight file) on load.

Calibration: a `qdd.calibration.Calibration` submodule. Every validation epoch fits its
threshold on the gathered validation logits; it travels in the state_dict, is reset when
a fit starts (new weights, new threshold) and ``test`` reports accuracy at it beside
accuracy at ``threshold``. A training-free detector's ``fit`` is its validation pass alone
(`qdd.training_free`); tested uncalibrated, its accuracies at logit 0 are left out
(`accuracy_note`).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule
from torch import Tensor
from torchmetrics import CatMetric, MeanMetric, MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC

from qdd.calibration import LEGACY_KEY, Calibration, accuracy_note, calibration_state
from qdd.callbacks import RunSummary, ScoreWriter
from qdd.checkpoint import WEIGHT_FILES_KEY, read_checkpoint
from qdd.datamodules.dataset import UNPERTURBED
from qdd.detectors import build_detector, load_detector
from qdd.detectors.registry import registered_name
from qdd.detectors.weights import apply_state
from qdd.errors import QddError
from qdd.metrics import GroupedDetectionMetrics, batch_groups

#: The loader-side transforms, by the kind of loader that runs them.
KINDS = ("train", "eval")


def checkpoint_state(checkpoint: dict[str, Any]) -> dict[str, Tensor]:
    """The detector's weights inside a Lightning checkpoint written by ``qdd-cli fit``."""
    state = checkpoint.get("state_dict", {})
    return {k.removeprefix("detector."): v for k, v in state.items() if k.startswith("detector.")}


class DetectorModule(LightningModule):
    """Train or evaluate one forensic detector.

    Args:
        detector: registered name (``npr``, ``clipd``, ``univfd``, ``corvi``).
        weights: official weight file or a ``qdd-cli fit`` checkpoint; default: the official
            file under ``checkpoints/``.
        random_weights: run without trained head weights (smoke tests only; logged loudly).
        detector_args: passed to the detector (e.g. ``backbone``, ``backbone_weights``).
        lr: learning rate; ``None`` keeps the detector's published recipe.
        threshold: logit above which an image is called fake (``acc``; 0 by convention).
        calibration: rule that fits a threshold on validation logits during ``fit``:
            ``balanced_acc`` or ``fpr@P`` (see `qdd.calibration`).
    """

    def __init__(
        self,
        detector: str = "npr",
        weights: str | None = None,
        random_weights: bool = False,
        detector_args: dict[str, Any] | None = None,
        lr: float | None = None,
        threshold: float = 0.0,
        calibration: str = "balanced_acc",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        # One name per detector (``NPRDetector`` → ``npr``): metrics.json, checkpoints, report.
        self.hparams.detector = registered_name(detector) or detector
        self.calibration = Calibration(calibration)
        self.configure_models()
        self.configure_losses()
        self.configure_metrics()
        #: Per test pass (perturbation), set at the end of each test epoch.
        self.test_results: dict[str, dict[str, Any]] = {}

    # -- hooks, torchgeo style -------------------------------------------------------------
    def configure_models(self) -> None:
        hp = self.hparams
        args = dict(hp.detector_args or {})
        if hp.weights and str(hp.weights).endswith(".ckpt"):
            start = read_checkpoint(hp.weights)  # read once (`qdd.checkpoint`)
            self.detector = build_detector(hp.detector, **args)
            start.check_weight_files(self.detector.weight_files, hp.detector)
            self.prepare_head(start.hparams)
            apply_state(self.detector, checkpoint_state(start.contents), str(hp.weights))
            self.detector.weights_source = str(hp.weights)
            self.calibration.load(start.calibration)
        else:
            self.detector = load_detector(
                hp.detector, hp.weights, random_weights=hp.random_weights, **args
            )
            self.prepare_head(None)
        # Frozen backbones are not in our checkpoints: load the rest strictly ourselves.
        self.strict_loading = not self.detector.frozen_prefixes
        # NHWC convolutions run ~1.5x faster on CPU (oneDNN) and on tensor cores.
        self.detector.to(memory_format=torch.channels_last)
        transforms = {"train": self.detector.train_transform(), "eval": self.eval_transform()}
        split = {kind: split_normalization(transforms[kind]) for kind in KINDS}
        self._loader_transforms = {kind: host for kind, (host, _) in split.items()}
        self._normalization = {kind: norm for kind, (_, norm) in split.items()}

    def prepare_head(self, saved: dict[str, Any] | None) -> None:
        """Shape the detector's head before weights are applied (``saved``: the hparams
        of the checkpoint they come from); the binary detector keeps its own."""

    def configure_losses(self) -> None:
        self.criterion = torch.nn.BCEWithLogitsLoss()

    def configure_metrics(self) -> None:
        metrics = MetricCollection({"acc": BinaryAccuracy(), "auroc": BinaryAUROC()})
        self.train_metrics = metrics.clone(prefix="train_")
        self.val_metrics = metrics.clone(prefix="val_")
        # Exact over all ranks (sums and gathered logits), so DDP equals one process.
        self.val_loss = MeanMetric()
        self.val_logits, self.val_labels = CatMetric(), CatMetric()
        # Test metrics need the data's groups and passes: built in on_test_epoch_start.
        self.test_metrics: dict[str, GroupedDetectionMetrics] = {}

    def configure_optimizers(self) -> Any:
        params = [p for p in self.detector.parameters() if p.requires_grad]
        optimizer, scheduler = self.detector.configure_optimizer(params)
        if self.hparams.lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] = self.hparams.lr
        if scheduler is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }

    def configure_callbacks(self) -> list[Callback]:
        """The run's outputs: scores.parquet, then metrics.json and the tables."""
        scores = ScoreWriter()
        return [scores, RunSummary(scores)]

    # -- preprocessing: the loader's part up to uint8, the rest on the device --------------
    def eval_transform(self) -> Any:
        """The detector's whole test-time preprocessing (PIL image → normalised tensor)."""
        return self.detector.eval_transform()

    def loader_transforms(self) -> dict[str, Any]:
        """The preprocessing the DataLoaders run (``train``, ``eval``): the detector's, up to
        a uint8 tensor. Its final ``ToTensor`` + ``Normalize`` run on the device instead
        (`on_after_batch_transfer`): the same operations on the same values, but a quarter
        of the bytes to collate, pin and copy."""
        return dict(self._loader_transforms)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels, meta = batch
        if isinstance(images, list):  # images of different sizes (see `collate`)
            return [self._normalized(image[None])[0] for image in images], labels, meta
        return self._normalized(images), labels, meta

    def _normalized(self, images: Tensor) -> Tensor:
        if images.dtype == torch.uint8 and len(images):
            trainer = self._trainer
            kind = "train" if trainer is not None and trainer.training else "eval"
            normalization = self._normalization[kind]
            if normalization is not None:
                mean, std = (t.to(images.device) for t in normalization)
                images = images.float().div(255).sub_(mean).div_(std)
        return images

    def forward(self, images: Tensor | list[Tensor]) -> Tensor:
        if isinstance(images, list):  # images of different sizes: one forward each
            return torch.cat([self.detector(image[None]) for image in images])
        return self.detector(images)

    # -- fit -------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self.calibration.reset()  # a threshold fitted for the starting weights is not ours

    def on_train_epoch_start(self) -> None:
        for name, module in self.detector.named_modules():
            if name and any(f"{name}.".startswith(p) for p in self.detector.frozen_prefixes):
                module.eval()  # frozen backbones keep eval-mode norms and no dropout

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        images, labels, _ = batch
        if len(images) == 0:  # every sample of this batch was unreadable (logged)
            return self._empty_batch_loss()
        logits = self(images)
        loss = self.criterion(logits, labels.float())
        self.train_metrics.update(torch.sigmoid(logits.detach().double()), labels)
        self._log_loss(loss, batch_size=len(labels))
        return loss

    def _empty_batch_loss(self) -> Tensor | None:
        """The step of a batch with no readable sample.

        One process: None, and Lightning skips the step. Under DDP every rank must join
        the gradient all-reduce and the loss sync, or the others fail (Lightning refuses a
        None step there): a zero loss touching every trainable parameter, logged with
        weight 0. The other ranks' gradients are then averaged with zeros, as for any
        rank with fewer samples.
        """
        if self.trainer.world_size <= 1:
            return None
        zero = torch.zeros((), device=self.device)
        loss = sum((p.sum() * 0.0 for p in self.parameters() if p.requires_grad), zero)
        self._log_loss(loss, batch_size=0)
        return loss

    def _log_loss(self, loss: Tensor, batch_size: int) -> None:
        self.log("train_loss", loss, batch_size=batch_size, prog_bar=True, sync_dist=True,
                 on_step=True, on_epoch=True)  # fmt: skip

    def on_train_epoch_end(self) -> None:
        self.log_dict(self.train_metrics.compute())
        self.train_metrics.reset()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels, _ = batch
        if len(images) == 0:  # every sample of this batch was unreadable (logged)
            return
        logits = self(images)
        self.val_loss.update(self.criterion(logits, labels.float()), weight=len(labels))
        self.val_metrics.update(torch.sigmoid(logits.double()), labels)
        self.val_logits.update(logits.double())
        self.val_labels.update(labels.double())

    def on_validation_epoch_end(self) -> None:
        # The sanity check's few batches, often of one class, measure and calibrate nothing.
        if not self.trainer.sanity_checking:
            # Already reduced over ranks by torchmetrics: every rank logs the same floats.
            self.log("val_loss", float(self.val_loss.compute()), prog_bar=True)
            metrics = self.val_metrics.compute()
            self.log_dict({k: float(v) for k, v in metrics.items()}, prog_bar=True)
            threshold = self.calibration.fit(self.val_logits.compute(), self.val_labels.compute())
            self.log("val_threshold", threshold)
        for metric in (self.val_loss, self.val_metrics, self.val_logits, self.val_labels):
            metric.reset()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[WEIGHT_FILES_KEY] = dict(self.detector.weight_files)  # checked on load
        prefixes = tuple(f"detector.{p}" for p in self.detector.frozen_prefixes)
        if prefixes:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith(prefixes)]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        if "calibration.threshold" not in state:  # written by qdd before Calibration
            state.update(calibration_state(checkpoint.get(LEGACY_KEY), "calibration."))
        if self.detector.frozen_prefixes:
            apply_state(self.detector, checkpoint_state(checkpoint), "checkpoint")

    # -- test: metrics per group and per perturbation pass, exact over all ranks -----------
    def on_test_epoch_start(self) -> None:
        data = self.trainer.datamodule
        groups = sorted(data.groups) if data is not None else []
        passes = data.perturbation_names if data is not None else [UNPERTURBED]
        threshold = None if self.accuracy_note and self.calibration.value is None else (
            self.hparams.threshold)  # fmt: skip
        metric = GroupedDetectionMetrics(groups, threshold, self.calibration.value)
        self.test_metrics = {name: metric.clone().to(self.device) for name in passes}
        self._group_index = {name: i for i, name in enumerate(groups)}

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Logits of a batch (kept by `ScoreWriter`), added to its pass's metrics."""
        logits = self.predict_step(batch, batch_idx)
        _, labels, meta = batch
        if len(logits):
            names = batch_groups(meta)
            stray = [g for g in names if g not in self._group_index]
            if stray and self._group_index:  # the data module's groups come from the same
                raise QddError(  # `group_label` of the same JSON: a bug if this is ever hit
                    f"{len(stray)} image(s) of group {stray[0]} are in none of the data's "
                    f"groups ({', '.join(sorted(self._group_index)[:4])}…): please report it"
                )
            groups = [self._group_index.get(g, -1) for g in names]
            group_ids = torch.tensor(groups, device=logits.device)
            for name, metric in self.test_metrics.items():
                rows = [i for i, p in enumerate(meta["perturbation"]) if p == name]
                if rows:
                    rows_t = torch.tensor(rows, device=logits.device)
                    metric.update(logits[rows_t], labels[rows_t], group_ids[rows_t])
        return logits

    def on_test_epoch_end(self) -> None:
        for metric in self.test_metrics.values():
            metric.ensure_state()  # a rank that saw no sample still joins the gather
        self.test_results = {name: m.compute() for name, m in self.test_metrics.items()}
        for name, result in self.test_results.items():
            suffix = "" if name == UNPERTURBED else f"/{name}"
            values = {f"test_{k}{suffix}": v for k, v in result["overall"].items()}
            self.log_dict({k: v for k, v in values.items() if v is not None}, rank_zero_only=True)

    @property
    def accuracy_note(self) -> str | None:
        """Why accuracy at ``threshold`` is not meaningful for this detector (None: it is)."""
        kind = type(self.detector)
        return accuracy_note(kind.name, kind.card.trainable, float(self.hparams.threshold),
                             self.calibration.value)  # fmt: skip

    # -- predict: scores only (kept by `ScoreWriter`) ----------------------------------------
    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        images = batch[0]
        if len(images) == 0:  # every sample of this batch was skipped
            return images.new_zeros(0)
        return self(images).float().flatten()


def split_normalization(transform: Any) -> tuple[Any, tuple[Tensor, Tensor] | None]:
    """``Compose([..., ToTensor(), Normalize(m, s)])`` → ``(Compose([..., PILToTensor()]),
    (mean, std))`` as broadcastable tensors; any other transform is returned unchanged."""
    from torchvision import transforms

    steps = list(getattr(transform, "transforms", []))
    if len(steps) < 2:
        return transform, None
    to_tensor, normalize = steps[-2:]
    if type(to_tensor) is not transforms.ToTensor or type(normalize) is not transforms.Normalize:
        return transform, None
    mean = torch.as_tensor(normalize.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(normalize.std, dtype=torch.float32).view(1, -1, 1, 1)
    return transforms.Compose([*steps[:-2], transforms.PILToTensor()]), (mean, std)
