"""Issue 23's calibration joins, tried as a user would (review `breakcalib`): training-only
flags given to a training-free fit, a checkpoint that records no weight files, other split
fractions at test time, a trained detector's resume, and the calibrated accuracy note."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from qdd.calibration import accuracy_note
from qdd.checkpoint import WEIGHT_FILES_KEY
from qdd.cli import main
from tests import test_training_free_calibration as base
from tests.test_training_free_calibration import FAST, data, fit_rigid, last_error

# The tiny DINOv2 file, the shards and the calibration run of issue 23's own tests.
shards, dinov2, calibrated = base.shards, base.dinov2, base.calibrated


def test_training_only_flags_of_a_calibration_are_named(
    calibrated: Path, shards: Path, dinov2: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``fit --detector rigid --trainer.max_epochs=5 --model.lr=0.1`` ran one validation
    pass and said nothing of the two flags it ignored."""
    capsys.readouterr()
    metrics = fit_rigid(shards, dinov2, tmp_path / "flags", "--trainer.max_epochs=5",
                        "--model.lr=0.1")  # fmt: skip
    warned = [line for line in capsys.readouterr().err.splitlines() if "ignored" in line]
    assert len(warned) == 1 and "rigid is training-free" in warned[0]
    assert "--model.lr, --trainer.max_epochs change nothing" in warned[0]
    expected = json.loads((calibrated / "metrics.json").read_text())["calibrated_threshold"]
    assert metrics["calibrated_threshold"] == expected and metrics["steps"] == 0
    fit_rigid(shards, dinov2, tmp_path / "plain")
    assert "ignored" not in capsys.readouterr().err


def test_calibrated_accuracy_note_is_a_whole_sentence() -> None:
    note = accuracy_note("rigid", False, 0.0, -0.99)
    assert note.endswith("acc_calibrated, at the threshold calibrated on held-out images, is "
                         "the accuracy to read")  # fmt: skip


def test_a_checkpoint_without_recorded_weight_files_is_warned(
    calibrated: Path, shards: Path, dinov2: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A checkpoint of an older qdd (no `qdd_weight_files`) was used without a word."""
    contents = torch.load(calibrated / "checkpoints" / "last.ckpt", weights_only=False)
    del contents[WEIGHT_FILES_KEY]
    old = tmp_path / "old.ckpt"
    torch.save(contents, old)
    capsys.readouterr()
    main(["test", "--ckpt_path", str(old), *data(shards), "--data.split=test", *FAST,
          "--out", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err
    assert f"{old} records no weight files" in err and str(dinov2) in err
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["calibrated_threshold"]


def test_other_fractions_at_test_are_checked_unit_by_unit(
    calibrated: Path, shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The held-out split of a smaller test_fraction lies inside the calibration's: accepted,
    overlap 0; a larger one reaches calibrated images: refused, naming the fractions."""
    checkpoint = str(calibrated / "checkpoints" / "last.ckpt")
    main(["test", "--ckpt_path", checkpoint, *data(shards), "--data.split=test", *FAST,
          "--data.test_fraction=0.2", "--out", str(tmp_path / "smaller")])  # fmt: skip
    assert json.loads((tmp_path / "smaller" / "metrics.json").read_text())["train_overlap"] == 0
    with pytest.raises(SystemExit):
        main(["test", "--ckpt_path", checkpoint, *data(shards), "--data.split=test", *FAST,
              "--data.test_fraction=0.5", "--out", str(tmp_path / "larger")])  # fmt: skip
    error = last_error(capsys)
    assert "with the calibration data of" in error and "--data.test_fraction=0.3" in error
    assert not (tmp_path / "larger").exists()


def test_a_trained_detector_still_resumes(shards: Path, tmp_path: Path) -> None:
    """The training-free branch of `QddCLI._run_subcommand` must not catch a trained fit."""
    npr = ["fit", "--detector", "npr", "--random-weights", "--model.detector_args",
           '{"resize": 64, "crop": 56}', *data(shards), *FAST]  # fmt: skip
    main([*npr, "--trainer.max_steps=2", "--out", str(tmp_path / "first")])
    main([*npr, "--trainer.max_steps=4", "--out", str(tmp_path / "resumed"),
          "--ckpt_path", str(tmp_path / "first" / "checkpoints" / "last.ckpt")])  # fmt: skip
    metrics = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and not metrics.get("training_free")
    assert metrics["calibrated_threshold"] is not None


def test_report_shows_rigids_threshold_in_full() -> None:
    """RIGID's logits are −cosine: a calibrated −0.99989 read −1.000 in report.md."""
    import pandas as pd

    from qdd.report.tables import markdown

    table = markdown(pd.DataFrame({"threshold": [0.0], "calibrated threshold": [-0.99989042],
                                   "acc": [0.51234]}))  # fmt: skip
    assert "| 0 | -0.99989 | 0.512 |" in table


def test_aeroblade_calibration_follows_its_files_by_content(
    shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A moved copy of AEROBLADE's autoencoder folder was refused as a conflicting
    ``vae`` ("trained with"); an autoencoder left out of the list was accepted silently,
    though the logit is the minimum over all of them."""
    from tests.detectors.test_aeroblade import kl_folder, vgg_file

    vaes = [str(kl_folder(tmp_path / name, seed)) for name, seed in (("sd1", 9), ("sd2", 10))]
    args = {"vae": vaes, "lpips_weights": str(vgg_file(tmp_path / "vgg16.pth"))}
    main(["fit", "--detector", "aeroblade", "--model.detector_args", json.dumps(args),
          *data(shards), *FAST, "--out", str(tmp_path / "cal")])  # fmt: skip
    checkpoint = str(tmp_path / "cal" / "checkpoints" / "last.ckpt")
    test = ["test", "--ckpt_path", checkpoint, *data(shards), "--data.split=test", *FAST]
    moved = [str(shutil.copytree(v, tmp_path / f"moved-{Path(v).name}")) for v in vaes]
    main([*test, "--model.detector_args.vae", json.dumps(moved), "--out", str(tmp_path / "a")])
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    calibrated = json.loads((tmp_path / "cal" / "metrics.json").read_text())
    assert metrics["calibrated_threshold"] == calibrated["calibrated_threshold"]
    with pytest.raises(SystemExit):
        main([*test, "--model.detector_args.vae", json.dumps(moved[:1]),
              "--out", str(tmp_path / "b")])  # fmt: skip
    error = last_error(capsys)
    assert error.startswith("qdd-cli test: error: aeroblade was built without ")
    assert f"{vaes[1]}/diffusion_pytorch_model.safetensors" in error
    with pytest.raises(SystemExit):  # not a copy: refused, in the words of a calibration
        main([*test, "--model.detector_args.autoencoder_dtype=float32",
              "--out", str(tmp_path / "c")])  # fmt: skip
    error = last_error(capsys)
    assert "was calibrated with autoencoder_dtype='float16'" in error
    assert "calibrate a new checkpoint" in error


@pytest.mark.slow
def test_calibration_under_two_ddp_processes_equals_one(
    calibrated: Path, shards: Path, dinov2: Path, tmp_path: Path
) -> None:
    """2 CPU processes, a batch size that divides neither the 17 calibration images nor a
    rank's share, a worker each: every rank fits on the gathered logits, the threshold is
    the single process's, and one checkpoint is written."""
    from tests.conftest import run_qdd
    from tests.test_training_free_calibration import rigid_args

    out = tmp_path / "ddp"
    run_qdd(["fit", "--detector", "rigid", "--model.detector_args", rigid_args(dinov2),
             *data(shards), *FAST, "--data.batch_size=3", "--data.num_workers=1",
             "--trainer.strategy=ddp", "--trainer.devices=2", "--out", str(out)],
            cwd=tmp_path)  # fmt: skip
    single = json.loads((calibrated / "metrics.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["calibration"] == single["calibration"]
    assert metrics["data"]["n_val"] == single["data"]["n_val"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "checkpoints/last.ckpt", "config.yaml", "metrics.json"]  # fmt: skip
    mine = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    theirs = torch.load(calibrated / "checkpoints" / "last.ckpt", weights_only=True)
    assert mine["ShardDataModule"]["train_digest"] == theirs["ShardDataModule"]["train_digest"]
