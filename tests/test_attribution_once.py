"""``test --task attribution`` measures every image exactly once: workers 0 and 2, batch
sizes that divide no folder, a perturbation pass, 2 DDP processes through a real
``python -m qdd``; the confusion matrix sums to the images scored. And ``qdd-cli report``
draws two attribution runs beside a detection run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from qdd.cli import main
from tests.conftest import run_qdd
from tests.test_cli_detect import FAST, write_set

TINY = "--model.detector_args={backbone: qdd-tiny-vit, backbone_weights: null}"
QUIET = ["--trainer.logger=false", *FAST]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Uneven folders (13 fp32, 11 fp4, 7 reals) and a family fit with reals as a class."""
    root = tmp_path_factory.mktemp("once")
    write_set(root / "shards" / "tiny-fp32", 13, 1, "tiny", "fp32", smooth=True)
    write_set(root / "shards" / "tiny-fp4", 11, 1, "tiny", "fp4", offset=100)
    write_set(root / "shards" / "real-noise", 7, 0, None, None, offset=1000)
    out = root / "fit"
    main(["fit", "--task", "attribution", "--attribute", "family", "--model.include_real=true",
          "--detector", "clipd", "--random-weights", TINY, "--data", str(root / "shards" / "*"),
          "--out", str(out), "--trainer.max_epochs=1", *QUIET])  # fmt: skip
    return root / "shards", str(out / "checkpoints" / "last.ckpt")


def expected_rows() -> list[tuple[str, str]]:
    """(group, key) of every image `fitted` wrote."""
    rows = []
    for offset, n, group in [(0, 13, "tiny/fp32"), (100, 11, "tiny/fp4@emulate"),
                             (1000, 7, "real/noise")]:  # fmt: skip
        rows += [(group, f"p{i:05d}-s{i}") for i in range(offset, offset + n)]
    return sorted(rows)


def check_once(out: Path, passes: list[str]) -> None:
    metrics = json.loads((out / "metrics.json").read_text())
    scores = pd.read_parquet(out / "scores.parquet")
    rows = expected_rows()
    assert metrics["expected"] == len(rows) and metrics["n_skipped"] == 0
    for name in passes:
        part = scores[scores["perturbation"] == name]
        assert sorted(zip(part["group"], part["key"], strict=True)) == rows, name
        measured = metrics["by_perturbation"][name]
        assert measured["n"] == len(rows) and sum(map(sum, measured["confusion"])) == len(rows)
        assert sum(g["n"] for g in measured["by_group"].values()) == len(rows)
    assert len(scores) == len(rows) * len(passes)
    confusion = pd.read_csv(out / "confusion.csv", index_col=0).to_numpy()
    assert confusion.sum() == metrics["n"] == len(rows)
    assert confusion.tolist() == metrics["by_perturbation"]["none"]["confusion"]


@pytest.mark.parametrize(("workers", "batch_size"), [(0, 5), (2, 3)])
def test_every_image_once_in_process(fitted, tmp_path: Path, workers: int,
                                     batch_size: int) -> None:  # fmt: skip
    shards, ckpt = fitted
    out = tmp_path / "test"
    main(["test", "--data", str(shards / "*"), "--ckpt_path", ckpt, "--out", str(out),
          "--data.allow_train_overlap=true", f"--data.num_workers={workers}",
          f"--data.batch_size={batch_size}", *QUIET])  # fmt: skip
    check_once(out, ["none"])


@pytest.mark.slow
def test_ddp_two_processes_every_image_once(fitted, tmp_path: Path) -> None:
    shards, ckpt = fitted
    out = tmp_path / "ddp"
    run_qdd(["test", "--data", str(shards / "*"), "--ckpt_path", ckpt, "--out", str(out),
             "--data.allow_train_overlap=true", "--data.num_workers=2", "--data.batch_size=4",
             "--perturb", "jpeg:75", "--trainer.strategy=ddp", "--trainer.devices=2",
             *QUIET], cwd=tmp_path)  # fmt: skip
    check_once(out, ["none", "jpeg:75"])
    written = sorted(p.name for p in out.iterdir())
    assert written == ["config.yaml", "confusion.csv", "metrics.json", "scores.parquet"]


def test_report_with_two_attribution_runs_beside_a_detection_run(
    fitted, tmp_path: Path, capsys
) -> None:
    shards, ckpt = fitted
    runs = [tmp_path / "attr-a", tmp_path / "attr-b"]
    for out in runs:
        main(["test", "--data", str(shards / "*"), "--ckpt_path", ckpt, "--out", str(out),
              "--data.allow_train_overlap=true", *QUIET])  # fmt: skip
    detection = tmp_path / "detect"
    main(["test", "--detector", "clipd", "--random-weights", TINY, "--data", str(shards / "*"),
          "--out", str(detection), *QUIET])  # fmt: skip
    report = tmp_path / "report"
    given = [runs[0], *runs, detection]  # a run given twice is read once (main refused it)
    main(["report", *map(str, given), "--out", str(report)])
    for run in runs:
        assert (report / f"attribution_{run.name}.png").is_file()
    assert (report / "kde_clipd.png").is_file()  # the detection run is drawn as before
    table = pd.read_csv(report / "tables" / "attribution.csv")
    assert sorted(set(table["run"])) == ["attr-a", "attr-b"]
    assert table.groupby("run")["n"].sum().tolist() == [31, 31]
    assert set(table["weights"]) == {ckpt} and set(table["attribute"]) == {"family"}
    index = (report / "report.md").read_text()
    assert "1 test run of 1 detector" in index  # attribution runs are not detector runs
    import shutil

    twin = shutil.copytree(runs[0], tmp_path / "elsewhere" / "attr-a")
    with pytest.raises(SystemExit):
        main(["report", str(runs[0]), str(twin), "--out", str(tmp_path / "r2")])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{runs[0]} and {twin} share the folder name attr-a" in line
