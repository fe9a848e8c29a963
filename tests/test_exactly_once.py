"""`qdd-cli test` scores every image exactly once (issue 8), per perturbation (issue 11).

Uneven shard folders (7, 13 and 29 images), worker counts 0, 2 and 3, batch sizes that
divide none of them, and DDP with 2 CPU processes through a real `python -m qdd`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from qdd.cli import main
from tests.conftest import run_qdd, write_fake_shards, zero_images

FAST = [
    "--random-weights",
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.logger=false",
]


def npr_test_args(data: Path, out: Path | None, *flags: str) -> list[str]:
    """``qdd-cli test`` of the NPR detector (random weights) on ``data``."""
    where = ["--out", str(out)] if out else []
    return ["test", "--detector", "npr", "--data", str(data), *where, *flags, *FAST]


@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, str]]]:
    """Three folders of 7, 13 and 29 tiny images (two fake groups and a real one)."""
    root = tmp_path_factory.mktemp("uneven")
    keys = []
    # g2 records no precision: its group is "g2/unknown"
    for name, count, label in [("g1-fp4", 7, 1), ("g2", 13, 1), ("real-x", 29, 0)]:
        generator, _, precision = name.partition("-")
        written = write_fake_shards(
            root / name, [count], generator, precision or None, label=label, size=(16, 16)
        )
        group = f"real/{generator}" if label == 0 else f"{generator}/{precision or 'unknown'}"
        keys += [(key, group) for key in written]
    return root, keys


def check_exactly_once(out: Path, keys: list[tuple[str, str]], perturbations: list[str]) -> None:
    scores = pd.read_parquet(out / "scores.parquet")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["perturbations"] == perturbations
    assert metrics["n"] == metrics["expected"] == len(keys) and metrics["n_skipped"] == 0
    for name in perturbations:
        rows = scores[scores["perturbation"] == name]
        assert sorted(zip(rows["key"], rows["group"], strict=True)) == sorted(keys), name
        assert metrics["by_perturbation"][name]["n"] == len(keys)
    assert len(scores) == len(keys) * len(perturbations)


@pytest.mark.parametrize(("workers", "batch_size"), [(0, 5), (2, 6), (3, 4), (3, 5)])
def test_every_image_once_in_process(uneven, tmp_path: Path, workers, batch_size) -> None:
    root, keys = uneven
    out = tmp_path / "run"
    main(
        npr_test_args(
            root / "*", out, f"--data.num_workers={workers}", f"--data.batch_size={batch_size}"
        )
    )
    check_exactly_once(out, keys, ["none"])


def test_perturbations_keep_exactly_once(uneven, tmp_path: Path) -> None:
    """Each image scored once per perturbation; the axis reaches parquet and metrics.json."""
    root, keys = uneven
    out = tmp_path / "run"
    # jpeg:50 given twice is scored once
    perturb = ["--perturb", "jpeg:50", "--perturb=blur:1.0", "--perturb", "jpeg:50"]
    main(npr_test_args(root / "*", out, *perturb, "--data.num_workers=2", "--data.batch_size=6"))
    check_exactly_once(out, keys, ["none", "jpeg:50", "blur:1.0"])  # as the user spelt it
    scores = pd.read_parquet(out / "scores.parquet")
    metrics = json.loads((out / "metrics.json").read_text())
    by = {
        name: rows.set_index(["key", "group"])["logit"]
        for name, rows in scores.groupby("perturbation")
    }
    # the perturbation reached the detector: JPEG and blur move logits, each differently
    assert (by["jpeg:50"] - by["none"]).abs().max() > 1e-4
    assert (by["blur:1.0"] - by["jpeg:50"]).abs().max() > 1e-4
    # today's keys describe the unperturbed pass; the nested form holds every pass
    assert metrics["overall"] == metrics["by_perturbation"]["none"]["overall"]
    assert set(metrics["by_perturbation"]["jpeg:50"]["groups"]) == {"g1/fp4", "g2/unknown"}


def test_unknown_perturbation_is_one_line(uneven, tmp_path: Path, capsys) -> None:
    root, _ = uneven
    with pytest.raises(SystemExit) as exit_info:
        main(npr_test_args(root / "*", None, "--perturb", "jpg:5"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "jpg:5" in err[0], err


def test_unreadable_samples_are_counted_and_named(tmp_path: Path, capsys) -> None:
    root = tmp_path / "shards"
    keys = write_fake_shards(root / "g-fp4", [6], "g", "fp4", size=(16, 16))
    write_fake_shards(root / "real-x", [5], "x", None, label=0, size=(16, 16))
    zero_images(root / "g-fp4" / "shard-000000.tar", [keys[2]])
    out = tmp_path / "run"
    main(npr_test_args(root / "*", out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 10 and metrics["expected"] == 11 and metrics["n_skipped"] == 1
    assert metrics["skipped"][0]["key"] == keys[2] and "decode" in metrics["skipped"][0]["error"]
    scores = pd.read_parquet(out / "scores.parquet")
    assert sorted(scores.loc[scores["group"] == "g/fp4", "key"]) == keys[:2] + keys[3:]
    assert "scored 10 of the 11 samples" in capsys.readouterr().err


def test_ddp_two_processes_every_image_once(uneven, tmp_path: Path) -> None:
    """The path users take: a real `python -m qdd` with DDP on 2 CPU processes and workers;
    scores travel through the process group, not through files next to the run folder."""
    root, keys = uneven
    out = tmp_path / "ddp"
    flags = ["--data.batch_size=4", "--data.num_workers=2", "--perturb", "jpeg:75"]
    ddp = ["--trainer.strategy=ddp", "--trainer.devices=2"]
    run_qdd(npr_test_args(root / "*", out, *flags, *ddp), cwd=tmp_path)
    check_exactly_once(out, keys, ["none", "jpeg:75"])
    written = sorted(p.name for p in out.iterdir())
    assert written == ["config.yaml", "metrics.json", "scores.parquet"]  # no per-rank files
