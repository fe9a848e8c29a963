"""`qdd-cli sweep`: W&B grid sweep YAMLs run offline, one fit run folder per trial."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from qdd.cli import main
from qdd.errors import QddError
from qdd.sweep import grid, load_sweep, trial_command

SWEEPS = sorted((Path(__file__).parents[1] / "configs" / "sweeps").glob("*.yaml"))
EXPERIMENT = Path(__file__).parents[1] / "configs" / "experiments" / "npr_fp4_aug.yaml"


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_shipped_sweeps_are_valid_grids(path: Path) -> None:
    config = load_sweep(path)
    trials = grid(config["parameters"])
    sizes = [len(p.get("values", [p.get("value")])) for p in config["parameters"].values()]
    assert len(trials) == math.prod(sizes)
    command = trial_command(["--config", "x.yaml", "${args}"], trials[0], Path("out"))
    assert command[-2:] == ["--out", "out"]
    assert all(f"--{k}={v}" in command for k, v in trials[0].items())


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_shipped_sweeps_pass_wandbs_own_validation(path: Path) -> None:
    """W&B validates sweep configs with its `sweeps` package (wandb[sweeps], offline)."""
    sweeps = pytest.importorskip("sweeps")
    assert sweeps.schema_violations_from_proposed_config(yaml.safe_load(path.read_text())) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "random"}, "method: grid"),
        ({"parameters": {"model.lr": {"min": 0.1, "max": 1}}}, "values"),
        ({"command": ["python", "train.py", "${args}"]}, "qdd-cli fit"),
        ({"command": ["qdd-cli", "fit"]}, "${args}"),
    ],
)
def test_sweeps_qdd_cannot_run_offline_are_refused(tmp_path: Path, change, message) -> None:
    config = {
        "method": "grid",
        "parameters": {"model.lr": {"values": [0.1]}},
        "command": ["qdd-cli", "fit", "${args}"],
        **change,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(QddError, match=message.replace("$", r"\$").replace("{", r"\{")):
        load_sweep(path)


def test_two_trial_sweep_runs_end_to_end(mix_shards: Path, tmp_path: Path, capsys) -> None:
    sources = [
        {"path": str(mix_shards / name), "weight": 1.0, "name": name}
        for name in ("real-skimage", "sd15-fp32", "sd15-fp4")
    ]
    sweep = {
        "program": "qdd-cli",
        "method": "grid",
        "metric": {"name": "val_auroc", "goal": "maximize"},
        "parameters": {"data.source_weights.sd15-fp4": {"values": [0.0, 1.0]}},
        "command": [
            "qdd-cli",
            "fit",
            "--config",
            str(EXPERIMENT),
            "--random-weights",
            "--data.train",
            json.dumps(sources),
            "--data.test=[]",
            "--data.num_workers=0",
            "--data.batch_size=16",
            "--data.samples_per_epoch=32",
            "--model.detector_args",
            json.dumps({"resize": 64, "crop": 56}),
            "--trainer.max_epochs=1",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            "${args}",
        ],
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    out = tmp_path / "sweep"
    main(["sweep", str(path), "--out", str(out)])
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    index = json.loads((out / "sweep.json").read_text())
    assert [t["returncode"] for t in index["trials"]] == [0, 0]
    shares = []
    for trial, weight in zip(index["trials"], (0.0, 1.0), strict=True):
        run = Path(trial["dir"])
        assert run.parent == out and (run / "checkpoints" / "last.ckpt").is_file()
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["data"]["source_weights"] == {"sd15-fp4": weight}
        summary = json.loads((run / "metrics.json").read_text())
        assert trial["metric"] == summary["metrics"]["val_auroc"]
        shares.append({s["name"]: s["share"] for s in summary["data"]["sources"]}["sd15-fp4"])
    assert shares == [0.0, 0.25]
    # re-running keeps finished trials instead of training them again
    main(["sweep", str(path), "--out", str(out)])
    assert capsys.readouterr().err.count("done earlier, kept") == 2
    # each trial's checkpoint tested, then the trials ranked side by side
    tests = []
    for i, trial in enumerate(index["trials"]):
        ckpt = Path(trial["dir"]) / "checkpoints" / "last.ckpt"
        main(["test", "--detector", "npr", "--ckpt_path", str(ckpt), "--data",
              str(mix_shards / "*"), "--out", str(tmp_path / f"test-{i}"),
              "--trainer.accelerator=cpu", "--trainer.logger=false"])  # fmt: skip
        tests.append(capsys.readouterr().out.strip().splitlines()[-1])
    main(["report", "--compare", *tests, "--metric", "auroc", "--out", str(tmp_path / "cmp")])
    compare = pd.read_csv(tmp_path / "cmp" / "compare.csv")
    assert len(compare) == 2 and "auroc" in compare.columns
    assert sorted(compare["auroc"], reverse=True) == compare["auroc"].tolist()  # best first
    assert (tmp_path / "cmp" / "compare.md").is_file()
