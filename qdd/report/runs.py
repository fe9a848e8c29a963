"""Reading test-run folders (scores.parquet + metrics.json) and merging them per detector.

Several runs of one detector on different data are one detector's results: their scores
are concatenated (an image scored twice, e.g. the same real shard in two runs, counts once)
and their group metrics collected. Runs of one detector with *different weights* (the
official file and a retrained checkpoint) are kept apart, as ``<detector>-<weights>``:
pooling them would mix two models in one curve.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from qdd.errors import QddError
from qdd.report.palette import order_generators, order_precisions

#: Columns every figure needs; the rest of scores.parquet is carried along when present.
REQUIRED = ("key", "label", "generator", "precision", "group", "logit")
#: Weight file names that say nothing about the model (Lightning's defaults).
GENERIC_STEMS = {"last", "best", "model", "weights", "checkpoint"}


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


def _fix(folder: Path) -> str:
    return f"make it with `qdd-cli test --detector D --data SHARDS --out {folder}`"


def read_run(folder: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One ``qdd-cli test`` run folder, or a one-line error saying how to make one."""
    if not folder.exists():
        raise QddError(f"run folder {folder} does not exist: check the path, or {_fix(folder)}")
    if not folder.is_dir():
        raise QddError(f"{folder} is not a folder: pass run folders of qdd-cli test")
    if not any(folder.iterdir()):
        raise QddError(f"run folder {folder} is empty: {_fix(folder)}")
    scores_path, metrics_path = folder / "scores.parquet", folder / "metrics.json"
    for path in (scores_path, metrics_path):
        if not path.is_file():
            raise QddError(
                f"{folder} has no {path.name}: it is not a finished qdd-cli test run; "
                f"{_fix(folder)} (fit runs have no scores)"
            )
    try:
        scores = pd.read_parquet(scores_path)
        metrics = json.loads(metrics_path.read_text())
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise QddError(f"cannot read run {folder} ({reason}): re-run qdd-cli test") from None
    lacking = [c for c in REQUIRED if c not in scores.columns]
    if lacking:
        raise QddError(
            f"{scores_path} lacks column(s) {', '.join(lacking)}: re-run qdd-cli test to "
            "write it with this qdd version"
        )
    if scores.empty:
        raise QddError(f"{scores_path} holds no scores: re-run qdd-cli test on non-empty shards")
    if not isinstance(metrics, dict):
        raise QddError(f"{metrics_path} is not a metrics object: re-run qdd-cli test")
    return _named_fakes(scores), metrics


def _named_fakes(scores: pd.DataFrame) -> pd.DataFrame:
    """Fakes without generator/precision metadata take them from their group name.

    A fake shard made with ``qdd-cli shard --label fake`` has no precision; its group
    (``<source>/unknown``) is how metrics.json names it, so the figures use the same name.
    """
    fake = scores["label"] == 1
    generator, _, precision = scores["group"].astype(str).str.rpartition("/").T.to_numpy()
    scores = scores.astype({"generator": object, "precision": object})
    for column, fallback in (("generator", generator), ("precision", precision)):
        absent = fake & scores[column].isna()
        scores.loc[absent, column] = fallback[absent.to_numpy()]
    return scores


def _weights_label(weights: str | None) -> str:
    """A short name for a weight file: its stem, or the fit run it came from."""
    if not weights:
        return "unknown"
    path = Path(str(weights))
    if path.stem not in GENERIC_STEMS and not path.stem.startswith("epoch="):
        return path.stem
    parents = [p.name for p in path.parents if p.name and p.name != "checkpoints"]
    return parents[0] if parents else path.stem


def _names(runs: list[tuple[Path, pd.DataFrame, dict[str, Any]]]) -> list[str]:
    """The results name of each run: the detector, plus its weights where they differ."""
    detectors = [
        str(m.get("detector") or (s["detector"].iloc[0] if "detector" in s else "detector"))
        for _, s, m in runs
    ]
    weights: dict[str, list[str]] = {}
    for detector, (_, _, metrics) in zip(detectors, runs, strict=True):
        w = str(metrics.get("weights"))
        if w not in weights.setdefault(detector, []):
            weights[detector].append(w)
    names = []
    for detector, (_, _, metrics) in zip(detectors, runs, strict=True):
        options = weights[detector]
        if len(options) == 1:
            names.append(detector)
            continue
        labels = [_weights_label(w) for w in options]
        if len(set(labels)) < len(labels):
            labels = [str(i + 1) for i in range(len(options))]
        names.append(f"{detector}-{labels[options.index(str(metrics.get('weights')))]}")
    return names


def load_runs(folders: list[Path]) -> dict[str, DetectorResults]:
    """Runs merged per detector (and per weights, where one detector ran with several)."""
    if not folders:
        raise QddError("no run folders given: pass one or more folders made by qdd-cli test")
    runs = [(Path(f), *read_run(Path(f))) for f in folders]
    results: dict[str, DetectorResults] = {}
    for name, (folder, scores, metrics) in zip(_names(runs), runs, strict=True):
        scores = scores.assign(detector=name)
        entry = results.get(name)
        if entry is None:
            entry = results[name] = DetectorResults(name, scores)
        else:
            merged = pd.concat([entry.scores, scores], ignore_index=True)
            entry.scores = merged.drop_duplicates(["group", "key"], ignore_index=True)
        entry.groups.update(metrics.get("groups") or {})
        entry.recipes.update(metrics.get("recipes") or {})
        entry.runs.append(
            {"folder": str(folder), "weights": metrics.get("weights"),
             "threshold": metrics.get("threshold", 0.0), "n": metrics.get("n", len(scores)),
             "data": metrics.get("data") or []}
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
    generators = order_generators(table["generator"].unique())
    precisions = order_precisions(table["precision"].unique())
    gaps = []
    for name in sorted(results):
        rows = table[table["detector"] == name]
        have = set(zip(rows["generator"], rows["precision"], strict=True))
        grid = [(g, p) for g in generators for p in precisions]
        gaps += [f"{g}/{p} for {name}" for g, p in grid if (g, p) not in have]
    return gaps
