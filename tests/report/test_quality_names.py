"""The report names quality metrics by their features and says when a feature network is
not the published file (issue 21, finding 6)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from qdd.identity import precision_label
from qdd.report.command import build_report
from tests.report.test_tradeoff import write_quality_run


def test_tradeoff_names_clip_distances_and_flags_unverified_networks(tmp_path: Path) -> None:
    run = write_quality_run(tmp_path / "runs" / "quality")
    metrics = json.loads((run / "metrics.json").read_text())
    for group in metrics["groups"].values():
        group.update(fd_clip=1.5, kd_clip=0.01, kd_clip_std=None)
    metrics["lpips"] = {
        "net": "alex",
        "weights": "random-alex.pth",
        "sha256": "ab" * 32,
        "verified": False,
        "published": None,
    }
    metrics["verified"] = False
    (run / "metrics.json").write_text(json.dumps(metrics))
    index = build_report([run], tmp_path / "report").read_text()
    frame = pd.read_csv(tmp_path / "report" / "tables" / "tradeoff.csv")
    assert {"fd_clip", "kd_clip"} <= set(frame.columns) and "fid" not in frame.columns
    assert "LPIPS from random-alex.pth (sha256 abababababababab…)" in index
    assert "verified: false" in index


def test_paired_view_pairs_twins_by_model_and_keeps_backends_apart() -> None:
    from qdd.report.paired import lower_precisions, paired_logits
    from qdd.report.runs import _named_fakes

    rows = []
    for precision, backend, model, shift in (
        ("fp32", "none", "org/a", 0.0),
        ("fp4", "bitsandbytes", "org/a", -1.0),
        ("fp4", "emulate", "org/a", -2.0),
        ("fp8", "torchao", "org/b", -3.0),
    ):
        for i in range(3):
            rows.append(
                {
                    "label": 1,
                    "generator": "sd3",
                    "precision": precision,
                    "quant_backend": backend,
                    "model_id": model,
                    "key": f"p{i}",
                    "logit": 1.0 + i + shift,
                    "group": f"sd3/{precision_label(precision, backend)}",
                }
            )
    scores = _named_fakes(pd.DataFrame(rows))
    assert lower_precisions(scores) == ["fp8", "fp4", "fp4@emulate"] or set(
        lower_precisions(scores)
    ) == {"fp8", "fp4", "fp4@emulate"}
    fp4, emulated = paired_logits(scores, "fp4"), paired_logits(scores, "fp4@emulate")
    assert ((fp4["fp4"] - fp4["fp32"]) == -1.0).all() and len(fp4) == 3
    assert ((emulated["fp4@emulate"] - emulated["fp32"]) == -2.0).all() and len(emulated) == 3
    assert paired_logits(scores, "fp8").empty  # another model's images are not twins
