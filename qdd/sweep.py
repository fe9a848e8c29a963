"""``qdd-cli sweep SWEEP.yaml [--out DIR]``: a W&B grid sweep, run offline on one machine.

The YAML is the one ``wandb sweep`` takes (``configs/sweeps/``): ``method: grid``,
``parameters:`` with ``values:`` lists (or one ``value:``), and a ``command:`` that runs
``qdd-cli fit ... ${args}``. Every point of the grid becomes one trial: the command's
arguments with ``${args}`` expanded as W&B's agent expands it (``--name=value``), plus
``--out DIR/trial-NNN``, run as a fresh ``python -m qdd`` process (nothing leaks from one
trial into the next: seeds, Lightning state, environment). Each trial is a normal fit run
folder; its output goes to ``trial-NNN/sweep.log``. ``DIR/sweep.json`` lists the trials,
their parameters, exit codes and the sweep's metric; a trial that already finished with
the same arguments is not run again, so an interrupted sweep resumes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from qdd.errors import QddError

RUN_DIR_ENV = "QDD_RUN_DIR"  # set by a parent qdd-cli run; never inherited by a trial


def load_sweep(path: Path) -> dict[str, Any]:
    """The sweep YAML, checked for what an offline grid needs."""
    if not path.is_file():
        raise QddError(f"sweep config {path} does not exist: check the path")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise QddError(f"{path} is not valid YAML ({error}): fix the file") from None
    if not isinstance(config, dict):
        raise QddError(f"{path} is not a sweep config (a mapping with method/parameters)")
    if config.get("method") != "grid":
        raise QddError(
            f"{path}: method is {config.get('method')!r}; qdd-cli sweep runs `method: grid` "
            "offline (random and bayes sweeps need a W&B server: `wandb sweep` + `wandb agent`)"
        )
    parameters = config.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise QddError(f"{path}: no `parameters:`: list each with `values: [...]`")
    for name, spec in parameters.items():
        if not isinstance(spec, dict) or not ("values" in spec or "value" in spec):
            raise QddError(
                f"{path}: parameter {name} needs `values: [...]` (or `value: X`) for a grid sweep"
            )
        if "values" in spec and (not isinstance(spec["values"], list) or not spec["values"]):
            raise QddError(f"{path}: parameter {name}: `values` must be a non-empty list")
    fit_arguments(config, path)
    return config


def fit_arguments(config: dict[str, Any], path: Path) -> list[str]:
    """The arguments after ``qdd-cli fit`` in the sweep's command (``${args}`` kept)."""
    command = [str(c) for c in config.get("command") or []]
    command = [config.get("program", "") if c == "${program}" else c for c in command]
    command = [c for c in command if c not in ("${env}", "${interpreter}")]
    if len(command) < 2 or Path(command[0]).name != "qdd-cli" or command[1] != "fit":
        raise QddError(
            f"{path}: command must run `qdd-cli fit ... ${{args}}` "
            f"(found {' '.join(command) or 'none'})"
        )
    if "${args}" not in command:
        raise QddError(f"{path}: command has no ${{args}}: trials could not set their parameters")
    return command[2:]


def grid(parameters: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination, in the YAML's order (the last parameter varies fastest)."""
    names = list(parameters)
    axes = [
        parameters[n]["values"] if "values" in parameters[n] else [parameters[n]["value"]]
        for n in names
    ]
    return [dict(zip(names, point, strict=True)) for point in itertools.product(*axes)]


def trial_command(arguments: list[str], params: dict[str, Any], out: Path) -> list[str]:
    """``python -m qdd fit`` with ``${args}`` expanded as W&B's agent does (``--k=v``)."""
    flags = [f"--{name}={value}" for name, value in params.items()]
    expanded: list[str] = []
    for argument in arguments:
        expanded += flags if argument == "${args}" else [argument]
    return [sys.executable, "-m", "qdd", "fit", *expanded, "--out", str(out)]


def _metric(trial_dir: Path, name: str | None) -> float | None:
    path = trial_dir / "metrics.json"
    if name is None or not path.is_file():
        return None
    return json.loads(path.read_text()).get("metrics", {}).get(name)


def run_sweep(config_path: Path, out: Path) -> list[dict[str, Any]]:
    """Run every trial of the grid under ``out``; returns the trial records."""
    config = load_sweep(config_path)
    arguments = fit_arguments(config, config_path)
    metric = (config.get("metric") or {}).get("name")
    out.mkdir(parents=True, exist_ok=True)
    index = out / "sweep.json"
    earlier = {}
    if index.is_file():
        earlier = {t["trial"]: t for t in json.loads(index.read_text()).get("trials", [])}
    env = {k: v for k, v in os.environ.items() if k != RUN_DIR_ENV}
    env.setdefault("WANDB_MODE", "offline")
    points = grid(config["parameters"])
    records = []
    for i, params in enumerate(points):
        name = f"trial-{i:03d}"
        trial_dir = out / name
        command = trial_command(arguments, params, trial_dir)
        before = earlier.get(name, {})
        done = before.get("returncode") == 0 and before.get("command") == command[3:]
        if done and (trial_dir / "metrics.json").is_file():
            code = 0
            print(f"[sweep] {name} {params}: done earlier, kept", file=sys.stderr, flush=True)
        else:
            print(f"[sweep] {name} ({i + 1}/{len(points)}) {params}", file=sys.stderr, flush=True)
            trial_dir.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            with open(trial_dir / "sweep.log", "w") as log:
                code = subprocess.run(
                    command, stdout=log, stderr=subprocess.STDOUT, env=env
                ).returncode
            status = "ok" if code == 0 else f"FAILED (exit {code}, see {trial_dir / 'sweep.log'})"
            print(
                f"[sweep] {name}: {status} in {time.perf_counter() - started:.0f} s",
                file=sys.stderr,
                flush=True,
            )
        records.append(
            {
                "trial": name,
                "dir": str(trial_dir),
                "params": params,
                "command": command[3:],
                "returncode": code,
                "metric": _metric(trial_dir, metric),
            }
        )
        summary = {"sweep": str(config_path), "metric": config.get("metric"), "trials": records}
        index.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return records


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="qdd-cli sweep",
        description="Run a W&B grid sweep YAML (configs/sweeps/) offline: one `qdd-cli fit` "
        "run folder per trial under --out.",
    )
    parser.add_argument("config", help="W&B sweep YAML with method: grid")
    parser.add_argument("--out", help="folder for the trials (default: runs/sweep-NAME-TIME)")
    args = parser.parse_args(argv)
    path = Path(args.config)
    out = Path(args.out or f"runs/sweep-{path.stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    records = run_sweep(path, out)
    config = load_sweep(path)
    metric = config.get("metric") or {}
    for record in records:
        value = "—" if record["metric"] is None else f"{record['metric']:.4f}"
        print(
            f"{record['trial']}  {metric.get('name', 'metric')}={value}  {record['params']}",
            file=sys.stderr,
        )
    failed = [r["trial"] for r in records if r["returncode"] != 0]
    if failed:
        raise QddError(
            f"{len(failed)} of {len(records)} trials failed ({', '.join(failed)}): read their "
            f"sweep.log under {out}, fix, and re-run the same command (finished trials are kept)"
        )
    print(out)
