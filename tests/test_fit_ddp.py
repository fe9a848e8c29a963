"""`qdd-cli fit` under DDP on 2 CPU processes validates like one process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qdd.detectors.tiny import tiny_detector_args


@pytest.mark.slow
def test_fit_under_ddp_matches_one_process(mix_shards: Path, tmp_path: Path) -> None:
    """Same global batches (2 × 4 vs 1 × 8), same per-draw augmentation, exact metric sync.

    CLIP-D (frozen tiny backbone, linear head, no batch norm): DDP's averaged gradient is
    the one-process gradient up to float summation order, so validation metrics agree to
    1e-4 (loss, threshold) and exactly for accuracy/AUROC unless a logit sits within
    1e-4 of a decision boundary.
    """
    sources = [
        {"path": str(mix_shards / name), "weight": 1.0}
        for name in ("real-skimage", "sd15-fp32", "sd15-fp4")
    ]
    common = [
        sys.executable,
        *("-m", "qdd", "fit", "--detector", "clipd", "--random-weights"),
        *("--model.detector_args", json.dumps(tiny_detector_args("clipd"))),
        *("--data.train", json.dumps(sources), "--data.val_fraction=0.25"),
        "--data.samples_per_epoch=48",
        "--model.lr=0.01",
        "--trainer.max_epochs=3",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    runs = {
        "one": ["--data.batch_size=8", "--trainer.devices=1"],
        "ddp": ["--data.batch_size=4", "--trainer.devices=2", "--trainer.strategy=ddp"],
    }
    metrics = {}
    for name, flags in runs.items():
        out = tmp_path / name
        subprocess.run(
            [*common, *flags, "--out", str(out)], check=True, env=env, cwd=tmp_path, timeout=900
        )
        summary = json.loads((out / "metrics.json").read_text())
        metrics[name] = {**summary["metrics"], "n_val": summary["data"]["n_val"]}
        metrics[name]["n_cal"] = summary["calibration"]["n_real"] + summary["calibration"]["n_fake"]
    print(json.dumps(metrics, indent=1))  # the numbers, for the record (-s)
    one, ddp = metrics["one"], metrics["ddp"]
    assert one["n_val"] == ddp["n_val"] == one["n_cal"] == ddp["n_cal"]  # each val image once
    for key in ("val_loss", "val_threshold", "train_loss_epoch"):
        assert ddp[key] == pytest.approx(one[key], abs=1e-4), key
    for key in ("val_acc", "val_auroc"):
        assert ddp[key] == pytest.approx(one[key], abs=1e-6), key


def test_fit_under_ddp_survives_a_batch_of_only_unreadable_samples(tmp_path: Path) -> None:
    """With batch size 1, a rank whose sample does not decode has an empty batch while the
    other trains: both must still take part in the gradient all-reduce and the loss sync
    (Lightning stops the run when a rank skips its step under DDP)."""
    from tests.conftest import run_qdd, write_fake_shards, zero_images

    root = tmp_path / "shards"
    write_fake_shards(root / "real-x", [8], "x", None, label=0, size=(16, 16))
    keys = write_fake_shards(root / "g-fp4", [8], "g", "fp4", size=(16, 16))
    # half the fakes, all in the train split (prompt-id rule: the val split is p0 and p6,
    # whose fakes must stay readable or validation has one class and is refused)
    zero_images(root / "g-fp4" / "shard-000000.tar", keys[1::2])
    out = tmp_path / "run"
    run_qdd(
        [
            *("fit", "--detector", "npr", "--random-weights"),
            *("--model.detector_args", json.dumps(tiny_detector_args("npr"))),
            *("--data", str(root / "*"), "--out", str(out), "--data.batch_size=1"),
            *("--trainer.max_epochs=2", "--trainer.accelerator=cpu", "--trainer.devices=2"),
            "--trainer.strategy=ddp",
            "--trainer.enable_progress_bar=false",
            "--trainer.logger=false",
        ],
        cwd=tmp_path,
        timeout=300,
    )
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["epochs"] == 2 and summary["last_checkpoint"]
    assert math.isfinite(summary["metrics"]["train_loss_epoch"])  # empty steps weigh 0
