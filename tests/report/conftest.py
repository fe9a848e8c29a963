"""Synthetic run folders with the schema `qdd-cli test` writes (scores.parquet + metrics.json).

The group metrics in each metrics.json are computed from that run's own scores with
scikit-learn (independently of `qdd.report.stats`), as `qdd-cli test` computes them from
its scores: no invented numbers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from qdd.callbacks import SCORE_COLUMNS

#: Mean logit of a fake group per precision: fp32/fp16/fp8 detected, 4-bit formats not.
SHIFT = {"fp32": 3.0, "fp16": 2.9, "fp8": 2.5}
RECIPE = ("generator", "precision", "quant_backend", "quant_scope", "model_id")
FULL = {"sd3": ["fp32", "fp16", "fp8", "fp4"], "flux-schnell": ["fp32", "fp16", "fp8", "fp4"]}
#: Quantized share of the denoiser per generator (as the real models: SD1.5 ~0.31, SD3 ~1).
FRACTION = {"sd15": 0.31, "sdxl": 0.87, "sd3": 0.999, "flux-schnell": 1.0}


def reference_metrics(real: np.ndarray, fake: np.ndarray, threshold: float = 0.0) -> dict:
    """Every metric of qdd.metrics.METRICS, by scikit-learn and plain counting."""
    labels = np.r_[np.zeros(len(real)), np.ones(len(fake))]
    logits = np.r_[real, fake]
    real_acc, fake_acc = float((real <= threshold).mean()), float((fake > threshold).mean())
    fpr, tpr, _ = roc_curve(labels, logits)
    return {
        "n_fake": len(fake),
        "n_real": len(real),
        "acc": float(((logits > threshold) == labels).mean()),
        "real_acc": real_acc,
        "fake_acc": fake_acc,
        "balanced_acc": (real_acc + fake_acc) / 2,
        "auroc": float(roc_auc_score(labels, logits)),
        "ap": float(average_precision_score(labels, logits)),
        "tpr_at_fpr1": float(tpr[fpr <= 0.01].max()),
        "tpr_at_fpr5": float(tpr[fpr <= 0.05].max()),
    }


def write_run(
    folder: Path,
    detector: str,
    grid: dict[str, list[str]],
    n: int = 12,
    seed: int = 0,
    weights: str = "checkpoints/x.pth",
    constant: bool = False,
    threshold: float = 0.0,
    shift: float = 0.0,
    perturbations: tuple[str, ...] | None = None,
    real_format: str | None = None,
    fake_format: str | None = None,
    extra: dict | None = None,
) -> Path:
    """Real images plus ``n`` fakes per generator/precision, paired by key across precisions.

    ``shift`` moves every fake logit (two runs with different shifts disagree per group);
    ``perturbations`` repeats every image once per spec (stronger specs lower fake logits),
    writing a ``perturbation`` column; without it the column is absent, as in old runs.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for perturbation in perturbations or ("none",):
        strength = 0.0 if perturbation == "none" else float(perturbation.split(":")[1]) / 100
        for i in range(n):
            rows.append({"key": f"photo{i}", "label": 0, "source": "coco", "group": "real/coco",
                         "logit": float(rng.normal(-2, 1)), "perturbation": perturbation,
                         "source_format": real_format})  # fmt: skip
        for generator, precisions in grid.items():
            for precision in precisions:
                quantized = precision not in ("fp32", "fp16")
                for i in range(n):
                    logit = SHIFT.get(precision, -0.5) + (0 if constant else rng.normal(0, 1))
                    rows.append({"key": f"p{i:05d}-s{i}", "label": 1, "source": generator,
                                 "generator": generator, "precision": precision,
                                 "quant_backend": "emulate" if quantized else None,
                                 "quant_scope": "denoiser" if quantized else None,
                                 "quant_fraction": FRACTION.get(generator, 0.5) if quantized
                                 else 0.0,
                                 "model_id": f"hub/{generator}",
                                 "group": f"{generator}/{precision}",
                                 "logit": float(logit + shift - 3 * strength),
                                 "perturbation": perturbation,
                                 "source_format": fake_format})  # fmt: skip
    scores = pd.DataFrame(rows)
    columns = [*SCORE_COLUMNS]
    columns += [c for c in ("quant_fraction", "source_format") if c not in columns]
    if perturbations:
        columns.append("perturbation")
    # the columns qdd-cli test writes, in its order, plus the detector
    scores = scores.reindex(columns=columns).assign(detector=detector)
    folder.mkdir(parents=True)
    scores.to_parquet(folder / "scores.parquet", index=False)
    groups, recipes = {}, {}
    plain = scores if not perturbations else scores[scores["perturbation"] == "none"]
    real = plain.loc[plain["label"] == 0, "logit"].to_numpy()
    for group, part in plain[plain["label"] == 1].groupby("group"):
        groups[group] = reference_metrics(real, part["logit"].to_numpy(), threshold)
        first = part.iloc[0]
        recipes[group] = {c: first[c] for c in RECIPE}
    metrics = {"detector": detector, "weights": weights, "data": [f"shards/{detector}"],
               "threshold": threshold, "n": len(plain), "overall": {}, "groups": groups,
               "recipes": recipes, **(extra or {})}  # fmt: skip
    (folder / "metrics.json").write_text(json.dumps(metrics, default=str))
    return folder


@pytest.fixture
def make_run(tmp_path: Path) -> Callable[..., Path]:
    """``make_run(name, detector, grid, **kw)`` writes tmp_path/name as a test run folder."""

    def make(name: str, detector: str, grid: dict[str, list[str]] = FULL, **kw: object) -> Path:
        return write_run(tmp_path / "runs" / name, detector, grid, **kw)

    return make
