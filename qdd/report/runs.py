"""Reading test-run folders (scores.parquet + metrics.json) and merging them per detector.

Several runs of one detector on different data are one detector's results: their scores
are concatenated and every group metric is recomputed from the pooled scores
(`qdd.report.stats`), never copied from one run's metrics.json. An image is its key plus its
recipe (`IMAGE`: perturbation, group, source, generator, precision, backend, scope, model).
An image scored twice with the same logit (within `LOGIT_TOLERANCE`: the same real shard in
two runs, or one run given twice) counts once; scored with *different* logits by two runs
that carry one name (two seeds, two weight files with one file name) it is refused: pooling
would keep whichever run came first. Within one run, an image scored twice counts once, with
a warning (e.g. DDP padding), or is refused when the two logits differ (two images under one
key). The pooled rows are sorted by image, so the order of the run folders changes nothing.

Runs of one detector with *different weights* (the official file and a retrained
checkpoint) are kept apart, as ``<detector>-<weights>``: pooling them would mix two models
in one curve. Runs with the same weights but different
decision thresholds are refused: one pooled accuracy needs one threshold.

A perturbation is named by its canonical form (``blur:1.0`` and ``blur:1`` of two runs are
one pass, ``blur:1``). Older runs lack the newer columns: no ``perturbation`` means every
image is the unperturbed pass (``none``); no ``quant_fraction`` / ``source_format`` means
not recorded.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qdd.errors import QddError
from qdd.report.palette import order_generators, order_precisions
from qdd.report.stats import BOOTSTRAP, accuracy, group_metrics

#: Columns every figure needs; the rest of scores.parquet is carried along when present.
REQUIRED = ("key", "label", "generator", "precision", "group", "logit")
#: What makes one image: scored twice, it must give one logit (the key alone repeats across
#: precisions and perturbations of one prompt).
IMAGE = ("perturbation", "group", "key", "source", "generator", "precision", "quant_backend",
         "quant_scope", "model_id")  # fmt: skip
#: Two logits of one image closer than this (absolute + relative) are one score: the same
#: weights in another batch composition or mixed-precision kernel differ by far less, two
#: seeds or two weight files by far more.
LOGIT_TOLERANCE = 1e-3
#: The unperturbed pass of `qdd-cli test --perturb`.
NONE = "none"
#: ``origin`` that `qdd-cli demo` writes into its runs' metrics.json (report.md then warns
#: that the numbers come from tiny random-init models).
DEMO_ORIGIN = "qdd-cli demo"
#: Weight file names that say nothing about the model (Lightning's defaults).
GENERIC_STEMS = {"last", "best", "model", "weights", "checkpoint"}


@dataclass
class DetectorResults:
    """Everything one detector's runs say: pooled per-image scores and their thresholds."""

    detector: str
    scores: pd.DataFrame
    runs: list[dict[str, Any]] = field(default_factory=list)  # run folder, weights, threshold
    threshold: float = 0.0
    calibrated_threshold: float | None = None

    @property
    def main(self) -> pd.DataFrame:
        """The unperturbed pass: what the KDE, paired view and main heatmaps show."""
        return self.scores[self.scores["perturbation"] == NONE]


def _fix(folder: Path) -> str:
    return f"make it with `qdd-cli test --detector D --data SHARDS --out {folder}`"


def _scores_without_metrics(folder: Path, scores_path: Path) -> str:
    """Why a folder with scores but no metrics.json is no test run, and which run to make:
    ``qdd-cli predict`` writes scores only (a prediction has no labels to measure); an
    attribution prediction (class probabilities, no logit) needs an attribution test."""
    import pyarrow.parquet as pq

    try:
        columns = set(pq.read_schema(scores_path).names)
    except Exception:  # unreadable: said as the plain missing metrics.json below
        columns = set()
    if "predicted" in columns and "logit" not in columns:
        return (f"{folder} holds an attribution prediction (qdd-cli predict scores images "
                "without measuring them, so it writes no metrics.json): the report draws "
                "attribution test runs; make one with `qdd-cli test --task attribution "
                f"--ckpt_path CKPT --data SHARDS --out {folder}-test`")  # fmt: skip
    return (f"{folder} has no metrics.json, only scores: a qdd-cli predict run (it "
            "measures nothing) or a test that did not finish; make a test run with `qdd-cli "
            f"test --detector D --data SHARDS --out {folder}-test`")  # fmt: skip


def read_run(folder: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One ``qdd-cli test`` run folder, or a one-line error saying how to make one."""
    if not folder.exists():
        raise QddError(f"run folder {folder} does not exist: check the path, or {_fix(folder)}")
    if not folder.is_dir():
        raise QddError(f"{folder} is not a folder: pass run folders of qdd-cli test")
    if not any(folder.iterdir()):
        raise QddError(f"run folder {folder} is empty: {_fix(folder)}")
    scores_path, metrics_path = folder / "scores.parquet", folder / "metrics.json"
    if scores_path.is_file() and not metrics_path.is_file():
        raise QddError(_scores_without_metrics(folder, scores_path))
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
    if "perturbation" not in scores.columns:
        scores = scores.assign(perturbation=NONE)
    scores["perturbation"] = canonical_perturbations(scores["perturbation"], scores_path)
    for column in ("quant_fraction", "source_format", *IMAGE):
        if column not in scores.columns:
            scores[column] = None
    scores["quant_fraction"] = pd.to_numeric(scores["quant_fraction"], errors="coerce")
    return _named_fakes(scores), metrics


def canonical_perturbations(names: pd.Series, path: Path) -> pd.Series:
    """Each row's perturbation in its canonical form (`qdd.perturb`): runs that spelled one
    operation two ways (``blur:1``, ``blur:1.0``; ``JPEG:75``) join as one pass."""
    from qdd.perturb import parse

    names = names.fillna(NONE).astype(str)
    canonical = {}
    for spec in names.unique():
        try:
            canonical[spec] = parse(spec).canonical
        except QddError:
            raise QddError(
                f"{path} names perturbation {spec!r}, which this qdd version does not know: "
                "re-run qdd-cli test with a --perturb spec of `qdd-cli test --help`"
            ) from None
    return names.map(canonical)


def _named_fakes(scores: pd.DataFrame) -> pd.DataFrame:
    """Fakes without generator/precision metadata take them from their group name; a
    fake's precision is its group's label (``fp4@emulate`` for the emulation's images).

    A fake shard made with ``qdd-cli shard --label fake`` has no precision; its group
    (``<source>/unknown``) is how metrics.json names it, so the figures use the same name.
    """
    fake = scores["label"] == 1
    generator, _, precision = scores["group"].astype(str).str.rpartition("/").T.to_numpy()
    scores = scores.astype({"generator": object, "precision": object})
    for column, fallback in (("generator", generator), ("precision", precision)):
        absent = fake & scores[column].isna()
        scores.loc[absent, column] = fallback[absent.to_numpy()]
    # a fake's precision is its group's (`qdd.identity.group_label`, recorded by the test
    # run): two backends of one precision are two groups in every figure and table
    named = fake & (scores["generator"].astype(str) == pd.Series(generator, scores.index))
    scores.loc[named, "precision"] = precision[named.to_numpy()]
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
    owner: dict[str, tuple[str, Path]] = {}
    for name, detector, (folder, _, _) in zip(names, detectors, runs, strict=True):
        first = owner.setdefault(name, (detector, folder))
        if first[0] != detector:  # npr with weights tuned.ckpt vs a detector npr-tuned
            raise QddError(
                f"runs {first[1]} (detector {first[0]}) and {folder} (detector {detector}) "
                f"would both be named {name} in the report and pooled: report them in "
                "separate qdd-cli report calls, or rank them with qdd-cli report --compare"
            )
    return names


def mark_demo_run(folder: Path) -> None:
    """Record in a run's metrics.json that `qdd-cli demo` made it."""
    path = Path(folder) / "metrics.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "origin": DEMO_ORIGIN},
                               indent=2) + "\n")  # fmt: skip


def _threshold(value: Any, folder: Path, key: str) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise QddError(f"{folder}/metrics.json: {key} {value!r} is not a number: re-run "
                       "qdd-cli test") from None  # fmt: skip


def _agree(entry: DetectorResults, folder: Path, key: str, value: float | None) -> None:
    """Refuse to pool runs that decided at different thresholds."""
    first = entry.runs[0]
    if first[key] != value:
        raise QddError(
            f"runs {first['folder']} and {folder} of {entry.detector} disagree on {key} "
            f"({first[key]} vs {value}): pooled accuracies need one threshold; report them "
            "in separate qdd-cli report calls or re-test with one --model.threshold"
        )


def _identity(scores: pd.DataFrame) -> pd.DataFrame:
    """The `IMAGE` columns as strings (missing values as ""), for matching images."""
    columns = scores[list(IMAGE)].astype(object)
    return columns.where(columns.notna(), "").astype(str)


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.isclose(a, b, rtol=LOGIT_TOLERANCE, atol=LOGIT_TOLERANCE, equal_nan=True)


def _example(row: pd.Series) -> str:
    """``sd3/fp4 key p00001-s1`` (plus the perturbation when there is one)."""
    text = f"{row['group']} key {row['key']}"
    return text if row["perturbation"] == NONE else f"{text} under {row['perturbation']}"


def _once_per_image(scores: pd.DataFrame, folder: Path) -> pd.DataFrame:
    """One run's scores with each image once: repeats with one logit counted once (said on
    stderr), repeats with different logits refused."""
    identity = _identity(scores)
    repeated = identity.duplicated(keep=False)
    if not repeated.any():
        return scores
    logits = scores["logit"].astype(float).groupby([identity[c] for c in IMAGE])
    high, low = logits.transform("max"), logits.transform("min")
    differ = (high - low > LOGIT_TOLERANCE * (1 + high.abs())).to_numpy()
    if differ.any():
        count = int((differ & ~identity.duplicated().to_numpy()).sum())
        raise QddError(
            f"run {folder} scores {_example(scores[differ].iloc[0])} twice with different "
            f"logits ({count} such image(s)): two images share one key and recipe; "
            "give their shard folders distinct --source names or test them in separate runs"
        )
    once = ~identity.duplicated()
    print(f"warning: run {folder} scores {int((~once).sum())} image(s) more than once with "
          "the same logit; each counted once", file=sys.stderr)  # fmt: skip
    return scores[once.to_numpy()].reset_index(drop=True)


def _twins(scores: pd.DataFrame) -> np.ndarray:
    """Each row's twin id (`qdd.identity.twin_id`) as a string, "" where not recorded."""
    if "twin" not in scores.columns:
        return np.full(len(scores), "", dtype=object)
    twins = scores["twin"].astype(object)
    return twins.where(twins.notna(), "").astype(str).to_numpy()


def _check_agreement(name: str, earlier: list[tuple[Path, pd.DataFrame]], folder: Path,
                     scores: pd.DataFrame) -> None:  # fmt: skip
    """Refuse a run that scores an image of an earlier run of ``name`` with another logit.

    The reason names what differs: where the two rows carry different twin ids, the runs
    scored two different images under one key and recipe (shards generated with another
    step count, prompt, seed, guidance or size); otherwise one image got two logits, so
    two models ran under one name.
    """
    mine = _identity(scores).assign(_logit=scores["logit"].to_numpy(dtype=float),
                                    _twin=_twins(scores))  # fmt: skip
    for other_folder, other in earlier:
        theirs = _identity(other).assign(_other=other["logit"].to_numpy(dtype=float),
                                         _other_twin=_twins(other))  # fmt: skip
        both = mine.merge(theirs, on=list(IMAGE))
        differ = ~_same(both["_logit"].to_numpy(), both["_other"].to_numpy())
        if not differ.any():
            continue
        twins = both[differ]
        images = (twins["_twin"] != "") & (twins["_other_twin"] != "") & (
            twins["_twin"] != twins["_other_twin"])  # fmt: skip
        if images.any():
            row = twins[images].iloc[0]
            raise QddError(
                f"runs {other_folder} and {folder} of {name} tested different images under "
                f"one key and recipe ({int(images.sum())} image(s), e.g. {_example(row)}: twin "
                f"ids {row['_other_twin']} vs {row['_twin']}), so their shards were generated "
                "with another step count, prompt, seed, guidance or size: report them in "
                "separate qdd-cli report calls, or rank them with qdd-cli report --compare"
            )
        row = twins.iloc[0]
        raise QddError(
            f"runs {other_folder} and {folder} of {name} score the same {int(differ.sum())} "
            f"image(s) with different logits (e.g. {_example(row)}: {row['_other']:.4g} vs "
            f"{row['_logit']:.4g}), so they are two models under one name (another seed or "
            "weight file): report them in separate qdd-cli report calls, or rank them "
            "side by side with qdd-cli report --compare"
        )


def load_runs(folders: list[Path]) -> dict[str, DetectorResults]:
    """Runs merged per detector (and per weights, where one detector ran with several)."""
    if not folders:
        raise QddError("no run folders given: pass one or more folders made by qdd-cli test")
    runs = [(Path(f), *read_run(Path(f))) for f in folders]
    results: dict[str, DetectorResults] = {}
    scored: dict[str, list[tuple[Path, pd.DataFrame]]] = {}
    for name, (folder, scores, metrics) in zip(_names(runs), runs, strict=True):
        scores = _once_per_image(scores.assign(detector=name), folder)
        threshold = _threshold(metrics.get("threshold", 0.0), folder, "threshold") or 0.0
        calibrated = _threshold(metrics.get("calibrated_threshold"), folder,
                                "calibrated_threshold")  # fmt: skip
        run = {"folder": str(folder), "detector": str(metrics.get("detector") or name),
               "weights": metrics.get("weights"), "threshold": threshold,
               "calibrated_threshold": calibrated,
               "n": len(scores[["group", "key"]].drop_duplicates()),
               "data": metrics.get("data") or [], "origin": metrics.get("origin"),
               "reencode": metrics.get("reencode"),
               "accuracy_note": metrics.get("accuracy_note")}  # fmt: skip
        entry = results.get(name)
        if entry is None:
            entry = results[name] = DetectorResults(name, scores, threshold=threshold,
                                                    calibrated_threshold=calibrated)  # fmt: skip
        else:
            _agree(entry, folder, "threshold", threshold)
            _agree(entry, folder, "calibrated_threshold", calibrated)
            _check_agreement(name, scored[name], folder, scores)
            merged = pd.concat([entry.scores, scores], ignore_index=True)
            entry.scores = merged[~_identity(merged).duplicated().to_numpy()]
        scored.setdefault(name, []).append((folder, scores))
        entry.runs.append(run)
    for entry in results.values():  # image order, not argument order: bootstraps draw by position
        order = _identity(entry.scores).sort_values(list(IMAGE), kind="stable").index
        entry.scores = entry.scores.loc[order].reset_index(drop=True)
    return results


def accuracy_warnings(results: dict[str, DetectorResults]) -> list[str]:
    """One line per detector whose runs say accuracy at logit 0 means nothing for it (a
    training-free detector: `qdd.calibration.accuracy_note`): the report's accuracies at
    the threshold are drawn all the same, so report.md must say so."""
    lines = []
    for name, entry in sorted(results.items()):
        if not any(run.get("accuracy_note") for run in entry.runs):
            continue
        read = ("acc_calibrated (its calibrated threshold)" if entry.calibrated_threshold
                is not None else "AUROC, AP and TPR at a fixed FPR (it was tested "
                f"uncalibrated: calibrate with `qdd-cli fit --detector {entry.runs[0]['detector']}"
                "` and test with --ckpt_path)")  # fmt: skip
        lines.append(f"{name} is training-free: its accuracies at logit 0 (acc, real, fake and "
                     f"balanced accuracy) are not meaningful; read {read}")  # fmt: skip
    return lines


def _one(values: pd.Series) -> Any:
    """The group's single recorded value, all distinct values joined, or None."""
    distinct = sorted({str(v) for v in values.dropna()})
    return ", ".join(distinct) if distinct else None


def _fraction(values: pd.Series) -> float:
    """The quantized fraction of a group (one per recipe); NaN when not recorded."""
    values = values.dropna()
    return float(values.mean()) if len(values) else float("nan")


def group_table(results: dict[str, DetectorResults], resamples: int = BOOTSTRAP) -> pd.DataFrame:
    """One row per detector × perturbation × fake group, metrics recomputed from the scores.

    Each fake group (generator × precision) is scored against the real images of the same
    perturbation; columns: detector, perturbation, generator, precision, quant_fraction,
    quant_scope, source_format, then `qdd.report.stats.group_metrics` (n, metrics, 95 %
    intervals), and ``acc_calibrated`` where the runs carry a calibrated threshold.
    """
    rows = []
    for name, entry in results.items():
        for perturbation, scores in entry.scores.groupby("perturbation", sort=True):
            real = scores.loc[scores["label"] == 0, "logit"].to_numpy(dtype=float)
            fakes = scores[scores["label"] == 1]
            for (generator, precision), part in fakes.groupby(["generator", "precision"]):
                fake = part["logit"].to_numpy(dtype=float)
                row = {"detector": name, "perturbation": perturbation, "generator": generator,
                       "precision": precision, "quant_fraction": _fraction(part["quant_fraction"]),
                       "quant_scope": _one(part["quant_scope"]),
                       "source_format": _one(part["source_format"]),
                       **group_metrics(real, fake, entry.threshold, resamples)}  # fmt: skip
                if entry.calibrated_threshold is not None:
                    row["acc_calibrated"] = accuracy(real, fake, entry.calibrated_threshold)
                rows.append(row)
    return pd.DataFrame(rows)


def missing_groups(table: pd.DataFrame) -> list[str]:
    """``generator/precision for detector``: a group some run measured that this detector's
    runs lack. (A generator never made at a precision is no detector's gap: the deployed
    formats, e.g. GGUF and SVDQuant, exist for the transformers only.)"""
    if table.empty:
        return []
    table = table[table["perturbation"] == NONE]
    measured = set(zip(table["generator"], table["precision"], strict=True))
    order = {g: i for i, g in enumerate(order_generators(table["generator"].unique()))}
    rank = {p: i for i, p in enumerate(order_precisions(table["precision"].unique()))}
    grid = sorted(measured, key=lambda gp: (order[gp[0]], rank[gp[1]]))
    gaps = []
    for name in sorted(table["detector"].unique()):
        rows = table[table["detector"] == name]
        have = set(zip(rows["generator"], rows["precision"], strict=True))
        gaps += [f"{g}/{p} for {name}" for g, p in grid if (g, p) not in have]
    return gaps
