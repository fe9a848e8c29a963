"""`ScoreWriter`: every scored image's logit and metadata in ``scores.parquet``, once.

Modelled on Lightning's ``BasePredictionWriter`` (rows kept per batch, written when the
epoch ends), for ``test`` and ``predict`` alike, with one difference: the rows of all
ranks meet on rank 0 through the process group (``gather_object``), which writes one
file. Nothing depends on a file system shared between nodes, and the report reads one
file per run.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from qdd.datamodules.dataset import META_FIELDS, UNPERTURBED
from qdd.metrics import batch_groups

log = logging.getLogger(__name__)

#: One row of scores.parquet: the sample's metadata as the data loader passes it along,
#: its label, its group and the detector's logit.
SCORE_COLUMNS = ("key", "label", *META_FIELDS[1:], "group", "logit")
#: The column (after SCORE_COLUMNS) naming the test-time perturbation of each row.
PERTURBATION = "perturbation"
#: What a batch's metadata carries per row (see `qdd.datamodules.dataset.collate`).
ROW_FIELDS = (*META_FIELDS, "label", PERTURBATION)


class ScoreWriter(Callback):
    """Writes ``<default_root_dir>/scores.parquet`` at the end of a test or predict epoch.

    The batch step returns the batch's logits (one per row of the batch's metadata). After
    the epoch, rank 0 holds the whole table in `scores` and the unreadable samples of all
    ranks in `skipped` (for `qdd.callbacks.RunSummary`); the other ranks hold None / [].
    """

    def __init__(self) -> None:
        self.scores: Any = None
        self.skipped: list[dict[str, str]] = []
        self._start()

    def _start(self) -> None:
        self._logits: list[Tensor] = []  # kept on the device until the epoch ends
        self._rows: dict[str, list[Any]] = {field: [] for field in ROW_FIELDS}
        self._skipped: list[dict[str, str]] = []

    def _keep(self, logits: Tensor, batch: Any) -> None:
        meta = batch[2]
        self._skipped.extend(meta["skipped"])
        if len(logits):
            self._logits.append(logits.detach())
            for field in ROW_FIELDS:
                self._rows[field].extend(meta[field])

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start()

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start()

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                          batch: Any, *args: Any) -> None:  # fmt: skip
        self._keep(outputs, batch)

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                             batch: Any, *args: Any) -> None:  # fmt: skip
        self._keep(outputs, batch)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module)

    def _write(self, trainer: Trainer, pl_module: LightningModule) -> None:
        import pandas as pd

        logits = torch.cat(self._logits).cpu().tolist() if self._logits else []
        local = {"rows": {**self._rows, "logit": logits}, "skipped": self._skipped}
        parts = gather_to_rank_zero(local, trainer.world_size)
        self._start()
        if parts is None:
            self.scores, self.skipped = None, []
            return
        columns = {c: [v for p in parts for v in p["rows"][c]] for c in (*ROW_FIELDS, "logit")}
        skipped = [s for part in parts for s in part["skipped"]]
        self.skipped = sorted(skipped, key=lambda s: (s["shard"], s["key"]))
        scores = pd.DataFrame(columns)
        scores["group"] = batch_groups(columns)
        for field in META_FIELDS:  # empty metadata strings are missing values
            scores[field] = scores[field].where(scores[field] != "", None)
        data = trainer.datamodule
        passes = data.perturbation_names if data is not None else [UNPERTURBED]
        order = scores[PERTURBATION].map({name: i for i, name in enumerate(passes)})
        scores = (
            scores.assign(_order=order)
            .sort_values(["_order", "group", "key"], kind="stable", ignore_index=True)
            .drop(columns="_order")
        )
        detector = pl_module.hparams.get("detector")
        self.scores = scores[[*SCORE_COLUMNS, PERTURBATION]].assign(detector=detector)
        run_dir = Path(trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.scores.to_parquet(run_dir / "scores.parquet", index=False)
        scored = int((scores[PERTURBATION] == UNPERTURBED).sum())
        report_count(scored, data.expected if data is not None else None, self.skipped)


def gather_to_rank_zero(obj: Any, world_size: int) -> list[Any] | None:
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
