"""`DetectorModule`: any registered detector, for ``qdd-cli fit`` and ``qdd-cli test``.

Follows torchgeo's trainer shape: ``configure_models`` / ``configure_losses`` /
``configure_metrics`` hooks, one MetricCollection cloned per stage. Testing also keeps
every sample's logit, so the run folder gets ``scores.parquet`` and ``metrics.json``.

Weights: ``weights`` is an official file, or a Lightning checkpoint of a previous ``fit``
(``*.ckpt``); ``None`` means the detector's official file under ``checkpoints/``. A
detector without weights refuses to run unless ``random_weights=True``. Frozen backbones
(CLIP detectors) are kept out of saved checkpoints: they are rebuilt from
``detector_args`` (the backbone weight file) on load.

Calibration: every validation epoch of ``fit`` fits a decision threshold on the gathered
validation logits (`qdd.calibration`, rule ``calibration``); checkpoints carry it under
``qdd_calibration`` and ``test`` reports accuracy at it beside accuracy at ``threshold``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor
from torchmetrics import CatMetric, MeanMetric, MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC

from qdd.calibration import fit_threshold, parse_rule
from qdd.datamodules.dataset import META_FIELDS, UNPERTURBED
from qdd.detectors import build_detector, load_detector
from qdd.detectors.weights import apply_state, load_tensor_file
from qdd.errors import QddError
from qdd.metrics import METRICS, grouped_metrics

log = logging.getLogger(__name__)

#: One row of scores.parquet: the sample's metadata as the data loader passes it along,
#: its label, its group and the detector's logit.
SCORE_COLUMNS = ("key", "label", *META_FIELDS[1:], "group", "logit")
#: The column (after SCORE_COLUMNS) naming the test-time perturbation of each row.
PERTURBATION = "perturbation"
#: What a batch's metadata carries per row (see `qdd.datamodules.dataset.collate`).
ROW_FIELDS = (*META_FIELDS, "label", PERTURBATION)


def checkpoint_state(checkpoint: dict[str, Any]) -> dict[str, Tensor]:
    """The detector's weights inside a Lightning checkpoint written by ``qdd-cli fit``."""
    state = checkpoint.get("state_dict", {})
    return {k.removeprefix("detector."): v for k, v in state.items() if k.startswith("detector.")}


def group_name(label: int, source: str, generator: str, precision: str) -> str:
    """Same rule as `qdd.datamodules.schema.group_of`, on collated string metadata."""
    if label == 0:
        return f"real/{source}"
    return f"{generator or source}/{precision or 'unknown'}"


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
        parse_rule(calibration)  # a bad rule fails now, not after the first epoch
        self.save_hyperparameters()
        #: The threshold fitted on validation (`qdd.calibration.fit_threshold`), or None.
        self.calibration: dict[str, Any] | None = None
        self.configure_models()
        self.configure_losses()
        self.configure_metrics()
        self._normalization: dict[str, tuple[Tensor, Tensor] | None] = {}
        self._reset_scores()

    # -- hooks, torchgeo style -------------------------------------------------------------
    def configure_models(self) -> None:
        hp = self.hparams
        args = dict(hp.detector_args or {})
        if hp.weights and str(hp.weights).endswith(".ckpt"):
            if not Path(hp.weights).is_file():
                raise QddError(f"checkpoint {hp.weights} does not exist: check the path")
            checkpoint = load_tensor_file(hp.weights)  # one-line error if it is not one
            self.detector = build_detector(hp.detector, **args)
            apply_state(self.detector, checkpoint_state(checkpoint), str(hp.weights))
            self.detector.weights_source = str(hp.weights)
            self.calibration = checkpoint.get("qdd_calibration")
        else:
            self.detector = load_detector(
                hp.detector, hp.weights, random_weights=hp.random_weights, **args
            )
        # Frozen backbones are not in our checkpoints: load the rest strictly ourselves.
        self.strict_loading = not self.detector.frozen_prefixes
        # NHWC convolutions run ~1.5x faster on CPU (oneDNN) and on tensor cores.
        self.detector.to(memory_format=torch.channels_last)

    def configure_losses(self) -> None:
        self.criterion = torch.nn.BCEWithLogitsLoss()

    def configure_metrics(self) -> None:
        metrics = MetricCollection({"acc": BinaryAccuracy(), "auroc": BinaryAUROC()})
        self.train_metrics = metrics.clone(prefix="train_")
        self.val_metrics = metrics.clone(prefix="val_")
        # Exact over all ranks (sums and gathered logits), so DDP equals one process.
        self.val_loss = MeanMetric()
        self.val_logits, self.val_labels = CatMetric(), CatMetric()

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

    # -- the detector's own preprocessing, asked for by ShardDataModule --------------------
    def train_transform(self) -> Any:
        return self.detector.train_transform()

    def eval_transform(self) -> Any:
        return self.detector.eval_transform()

    def loader_transform(self, kind: str) -> Any:
        """The preprocessing the DataLoader runs: the detector's, up to a uint8 tensor.

        Its final ``ToTensor`` + ``Normalize`` run on the device instead
        (`on_after_batch_transfer`): the same operations on the same values, but a quarter
        of the bytes to collate, pin and copy.
        """
        transform = self.train_transform() if kind == "train" else self.eval_transform()
        host, normalization = split_normalization(transform)
        self._normalization[kind] = normalization
        return host

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels, meta = batch
        if images.dtype == torch.uint8 and len(images):
            trainer = self._trainer
            kind = "train" if trainer is not None and trainer.training else "eval"
            normalization = self._normalization.get(kind)
            if normalization is not None:
                mean, std = (t.to(images.device) for t in normalization)
                images = images.float().div(255).sub_(mean).div_(std)
        return images, labels, meta

    def forward(self, images: Tensor) -> Tensor:
        return self.detector(images)

    # -- fit -------------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        for name, module in self.detector.named_modules():
            if name and any(f"{name}.".startswith(p) for p in self.detector.frozen_prefixes):
                module.eval()  # frozen backbones keep eval-mode norms and no dropout

    def _step(self, batch: Any, metrics: MetricCollection, stage: str) -> Tensor | None:
        images, labels, _ = batch
        if len(images) == 0:  # every sample of this batch was unreadable (logged)
            return self._empty_batch_loss(stage)
        logits = self(images)
        loss = self.criterion(logits, labels.float())
        metrics.update(torch.sigmoid(logits.detach().double()), labels)
        self._log_loss(stage, loss, batch_size=len(labels))
        return loss

    def _empty_batch_loss(self, stage: str) -> Tensor | None:
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
        self._log_loss(stage, loss, batch_size=0)
        return loss

    def _log_loss(self, stage: str, loss: Tensor, batch_size: int) -> None:
        self.log(f"{stage}_loss", loss, batch_size=batch_size, prog_bar=True, sync_dist=True,
                 on_step=stage == "train", on_epoch=True)  # fmt: skip

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        return self._step(batch, self.train_metrics, "train")

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
            logits, labels = self.val_logits.compute(), self.val_labels.compute()
            self.calibration = fit_threshold(logits, labels, self.hparams.calibration)
            self.log("val_threshold", self.calibration["threshold"])
        for metric in (self.val_loss, self.val_metrics, self.val_logits, self.val_labels):
            metric.reset()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["qdd_calibration"] = self.calibration
        prefixes = tuple(f"detector.{p}" for p in self.detector.frozen_prefixes)
        if prefixes:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith(prefixes)]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.calibration = checkpoint.get("qdd_calibration")
        if self.detector.frozen_prefixes:
            apply_state(self.detector, checkpoint_state(checkpoint), "checkpoint")

    # -- test ------------------------------------------------------------------------------
    # Per batch only the logits (kept on the device) and the batch's metadata lists are kept:
    # no metric update, no device-to-host copy, no synchronisation. At the end of the epoch
    # the scores of all ranks meet on rank 0 through the process group, which computes the
    # metrics per perturbation and writes scores.parquet and metrics.json once.
    def on_test_epoch_start(self) -> None:
        self._reset_scores()

    @property
    def calibrated_threshold(self) -> float | None:
        """The threshold fitted on validation that these weights carry, or None."""
        return None if self.calibration is None else self.calibration["threshold"]

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._score(batch)

    def on_test_epoch_end(self) -> None:
        scores, skipped = self._gather_scores()
        if scores is None:
            return
        datamodule = self.trainer.datamodule
        groups = sorted(getattr(datamodule, "groups", {}) or set(scores["group"]))
        names = self._perturbation_names
        by_perturbation = {}
        for name in names:
            rows = scores[scores[PERTURBATION] == name]
            by_perturbation[name] = frame_metrics(
                rows, groups, self.hparams.threshold, self.calibrated_threshold
            )
        results = by_perturbation[UNPERTURBED]
        for name, value in results["overall"].items():
            if value is not None:
                self.log(f"test_{name}", value, rank_zero_only=True)
        for perturbation, result in by_perturbation.items():
            for name, value in result["overall"].items():
                if perturbation != UNPERTURBED and value is not None:
                    self.log(f"test_{name}/{perturbation}", value, rank_zero_only=True)
        self.results = results
        run_dir = Path(self.trainer.default_root_dir)
        metrics = {
            "detector": self.hparams.detector,
            "weights": self.detector.weights_source,
            "data": [str(f) for f in getattr(datamodule, "folders", [])],
            "reencode": getattr(datamodule, "reencode", None),
            "formats": getattr(datamodule, "formats", None),
            "threshold": self.hparams.threshold,
            "calibrated_threshold": self.calibrated_threshold,
            "calibration": self.calibration,
            "n": results["n"],
            "expected": getattr(datamodule, "expected", None),
            "n_skipped": len(skipped),
            "skipped": skipped,
            "overall": results["overall"],
            "groups": results["groups"],
            "recipes": recipes(scores[scores[PERTURBATION] == UNPERTURBED]),
            "perturbations": names,
            "by_perturbation": by_perturbation,
        }
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json) + "\n")
        log_table(self, metrics)

    # -- predict: scores only, for shards whose labels are unknown or not needed -----------
    def on_predict_epoch_start(self) -> None:
        self._reset_scores()

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._score(batch)

    def on_predict_epoch_end(self) -> None:
        self._gather_scores()

    # -- score bookkeeping shared by test and predict ---------------------------------------
    @property
    def _perturbation_names(self) -> list[str]:
        """The passes the data module scores (a loader of another kind: the plain one)."""
        return list(getattr(self.trainer.datamodule, "perturbation_names", [UNPERTURBED]))

    def _reset_scores(self) -> None:
        self._logits: list[Tensor] = []
        self._rows: dict[str, list[Any]] = {field: [] for field in ROW_FIELDS}
        self._skipped: list[dict[str, str]] = []

    def _score(self, batch: Any) -> Tensor:
        """Logits of a batch; the rows' metadata and the batch's skipped samples are kept."""
        images, labels, meta = batch
        self._skipped.extend(meta.get("skipped", []))
        if len(images) == 0:  # every sample of this batch was skipped
            return images.new_zeros(0)
        logits = self(images).float().flatten()
        self._logits.append(logits)
        for field in ROW_FIELDS:
            values = meta.get(field)
            if values is None:  # a loader other than ShardDataModule's: plain defaults
                n = len(logits)
                default = {"label": None, PERTURBATION: [UNPERTURBED] * n}.get(field, [""] * n)
                values = labels.tolist() if default is None else default
            self._rows[field].extend(values)
        return logits

    def _gather_scores(self) -> tuple[Any, list[dict[str, str]]]:
        """All ranks' rows in run_dir/scores.parquet, written by rank 0.

        Returns ``(scores, skipped)`` on rank 0 and ``(None, [])`` elsewhere. The rows
        travel through the process group (``gather_object``), so nothing depends on a
        file system shared between nodes. Says on stderr when the scored count differs
        from the manifests' total.
        """
        import pandas as pd

        logits = torch.cat(self._logits).cpu().tolist() if self._logits else []
        local = {"rows": {**self._rows, "logit": logits}, "skipped": self._skipped}
        parts = _gather_to_rank_zero(local, self.trainer.world_size)
        if parts is None:
            return None, []
        columns = {
            c: [v for part in parts for v in part["rows"][c]] for c in (*ROW_FIELDS, "logit")
        }
        skipped = sorted(
            (s for part in parts for s in part["skipped"]), key=lambda s: (s["shard"], s["key"])
        )
        scores = pd.DataFrame(columns)
        scores["group"] = [
            group_name(label, source, generator, precision)
            for label, source, generator, precision in zip(
                columns["label"], columns["source"], columns["generator"], columns["precision"],
                strict=True,
            )
        ]  # fmt: skip
        for field in META_FIELDS:  # empty metadata strings are missing values
            scores[field] = scores[field].where(scores[field] != "", None)
        order = scores[PERTURBATION].map({n: i for i, n in enumerate(self._perturbation_names)})
        scores = (
            scores.assign(_order=order)
            .sort_values(["_order", "group", "key"], kind="stable", ignore_index=True)
            .drop(columns="_order")
        )
        scores = scores[[*SCORE_COLUMNS, PERTURBATION]].assign(detector=self.hparams.detector)
        run_dir = Path(self.trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        scores.to_parquet(run_dir / "scores.parquet", index=False)
        report_count(
            int((scores[PERTURBATION] == UNPERTURBED).sum()),
            getattr(self.trainer.datamodule, "expected", None),
            skipped,
        )
        return scores, skipped


def _gather_to_rank_zero(obj: Any, world_size: int) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (in rank order), ``None`` on the other ranks."""
    import torch.distributed as dist

    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    rank = dist.get_rank()
    parts: list[Any] | None = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(obj, parts, dst=0)
    return parts


def report_count(scored: int, expected: int | None, skipped: list[dict[str, str]]) -> None:
    """Name every skipped sample in the log, and say on stderr when the count falls short."""
    for sample in skipped[:20]:
        log.warning("skipped %s in %s: %s", sample["key"], sample["shard"], sample["error"])
    if len(skipped) > 20:
        log.warning("... and %d more skipped samples (listed in metrics.json)", len(skipped) - 20)
    if expected is None or scored == expected:
        return
    message = f"scored {scored} of the {expected} samples in the manifests"
    if skipped:
        message += f"; {len(skipped)} could not be read (named under 'skipped' in metrics.json)"
    missing = expected - scored - len(skipped)
    if missing:
        message += f"; {missing} unaccounted for: this is a bug in qdd, please report it"
    print(f"qdd: warning: {message}", file=sys.stderr, flush=True)


def frame_metrics(
    scores: Any, groups: list[str], threshold: float, calibrated: float | None = None
) -> dict[str, Any]:
    """`grouped_metrics` of a scores frame (one perturbation)."""
    index = {name: i for i, name in enumerate(groups)}
    return grouped_metrics(
        torch.tensor(scores["logit"].to_numpy(), dtype=torch.float32),
        torch.tensor(scores["label"].to_numpy(), dtype=torch.long),
        torch.tensor([index.get(g, -1) for g in scores["group"]], dtype=torch.long),
        groups,
        threshold,
        calibrated,
    )


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


def recipes(scores: Any) -> dict[str, dict[str, Any]]:
    """How each fake group was made, as recorded in its samples' metadata."""
    fakes = scores[scores["label"] == 1]
    columns = ["generator", "precision", "quant_backend", "quant_scope", "model_id"]
    out = {}
    for group, rows in fakes.groupby("group", sort=True):
        first = rows.iloc[0]
        out[group] = {c: (None if _missing(first[c]) else first[c]) for c in columns}
    return out


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _json(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(type(value))


def table_metrics(metrics: dict[str, Any]) -> list[str]:
    """`METRICS`, with ``acc_calibrated`` beside ``acc`` when the weights carry a threshold."""
    if metrics.get("calibrated_threshold") is None:
        return list(METRICS)
    return ["acc", "acc_calibrated", *METRICS[1:]]


def format_table(metrics: dict[str, Any]) -> str:
    """The console table: one row per group, then the overall row; then, when the run has
    perturbations, one overall row per perturbation."""
    columns = table_metrics(metrics)
    rows = [
        [group, str(values["n_fake"]), *(_fmt(values[m]) for m in columns)]
        for group, values in metrics["groups"].items()
    ]
    n_fake = sum(values["n_fake"] for values in metrics["groups"].values())
    rows.append(["overall", str(n_fake), *(_fmt(metrics["overall"][m]) for m in columns)])
    table = _grid(["group", "n_fake", *columns], rows)
    perturbed = metrics.get("by_perturbation", {})
    if len(perturbed) > 1:
        rows = [
            [name, str(result["n"]), *(_fmt(result["overall"][m]) for m in columns)]
            for name, result in perturbed.items()
        ]
        table += "\n\n" + _grid(["perturbation", "n", *columns], rows)
    return table


def _grid(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(padded)

    lines = [line(r) for r in [header, *rows]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def log_table(module: LightningModule, metrics: dict[str, Any]) -> None:
    """Print the table and hand it to W&B when that logger is in use."""
    table = format_table(metrics)
    print(f"\n{metrics['detector']} on {len(metrics['data'])} folder(s)\n{table}\n", flush=True)
    for logger in module.loggers:
        log_table_fn = getattr(logger, "log_table", None)
        if callable(log_table_fn) and type(logger).__name__ == "WandbLogger":
            columns = ["group", "n_fake", *table_metrics(metrics)]
            data = [
                [g, v["n_fake"], *(v[m] for m in table_metrics(metrics))]
                for g, v in metrics["groups"].items()
            ]
            log_table_fn(key="test_groups", columns=columns, data=data)
