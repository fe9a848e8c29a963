"""Running a sweep's trials, each one fit through `qdd.api`, and its record ``sweep.json``.

A trial is a call, not a process: its command line (W&B's macros expanded, `expand_command`)
is parsed by the one mechanism ``qdd-cli fit`` uses (`qdd.flags.trainer_config`) and given
to the ``fit`` function `qdd.api.sweep` passes in, with ``out`` its own folder. Nothing
carries from one trial into the next: the run folder is an argument, every logger is
finished when a fit ends (failed or not), and each fit seeds itself (``seed_everything``).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qdd.errors import QddError
from qdd.flags import trainer_config
from qdd.sweep.macros import expand_command
from qdd.sweep.sampling import trials
from qdd.sweep.schema import is_number, load_sweep

#: How a trial runs: `qdd.api.fit` (a config dict, keyword overrides).
Fit = Callable[..., Any]


@dataclass
class Trial:
    """One trial of the sweep: its folder, parameters and the arguments it runs with."""

    name: str
    dir: Path
    params: dict[str, Any]
    arguments: list[str]

    @property
    def command(self) -> list[str]:
        """What sweep.json records (and compares when resuming)."""
        return ["fit", *self.arguments, "--out", str(self.dir)]


def run_trial(trial: Trial, fit: Fit) -> int:
    """``fit`` on the trial's arguments into its folder; 0, or 1 with the error in sweep.log.

    The fit's own output goes to ``trial.dir/sweep.log`` (what it prints; qdd's log lines
    stay on the console beside the sweep's).
    """
    config, passed = trainer_config(trial.arguments)
    config.pop("out", None)  # refused in the sweep's command: the trial's folder is its own
    with open(trial.dir / "sweep.log", "w") as log:
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                fit(config, out=trial.dir, lightning_args=passed)
        except (Exception, SystemExit) as error:  # a failed trial is a result; the sweep goes on
            log.write("".join(traceback.format_exception(error)))
            _log(f"{trial.name}: {type(error).__name__}: {str(error).partition(chr(10))[0]}")
            return 1
    return 0


def logged_metrics(trial_dir: Path) -> dict[str, Any]:
    """The metrics a finished trial logged (its metrics.json); {} when it wrote none."""
    path = trial_dir / "metrics.json"
    if not path.is_file():
        return {}
    metrics = json.loads(path.read_text()).get("metrics", {})
    return metrics if isinstance(metrics, dict) else {}


def _reached(value: Any, metric: dict[str, Any]) -> bool:
    target = metric.get("target")
    if target is None or not is_number(value):
        return False
    return value >= target if metric.get("goal") == "maximize" else value <= target


def _seed(out: Path, seed: int | None) -> int:
    """``seed``, else the seed an earlier run of this sweep folder recorded, else 0."""
    index = out / "sweep.json"
    recorded = json.loads(index.read_text()).get("seed") if index.is_file() else None
    if seed is not None and recorded is not None and seed != recorded:
        raise QddError(
            f"{out} holds a sweep drawn with --seed {recorded}: resume it with "
            f"--seed {recorded}, or give another --out for seed {seed}"
        )
    return seed if seed is not None else recorded if recorded is not None else 0


def _log(message: str) -> None:
    print(f"[sweep] {message}", file=sys.stderr, flush=True)


def run_sweep(
    config: dict[str, Any], source: Path, out: Path, seed: int | None, fit: Fit
) -> list[dict[str, Any]]:
    """Run the sweep ``config`` (read from ``source``, which names it) under ``out``, each
    trial through ``fit``; returns the trial records (sweep.json's).

    Everything is checked, and every trial's command expanded, before the first trial
    starts. Trials recorded by an earlier run that this one does not plan (a lowered
    ``run_cap``) stay in sweep.json, marked ``"planned": false``. Raises `QddError` when
    the sweep's metric was logged by no trial.
    """
    config = load_sweep(source, config)
    seed = _seed(out, seed)
    metric = config.get("metric") or {}
    planned = []
    for i, params in enumerate(trials(config, seed)):
        trial_dir = out / f"trial-{i:03d}"
        arguments = expand_command(config, params, trial_dir, source)
        planned.append(Trial(trial_dir.name, trial_dir, params, arguments))
    out.mkdir(parents=True, exist_ok=True)
    index = out / "sweep.json"
    earlier = {}
    if index.is_file():
        earlier = {t["trial"]: t for t in json.loads(index.read_text()).get("trials", [])}
    summary = {
        "sweep": str(source),
        "method": config["method"],
        "seed": seed,
        "run_cap": config.get("run_cap"),
        "metric": config.get("metric"),
        "trials": [],
    }
    records: list[dict[str, Any]] = summary["trials"]
    names = {trial.name for trial in planned}
    kept = [{**r, "planned": False} for name, r in sorted(earlier.items()) if name not in names]

    def write() -> None:
        index.write_text(
            json.dumps({**summary, "trials": records + kept}, indent=2, default=str) + "\n"
        )

    seen: set[str] = set()
    warned = False
    for i, trial in enumerate(planned):
        before = earlier.get(trial.name, {})
        done = before.get("returncode") == 0 and before.get("command") == trial.command
        if done and (trial.dir / "metrics.json").is_file():
            code = 0
            _log(f"{trial.name} {trial.params}: done earlier, kept")
        else:
            _log(f"{trial.name} ({i + 1}/{len(planned)}) {trial.params}")
            trial.dir.mkdir(parents=True, exist_ok=True)
            (trial.dir / "params.json").write_text(json.dumps(trial.params) + "\n")
            started = time.perf_counter()
            code = run_trial(trial, fit)
            log = trial.dir / "sweep.log"
            status = "ok" if code == 0 else f"FAILED (see {log})"
            _log(f"{trial.name}: {status} in {time.perf_counter() - started:.0f} s")
        logged = logged_metrics(trial.dir) if code == 0 else {}
        value = logged.get(metric["name"]) if metric else None
        if metric and code == 0 and metric["name"] not in logged and not warned:
            warned = True  # once: a misspelt name would repeat it for every trial
            _log(
                f"warning: {trial.name} logged no {metric['name']!r} "
                f"(it logged: {', '.join(sorted(logged)) or 'nothing'})"
            )
        seen |= set(logged)
        records.append(
            {
                "trial": trial.name,
                "dir": str(trial.dir),
                "params": trial.params,
                "command": trial.command,
                "returncode": code,
                "metric": value,
            }
        )
        write()
        if _reached(value, metric):
            _log(
                f"{trial.name} reached the target {metric['name']} = {metric['target']}: "
                "the sweep stops, as W&B's does"
            )
            summary["stopped"] = f"{trial.name} reached metric.target"
            write()
            break
    finished = [r for r in records if r["returncode"] == 0]
    if metric and finished and all(r["metric"] is None for r in finished):
        print(
            f"warning: no trial logged the sweep's metric {metric['name']!r}; they logged: "
            f"{', '.join(sorted(seen)) or 'nothing'}",
            file=sys.stderr,
        )
        raise QddError(
            f"{source}: metric.name {metric['name']!r} was logged by no trial "
            f"(see the warning above for the names they logged): fix metric.name "
            f"and re-run the same command (finished trials are kept)"
        )
    return records
