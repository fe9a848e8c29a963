"""The study's trade-off, per generator × precision: what a precision saves (denoiser bytes,
time, memory), what it costs in image quality (PSNR, SSIM … against the reference twin),
and what it hides from each detector (fake accuracy, AUROC).

Quality runs (``qdd-cli quality``) bring the per-image quality (quality.parquet, pooled
over runs and recomputed here) and the costs the shards recorded (copied into their
metrics.json, so a report reads only run folders); test runs bring the detection metrics
(`qdd.report.runs.group_table`). Costs missing in older shards stay empty ("–").
The figure is drawn by `qdd.report.tradeoff_figure`, report.md's lines by
`qdd.report.verdict`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qdd.errors import QddError
from qdd.report.palette import bits, order_generators, order_precisions
from qdd.report.runs import NONE

#: The measure (a quality.parquet column, higher = closer to the twin) and the level a
#: precision must keep to count in the per-generator verdict of report.md.
KEEP_MEASURE = "ssim"
KEEP_SSIM = 0.90
#: Colour map of the quality (SSIM) in the figure: dark = degraded, bright = like the twin.
CMAP = "viridis"
QUALITY_PARQUET = "quality.parquet"
# The quality measures the report reads, by the names the quality runs write them: the one
# place to change when a measure is renamed or added.
#: Per-image measures against the twin (quality.parquet columns): mean and 95 % interval.
PER_IMAGE = ("psnr", "ssim", "lpips")
#: Group-level distances copied from the quality runs' metrics.json: FID/KID on Inception-V3
#: features, FD/KD on CLIP features (older runs named the CLIP ones fid/kid).
DISTANCES = ("fid", "kid", "kid_std", "fid_real", "kid_real", "kid_real_std",
             "fd_clip", "kd_clip", "kd_clip_std")  # fmt: skip
#: Per-image scores against the prompt (the image's and its twin's).
PROMPT_SCORES = ("clip_score", "clip_score_reference")
#: Quality columns left out of the table when no run measured them.
OPTIONAL = (*PER_IMAGE[2:], *DISTANCES, *PROMPT_SCORES)
#: What ``memory_saved`` is a share of, per row of the table.
BYTES, NOMINAL = "denoiser bytes", "nominal bits"
COSTS = ("denoiser_bytes", "seconds_per_image", "peak_memory_bytes")
#: A measured image, across quality runs.
SAMPLE = ["generator", "precision", "key"]


@dataclass
class QualityResults:
    """Every quality run, pooled: per-image rows, per-group FID/KID and costs."""

    scores: pd.DataFrame
    reference: str
    distances: dict[str, dict[str, Any]] = field(default_factory=dict)
    costs: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)


def is_quality_run(folder: Path) -> bool:
    """A folder made by ``qdd-cli quality``: it holds quality.parquet, or its metrics.json
    says ``"kind": "quality"``."""
    folder = Path(folder)
    if (folder / QUALITY_PARQUET).is_file():
        return True
    try:
        return json.loads((folder / "metrics.json").read_text()).get("kind") == "quality"
    except (OSError, ValueError, AttributeError):
        return False


def load_quality(folders: list[Path]) -> QualityResults:
    """Pool quality runs (an image measured twice counts once); one reference for all."""
    frames, runs = [], []
    distances: dict[str, dict[str, Any]] = {}
    costs: dict[str, dict[str, Any]] = {}
    references = set()
    for folder in folders:
        parquet, metrics_path = folder / QUALITY_PARQUET, folder / "metrics.json"
        try:
            frames.append(pd.read_parquet(parquet).assign(_run=str(folder)))
            metrics = json.loads(metrics_path.read_text())
        except Exception as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise QddError(
                f"cannot read quality run {folder} ({reason}): re-run qdd-cli quality "
                f"--data SHARDS --out {folder}"
            ) from None
        references.add(metrics.get("reference", "fp32"))
        for group, entry in (metrics.get("groups") or {}).items():
            if any(entry.get(k) is not None for k in DISTANCES):
                distances.setdefault(group, {k: entry.get(k) for k in DISTANCES})
        for group, entry in (metrics.get("costs") or {}).items():
            costs.setdefault(group, dict(entry))
        runs.append(
            {
                "folder": str(folder),
                "reference": metrics.get("reference"),
                "n": metrics.get("n"),
                "n_unpaired": metrics.get("n_unpaired", 0),
                "data": metrics.get("data") or [],
            }
        )
    if len(references) > 1:
        raise QddError(
            f"quality runs against different references ({', '.join(sorted(references))}): "
            "report them in separate qdd-cli report calls"
        )
    scores = pd.concat(frames, ignore_index=True)
    refuse_different_images(scores)
    scores = scores.drop_duplicates(SAMPLE, ignore_index=True).drop(columns="_run")
    return QualityResults(scores, references.pop(), distances, costs, runs)


def refuse_different_images(scores: pd.DataFrame) -> None:
    """An image measured by two quality runs counts once, if it is the same image: the same
    group and key with another PSNR or SSIM is another model's or recipe's image (quality.parquet
    records no recipe), refused in one line rather than one run's rows silently kept."""
    measures = [m for m in ("psnr", "ssim") if m in scores.columns]
    twice = scores[scores.duplicated(SAMPLE, keep=False)]
    for _, rows in twice.groupby(SAMPLE, sort=False):
        values = rows[measures].astype(float).to_numpy()
        same = np.isclose(values, values[0], rtol=1e-4, atol=1e-4, equal_nan=True).all(axis=1)
        if same.all():
            continue
        first, other = rows.iloc[0], rows[~same].iloc[0]
        raise QddError(
            f"quality runs {first['_run']} and {other['_run']} both measured "
            f"{first['generator']}/{first['precision']} {first['key']}, with different values "
            f"(SSIM {first.get('ssim', math.nan):.4f} vs {other.get('ssim', math.nan):.4f}): "
            "they measured different images (another model or recipe); report them in "
            "separate qdd-cli report calls"
        )


def tradeoff_table(quality: QualityResults, detection: pd.DataFrame) -> pd.DataFrame:
    """One row per generator × precision that a quality run or a test run holds (plus each
    generator's reference): costs, ratio to the reference, quality (mean and
    95 % interval), FID/KID and the CLIP scores (the image's and its twin's) where measured,
    each detector's AUROC and fake accuracy; ``memory_saved`` and what it is a share of
    (``memory_saved_from``: denoiser bytes, or nominal bits, per generator).

    ``detection``: `qdd.report.runs.group_table` (only its unperturbed rows are used).
    The reference's own row has no quality values (it is what the others are measured by).
    """
    from qdd.quality import group_summary

    summary = group_summary(quality.scores, {})
    detection = detection[detection["perturbation"] == NONE] if not detection.empty else detection
    groups = set(summary) | set(quality.costs)
    tested = zip(detection.get("generator", []), detection.get("precision", []), strict=True)
    groups |= {f"{g}/{p}" for g, p in tested}  # a generator without a quality run: a row
    generators = {g.rpartition("/")[0] for g in groups} | set(quality.scores["generator"])
    groups |= {f"{g}/{quality.reference}" for g in generators}
    detectors = sorted(detection["detector"].unique()) if not detection.empty else []
    rows = []
    for group in groups:
        generator, _, precision = group.rpartition("/")
        cost = quality.costs.get(group, {})
        reference_cost = quality.costs.get(f"{generator}/{quality.reference}", {})
        size, base = cost.get("denoiser_bytes"), reference_cost.get("denoiser_bytes")
        row: dict[str, Any] = {
            "generator": generator,
            "precision": precision,
            "denoiser_bytes": size,
            f"bytes_vs_{quality.reference}": size / base if size and base else None,
            "seconds_per_image": cost.get("seconds_per_image"),
            "peak_memory_bytes": cost.get("peak_memory_bytes"),
            "n_pairs": summary.get(group, {}).get("n", 0),
        }
        for measure in PER_IMAGE:
            for suffix in ("", "_lo", "_hi"):
                row[f"{measure}{suffix}"] = summary.get(group, {}).get(f"{measure}{suffix}")
        row.update(quality.distances.get(group, {}))
        for measure in PROMPT_SCORES:
            row[measure] = summary.get(group, {}).get(measure)
        for name in detectors:
            match = detection[
                (detection["detector"] == name)
                & (detection["generator"] == generator)
                & (detection["precision"] == precision)
            ]
            for metric in ("auroc", "fake_acc"):
                row[f"{name}_{metric}"] = float(match[metric].iloc[0]) if len(match) else None
        rows.append(row)
    table = pd.DataFrame(rows)
    optional = {f"{m}{s}" for m in OPTIONAL for s in ("", "_lo", "_hi")}
    empty = [c for c in table.columns if c in optional and table[c].isna().all()]
    table = table.drop(columns=empty)
    saved, measured = memory_saved(table, quality.reference)
    at = table.columns.get_loc("n_pairs") + 1
    table.insert(at, "memory_saved", saved)
    table.insert(at + 1, "memory_saved_from", measured.map({True: BYTES, False: NOMINAL}))
    g = {n: i for i, n in enumerate(order_generators(table["generator"].unique()))}
    p = {n: i for i, n in enumerate(order_precisions(table["precision"].unique()))}
    table = table.assign(_g=table["generator"].map(g), _p=table["precision"].map(p))
    return table.sort_values(["_g", "_p"]).drop(columns=["_g", "_p"]).reset_index(drop=True)


def detectors_in(table: pd.DataFrame) -> list[str]:
    """The detectors with columns in a trade-off table."""
    return [c[: -len("_fake_acc")] for c in table.columns if c.endswith("_fake_acc")]


def memory_saved(table: pd.DataFrame, reference: str) -> tuple[pd.Series, pd.Series]:
    """Share of the reference's denoiser bytes each row saves, and whether it is measured.

    Per generator: where all its rows (the reference's included) recorded
    ``denoiser_bytes``, the measured share; otherwise (shards older than the cost fields, a
    group only tested, never quality-measured) its rows fall back to the nominal share
    ``1 − bits/32`` of their precision names, and the second value is False for them.
    One generator's gap never changes another's numbers.
    """
    ratio = table[f"bytes_vs_{reference}"].astype(float)
    measured = ratio.notna().groupby(table["generator"]).transform("all").astype(bool)
    nominal = table["precision"].map(lambda p: (bits(p) or math.nan) / (bits(reference) or 32))
    share = ratio.where(measured, nominal.astype(float))
    return 1.0 - share, measured


def unrecorded_bytes(table: pd.DataFrame, generator: str) -> list[str]:
    """The ``generator/precision`` rows of one generator without recorded denoiser bytes."""
    rows = table[(table["generator"] == generator) & table["denoiser_bytes"].isna()]
    return [f"{generator}/{p}" for p in order_precisions(rows["precision"])]
