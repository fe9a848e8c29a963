"""`qdd-cli sweep`: W&B grid sweep YAMLs run offline, one fit run folder per trial."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from qdd.cli import main
from qdd.errors import QddError
from qdd.sweep import Trial, expand_command, grid, load_sweep, trials

SWEEPS = sorted((Path(__file__).parents[1] / "configs" / "sweeps").glob("*.yaml"))
EXPERIMENT = Path(__file__).parents[1] / "configs" / "experiments" / "npr_fp4_aug.yaml"


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_shipped_sweeps_are_valid(path: Path) -> None:
    config = load_sweep(path)
    if config["method"] == "random":
        points = trials(config, seed=0)
        assert len(points) == config["run_cap"] and len({str(p) for p in points}) == len(points)
    else:
        points = grid(config["parameters"])
        sizes = [len(p.get("values", [p.get("value")])) for p in config["parameters"].values()]
        assert len(points) == math.prod(sizes)
    config["command"] = ["qdd-cli", "fit", "--config", "x.yaml", "${args}"]
    arguments = expand_command(config, points[0], Path("out"), path)
    command = Trial("trial-000", Path("out"), points[0], arguments).command
    assert command[-2:] == ["--out", "out"]
    assert all(f"--{k}={v}" in command for k, v in points[0].items())


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_shipped_sweeps_pass_wandbs_own_validation(path: Path) -> None:
    """W&B validates sweep configs with its `sweeps` package (wandb[sweeps], offline)."""
    sweeps = pytest.importorskip("sweeps")
    assert sweeps.schema_violations_from_proposed_config(yaml.safe_load(path.read_text())) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "bayes"}, "method: grid"),  # was "random", which now runs (bug 7)
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
    assert index["seed"] == 0 and index["method"] == "grid"
    # a misspelt metric: a warning naming what the trials logged, and a non-zero exit
    path.write_text(yaml.safe_dump({**sweep, "metric": {"name": "val_aucroc"}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", str(path), "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no trial logged the sweep's metric 'val_aucroc'; they logged: " in err
    assert "val_auroc" in err.split("they logged: ")[1].splitlines()[0]
    # run_cap: 1 runs one trial of the grid (the first, finished above: kept)
    path.write_text(yaml.safe_dump({**sweep, "run_cap": 1}))
    main(["sweep", str(path), "--out", str(out)])
    assert capsys.readouterr().err.count("done earlier, kept") == 1
    capped = json.loads((out / "sweep.json").read_text())
    assert capped["run_cap"] == 1  # the finished trial-001 is still recorded (finding 8)
    assert [(t["trial"], t.get("planned", True)) for t in capped["trials"]] == [
        ("trial-000", True), ("trial-001", False)
    ]  # fmt: skip
    assert capped["trials"][1]["returncode"] == 0
    assert capped["trials"][1]["command"] == index["trials"][1]["command"]
    # each trial's checkpoint tested, then the trials ranked side by side
    tests = []
    for i, trial in enumerate(index["trials"]):
        ckpt = Path(trial["dir"]) / "checkpoints" / "last.ckpt"
        main(["test", "--detector", "npr", "--ckpt_path", str(ckpt), "--data",
              str(mix_shards / "*"), "--data.split=test", "--out", str(tmp_path / f"test-{i}"),
              "--trainer.accelerator=cpu", "--trainer.logger=false"])  # fmt: skip
        tests.append(capsys.readouterr().out.strip().splitlines()[-1])
    main(["report", "--compare", *tests, "--metric", "auroc", "--out", str(tmp_path / "cmp")])
    compare = pd.read_csv(tmp_path / "cmp" / "compare.csv")
    assert len(compare) == 2 and "auroc" in compare.columns
    assert sorted(compare["auroc"], reverse=True) == compare["auroc"].tolist()  # best first
    assert (tmp_path / "cmp" / "compare.md").is_file()


def _sweep(tmp_path: Path, **change: object) -> Path:
    config = {
        "method": "grid",
        "metric": {"name": "val_auroc", "goal": "maximize"},
        "parameters": {"model.lr": {"values": [0.1, 0.2]}},
        "command": ["qdd-cli", "fit", "--config", "x.yaml", "${args}"],
        **change,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


RANDOM = {
    "pick": {"values": ["npr", "clipd", "corvi"]},
    "weighted": {"values": ["a", "b", "c"], "probabilities": [0.0, 0.25, 0.75]},
    "fixed": {"value": 7},
    "epochs": {"min": 1, "max": 4},  # int_uniform, inferred as W&B infers it
    "share": {"min": 0.0, "max": 2.0},  # uniform, inferred
    "lr": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-1},
    "batch": {"distribution": "q_log_uniform_values", "min": 8, "max": 256, "q": 8},
    "drop": {"distribution": "q_uniform", "min": 0.0, "max": 0.5, "q": 0.05},
    "shift": {"distribution": "normal", "mu": 1.0, "sigma": 0.5},
    "scale": {"distribution": "log_normal", "mu": 0.0, "sigma": 0.25},
    "width": {"distribution": "int_uniform", "min": 16, "max": 18},
}


def test_random_sweeps_draw_wandbs_distributions_seeded(tmp_path: Path) -> None:
    path = _sweep(tmp_path, method="random", run_cap=400, parameters=RANDOM)
    config = load_sweep(path)
    drawn = trials(config, seed=3)
    assert len(drawn) == 400 and drawn == trials(config, seed=3)  # seeded: the same draws
    assert drawn != trials(config, seed=4)
    assert trials({**config, "run_cap": 5}, seed=3) == drawn[:5]  # trial i depends on (seed, i)
    frame = pd.DataFrame(drawn)
    assert set(frame["pick"]) == {"npr", "clipd", "corvi"} and set(frame["fixed"]) == {7}
    assert set(frame["weighted"]) == {"b", "c"} and (frame["weighted"] == "c").mean() > 0.65
    assert set(frame["epochs"]) == {1, 2, 3, 4} and set(frame["width"]) == {16, 17, 18}
    assert all(isinstance(v, int) for v in frame["epochs"])
    assert frame["share"].between(0.0, 2.0).all() and frame["share"].std() > 0.4
    # log-uniform: the exponents are uniform over [-5, -1]
    exponents = np.log10(frame["lr"])
    assert exponents.between(-5, -1).all() and abs(exponents.mean() + 3) < 0.2
    assert (frame["batch"] % 8 == 0).all() and frame["batch"].between(8, 256).all()
    assert all(isinstance(v, int) for v in frame["batch"])  # q is an int: so are the values
    steps = frame["drop"] / 0.05
    assert np.allclose(steps, steps.round()) and frame["drop"].between(0, 0.5).all()
    assert abs(frame["shift"].mean() - 1.0) < 0.1 and abs(frame["shift"].std() - 0.5) < 0.1
    assert abs(np.log(frame["scale"]).std() - 0.25) < 0.05 and (frame["scale"] > 0).all()


def test_grids_enumerate_like_wandbs_and_run_cap_caps_them(tmp_path: Path) -> None:
    parameters = {
        "a": {"values": [1, 2]},
        "b": {"distribution": "int_uniform", "min": 3, "max": 5},
        "c": {"distribution": "q_uniform", "min": 0, "max": 1, "q": 0.5},  # W&B: max left out
        "d": {"value": "x"},
    }
    config = load_sweep(_sweep(tmp_path, parameters=parameters))
    points = trials(config, seed=0)
    assert len(points) == 2 * 3 * 2
    assert points[:3] == [{"a": 1, "b": 3, "c": 0.0, "d": "x"}, {"a": 1, "b": 3, "c": 0.5,
                          "d": "x"}, {"a": 1, "b": 4, "c": 0.0, "d": "x"}]  # fmt: skip
    config = load_sweep(_sweep(tmp_path, parameters=parameters, run_cap=1))
    assert trials(config, seed=0) == points[:1]


def _arguments(tmp_path: Path, command: list[str], params: dict | None = None) -> list[str]:
    path = _sweep(tmp_path, command=command)
    config = load_sweep(path)
    return expand_command(config, params or {"model.lr": 0.1}, tmp_path / "trial-000", path)


def test_every_wandb_macro_is_expanded_as_wandbs_agent_does(tmp_path: Path, monkeypatch) -> None:
    params = {"model.lr": 0.1, "model.name": "npr"}
    head = ["${env}", "${interpreter}", "${program}", "fit"]
    monkeypatch.setenv("QDD_SWEEP_CFG", "configs/x.yaml")
    path = _sweep(tmp_path, program="qdd-cli", parameters={"model.lr": {"values": [0.1]},
                  "model.name": {"values": ["npr"]}},
                  command=[*head, "--config", "${envvar:QDD_SWEEP_CFG}", "${args}"])  # fmt: skip
    config = load_sweep(path)
    trial = tmp_path / "trial-000"
    assert expand_command(config, params, trial, path) == [
        "--config", "configs/x.yaml", "--model.lr=0.1", "--model.name=npr"
    ]  # fmt: skip
    expected = {
        "${args_no_equals}": ["--model.lr", "0.1", "--model.name", "npr"],
        "${args_no_boolean_flags}": ["--model.lr=0.1", "--model.name=npr"],
    }
    for macro, arguments in expected.items():
        config["command"] = ["qdd-cli", "fit", macro]
        assert expand_command(config, params, trial, path) == arguments, macro
    # the JSON forms are a config of dotted keys: qdd-cli fit reads them with --config
    config["command"] = ["qdd-cli", "fit", "--config", "${args_json}"]
    arguments = expand_command(config, params, trial, path)
    assert arguments[0] == "--config" and json.loads(arguments[1]) == params
    config["command"] = ["qdd-cli", "fit", "--config", "${args_json_file}"]
    assert expand_command(config, params, trial, path) == ["--config", str(trial / "params.json")]


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["${args_json}"], r"\$\{args_json\} must follow --config"),
        (["${args}", "${args_json_file}"], r"\$\{args_json_file\} must follow --config"),
        (["${args_no_hyphens}"], r"reads --name=value, not name=value; use \$\{args\}"),
        (["${args_override_hydra}"], "not a Hydra program"),
        (["${args}", "${arg}"], r"unknown macro \$\{arg\}.*\$\{args_json_file\}"),
        (["--x=${args}"], "expands a macro only as a whole element"),
        (["${args}", "${envvar:QDD_NOT_SET_ANYWHERE}"], "QDD_NOT_SET_ANYWHERE is not set"),
        (["${args}", "${program}"], "no `program:`"),
        (["${args}", "${env}"], "belongs before the program"),
        (["${args}", "--out", "runs/x"], "--out is set per trial"),
        (["--config", "${args_json}"], "passes data.source_weights.fp4 as a --config key"),
    ],
)
def test_macros_qdd_cannot_expand_are_refused_before_any_trial(
    tmp_path: Path, command: list[str], message: str
) -> None:
    parameters = {"model.lr": {"values": [0.1]}, "data.source_weights.fp4": {"values": [0.5]}}
    path = _sweep(tmp_path, command=["qdd-cli", "fit", "--config", "x.yaml", *command],
                  parameters=parameters)  # fmt: skip
    out = tmp_path / "out"
    with pytest.raises(QddError, match=message) as info:
        main_sweep([str(path), "--out", str(out)])
    assert "\n" not in str(info.value)
    assert not out.exists()  # refused before the first trial started


def main_sweep(argv: list[str]) -> None:
    from qdd.cli import sweep_command

    sweep_command(argv)


def test_boolean_parameters_are_refused_with_bare_boolean_flags(tmp_path: Path) -> None:
    path = _sweep(tmp_path, parameters={"model.random_weights": {"values": [True, False]}},
                  command=["qdd-cli", "fit", "${args_no_boolean_flags}"])  # fmt: skip
    with pytest.raises(QddError, match="options take a value .*use \\$\\{args\\}"):
        load_sweep(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"early_terminate": {"type": "hyperband", "min_iter": 3}}, "`early_terminate` is not"),
        ({"scheduler": {"num_workers": 2}}, "`scheduler` is not supported"),
        ({"paramaters": {}}, "unknown key `paramaters`"),
        ({"method": "random"}, "set `run_cap: N`"),
        ({"run_cap": 0}, "run_cap must be a whole number"),
        ({"metric": {"name": "val_auroc", "goal": "max"}}, "minimize or maximize"),
        (
            {"parameters": {"model": {"parameters": {"lr": {"values": [0.1]}}}}},
            "nests `parameters:`.*write `model.lr:`",
        ),  # fmt: skip
        ({"parameters": {"x": {"distribution": "beta"}}}, "'beta' is not supported"),
        ({"parameters": {"x": {"min": 0.5, "max": 0.1}}}, "min 0.5 is not less than max 0.1"),
        ({"parameters": {"x": {"values": [1], "q": 2}}}, r"\(categorical\) has q"),
        (
            {"parameters": {"x": {"distribution": "log_uniform_values", "min": 0, "max": 1}}},
            "needs min > 0",
        ),  # fmt: skip
        ({"parameters": {"x": {"distribution": "normal"}}}, "a grid cannot enumerate a normal"),
        (
            {
                "method": "random",
                "run_cap": 2,
                "parameters": {"x": {"values": [1, 2], "probabilities": [0.5, 0.6]}},
            },
            "summing to 1",
        ),  # fmt: skip
    ],
)
def test_what_a_local_sweep_cannot_honour_is_refused_in_one_line(
    tmp_path: Path, change: dict, message: str
) -> None:
    with pytest.raises(QddError, match=message) as info:
        load_sweep(_sweep(tmp_path, **change))
    assert "\n" not in str(info.value)


def test_a_sweep_folder_keeps_its_seed(tmp_path: Path) -> None:
    from qdd.sweep.runner import _seed

    out = tmp_path / "out"
    out.mkdir()
    assert _seed(out, None) == 0 and _seed(out, 5) == 5
    (out / "sweep.json").write_text(json.dumps({"seed": 5, "trials": []}))
    assert _seed(out, None) == 5 and _seed(out, 5) == 5
    with pytest.raises(QddError, match="drawn with --seed 5: resume it with --seed 5"):
        _seed(out, 6)


def test_what_qdd_runs_wandb_accepts(tmp_path: Path) -> None:
    """The random and grid configs above are W&B sweeps too (its validator, where installed)."""
    sweeps = pytest.importorskip("sweeps")
    for change in ({"method": "random", "run_cap": 4, "parameters": RANDOM}, {}):
        config = yaml.safe_load(_sweep(tmp_path, **change).read_text())
        assert sweeps.schema_violations_from_proposed_config(config) == []


def test_metric_target_stops_at_the_goal_side() -> None:
    from qdd.sweep.runner import _reached

    high = {"name": "val_auroc", "goal": "maximize", "target": 0.9}
    assert _reached(0.9, high) and _reached(0.95, high) and not _reached(0.89, high)
    low = {"name": "val_loss", "target": 0.1}  # W&B's default goal: minimize
    assert _reached(0.05, low) and not _reached(0.2, low)
    assert not _reached(None, high) and not _reached(0.99, {"name": "val_auroc"})
