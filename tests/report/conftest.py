"""Synthetic run folders with the schema `qdd-cli test` writes (scores.parquet + metrics.json)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qdd.modules.detector import SCORE_COLUMNS

#: Mean logit of a fake group per precision: fp32/fp16/fp8 detected, 4-bit formats not.
SHIFT = {"fp32": 3.0, "fp16": 2.9, "fp8": 2.5}
RECIPE = ("generator", "precision", "quant_backend", "quant_scope", "model_id")
FULL = {"sd3": ["fp32", "fp16", "fp8", "fp4"], "flux-schnell": ["fp32", "fp16", "fp8", "fp4"]}


def write_run(
    folder: Path,
    detector: str,
    grid: dict[str, list[str]],
    n: int = 12,
    seed: int = 0,
    weights: str = "checkpoints/x.pth",
    constant: bool = False,
) -> Path:
    """Real images plus ``n`` fakes per generator/precision, paired by key across precisions."""
    rng = np.random.default_rng(seed)
    rows = [
        {"key": f"photo{i}", "label": 0, "source": "coco", "generator": None, "precision": None,
         "quant_backend": None, "quant_scope": None, "model_id": None, "group": "real/coco",
         "logit": float(rng.normal(-2, 1))}
        for i in range(n)
    ]  # fmt: skip
    for generator, precisions in grid.items():
        for precision in precisions:
            quantized = precision not in ("fp32", "fp16")
            for i in range(n):
                logit = SHIFT.get(precision, -0.5) + (0 if constant else rng.normal(0, 1))
                rows.append({"key": f"p{i:05d}-s{i}", "label": 1, "source": generator,
                             "generator": generator, "precision": precision,
                             "quant_backend": "emulate" if quantized else None,
                             "quant_scope": "denoiser" if quantized else None,
                             "model_id": f"hub/{generator}", "group": f"{generator}/{precision}",
                             "logit": float(logit)})  # fmt: skip
    scores = pd.DataFrame(rows)
    # the columns qdd-cli test writes, in its order, plus the detector
    scores = scores.reindex(columns=list(SCORE_COLUMNS)).assign(detector=detector)
    folder.mkdir(parents=True)
    scores.to_parquet(folder / "scores.parquet", index=False)
    groups, recipes = {}, {}
    for group, part in scores[scores["label"] == 1].groupby("group"):
        fake_acc = float((part["logit"] > 0).mean())
        groups[group] = {"n_fake": len(part), "n_real": n, "acc": None, "real_acc": 0.9,
                         "fake_acc": fake_acc, "balanced_acc": (0.9 + fake_acc) / 2,
                         "auroc": min(1.0, 0.5 + fake_acc / 2), "ap": None,
                         "tpr_at_fpr1": None, "tpr_at_fpr5": None}  # fmt: skip
        first = part.iloc[0]
        recipes[group] = {c: first[c] for c in RECIPE}
    metrics = {"detector": detector, "weights": weights, "data": [f"shards/{detector}"],
               "threshold": 0.0, "n": len(scores), "overall": {}, "groups": groups,
               "recipes": recipes}  # fmt: skip
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


@pytest.fixture
def make_run(tmp_path: Path) -> Callable[..., Path]:
    """``make_run(name, detector, grid, **kw)`` writes tmp_path/name as a test run folder."""

    def make(name: str, detector: str, grid: dict[str, list[str]] = FULL, **kw: object) -> Path:
        return write_run(tmp_path / "runs" / name, detector, grid, **kw)

    return make
