"""Callbacks that write a run's outputs (what `qdd.modules.detector.DetectorModule` brings
along through ``configure_callbacks``): `ScoreWriter` (scores.parquet) and `RunSummary`
(metrics.json, the console table, the W&B table)."""

from qdd.callbacks.scores import SCORE_COLUMNS, ScoreWriter
from qdd.callbacks.summary import RunSummary

__all__ = ["SCORE_COLUMNS", "RunSummary", "ScoreWriter"]
