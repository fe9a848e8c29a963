"""Reading test-run folders (scores.parquet + metrics.json) and merging them per detector."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from qdd.errors import QddError


@dataclass
class DetectorResults:
    """Everything one detector's runs say: per-image scores and per-group metrics."""

    detector: str
    scores: pd.DataFrame
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    recipes: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)  # run folder, weights, threshold

    @property
    def threshold(self) -> float:
        return float(self.runs[0]["threshold"]) if self.runs else 0.0


def read_run(folder: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One ``qdd-cli test`` run folder, or a one-line error saying how to make one."""
    if not folder.is_dir():
        raise QddError(f"run folder {folder} does not exist: pass folders made by qdd-cli test")
    scores_path, metrics_path = folder / "scores.parquet", folder / "metrics.json"
    for path in (scores_path, metrics_path):
        if not path.is_file():
            raise QddError(
                f"{folder} has no {path.name}: it is not a finished qdd-cli test run "
                "(re-run qdd-cli test --out there)"
            )
    try:
        scores = pd.read_parquet(scores_path)
        metrics = json.loads(metrics_path.read_text())
    except Exception as error:
        raise QddError(f"cannot read run {folder} ({error}): re-run qdd-cli test") from None
    if scores.empty:
        raise QddError(f"{scores_path} holds no scores: re-run qdd-cli test on non-empty shards")
    return scores, metrics


def load_runs(folders: list[Path]) -> dict[str, DetectorResults]:
    """Runs merged per detector (several runs may cover different data for one detector)."""
    if not folders:
        raise QddError("no run folders given: pass one or more folders made by qdd-cli test")
    results: dict[str, DetectorResults] = {}
    for folder in folders:
        scores, metrics = read_run(Path(folder))
        name = str(metrics.get("detector") or scores["detector"].iloc[0])
        scores = scores.assign(detector=name)
        entry = results.get(name)
        if entry is None:
            entry = results[name] = DetectorResults(name, scores)
        else:
            entry.scores = pd.concat([entry.scores, scores], ignore_index=True)
        entry.groups.update(metrics.get("groups", {}))
        entry.recipes.update(metrics.get("recipes", {}))
        entry.runs.append(
            {"folder": str(folder), "weights": metrics.get("weights"),
             "threshold": metrics.get("threshold", 0.0), "n": metrics.get("n")}
        )  # fmt: skip
    return results


def group_table(results: dict[str, DetectorResults]) -> pd.DataFrame:
    """One row per detector × fake group with its metrics (the tables and heatmaps)."""
    rows = []
    for name, entry in results.items():
        for group, values in entry.groups.items():
            generator, _, precision = group.rpartition("/")
            rows.append({"detector": name, "generator": generator, "precision": precision,
                         **values})  # fmt: skip
    return pd.DataFrame(rows)


def missing_groups(results: dict[str, DetectorResults]) -> list[str]:
    """``generator/precision for detector`` of the grid spanned by all runs, not measured."""
    table = group_table(results)
    if table.empty:
        return []
    grid = {(g, p) for g in table["generator"].unique() for p in table["precision"].unique()}
    gaps = []
    for name in sorted(results):
        rows = table[table["detector"] == name]
        have = set(zip(rows["generator"], rows["precision"], strict=True))
        gaps += [f"{g}/{p} for {name}" for g, p in sorted(grid - have)]
    return gaps
