"""The report names quality metrics by their features and says when a feature network is
not the published file (issue 21, finding 6)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

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
