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
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor
from torchmetrics import CatMetric, MeanMetric, MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC

from qdd.calibration import fit_threshold, parse_rule
from qdd.datamodules.dataset import META_FIELDS
from qdd.detectors import build_detector, load_detector
from qdd.detectors.weights import apply_state
from qdd.errors import QddError
from qdd.metrics import METRICS, GroupedDetectionMetrics

log = logging.getLogger(__name__)

#: One row of scores.parquet: the sample's metadata as the data loader passes it along,
#: its label, its group and the detector's logit.
SCORE_COLUMNS = ("key", "label", *META_FIELDS[1:], "group", "logit")


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
        self.scores: list[dict[str, Any]] = []

    # -- hooks, torchgeo style -------------------------------------------------------------
    def configure_models(self) -> None:
        hp = self.hparams
        args = dict(hp.detector_args or {})
        if hp.weights and str(hp.weights).endswith(".ckpt"):
            if not Path(hp.weights).is_file():
                raise QddError(f"checkpoint {hp.weights} does not exist: check the path")
            checkpoint = torch.load(hp.weights, map_location="cpu", weights_only=True)
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

    def forward(self, images: Tensor) -> Tensor:
        return self.detector(images)

    # -- fit -------------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        for name, module in self.detector.named_modules():
            if name and any(f"{name}.".startswith(p) for p in self.detector.frozen_prefixes):
                module.eval()  # frozen backbones keep eval-mode norms and no dropout

    def _step(self, batch: Any, metrics: MetricCollection, stage: str) -> Tensor:
        images, labels, _ = batch
        logits = self(images)
        loss = self.criterion(logits, labels.float())
        metrics.update(torch.sigmoid(logits.detach().double()), labels)
        self.log(
            f"{stage}_loss",
            loss,
            batch_size=len(labels),
            prog_bar=True,
            sync_dist=True,
            on_step=stage == "train",
            on_epoch=True,
        )
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, self.train_metrics, "train")

    def on_train_epoch_end(self) -> None:
        self.log_dict(self.train_metrics.compute())
        self.train_metrics.reset()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels, _ = batch
        logits = self(images)
        self.val_loss.update(self.criterion(logits, labels.float()), weight=len(labels))
        self.val_metrics.update(torch.sigmoid(logits.double()), labels)
        self.val_logits.update(logits.double())
        self.val_labels.update(labels.double())

    def on_validation_epoch_end(self) -> None:
        # Already reduced over ranks by torchmetrics: every rank logs the same floats.
        self.log("val_loss", float(self.val_loss.compute()), prog_bar=True)
        self.log_dict({k: float(v) for k, v in self.val_metrics.compute().items()}, prog_bar=True)
        logits, labels = self.val_logits.compute(), self.val_labels.compute()
        for metric in (self.val_loss, self.val_metrics, self.val_logits, self.val_labels):
            metric.reset()
        if self.trainer.sanity_checking:
            return  # a few batches: not a calibration
        self.calibration = fit_threshold(logits, labels, self.hparams.calibration)
        self.log("val_threshold", self.calibration["threshold"])

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
    def on_test_epoch_start(self) -> None:
        datamodule = self.trainer.datamodule
        self.groups = sorted(datamodule.groups) if datamodule is not None else []
        self.test_metrics = GroupedDetectionMetrics(
            self.groups, self.hparams.threshold, self.calibrated_threshold
        )
        self.test_metrics.to(self.device)
        self.scores = []

    @property
    def calibrated_threshold(self) -> float | None:
        """The threshold fitted on validation that these weights carry, or None."""
        return None if self.calibration is None else self.calibration["threshold"]

    def _score(self, batch: Any) -> tuple[Tensor, Tensor, list[str]]:
        """Logits of a batch, each kept as a scores row with its group and metadata."""
        images, labels, meta = batch
        logits = self(images).float()
        names = [
            group_name(int(lab), src, gen, prec)
            for lab, src, gen, prec in zip(
                labels, meta["source"], meta["generator"], meta["precision"], strict=True
            )
        ]
        for i, value in enumerate(logits.cpu().tolist()):
            row = {c: meta[c][i] or None for c in SCORE_COLUMNS if c in meta}
            row.update(label=int(labels[i]), group=names[i], logit=value)
            self.scores.append(row)
        return logits, labels, names

    def test_step(self, batch: Any, batch_idx: int) -> None:
        logits, labels, names = self._score(batch)
        index = {name: i for i, name in enumerate(self.groups)}
        ids = torch.tensor([index.get(n, -1) for n in names], device=logits.device)
        self.test_metrics.update(logits, labels, ids)

    def on_test_epoch_end(self) -> None:
        self.test_metrics.ensure_state()
        results = self.test_metrics.compute()
        self.test_metrics.reset()
        for name, value in results["overall"].items():
            if value is not None:
                self.log(f"test_{name}", value, rank_zero_only=True)
        self.results = results
        self._write_outputs(results)

    # -- predict: scores only, for shards whose labels are unknown or not needed -----------
    def on_predict_epoch_start(self) -> None:
        self.scores = []

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._score(batch)[0]

    def on_predict_epoch_end(self) -> None:
        self._gather_scores()

    def _gather_scores(self) -> Any:
        """All ranks' rows in run_dir/scores.parquet (written by rank 0, None elsewhere)."""
        import pandas as pd

        run_dir = Path(self.trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        rank = self.trainer.global_rank
        part = run_dir / f".scores.rank{rank}.parquet"
        frame = pd.DataFrame(self.scores, columns=[*SCORE_COLUMNS])
        frame["detector"] = self.hparams.detector
        frame.to_parquet(part, index=False)
        self.trainer.strategy.barrier()
        if rank != 0:
            return None
        parts = sorted(run_dir.glob(".scores.rank*.parquet"))
        scores = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
        scores = scores.sort_values(["group", "key"], kind="stable", ignore_index=True)
        scores.to_parquet(run_dir / "scores.parquet", index=False)
        for p in parts:
            p.unlink()
        return scores

    def _write_outputs(self, results: dict[str, Any]) -> None:
        """scores.parquet (all ranks' rows) and metrics.json in the run folder, by rank 0."""

        scores = self._gather_scores()
        if scores is None:
            return
        run_dir = Path(self.trainer.default_root_dir)
        metrics = {
            "detector": self.hparams.detector,
            "weights": self.detector.weights_source,
            "data": [str(f) for f in getattr(self.trainer.datamodule, "folders", [])],
            "threshold": self.hparams.threshold,
            "calibrated_threshold": self.calibrated_threshold,
            "calibration": self.calibration,
            "n": results["n"],
            "overall": results["overall"],
            "groups": results["groups"],
            "recipes": recipes(scores),
        }
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json) + "\n")
        log_table(self, metrics)


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


def format_table(metrics: dict[str, Any]) -> str:
    """The console table: one row per group, then the overall row."""
    header = ["group", "n_fake", *METRICS]
    rows = [
        [group, str(values["n_fake"]), *(_fmt(values[m]) for m in METRICS)]
        for group, values in metrics["groups"].items()
    ]
    n_fake = sum(values["n_fake"] for values in metrics["groups"].values())
    rows.append(["overall", str(n_fake), *(_fmt(metrics["overall"][m]) for m in METRICS)])
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
            columns = ["group", "n_fake", *METRICS]
            data = [
                [g, v["n_fake"], *(v[m] for m in METRICS)] for g, v in metrics["groups"].items()
            ]
            log_table_fn(key="test_groups", columns=columns, data=data)
