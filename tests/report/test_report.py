"""`qdd-cli report` on synthetic run folders with the schema `qdd-cli test` writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from qdd.cli import main
from qdd.errors import QddError
from qdd.report.command import build_report
from qdd.report.heatmap import plot_heatmap
from qdd.report.kde import plot_kde
from qdd.report.paired import plot_paired
from qdd.report.runs import group_table, load_runs


def write_run(
    folder: Path, detector: str, grid: dict[str, list[str]], n: int = 12, seed: int = 0
) -> Path:
    """A run folder: real images plus `n` fakes per generator/precision, paired by key."""
    rng = np.random.default_rng(seed)
    rows = [
        {
            "key": f"photo{i}",
            "label": 0,
            "source": "coco",
            "generator": None,
            "precision": None,
            "quant_backend": None,
            "quant_scope": None,
            "model_id": None,
            "group": "real/coco",
            "logit": float(rng.normal(-2, 1)),
        }
        for i in range(n)
    ]
    for generator, precisions in grid.items():
        for precision in precisions:
            shift = {"fp32": 3.0, "fp16": 2.9, "fp8": 2.5}.get(precision, -0.5)
            for i in range(n):
                rows.append({"key": f"p{i:05d}-s{i}", "label": 1, "source": generator,
                             "generator": generator, "precision": precision,
                             "quant_backend": None if precision in ("fp32", "fp16") else "emulate",
                             "quant_scope": None if precision in ("fp32", "fp16") else "denoiser",
                             "model_id": f"hub/{generator}", "group": f"{generator}/{precision}",
                             "logit": float(rng.normal(shift, 1))})  # fmt: skip
    scores = pd.DataFrame(rows).assign(detector=detector)
    folder.mkdir(parents=True)
    scores.to_parquet(folder / "scores.parquet", index=False)
    groups = {}
    for group, part in scores[scores["label"] == 1].groupby("group"):
        fake_acc = float((part["logit"] > 0).mean())
        groups[group] = {"n_fake": len(part), "n_real": n, "fake_acc": fake_acc,
                         "auroc": min(1.0, 0.5 + fake_acc / 2), "acc": None}  # fmt: skip
    metrics = {"detector": detector, "weights": "checkpoints/x.pth", "data": [], "threshold": 0.0,
               "n": len(scores), "overall": {}, "groups": groups,
               "recipes": {g: {"generator": g.split("/")[0], "precision": g.split("/")[1],
                               "quant_backend": "emulate", "quant_scope": "denoiser",
                               "model_id": "hub/x"} for g in groups}}  # fmt: skip
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


FULL = {"sd3": ["fp32", "fp16", "fp8", "fp4"], "flux-schnell": ["fp32", "fp16", "fp8", "fp4"]}


def test_kde_has_one_curve_per_precision_plus_real(tmp_path: Path) -> None:
    scores = pd.read_parquet(write_run(tmp_path / "r", "npr", FULL) / "scores.parquet")
    fig = plot_kde(scores, "npr")
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["sd3", "flux-schnell"]
    for ax in panels:
        curves = [
            line for line in ax.lines if line.get_label() and not line.get_label().startswith("_")
        ]
        assert [c.get_label() for c in curves] == ["fp32", "fp16", "fp8", "fp4", "real"]
        assert any(tuple(line.get_xdata()) == (0, 0) for line in ax.lines)  # threshold


def test_kde_survives_single_and_constant_values(tmp_path: Path) -> None:
    scores = pd.read_parquet(write_run(tmp_path / "r", "npr", {"sd3": ["fp32", "fp4"]}, n=1)
                             / "scores.parquet")  # fmt: skip
    fig = plot_kde(scores, "npr")
    assert len(fig.axes[0].lines) >= 3


def test_heatmap_has_a_panel_per_detector_and_shared_scale(tmp_path: Path) -> None:
    runs = [write_run(tmp_path / d, d, FULL, seed=i) for i, d in enumerate(["npr", "clipd"])]
    table = group_table(load_runs(runs))
    fig = plot_heatmap(table, "fake_acc")
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["clipd", "npr"]
    for ax in panels:
        image = ax.images[0]
        assert image.get_clim() == (0, 1) and image.get_array().shape == (2, 4)
        assert len(ax.texts) == 8
        assert [t.get_text() for t in ax.get_xticklabels()] == ["fp32", "fp16", "fp8", "fp4"]


def test_paired_view_pairs_fp4_with_fp32_by_key(tmp_path: Path) -> None:
    scores = pd.read_parquet(write_run(tmp_path / "r", "npr", FULL) / "scores.parquet")
    fig = plot_paired(scores, "npr")
    scatter, bars = fig.axes[:2]
    assert len(scatter.collections) == 2  # one scatter per generator
    assert sum(len(c.get_offsets()) for c in scatter.collections) == 24
    assert len(bars.patches) == 2 and all(p.get_height() < 0 for p in bars.patches)
    assert "FP4" in fig._suptitle.get_text()
    only_nf4 = {"sd3": ["fp32", "nf4"]}
    fig = plot_paired(pd.read_parquet(write_run(tmp_path / "n", "npr", only_nf4)
                                      / "scores.parquet"), "npr")  # fmt: skip
    assert "NF4" in fig._suptitle.get_text()
    no_fp32 = pd.read_parquet(write_run(tmp_path / "x", "npr", {"sd3": ["fp4"]}) / "scores.parquet")
    assert plot_paired(no_fp32, "npr") is None


def test_report_command_writes_every_file_and_names_gaps(tmp_path: Path, capsys) -> None:
    partial = {"sd3": ["fp32", "fp4"], "flux-schnell": ["fp32", "fp16", "fp8", "fp4"]}
    runs = [
        write_run(tmp_path / "npr", "npr", FULL),
        write_run(tmp_path / "clipd", "clipd", partial),
    ]
    out = tmp_path / "report"
    main(["report", *map(str, runs), "--out", str(out)])
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out / "report.md")
    for stem in ["kde_npr", "kde_clipd", "paired_npr", "paired_clipd", "heatmap_fake_acc",
                 "heatmap_auroc"]:  # fmt: skip
        with Image.open(out / f"{stem}.png") as image:
            assert image.size[0] > 400
        assert (out / f"{stem}.svg").read_text().startswith("<?xml")
    for stem in ["fake_acc", "auroc", "groups", "paired_shift"]:
        assert (out / "tables" / f"{stem}.csv").exists() and (
            out / "tables" / f"{stem}.md"
        ).exists()
    index = (out / "report.md").read_text()
    assert "missing: sd3/fp16 for clipd" in index and "missing: sd3/fp8 for clipd" in index
    assert "missing: sd3/fp16 for npr" not in index
    assert "kde_npr.png" in index and "checkpoints/x.pth" in index and "emulate" in index
    groups = pd.read_csv(out / "tables" / "groups.csv")
    assert len(groups) == 8 + 6
    first = (out / "heatmap_fake_acc.svg").read_bytes()
    build_report(runs, out)
    assert (out / "heatmap_fake_acc.svg").read_bytes() == first  # reproducible files


def test_bad_run_folders_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(QddError, match="does not exist"):
        load_runs([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(QddError, match="has no scores.parquet.*qdd-cli test"):
        load_runs([tmp_path / "empty"])
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r")])
    assert exit_info.value.code == 2
