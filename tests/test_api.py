"""`qdd.api`: fit then test as Python calls, results read from the returned `RunResult`."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from qdd import api
from qdd.errors import QddError
from tests.test_cli_detect import write_set

TRAINER = {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False}


def test_fit_then_test_chain_returns_checkpoints_metrics_and_scores(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    write_set(shards / "real-noise", 12, 0, None, None, offset=1000)
    write_set(shards / "tiny-fp32", 12, 1, "tiny", "fp32", smooth=True)
    fitted = api.fit(
        {"detector": "npr", "random_weights": True, "data": str(shards / "*")},
        out=tmp_path / "fit",
        model={"detector_args": {"resize": 64, "crop": 56}},
        data={"paths": str(shards / "*"), "batch_size": 8, "val_fraction": 0.25},
        trainer={**TRAINER, "max_epochs": 2},
    )
    assert fitted.run_dir == tmp_path / "fit"
    assert fitted.checkpoints["last"] == tmp_path / "fit" / "checkpoints" / "last.ckpt"
    assert fitted.checkpoints["last"].is_file() and fitted.checkpoints["best"].is_file()
    assert fitted.metrics["steps"] > 0 and fitted.metrics["stopped_by"] == "max_epochs"
    assert {"val_acc", "val_auroc"} <= set(fitted.metrics["metrics"])
    assert fitted.scores is None

    # other images (other keys) than the fit's: a checkpoint's training data is never tested
    held_out = tmp_path / "held-out"
    write_set(held_out / "real-noise", 12, 0, None, None, offset=3000)
    write_set(held_out / "tiny-fp32", 12, 1, "tiny", "fp32", smooth=True, offset=500)
    tested = api.test(
        detector="npr",
        ckpt_path=fitted.checkpoints["last"],
        data=[str(held_out / "real-noise"), str(held_out / "tiny-fp32")],
        out=tmp_path / "test",
        trainer=TRAINER,
    )
    assert tested.checkpoints == {}
    assert tested.metrics["n"] == 24 and set(tested.metrics["groups"]) == {"tiny/fp32"}
    assert tested.metrics["weights"] == str(fitted.checkpoints["last"])
    scores = pd.read_parquet(tested.scores)
    assert len(scores) == 24 and tested.scores == tmp_path / "test" / "scores.parquet"


def test_bad_data_fails_in_one_line_before_any_model(tmp_path: Path) -> None:
    with pytest.raises(QddError, match="nowhere"):
        api.test(detector="npr", random_weights=True, data=str(tmp_path / "nowhere"))


def test_short_keys_become_lightning_sections() -> None:
    config = api.lightning_config(
        {"detector": "npr", "data": ["a", "b"], "weights": Path("w.pth"), "out": "runs/x",
         "perturb": ["blur:1.0"], "trainer": "cpu", "model": {"lr": 0.1}}
    )  # fmt: skip
    assert config["model"] == {"detector": "npr", "weights": "w.pth", "lr": 0.1}
    assert config["data"]["paths"] == ["a", "b"] and config["data"]["perturb"] == ["blur:1.0"]
    assert config["data"]["batch_size"] == 32  # the npr preset, under the keys given
    assert config["trainer"]["default_root_dir"] == "runs/x"
    assert config["trainer"]["accelerator"] == "cpu"
