"""`qdd-cli report` end to end: the files, the gaps, the errors, reproducibility."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pandas as pd
import pytest
from PIL import Image

from qdd.cli import main
from qdd.errors import QddError
from qdd.report.command import build_report
from qdd.report.runs import load_runs

PARTIAL = {"sd3": ["fp32", "fp4"], "flux-schnell": ["fp32", "fp16", "fp8", "fp4"]}


def test_report_command_writes_every_file_and_names_gaps(make_run, tmp_path, capsys) -> None:
    runs = [
        make_run("npr", "npr"),
        make_run("clipd", "clipd", PARTIAL, seed=1),
        make_run("corvi", "corvi", {"sd3": ["fp8", "fp4"]}, seed=2),  # no fp32: no pairs
    ]
    out = tmp_path / "report"
    main(["report", *map(str, runs), "--out", str(out)])
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == str(out / "report.md")
    gaps = [line for line in captured.err.splitlines() if line.startswith("missing: ")]
    assert "missing: sd3/fp16 for clipd" in gaps and "missing: sd3/fp8 for clipd" in gaps
    assert "missing: flux-schnell/fp32 for corvi" in gaps
    assert not any(line.endswith("for npr") for line in gaps)
    assert len(gaps) == 2 + 6  # the 2 × 4 grid minus what each detector has
    assert "no paired view for corvi" in captured.err

    stems = ["kde_npr", "kde_clipd", "kde_corvi", "paired_npr", "paired_clipd",
             "heatmap_fake_acc", "heatmap_auroc"]  # fmt: skip
    for stem in stems:
        with Image.open(out / f"{stem}.png") as image:
            image.verify()
        with Image.open(out / f"{stem}.png") as image:
            assert image.size[0] >= 800 and image.mode == "RGBA"
        assert ET.parse(out / f"{stem}.svg").getroot().tag.endswith("svg")
    assert not (out / "paired_corvi.png").exists()
    for stem in ["fake_acc", "auroc", "groups", "paired_shift"]:
        assert (out / "tables" / f"{stem}.csv").is_file()
        assert (out / "tables" / f"{stem}.md").read_text().startswith("| ")

    index = (out / "report.md").read_text()
    for stem in stems:
        assert f"]({stem}.png)" in index and f"({stem}.svg)" in index
    assert "paired_corvi" not in index and "no paired view for corvi" in index
    for gap in gaps:
        assert f"- {gap}" in index
    assert "checkpoints/x.pth" in index and "emulate" in index and "denoiser" in index
    assert "(tables/groups.csv)" in index and "shards/npr" in index

    groups = pd.read_csv(out / "tables" / "groups.csv")
    assert len(groups) == 8 + 6 + 2
    assert groups[groups["detector"] == "npr"]["precision"].tolist()[:4] == [
        "fp32", "fp16", "fp8", "fp4"
    ]  # fmt: skip
    fake_acc = pd.read_csv(out / "tables" / "fake_acc.csv")
    assert list(fake_acc.columns) == ["detector", "generator", "fp32", "fp16", "fp8", "fp4"]
    shift = pd.read_csv(out / "tables" / "paired_shift.csv")
    assert set(shift["detector"]) == {"npr", "clipd"} and (shift["mean_shift"] < -2).all()
    assert (shift["pairs"] == 12).all()


def test_the_same_runs_give_byte_identical_files(make_run, tmp_path) -> None:
    runs = [make_run("npr", "npr", {"sd3": ["fp32", "fp4"]})]
    first, second = build_report(runs, tmp_path / "a"), build_report(runs, tmp_path / "b")
    files = sorted(p.relative_to(first.parent) for p in first.parent.rglob("*") if p.is_file())
    assert len(files) == 1 + 2 * 4 + 2 * 4  # index, 4 figures (png, svg), 4 tables (csv, md)
    for name in files:
        assert (first.parent / name).read_bytes() == (second.parent / name).read_bytes(), name
    with Image.open(first.parent / "kde_npr.png") as image:
        assert set(image.info) <= {"dpi"}  # no software or date stamps
    svg = (first.parent / "kde_npr.svg").read_text()
    assert "<dc:date>" not in svg and "Matplotlib v" not in svg


def test_runs_of_one_detector_merge_and_different_weights_stay_apart(make_run) -> None:
    a = make_run("a", "npr", {"sd3": ["fp32", "fp4"]})
    b = make_run("b", "npr", {"flux-schnell": ["fp32"]}, seed=0)  # same real images
    merged = load_runs([a, b])
    assert list(merged) == ["npr"]
    scores = merged["npr"].scores
    assert (scores["label"] == 0).sum() == 12  # the shared real images count once
    assert set(merged["npr"].groups) == {"sd3/fp32", "sd3/fp4", "flux-schnell/fp32"}
    retrained = make_run("c", "npr", {"sd3": ["fp4"]}, weights="runs/fit-npr/checkpoints/last.ckpt")
    apart = load_runs([a, retrained])
    assert sorted(apart) == ["npr-fit-npr", "npr-x"]
    assert set(apart["npr-fit-npr"].scores["detector"]) == {"npr-fit-npr"}


def test_bad_run_folders_are_one_line_errors(make_run, tmp_path, capsys) -> None:
    with pytest.raises(QddError, match="does not exist: check the path"):
        load_runs([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(QddError, match="is empty: make it with `qdd-cli test"):
        load_runs([tmp_path / "empty"])
    run = make_run("noscores", "npr")
    (run / "scores.parquet").unlink()
    with pytest.raises(QddError, match="has no scores.parquet: .*qdd-cli test"):
        load_runs([run])
    run = make_run("corrupt", "npr")
    (run / "scores.parquet").write_bytes(b"not parquet")
    with pytest.raises(QddError, match="cannot read run .*: re-run qdd-cli test"):
        load_runs([run])
    run = make_run("old", "npr")
    pd.read_parquet(run / "scores.parquet").drop(columns="logit").to_parquet(run / "scores.parquet")
    with pytest.raises(QddError, match="lacks column.*logit"):
        load_runs([run])
    run = make_run("nometrics", "npr")
    (run / "metrics.json").unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(run), "--out", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no metrics.json" in err


def test_fakes_without_precision_are_named_by_their_group(make_run) -> None:
    run = make_run("mj", "npr", {"sd3": ["fp32"]})
    scores = pd.read_parquet(run / "scores.parquet")
    fakes = scores["label"] == 1
    scores.loc[fakes, ["generator", "precision"]] = None  # a `qdd-cli shard --label fake` set
    scores.loc[fakes, "group"] = "midjourney/unknown"
    scores.to_parquet(run / "scores.parquet")
    loaded = load_runs([run])["npr"].scores
    assert set(loaded.loc[loaded["label"] == 1, "precision"]) == {"unknown"}
    assert set(loaded.loc[loaded["label"] == 0, "precision"].dropna()) == set()


def test_many_shard_folders_are_summarised_in_the_runs_table() -> None:
    from qdd.report.index import data_summary

    assert data_summary(["a/x", "a/y"]) == "a/x, a/y"
    assert data_summary([f"s/test/g{i}" for i in range(29)]) == "29 folders under s/test"
    assert data_summary([]) == "–"
