"""`qdd.api`: fit then test as Python calls, results read from the returned `RunResult`."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from lightning.pytorch import Callback

from qdd import api
from qdd.errors import QddError
from qdd.run_folder import fresh_run_dir
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


def _tiny_shards(root: Path) -> str:
    write_set(root / "real-noise", 6, 0, None, None, offset=1000)
    write_set(root / "tiny-fp32", 6, 1, "tiny", "fp32", smooth=True)
    return str(root / "*")


def _npr(data: str | dict, **extra: object) -> dict:
    return {"detector": "npr", "random_weights": True, "data": data,
            "model": {"detector_args": {"resize": 32, "crop": 28}},
            "trainer": dict(TRAINER), **extra}  # fmt: skip


def _files(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and mtime; W&B's own debug logs aside (its service process appends
    their last lines after `wandb.finish` has returned)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith("debug")}  # fmt: skip


def test_a_call_without_out_never_writes_into_the_previous_calls_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 2: the folder of ``validate(out=A)`` travelled in os.environ into ``test()``."""
    monkeypatch.chdir(tmp_path)
    data = _tiny_shards(tmp_path / "shards")
    first = api.validate(_npr({"paths": data, "val_fraction": 0.5}), out=tmp_path / "A")
    assert first.run_dir == tmp_path / "A" and (first.run_dir / "metrics.json").is_file()
    before = _files(first.run_dir)
    second = api.test(_npr(data))
    third = api.test(_npr(data))
    assert _files(first.run_dir) == before  # bytes and mtimes
    assert len(list((first.run_dir / "wandb").glob("offline-run-*"))) == 1
    assert second.run_dir.parent == third.run_dir.parent == Path("runs")
    assert second.run_dir.name.startswith("test-npr-") and second.run_dir != third.run_dir
    for run in (second, third):
        assert (run.run_dir / "metrics.json").is_file() and run.scores.is_file()
        assert (run.run_dir / "config.yaml").is_file()


class FailAfterLoggersStarted(Callback):
    """Fails a run once its loggers (W&B included) have started."""

    def on_test_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        for logger in trainer.loggers:
            logger.experiment  # noqa: B018 (starts the W&B run, as a logged metric would)
        raise RuntimeError("failed on purpose")


def test_a_failed_call_leaves_no_wandb_run_open(tmp_path: Path) -> None:
    """Finding 2: after a failed call, the next call's W&B data landed in the failed run."""
    wandb = pytest.importorskip("wandb")
    data = _tiny_shards(tmp_path / "shards")
    failing = _npr(data)
    failing["trainer"]["callbacks"] = [{"class_path": f"{__name__}.FailAfterLoggersStarted"}]
    with pytest.raises(RuntimeError, match="on purpose"):
        api.test(failing, out=tmp_path / "failed")
    assert wandb.run is None
    failed_runs = sorted((tmp_path / "failed" / "wandb").glob("offline-run-*"))
    assert len(failed_runs) == 1
    api.test(_npr(data), out=tmp_path / "next")
    assert wandb.run is None
    assert sorted((tmp_path / "failed" / "wandb").glob("offline-run-*")) == failed_runs
    assert len(list((tmp_path / "next" / "wandb").glob("offline-run-*"))) == 1


def test_fresh_run_folders_are_unique_within_one_second(tmp_path: Path) -> None:
    folders = [fresh_run_dir("test", "npr", tmp_path) for _ in range(3)]
    assert len(set(folders)) == 3 and all(f.is_dir() for f in folders)
    assert folders[1].name == folders[0].name + "-2"
