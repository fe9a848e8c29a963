"""Issue 23: a training-free detector's `qdd-cli fit` calibrates a threshold (no training),
and `qdd-cli test --ckpt_path` uses it, refusing other files, other detectors and the
calibration images; uncalibrated, its accuracies at logit 0 are left out and said so."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from qdd.calibration import fit_threshold
from qdd.checkpoint import WEIGHT_FILES_KEY
from qdd.cli import main
from qdd.detectors.tiny import tiny_detector_args
from qdd.metrics import detection_metrics

FAST = [
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.logger=false",
    "--data.test_fraction=0.3",
    "--data.batch_size=4",
]
N = 12  # images per class


def write_shards(folder: Path, label: int) -> None:
    """Real photos: pixel noise, keyed by name; fakes: smooth images, one prompt each."""
    from qdd.datamodules.schema import make_meta
    from qdd.datamodules.writer import ShardWriter, write_manifest

    rng = np.random.default_rng(label)
    with ShardWriter(folder, mode="new", max_count=10**6) as writer:
        for n in range(N):
            if label == 0:
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                image = Image.fromarray(pixels)
                meta = make_meta(0, "photos")
                key = f"photo{n:03d}"
            else:
                coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
                image = coarse.resize((32, 32), Image.BILINEAR)
                meta = make_meta(1, "tiny", generator="tiny", precision="fp4", prompt_id=n,
                                 prompt=f"prompt {n}", seed=n)  # fmt: skip
                key = f"p{n:05d}-s{n}"
            writer.write(key, image, meta)
    write_manifest(folder)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("calibration-shards")
    write_shards(root / "real", 0)
    write_shards(root / "fake", 1)
    return root


def data(shards: Path) -> list[str]:
    return ["--data", str(shards / "real"), "--data", str(shards / "fake")]


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.detectors.test_vit_detectors import hub_state

    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vitl14_pretrain.pth"
    torch.save(hub_state(4), path)
    return path


def rigid_args(backbone: Path) -> str:
    return json.dumps({**tiny_detector_args("rigid"), "backbone_weights": str(backbone)})


def fit_rigid(shards: Path, backbone: Path, out: Path, *extra: str) -> dict:
    main(["fit", "--detector", "rigid", "--model.detector_args", rigid_args(backbone),
          *data(shards), "--out", str(out), *FAST, *extra])  # fmt: skip
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def calibrated(shards: Path, dinov2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rigid calibration run (its folder)."""
    out = tmp_path_factory.mktemp("runs") / "fit-rigid"
    fit_rigid(shards, dinov2, out)
    return out


def last_error(capsys: pytest.CaptureFixture) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1]


def test_rigid_fit_calibrates_without_training(calibrated: Path, shards: Path, dinov2: Path,
                                               tmp_path: Path) -> None:  # fmt: skip
    metrics = json.loads((calibrated / "metrics.json").read_text())
    checkpoint = calibrated / "checkpoints" / "last.ckpt"
    assert metrics["training_free"] and metrics["steps"] == 0 and metrics["epochs"] == 0
    assert metrics["last_checkpoint"] == metrics["best_checkpoint"] == str(checkpoint)
    assert set(metrics["metrics"]) == {"val_auroc", "val_threshold"}  # nothing at logit 0
    calibration = metrics["calibration"]
    # the calibration set: every image outside the test split (train + val), both classes
    from qdd.datamodules.split import index_folder, split_of

    outside = [s for f in ("real", "fake") for s in index_folder(shards / f)
               if split_of(s.unit, 0.1, 0.3) != "test"]  # fmt: skip
    assert calibration["n_real"] + calibration["n_fake"] == len(outside) == metrics["data"]["n_val"]
    assert calibration["n_real"] and calibration["n_fake"] and calibration["rule"] == "balanced_acc"
    saved = torch.load(checkpoint, weights_only=True, map_location="cpu")
    sha = metrics["weight_files"][str(dinov2)]
    assert saved[WEIGHT_FILES_KEY] == {str(dinov2): sha} and len(sha) == 64
    split = saved["ShardDataModule"]
    assert split["calibration_only"] and split["n_train_units"] == len({s.unit for s in outside})
    assert not [k for k in saved["state_dict"] if k.startswith("detector.")]  # no weights kept
    # a repeated call gives the identical threshold
    from qdd.api import fit

    result = fit(detector="rigid", data=[str(shards / "real"), str(shards / "fake")],
                 out=tmp_path / "again", model={"detector_args": json.loads(rigid_args(dinov2))},
                 lightning_args=FAST)  # the API: the same calibration, its checkpoint returned
    assert result.checkpoints == {"best": tmp_path / "again" / "checkpoints" / "last.ckpt",
                                  "last": tmp_path / "again" / "checkpoints" / "last.ckpt"}
    again = result.metrics
    assert again["calibrated_threshold"] == metrics["calibrated_threshold"]
    assert again["calibration"] == calibration


@pytest.fixture(scope="module")
def tested(calibrated: Path, shards: Path) -> Path:
    """A test run of the calibration's held-out split (its folder)."""
    out = calibrated.parent / "test-rigid"
    main(["test", "--ckpt_path", str(calibrated / "checkpoints" / "last.ckpt"), *data(shards),
          "--data.split=test", "--out", str(out), *FAST])  # fmt: skip
    return out


@pytest.fixture(scope="module")
def uncalibrated(shards: Path, dinov2: Path) -> Path:
    """A test run of rigid without calibration (its folder)."""
    out = dinov2.parent / "test-plain"
    main(["test", "--detector", "rigid", "--model.detector_args", rigid_args(dinov2),
          *data(shards), "--out", str(out), *FAST])  # fmt: skip
    return out


def test_test_with_the_calibration_reports_both_accuracies(calibrated: Path, tested: Path):
    threshold = json.loads((calibrated / "metrics.json").read_text())["calibrated_threshold"]
    out = tested
    metrics = json.loads((out / "metrics.json").read_text())
    scores = pd.read_parquet(out / "scores.parquet")
    assert metrics["detector"] == "rigid" and metrics["train_overlap"] == 0
    assert metrics["calibrated_threshold"] == threshold
    assert set(scores["label"]) == {0, 1}
    logits, labels = torch.tensor(scores["logit"].to_numpy()), torch.tensor(scores["label"])
    expected = detection_metrics(logits, labels, 0.0, threshold)
    overall = metrics["overall"]
    assert overall["acc"] == pytest.approx(expected["acc"])
    assert overall["acc_calibrated"] == pytest.approx(
        float(((logits > threshold).long() == labels).double().mean())
    )
    assert "acc_calibrated" in metrics["accuracy_note"]


def test_calibration_images_are_refused_or_counted_at_test(
    calibrated: Path, shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    checkpoint = str(calibrated / "checkpoints" / "last.ckpt")
    with pytest.raises(SystemExit) as stop:
        main(["test", "--ckpt_path", checkpoint, *data(shards), "--out", str(tmp_path / "all"),
              *FAST])  # fmt: skip
    assert stop.value.code == 2
    error = last_error(capsys)
    assert "share a prompt (real photos: the image) with the calibration data of" in error
    assert "--data.split=test" in error and not (tmp_path / "all").exists()
    with pytest.raises(SystemExit):  # no validation split is left after a calibration
        main(["validate", "--ckpt_path", checkpoint, *data(shards), "--out",
              str(tmp_path / "val"), *FAST])  # fmt: skip
    error = last_error(capsys)
    assert "calibration data of" in error and "--data.split=test" in error
    assert "its own validation split" not in error
    out = tmp_path / "counted"
    main(["test", "--ckpt_path", checkpoint, *data(shards), "--data.allow_train_overlap=true",
          "--out", str(out), *FAST])  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    from qdd.datamodules.split import index_folder, split_of

    outside = [s for f in ("real", "fake") for s in index_folder(shards / f)
               if split_of(s.unit, 0.1, 0.3) != "test"]  # fmt: skip
    assert metrics["n"] == 2 * N and metrics["train_overlap"] == len(outside) < 2 * N


def test_another_detector_or_backbone_file_is_refused(
    calibrated: Path, shards: Path, dinov2: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from tests.detectors.test_vit_detectors import hub_state

    checkpoint = str(calibrated / "checkpoints" / "last.ckpt")
    common = [*data(shards), "--data.split=test", *FAST]
    with pytest.raises(SystemExit):
        main(["test", "--detector", "aeroblade", "--ckpt_path", checkpoint, *common,
              "--out", str(tmp_path / "a")])  # fmt: skip
    assert "holds a rigid detector, not aeroblade: pass --detector rigid" in last_error(capsys)
    other = tmp_path / "other.pth"
    torch.save(hub_state(5), other)  # same layout, other weights
    with pytest.raises(SystemExit):
        main(["test", "--ckpt_path", checkpoint, "--model.detector_args.backbone_weights",
              str(other), *common, "--out", str(tmp_path / "b")])  # fmt: skip
    error = last_error(capsys)
    assert f"rigid was built from {other} (sha256 " in error
    assert f"was made with {dinov2} (sha256 " in error
    moved = tmp_path / "moved.pth"  # the same file elsewhere: accepted
    shutil.copy(dinov2, moved)
    main(["test", "--ckpt_path", checkpoint, "--model.detector_args.backbone_weights",
          str(moved), *common, "--out", str(tmp_path / "c")])  # fmt: skip
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())["calibrated_threshold"]


def test_one_class_calibration_and_a_start_are_refused(
    calibrated: Path, shards: Path, dinov2: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--detector", "rigid", "--model.detector_args", rigid_args(dinov2),
              "--data", str(shards / "real"), "--out", str(tmp_path / "one"), *FAST])  # fmt: skip
    assert stop.value.code == 2
    error = last_error(capsys)
    assert error.startswith("qdd-cli fit: error: the calibration set (all but the test split)")
    assert "holds only real readable images" in error and "add fake shards" in error
    checkpoint = str(calibrated / "checkpoints" / "last.ckpt")
    with pytest.raises(SystemExit):
        main(["fit", "--ckpt_path", checkpoint, "--detector", "rigid", *data(shards),
              "--out", str(tmp_path / "resume"), *FAST])  # fmt: skip
    assert "rigid is training-free: `qdd-cli fit` only calibrates its threshold, from nothing, " \
        "and takes no --ckpt_path" in last_error(capsys)  # fmt: skip
    with pytest.raises(SystemExit):
        main(["fit", "--weights", checkpoint, "--detector", "rigid", *data(shards),
              "--out", str(tmp_path / "tune"), *FAST])  # fmt: skip
    assert "and takes no --weights" in last_error(capsys)
    with pytest.raises(SystemExit):
        main(["fit", "--weights", str(dinov2), "--detector", "rigid", *data(shards),
              "--out", str(tmp_path / "official"), *FAST])  # fmt: skip
    assert "rigid is training-free: it takes no --weights" in last_error(capsys)


def test_uncalibrated_test_leaves_out_accuracy_at_logit_zero(
    uncalibrated: Path, shards: Path, dinov2: Path, tmp_path: Path
) -> None:
    metrics = json.loads((uncalibrated / "metrics.json").read_text())
    assert metrics["calibrated_threshold"] is None
    assert "training-free and uncalibrated" in metrics["accuracy_note"]
    for values in [metrics["overall"], *metrics["groups"].values()]:
        assert values["acc"] is values["real_acc"] is values["fake_acc"] is None
        assert values["balanced_acc"] is None and values["auroc"] is not None
    main(["test", "--detector", "rigid", "--model.detector_args", rigid_args(dinov2),
          *data(shards), *FAST, "--model.threshold=-0.9999", "--out", str(tmp_path / "own")])
    own = json.loads((tmp_path / "own" / "metrics.json").read_text())
    assert own["accuracy_note"] is None and own["overall"]["acc"] is not None


def test_detection_metrics_without_a_threshold() -> None:
    logits, labels = torch.tensor([-0.9, -0.5, -0.2, -0.1]), torch.tensor([0, 0, 1, 1])
    metrics = detection_metrics(logits, labels, None, -0.3)
    assert metrics["acc"] is None and metrics["balanced_acc"] is None
    assert metrics["acc_calibrated"] == 1.0 and metrics["auroc"] == 1.0
    assert fit_threshold(logits, labels, "balanced_acc")["threshold"] == pytest.approx(-0.35)


def test_report_shows_the_calibrated_accuracy_and_says_what_logit_zero_means(
    tested: Path, uncalibrated: Path, tmp_path: Path
) -> None:
    from qdd.api import report

    index = Path(report(runs=[str(tested), str(uncalibrated)], out=tmp_path / "report")
                 .metrics["index"]).read_text()  # fmt: skip
    groups = pd.read_csv(tmp_path / "report" / "tables" / "groups.csv")
    calibrated = groups[groups["acc_calibrated"].notna()]
    assert len(calibrated) == 1 and calibrated["detector"].str.startswith("rigid").all()
    assert "is training-free: its accuracies at logit 0" in index
    assert "read acc_calibrated (its calibrated threshold)" in index
    assert "tested uncalibrated: calibrate with `qdd-cli fit --detector rigid`" in index


def test_detectors_table_says_fit_only_calibrates(capsys: pytest.CaptureFixture) -> None:
    main(["detectors"])
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()}
    for name in ("rigid", "aeroblade"):
        assert "| calibrates a threshold only |" in rows[name]
    assert "| yes |" in rows["npr"]


def test_calibration_set_is_everything_but_the_test_split(shards: Path) -> None:
    from qdd.datamodules.shard import ShardDataModule

    paths = [str(shards / "real"), str(shards / "fake")]
    fit = ShardDataModule(paths, test_fraction=0.3)
    fit.setup("fit")
    calibration = ShardDataModule(paths, test_fraction=0.3)
    calibration.calibrate_only()
    calibration.setup("validate")
    held_out = ShardDataModule(test=paths, test_fraction=0.3)
    held_out.setup("test")
    units = {s.unit for s in calibration.split["val"]}
    assert units == {s.unit for s in fit.split["train"] + fit.split["val"]}
    assert not units & {s.unit for s in held_out.split["test"]}
    assert len(calibration.split["val"]) + held_out.expected == 2 * N
    state = calibration.state_dict()
    assert state["calibration_only"] and state["n_train_units"] == len(units)
    assert calibration.describe()["calibration_only"] and not fit.describe()["calibration_only"]
    assert "calibration_only" not in fit.state_dict()
