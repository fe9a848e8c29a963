"""`qdd.api`: fit then test as Python calls, results read from the returned `RunResult`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from lightning.pytorch import Callback

from qdd import api
from qdd.errors import QddError
from qdd.run_folder import fresh_run_dir
from tests.conftest import random_image
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


def _wandb_service_slowed_at_close(monkeypatch: pytest.MonkeyPatch, seconds: float) -> list:
    """Each W&B run's close, once asked for, held up ``seconds`` (its service process stopped,
    as a loaded machine leaves it unscheduled); returns the resume timers to wait on."""
    import signal
    import threading

    import psutil
    from wandb.sdk.lib.service.service_connection import ServiceConnection

    timers: list[threading.Timer] = []
    inform_finish = ServiceConnection.inform_finish

    def slow_finish(self, run_id: str) -> None:  # noqa: ANN001
        for child in psutil.Process().children(recursive=True):
            if "wandb" in child.name():
                child.send_signal(signal.SIGSTOP)  # the request waits in the socket meanwhile
                timer = threading.Timer(seconds, child.send_signal, (signal.SIGCONT,))
                timer.start()
                timers.append(timer)
        inform_finish(self, run_id)

    monkeypatch.setattr(ServiceConnection, "inform_finish", slow_finish)
    return timers


def test_a_call_returns_after_its_wandb_run_files_are_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flaky under load: W&B's service wrote the run file (run-*.wandb) after the call had
    returned, as it closes the run only once `wandb.finish` has returned."""
    pytest.importorskip("wandb")
    timers = _wandb_service_slowed_at_close(monkeypatch, seconds=1.5)
    data = _tiny_shards(tmp_path / "shards")
    try:
        run = api.validate(_npr({"paths": data, "val_fraction": 0.5}), out=tmp_path / "A")
        returned = _files(run.run_dir)
    finally:
        for timer in timers:
            timer.join()  # the service resumed: whatever it still had to write, it writes now
    assert timers, "the test did not hold the W&B service up"
    time.sleep(0.5)
    [run_file] = (run.run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    assert run_file.stat().st_size > 100  # the run's records, not the bare header
    assert _files(run.run_dir) == returned


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


def test_a_refused_call_leaves_no_empty_run_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    data = _tiny_shards(tmp_path / "shards")
    with pytest.raises(QddError, match="nodetector"):
        api.test({**_npr(data), "detector": "nodetector"})
    assert not list((tmp_path / "runs").glob("*"))


def test_fresh_run_folders_are_unique_within_one_second(tmp_path: Path) -> None:
    folders = [fresh_run_dir("test", "npr", tmp_path) for _ in range(3)]
    assert len(set(folders)) == 3 and all(f.is_dir() for f in folders)
    assert folders[1].name == folders[0].name + "-2"


# Every API function, with a dict and then with a YAML path, twice in a row: the second call
# (without ``out`` where it is optional) never touches the first run's files.


def _as_yaml(folder: Path, name: str, config: dict) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(config, default=str))))
    return path


def _twice(function, config: dict, folder: Path, second: dict | None = None) -> tuple:
    """``function(config)``, then ``function(<config as YAML> + second)``; the first run's
    files unchanged by the second, the two folders different."""
    first = function(config)
    before = _files(first.run_dir)
    again = {k: v for k, v in config.items() if k != "out"} | (second or {})
    result = function(_as_yaml(folder, f"{function.__name__}-2", again))
    assert result.run_dir != first.run_dir
    assert _files(first.run_dir) == before
    return first, result


@pytest.mark.parametrize("command", ["fit", "validate", "predict"])
def test_trainer_calls_twice_with_a_dict_then_a_yaml(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    data = _tiny_shards(tmp_path / "shards")
    config = _npr({"paths": data, "val_fraction": 0.5}, out=str(tmp_path / "first"))
    config["trainer"] |= {"max_steps": 2, "logger": False}
    first, second = _twice(getattr(api, command), config, tmp_path)
    assert second.run_dir.parent == Path("runs") and second.run_dir.name.startswith(command)
    if command == "fit":
        assert first.checkpoints["last"].is_file() and second.checkpoints["last"].is_file()
        assert second.checkpoints["last"].parent.parent == second.run_dir
    if command == "predict":
        assert first.scores.is_file() and second.scores.is_file()


def test_test_and_report_twice_with_a_dict_then_a_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    data = _tiny_shards(tmp_path / "shards")
    config = _npr(data, out=str(tmp_path / "first"))
    config["trainer"]["logger"] = False
    tested, again = _twice(api.test, config, tmp_path)
    assert tested.metrics["n"] == again.metrics["n"] == 12
    report = {"runs": [str(tested.run_dir)], "out": str(tmp_path / "report")}
    first, second = _twice(api.report, report, tmp_path, {"out": str(tmp_path / "report-2")})
    assert Path(first.metrics["index"]).name == "report.md"
    assert Path(second.metrics["index"]).is_file()
    # without out (main: Path(None), a TypeError; or ./report, rewritten by each call)
    report.pop("out")
    first, second = _twice(api.report, report, tmp_path)
    assert first.run_dir.parent == second.run_dir.parent == Path("runs")


def test_shard_twice_with_a_dict_then_a_yaml(tmp_path: Path) -> None:
    images = tmp_path / "photos"
    images.mkdir()
    for i in range(3):
        random_image(i, (16, 16)).save(images / f"{i}.png")
    config = {"src": str(images), "out": str(tmp_path / "real-a"), "label": "real",
              "source": "photos", "workers": 1}  # fmt: skip
    first, second = _twice(api.shard, config, tmp_path, {"out": str(tmp_path / "real-b")})
    assert first.metrics == second.metrics == {"total": 3, "shards": 1}


def test_quality_twice_with_a_dict_then_a_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_quality import write_pairs

    monkeypatch.chdir(tmp_path)
    folders = [("sd3-fp32", "sd3", "fp32", range(2), 0.0, (24, 20)),
               ("sd3-fp4", "sd3", "fp4", range(2), 20.0, (24, 20))]  # fmt: skip
    pairs = write_pairs(tmp_path / "pairs", folders)
    config = {"data": [str(pairs / "sd3-fp32"), str(pairs / "sd3-fp4")],
              "trainer": {"accelerator": "cpu"}}  # fmt: skip
    first, second = _twice(api.quality, config, tmp_path)
    assert first.run_dir.parent == second.run_dir.parent == Path("runs")
    assert len(pd.read_parquet(first.scores)) == len(pd.read_parquet(second.scores)) == 2


def test_generate_twice_with_a_dict_then_a_yaml(tmp_path: Path) -> None:
    from qdd.generation.tiny import build_tiny_pipeline

    model = build_tiny_pipeline("sd3", tmp_path / "sd3")
    config = {"generator": "sd3", "model_path": str(model), "precision": "fp32",
              "out": str(tmp_path / "sd3-a"), "steps": 1, "limit": 1, "height": 64,
              "width": 64, "trainer": {"accelerator": "cpu"}}  # fmt: skip
    first, second = _twice(api.generate, config, tmp_path, {"out": str(tmp_path / "sd3-b")})
    assert (first.run_dir / "manifest.json").is_file()
    assert (second.run_dir / "manifest.json").is_file()


def test_sweep_twice_with_a_dict_then_a_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    data = _tiny_shards(tmp_path / "shards")
    sweep = {
        "method": "random", "run_cap": 1,
        "metric": {"name": "val_auroc", "goal": "maximize"},
        "parameters": {"model.lr": {"min": 0.001, "max": 0.01}},
        "command": ["qdd-cli", "fit", "--detector", "npr", "--random-weights", "--data", data,
                    "--data.val_fraction=0.5", '--model.detector_args={"resize": 32, "crop": 28}',
                    "--trainer.max_steps=2",
                    "--trainer.logger=false", "--trainer.accelerator=cpu",
                    "--trainer.enable_progress_bar=false", "${args}"],
    }  # fmt: skip
    first = api.sweep(sweep, seed=3, out=tmp_path / "sweep")
    before = _files(first.run_dir)
    second = api.sweep(_as_yaml(tmp_path, "sweep", sweep), seed=4)
    assert _files(first.run_dir) == before and second.run_dir.parent == Path("runs")
    (trial,), (other,) = first.metrics["trials"], second.metrics["trials"]
    assert trial["returncode"] == other["returncode"] == 0, (trial, other)
    assert trial["params"] != other["params"]  # seeds 3 and 4 draw different trials
    assert (Path(other["dir"]) / "checkpoints" / "last.ckpt").is_file()
