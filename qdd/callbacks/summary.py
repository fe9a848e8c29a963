"""`RunSummary`: a run's ``metrics.json`` (fit, validate and test alike) and its tables.

- fit: how far it went (epochs, steps, what stopped it), the last logged metrics, the
  calibrated threshold, what the data module drew from, the best and last checkpoints;
- validate: the logged metrics and the threshold this validation fitted;
- fit, validate and test: ``train_overlap``, the evaluated images in the training data of
  the checkpoint the run starts from or evaluates (`qdd.checkpoint`);
- test: ``accuracy_note`` where accuracy at logit 0 means nothing (a training-free
  detector), per group and per perturbation pass (`DetectorModule.test_results`), the skipped
  samples (`ScoreWriter.skipped`), and how each fake group was made; printed as a table,
  and handed to W&B as one when a WandbLogger is in use.

Written by global rank 0 into ``trainer.default_root_dir``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn

from qdd.callbacks.scores import PERTURBATION, ScoreWriter
from qdd.datamodules.dataset import UNPERTURBED
from qdd.metrics import METRICS


class RunSummary(Callback):
    """Writes ``metrics.json`` when a fit, a validation or a test ends (see the module)."""

    def __init__(self, scores: ScoreWriter) -> None:
        self.scores = scores
        #: What the last hook wrote to metrics.json (rank 0; empty elsewhere and before).
        self.metrics: dict[str, Any] = {}

    def write(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self.metrics = metrics
        write_metrics(trainer, metrics)

    def summary(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        """What a fit's and a validation's metrics.json say of the model (a hook: a task
        adds what it names)."""
        return model_summary(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            callback = trainer.checkpoint_callback
            self.write(trainer, {
                **self.summary(trainer, pl_module),
                **fit_progress(trainer),
                "best_checkpoint": callback.best_model_path if callback else None,
                "last_checkpoint": callback.last_model_path if callback else None,
            })  # fmt: skip

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING and trainer.is_global_zero:
            self.write(trainer, self.summary(trainer, pl_module))

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = summary_of_test(trainer, pl_module, self.scores)
        self.write(trainer, metrics)
        table = format_table(metrics)
        note = f"note: {metrics['accuracy_note']}\n" if metrics.get("accuracy_note") else ""
        print(f"\n{metrics['detector']} on {len(metrics['data'])} folder(s)\n{table}\n{note}",
              flush=True)  # fmt: skip
        columns = ["group", "n_fake", *table_metrics(metrics)]
        rows = [
            [g, v["n_fake"], *(v[m] for m in columns[2:])] for g, v in metrics["groups"].items()
        ]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key="test_groups", columns=columns, data=rows)


def write_metrics(trainer: Trainer, metrics: dict[str, Any]) -> None:
    run_dir = Path(trainer.default_root_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(metrics, indent=2, default=lambda value: value.item())
    (run_dir / "metrics.json").write_text(text + "\n")


def model_summary(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
    """What fit and validate report: the weights, the last logged values, the threshold."""
    data = trainer.datamodule
    return {
        "detector": pl_module.hparams.detector,
        "weights": pl_module.detector.weights_source,
        "weight_files": dict(pl_module.detector.weight_files),  # path → sha256
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "calibrated_threshold": pl_module.calibration.value,
        "calibration": pl_module.calibration.summary(),
        # validation images in the start checkpoint's training data (0: checked, none;
        # null: no checkpoint to check against); see qdd.checkpoint
        "train_overlap": data.train_overlap if data is not None else None,
        "data": data.describe() if data is not None else None,
    }


def fit_progress(trainer: Trainer) -> dict[str, Any]:
    """How far a fit went: epochs (a fraction for a partial last one), steps, what stopped it."""
    completed = trainer.fit_loop.epoch_progress.current.completed
    batches = trainer.fit_loop.epoch_loop.batch_progress.current.completed
    per_epoch = trainer.num_training_batches
    epochs: float = completed
    if completed and 0 < batches < per_epoch < float("inf"):
        epochs = completed - 1 + batches / per_epoch  # the last epoch stopped part-way
    if 0 < trainer.max_steps <= trainer.global_step:
        stopped_by = "max_steps"
    elif trainer.max_epochs is not None and 0 <= trainer.max_epochs <= completed:
        stopped_by = "max_epochs"
    else:
        stopped_by = "stop requested (a callback, e.g. early stopping, or an interrupt)"
    return {
        "epochs": round(epochs, 4),
        "steps": trainer.global_step,
        "batches_per_epoch": per_epoch if per_epoch < float("inf") else None,
        "stopped_by": stopped_by,
    }


def summary_of_test(
    trainer: Trainer, pl_module: LightningModule, scores: ScoreWriter
) -> dict[str, Any]:
    """metrics.json of a test run; the top-level numbers are the unperturbed pass's."""
    data = trainer.datamodule
    by_perturbation = pl_module.test_results
    results = by_perturbation[UNPERTURBED]
    frame = scores.scores
    return {
        "detector": pl_module.hparams.detector,
        "weights": pl_module.detector.weights_source,
        "weight_files": dict(pl_module.detector.weight_files),  # path → sha256
        "data": [str(f) for f in data.folders] if data is not None else [],
        "reencode": data.reencode if data is not None else None,
        "formats": data.formats if data is not None else None,
        "threshold": pl_module.hparams.threshold,
        "calibrated_threshold": pl_module.calibration.value,
        "calibration": pl_module.calibration.summary(),
        # a training-free detector's accuracies at logit 0 mean nothing (left out when it
        # is uncalibrated): `qdd.calibration.accuracy_note`
        "accuracy_note": getattr(pl_module, "accuracy_note", None),
        "n": results["n"],
        "expected": data.expected if data is not None else None,
        # images of the checkpoint's training data evaluated (on purpose: allow_train_overlap;
        # 0: checked, none; null: nothing to check against)
        "train_overlap": data.train_overlap if data is not None else None,
        "n_skipped": len(scores.skipped),
        "skipped": scores.skipped,
        "overall": results["overall"],
        "groups": results["groups"],
        "recipes": recipes(frame[frame[PERTURBATION] == UNPERTURBED]),
        "perturbations": list(by_perturbation),
        "by_perturbation": by_perturbation,
    }


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
