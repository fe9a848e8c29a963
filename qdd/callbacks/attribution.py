"""`AttributionSummary`: an attribution run's files, each written once by global rank 0.

- test and predict: ``scores.parquet``, one row per image and pass, with its metadata,
  its true class (None for an image of no class: a real one when reals are not a class;
  in a prediction also a fake one that records no precision), the predicted class (one of
  the model's) and one ``prob_<class>`` column per class of the model. A prediction takes
  images of any class: one the model lacks (``nf4`` for an fp32/fp4 model) keeps its own
  name in ``class``, so it is never counted as one of the model's;
- test: ``metrics.json`` (accuracy, macro-F1, per-class recall with Wilson intervals,
  the confusion matrix; the unperturbed pass at the top level, every pass under
  ``by_perturbation``) and ``confusion.csv`` (rows: true class, columns: predicted);
- fit and validate: `RunSummary`'s metrics.json, with the classes.

The rows of all ranks meet on rank 0 (`gather_to_rank_zero`), as for `ScoreWriter`, so
every image is measured once however many workers and ranks read the shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from qdd.attribution import attribution_metrics, class_of, recorded_class
from qdd.callbacks.scores import PERTURBATION, ROW_FIELDS, gather_to_rank_zero, report_count
from qdd.callbacks.summary import RunSummary, model_summary
from qdd.datamodules.dataset import META_FIELDS, UNPERTURBED
from qdd.metrics import batch_groups
from qdd.report.attribution import CONFUSION


class AttributionSummary(RunSummary):
    """Keeps every test/predict batch's class probabilities; writes the run's files."""

    def __init__(self) -> None:
        super().__init__(scores=None)  # type: ignore[arg-type]
        self.frame: Any = None
        self._start()

    def _start(self) -> None:
        self._probs: list[Tensor] = []
        self._rows: dict[str, list[Any]] = {field: [] for field in ROW_FIELDS}
        self._skipped: list[dict[str, str]] = []

    def _keep(self, probs: Tensor, batch: Any) -> None:
        meta = batch[2]
        self._skipped.extend(meta["skipped"])
        if len(probs):
            self._probs.append(probs.detach())
            for field in ROW_FIELDS:
                self._rows[field].extend(meta[field])

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start()

    on_predict_epoch_start = on_test_epoch_start

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                          batch: Any, *args: Any) -> None:  # fmt: skip
        self._keep(outputs, batch)

    on_predict_batch_end = on_test_batch_end

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._gather(trainer, pl_module)

    on_predict_epoch_end = on_test_epoch_end

    def _gather(self, trainer: Trainer, pl_module: LightningModule) -> None:
        import pandas as pd

        classes = list(pl_module.hparams.classes)
        probs = torch.cat(self._probs).cpu().numpy() if self._probs else np.zeros((0, len(classes)))
        parts = gather_to_rank_zero({"rows": self._rows, "probs": probs, "skipped": self._skipped},
                                    trainer.world_size)  # fmt: skip
        self._start()
        if parts is None:
            self.frame = None
            return
        columns = {c: [v for p in parts for v in p["rows"][c]] for c in ROW_FIELDS}
        probs = np.concatenate([p["probs"] for p in parts]).reshape(-1, len(classes))
        self.skipped = sorted((s for p in parts for s in p["skipped"]),
                              key=lambda s: (s["shard"], s["key"]))  # fmt: skip
        frame = pd.DataFrame(columns)
        frame["group"] = batch_groups(columns)
        for field in META_FIELDS:
            frame[field] = frame[field].where(frame[field] != "", None)
        hp = pl_module.hparams
        # a test refused images of no class or of a class the model lacks when it started
        # (`check_known`); a prediction needs no labels and scores every image
        label = recorded_class if trainer.predicting else class_of
        frame["class"] = [label(g, hp.attribute, hp.include_real) for g in frame["group"]]
        frame["predicted"] = [classes[i] for i in probs.argmax(1)] if len(probs) else []
        for i, name in enumerate(classes):
            frame[f"prob_{name}"] = probs[:, i]
        frame["detector"] = hp.detector
        frame = frame.sort_values([PERTURBATION, "group", "key"], kind="stable",
                                  ignore_index=True)  # fmt: skip
        self.frame = frame
        run_dir = Path(trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(run_dir / "scores.parquet", index=False)
        data = trainer.datamodule
        scored = int((frame[PERTURBATION] == UNPERTURBED).sum())
        report_count(scored, data.expected if data is not None else None, self.skipped)

    def summary(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        return {**model_summary(trainer, pl_module), **what_is_named(pl_module)}

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or self.frame is None:
            return
        hp, frame = pl_module.hparams, self.frame
        classes = list(hp.classes)
        by_pass = {name: measure(rows, classes) for name, rows in frame.groupby(PERTURBATION)}
        top = by_pass.get(UNPERTURBED) or measure(frame.iloc[:0], classes)
        data = trainer.datamodule
        metrics = {
            "task": "attribution", "detector": hp.detector, "attribute": hp.attribute,
            "include_real": hp.include_real, "classes": classes,
            "weights": pl_module.detector.weights_source,
            "data": [str(f) for f in data.folders] if data is not None else [],
            "expected": data.expected if data is not None else None,
            "train_overlap": data.train_overlap if data is not None else None,
            "n_skipped": len(self.skipped), "skipped": self.skipped,
            **top, "by_perturbation": by_pass,
        }  # fmt: skip
        self.write(trainer, metrics)
        write_confusion(Path(trainer.default_root_dir) / CONFUSION, top["confusion"], classes)
        print(format_attribution(metrics), flush=True)


def what_is_named(pl_module: LightningModule) -> dict[str, Any]:
    """The task and its classes, for a fit's or a validation's metrics.json."""
    hp = pl_module.hparams
    return {"task": "attribution", "attribute": hp.attribute, "include_real": hp.include_real,
            "classes": list(hp.classes)}  # fmt: skip


def measure(rows: Any, classes: list[str]) -> dict[str, Any]:
    """Attribution metrics of one pass's rows; rows of no class are counted, not measured.
    ``by_group``: each group's true class and how often each class was predicted (how a
    swap group ``sd3/fp32-vaefp4`` is called, beside the plain ``sd3/fp32``)."""
    index = {name: i for i, name in enumerate(classes)}
    classed = rows[rows["class"].notna()]
    truth = classed["class"].map(index).to_numpy(dtype=np.int64)
    predicted = classed["predicted"].map(index).to_numpy(dtype=np.int64)
    by_group = {
        str(group): {"n": len(part), "class": _name(part["class"].iloc[0]),
                     "predicted": {c: int((part["predicted"] == c).sum()) for c in classes}}
        for group, part in rows.groupby("group", sort=True)
    }  # fmt: skip
    return {**attribution_metrics(truth, predicted, classes),
            "n_without_class": int(len(rows) - len(classed)), "by_group": by_group}  # fmt: skip


def _name(value: Any) -> str | None:
    return value if isinstance(value, str) else None  # None (or NaN): no class


def write_confusion(path: Path, confusion: list[list[int]], classes: list[str]) -> None:
    import pandas as pd

    table = pd.DataFrame(confusion, index=pd.Index(classes, name="true"), columns=classes)
    table.to_csv(path)


def format_attribution(metrics: dict[str, Any]) -> str:
    lines = [f"\n{metrics['detector']} attribution of {metrics['attribute']}: "
             f"n={metrics['n']} accuracy={_fmt(metrics['accuracy'])} "
             f"macro_f1={_fmt(metrics['macro_f1'])}"]  # fmt: skip
    for name, v in metrics["per_class"].items():
        lines.append(f"  {name:<20} n={v['n']:<6} recall={_fmt(v['recall'])} "
                     f"[{_fmt(v['recall_low'])}, {_fmt(v['recall_high'])}]")  # fmt: skip
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


__all__ = ["CONFUSION", "AttributionSummary"]
