"""``qdd-cli sweep SWEEP.yaml [--out DIR] [--seed N]``: a W&B sweep, run offline on one machine.

The YAML is the one ``wandb sweep`` takes (``configs/sweeps/``), and is read as W&B reads it:

- ``method: grid`` (every combination, in the YAML's order, the last parameter varying
  fastest) or ``method: random`` (``run_cap`` draws, seeded by ``--seed``: trial i's
  parameters depend only on the seed and i). ``bayes`` needs W&B's server and is refused.
- ``parameters:`` with W&B's distributions (`DISTRIBUTIONS`), inferred from the keys as W&B
  does when ``distribution`` is absent (``values`` → categorical, ``value`` → constant,
  integer ``min``/``max`` → int_uniform, other ``min``/``max`` → uniform). A grid takes
  categorical, constant, int_uniform and q_uniform parameters, as W&B's grid does.
- ``run_cap`` (at most that many trials), ``metric`` (``name``, ``goal``, ``target``: the
  sweep stops once a trial reaches it).
- ``command:`` running ``qdd-cli fit ...`` with W&B's macros (`expand_command`). Every macro
  is expanded or refused before the first trial starts.

Keys a local run cannot honour (``early_terminate``, ``scheduler``, ``metrics``, Launch
keys) are refused in one line rather than ignored. Where W&B's own validator (the
``sweeps`` package of ``wandb[sweeps]``) is installed, its schema is checked too.

Every trial runs in its own process (`run_trial`: nothing leaks from one trial into the
next) into ``DIR/trial-NNN``, a normal fit run folder, its output in ``trial-NNN/sweep.log``.
``DIR/sweep.json`` records the seed, the trials, their parameters, exit codes and the sweep's
metric; a trial that already finished with the same arguments is not run again, so an
interrupted sweep resumes. A metric that no trial logged (a misspelt ``metric.name``) is a
warning naming the metrics that were logged, and a non-zero exit.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from qdd.errors import QddError

RUN_DIR_ENV = "QDD_RUN_DIR"  # set by a parent qdd-cli run; never inherited by a trial
METHODS = ("grid", "random")
#: Top-level keys a local sweep honours (``program``, ``entity``, ... are only metadata here).
KEYS = {
    "program",
    "method",
    "metric",
    "parameters",
    "command",
    "run_cap",
    "name",
    "description",
    "entity",
    "project",
}
#: W&B keys that change what runs and cannot be honoured offline: why, for the one-line error.
UNSUPPORTED = {
    "early_terminate": "it stops trials early from a W&B server's view of all runs",
    "scheduler": "it schedules W&B Launch jobs",
    "metrics": "multi-objective sweeps need `method: custom` on a W&B server",
    "job": "it names a W&B Launch job",
    "image_uri": "it names a W&B Launch image",
    "controller": "it picks W&B's sweep controller",
    "apiVersion": "it is a W&B Launch key",
    "kind": "it is a W&B Launch key",
}
METRIC_KEYS = {"name", "goal", "target", "impute", "impute_while_running"}
#: distribution → (required keys, optional keys with W&B's defaults).
DISTRIBUTIONS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "constant": (("value",), {}),
    "categorical": (("values",), {}),
    "categorical_w_probabilities": (("values", "probabilities"), {}),
    "int_uniform": (("min", "max"), {}),
    "uniform": (("min", "max"), {}),
    "q_uniform": (("min", "max"), {"q": 1.0}),
    "log_uniform": (("min", "max"), {}),  # min and max are exponents: e^min .. e^max
    "log_uniform_values": (("min", "max"), {}),
    "q_log_uniform_values": (("min", "max"), {"q": 1.0}),
    "normal": ((), {"mu": 0.0, "sigma": 1.0}),
    "q_normal": ((), {"mu": 0.0, "sigma": 1.0, "q": 1.0}),
    "log_normal": ((), {"mu": 0.0, "sigma": 1.0}),
    "q_log_normal": ((), {"mu": 0.0, "sigma": 1.0, "q": 1.0}),
}
#: What a grid can enumerate (W&B's grid: int_uniform and q_uniform become value lists).
GRID = ("constant", "categorical", "int_uniform", "q_uniform")
#: W&B's argument macros (a whole command element) that pass the parameters.
ARGS_MACROS = ("args", "args_no_equals", "args_no_boolean_flags", "args_json", "args_json_file")
#: W&B's macros that qdd-cli fit cannot read, with what to write instead.
REFUSED_MACROS = {
    "args_no_hyphens": "qdd-cli fit reads --name=value, not name=value",
    "args_append_hydra": "qdd-cli fit is not a Hydra program (+name=value)",
    "args_override_hydra": "qdd-cli fit is not a Hydra program (++name=value)",
}
KNOWN_MACROS = (
    ", ".join(
        "${" + m + "}" for m in ("env", "interpreter", "program", *ARGS_MACROS, *REFUSED_MACROS)
    )
    + ", ${envvar:NAME}"
)
MACRO = re.compile(r"\$\{([^}]*)\}")
ENVVAR = re.compile(r"\$\{envvar:([A-Z0-9_]*)\}")


def _fail(path: Path, message: str) -> QddError:
    return QddError(f"{path}: {message}")


def load_sweep(path: Path) -> dict[str, Any]:
    """The sweep YAML, every key and parameter checked for what a local sweep runs."""
    if not path.is_file():
        raise QddError(f"sweep config {path} does not exist: check the path")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise QddError(f"{path} is not valid YAML ({error}): fix the file") from None
    if not isinstance(config, dict):
        raise QddError(f"{path} is not a sweep config (a mapping with method/parameters)")
    for key in config:
        if key in UNSUPPORTED:
            raise _fail(
                path,
                f"`{key}` is not supported by qdd-cli sweep ({UNSUPPORTED[key]}): "
                "remove it, or run the sweep with `wandb sweep` + `wandb agent`",
            )
        if key not in KEYS:
            raise _fail(path, f"unknown key `{key}`: a W&B sweep has {', '.join(sorted(KEYS))}")
    method = config.get("method")
    if method not in METHODS:
        raise _fail(
            path,
            f"method is {method!r}; qdd-cli sweep runs `method: grid` or "
            "`method: random` offline (bayes needs a W&B server: `wandb sweep` + "
            "`wandb agent`)",
        )
    cap = config.get("run_cap")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise _fail(path, f"run_cap must be a whole number of trials above 0 (found {cap!r})")
    if method == "random" and cap is None:
        raise _fail(path, "method: random draws trials until stopped: set `run_cap: N`")
    _check_metric(config.get("metric"), path)
    parameters = config.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise _fail(path, "no `parameters:`: list each with `values: [...]` or a distribution")
    for name, spec in parameters.items():
        kind = distribution(name, spec, path)
        if method == "grid" and kind not in GRID:
            raise _fail(
                path,
                f"parameter {name}: a grid cannot enumerate a {kind} "
                "distribution: give it `values: [...]`, or use `method: random`",
            )
    expand_command(config, {name: None for name in parameters}, Path("trial"), path)
    _check_with_wandb(config, path)  # last: qdd's own messages say more for what both refuse
    return config


def _check_with_wandb(config: dict[str, Any], path: Path) -> None:
    """W&B's own schema check, where its ``sweeps`` package is installed."""
    try:
        from sweeps import schema_violations_from_proposed_config
    except ImportError:
        return
    violations = schema_violations_from_proposed_config(config)
    if violations:
        raise _fail(path, f"W&B's sweep validator refuses it: {violations[0]}")


def _check_metric(metric: Any, path: Path) -> None:
    if metric is None:
        return
    if not isinstance(metric, dict) or not isinstance(metric.get("name"), str):
        raise _fail(path, "metric needs a `name:` (a metric of the fit's metrics.json)")
    unknown = set(metric) - METRIC_KEYS
    if unknown:
        raise _fail(path, f"metric has unknown key(s) {', '.join(sorted(unknown))}")
    if metric.get("goal", "minimize") not in ("minimize", "maximize"):
        raise _fail(path, f"metric goal must be minimize or maximize (found {metric['goal']!r})")
    target = metric.get("target")
    if target is not None and (isinstance(target, bool) or not isinstance(target, int | float)):
        raise _fail(path, f"metric target must be a number (found {target!r})")


def distribution(name: str, spec: Any, path: Path) -> str:
    """The W&B distribution of one parameter (inferred as W&B does), its keys checked."""
    if isinstance(spec, dict) and "parameters" in spec:
        inner = spec["parameters"] if isinstance(spec["parameters"], dict) else {}
        example = next(iter(inner), "lr")
        raise _fail(
            path,
            f"parameter {name} nests `parameters:` (a W&B dict parameter, which "
            f"W&B passes as one value); qdd-cli fit sets nested keys by their dotted "
            f"name: write `{name}.{example}:` at the top of `parameters:` instead",
        )
    if not isinstance(spec, dict):
        raise _fail(
            path,
            f"parameter {name} needs `values: [...]`, `value: X` or a "
            f"distribution with its keys (found {spec!r})",
        )
    kind = spec.get("distribution")
    if kind is None:
        if "values" in spec:
            kind = "categorical_w_probabilities" if "probabilities" in spec else "categorical"
        elif "value" in spec:
            kind = "constant"
        elif "min" in spec and "max" in spec:
            ints = all(
                isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in ("min", "max")
            )
            kind = "int_uniform" if ints else "uniform"
        else:
            raise _fail(
                path,
                f"parameter {name} needs `values: [...]`, `value: X`, "
                "`min`/`max` or a `distribution:`",
            )
    if kind not in DISTRIBUTIONS:
        raise _fail(
            path,
            f"parameter {name}: distribution {kind!r} is not supported by "
            f"qdd-cli sweep (it supports {', '.join(DISTRIBUTIONS)})",
        )
    required, optional = DISTRIBUTIONS[kind]
    missing = [k for k in required if k not in spec]
    unknown = set(spec) - {"distribution", *required, *optional}
    if missing or unknown:
        wrong = f"lacks {', '.join(missing)}" if missing else f"has {', '.join(sorted(unknown))}"
        raise _fail(
            path,
            f"parameter {name} ({kind}) {wrong}: it takes "
            f"{', '.join([*required, *optional]) or 'mu, sigma'}",
        )
    _check_values(name, kind, {**optional, **spec}, path)
    return kind


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_values(name: str, kind: str, spec: dict[str, Any], path: Path) -> None:
    """The ranges W&B's schema enforces, in qdd's one-line form."""
    if "values" in spec and (not isinstance(spec["values"], list) or not spec["values"]):
        raise _fail(path, f"parameter {name}: `values` must be a non-empty list")
    if kind == "categorical_w_probabilities":
        probabilities = spec["probabilities"]
        if (
            not isinstance(probabilities, list)
            or len(probabilities) != len(spec["values"])
            or not all(_number(p) and p >= 0 for p in probabilities)
            or not math.isclose(sum(probabilities), 1.0)
        ):
            raise _fail(
                path,
                f"parameter {name}: `probabilities` must be one number ≥ 0 per value, summing to 1",
            )
    for key in ("min", "max", "mu", "sigma", "q"):
        if key in spec and not _number(spec[key]):
            raise _fail(path, f"parameter {name}: `{key}` must be a number (found {spec[key]!r})")
    if "min" in spec and spec["min"] >= spec["max"]:
        raise _fail(path, f"parameter {name}: min {spec['min']} is not less than max {spec['max']}")
    if kind == "int_uniform" and not all(isinstance(spec[k], int) for k in ("min", "max")):
        raise _fail(path, f"parameter {name}: int_uniform needs whole-number min and max")
    if kind in ("log_uniform_values", "q_log_uniform_values") and spec["min"] <= 0:
        raise _fail(path, f"parameter {name}: {kind} needs min > 0 (found {spec['min']})")
    if spec.get("sigma", 0) < 0 or spec.get("q", 1) <= 0:
        raise _fail(path, f"parameter {name}: sigma must be ≥ 0 and q > 0")


def _quantize(value: float, q: float) -> float | int:
    """W&B's rounding to a multiple of q (an int where q is an int)."""
    rounded = float(np.round(value / q) * q)
    return int(rounded) if isinstance(q, int) else rounded


def grid(parameters: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination, in the YAML's order (the last parameter varies fastest)."""
    axes = []
    for name, spec in parameters.items():
        kind = distribution(name, spec, Path("parameters"))
        if kind == "constant":
            axes.append([spec["value"]])
        elif kind == "int_uniform":
            axes.append(list(range(spec["min"], spec["max"] + 1)))
        elif kind == "q_uniform":  # W&B's grid: numpy's arange, max excluded
            axes.append(np.arange(spec["min"], spec["max"], spec.get("q", 1.0)).tolist())
        else:
            axes.append(list(spec["values"]))
    return [dict(zip(parameters, point, strict=True)) for point in itertools.product(*axes)]


def sample(parameters: dict[str, Any], seed: int, index: int) -> dict[str, Any]:
    """Trial ``index`` of a random sweep: one draw per parameter, from ``(seed, index)`` alone
    (a larger run_cap adds trials, it does not change the earlier ones)."""
    rng = np.random.default_rng([seed, index])
    point = {}
    for name, spec in parameters.items():
        kind = distribution(name, spec, Path("parameters"))
        spec = {**DISTRIBUTIONS[kind][1], **spec}
        if kind == "constant":
            value = spec["value"]
        elif kind == "categorical":
            value = spec["values"][int(rng.integers(len(spec["values"])))]
        elif kind == "categorical_w_probabilities":
            p = np.asarray(spec["probabilities"], dtype=float)
            value = spec["values"][int(rng.choice(len(p), p=p / p.sum()))]
        elif kind == "int_uniform":
            value = int(rng.integers(spec["min"], spec["max"] + 1))
        elif kind in ("uniform", "q_uniform"):
            value = float(rng.uniform(spec["min"], spec["max"]))
        elif kind == "log_uniform":
            value = math.exp(rng.uniform(spec["min"], spec["max"]))
        elif kind in ("log_uniform_values", "q_log_uniform_values"):
            value = math.exp(rng.uniform(math.log(spec["min"]), math.log(spec["max"])))
        elif kind in ("normal", "q_normal"):
            value = float(rng.normal(spec["mu"], spec["sigma"]))
        else:  # log_normal, q_log_normal
            value = math.exp(rng.normal(spec["mu"], spec["sigma"]))
        point[name] = _quantize(value, spec["q"]) if kind.startswith("q_") else value
    return point


def trials(config: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    """The parameters of every trial the sweep runs: the grid or ``run_cap`` draws, capped."""
    cap = config.get("run_cap")
    if config["method"] == "grid":
        points = grid(config["parameters"])
        return points[:cap] if cap else points
    return [sample(config["parameters"], seed, i) for i in range(cap)]


def _flag_values(params: dict[str, Any]) -> dict[str, list[str]]:
    """W&B's agent's renderings of the parameters (``str(value)``, as it formats them)."""
    flags: dict[str, list[str]] = {m: [] for m in ARGS_MACROS}
    for name, value in params.items():
        flags["args"].append(f"--{name}={value}")
        flags["args_no_equals"] += [f"--{name}", str(value)]
        if isinstance(value, bool):
            flags["args_no_boolean_flags"] += [f"--{name}"] if value else []
        else:
            flags["args_no_boolean_flags"].append(f"--{name}={value}")
    flags["args_json"] = [json.dumps(params, default=str)]
    return flags


def _may_be_boolean(spec: dict[str, Any]) -> bool:
    candidates = spec.get("values", [spec.get("value")])
    return any(isinstance(v, bool) for v in candidates)


def expand_command(
    config: dict[str, Any], params: dict[str, Any], trial_dir: Path, path: Path
) -> list[str]:
    """The arguments after ``qdd-cli fit`` for one trial, every W&B macro expanded.

    As W&B's agent: ``${env}`` and ``${interpreter}`` before the program are how it is
    started (a trial is always a fresh ``python -m qdd``), ``${program}`` is ``program:``,
    ``${args}`` is ``--name=value`` per parameter, ``${args_no_equals}`` ``--name value``,
    ``${args_no_boolean_flags}`` ``${args}`` with true booleans as bare flags and false ones
    left out, ``${args_json}`` the parameters as one JSON object and ``${args_json_file}``
    a file holding it (``trial_dir/params.json``: both only after ``--config``, which reads
    them as a config of dotted keys, down to an option such as ``model.lr``: deeper names
    such as ``data.source_weights.fp4`` are refused there), ``${envvar:NAME}`` the
    variable's value. Anything else is refused (`QddError`), with what to write instead.
    """
    command = config.get("command")
    if not isinstance(command, list) or not command:
        raise _fail(path, "no `command:`: it must run `qdd-cli fit ... ${args}`")
    program = config.get("program")
    expanded: list[str] = []
    for element in (str(c) for c in command):
        for name in ENVVAR.findall(element):
            if name not in os.environ:
                raise _fail(path, f"command uses ${{envvar:{name}}} but {name} is not set")
            element = element.replace(f"${{envvar:{name}}}", os.environ[name])
        macros = MACRO.findall(element)
        if not macros:
            expanded.append(element)
            continue
        macro = macros[0]
        if element != f"${{{macro}}}":
            raise _fail(
                path,
                f"command element {element!r}: W&B expands a macro only as a "
                "whole element; write it as its own list item",
            )
        if macro in ("env", "interpreter"):
            if expanded:
                raise _fail(path, f"${{{macro}}} belongs before the program in `command:`")
        elif macro == "program":
            if not program:
                raise _fail(path, "command uses ${program} but the sweep has no `program:`")
            expanded.append(str(program))
        elif macro in REFUSED_MACROS:
            raise _fail(path, f"${{{macro}}}: {REFUSED_MACROS[macro]}; use ${{args}}")
        elif macro not in ARGS_MACROS:
            raise _fail(
                path,
                f"unknown macro ${{{macro}}} in `command:` (W&B defines {KNOWN_MACROS})",
            )
        else:
            expanded.append(element)
    if len(expanded) < 2 or Path(expanded[0]).name != "qdd-cli" or expanded[1] != "fit":
        raise _fail(
            path,
            f"command must run `qdd-cli fit ... ${{args}}` (found {' '.join(expanded) or 'none'})",
        )
    arguments = expanded[2:]
    used = [m for m in ARGS_MACROS if f"${{{m}}}" in arguments]
    if not used:
        raise _fail(path, "command has no ${args}: trials could not set their parameters")
    if any(a == "--out" or a.startswith("--out=") for a in arguments) or "out" in params:
        raise _fail(path, "--out is set per trial by qdd-cli sweep (DIR/trial-NNN): remove it")
    for macro in ("args_json", "args_json_file"):
        at = [i for i, a in enumerate(arguments) if a == f"${{{macro}}}"]
        if any(i == 0 or arguments[i - 1] != "--config" for i in at):
            raise _fail(
                path,
                f"${{{macro}}} must follow --config (`- --config` then "
                f"`- ${{{macro}}}`): qdd-cli fit reads the parameters' JSON as a config",
            )
    deep = [n for n in config.get("parameters") or {} if n.count(".") >= 2]
    if deep and {"args_json", "args_json_file"} & set(used):
        raise _fail(
            path,
            f"${{{used[-1]}}} passes {deep[0]} as a --config key, and qdd-cli fit reads config "
            "keys down to an option (model.lr), not into a dict option's entries "
            "(data.source_weights.fp4): use ${args}",
        )
    if "args_no_boolean_flags" in used and any(
        _may_be_boolean(spec) for spec in (config.get("parameters") or {}).values()
    ):
        raise _fail(
            path,
            "${args_no_boolean_flags} passes true booleans as bare flags, and "
            "qdd-cli fit's options take a value (--name=true): use ${args}",
        )
    flags = _flag_values(params)
    flags["args_json_file"] = [str(trial_dir / "params.json")]
    out: list[str] = []
    for argument in arguments:
        name = argument[2:-1] if argument.startswith("${") else None
        out += flags[name] if name in flags else [argument]
    return out


def run_trial(arguments: list[str], params: dict[str, Any], trial_dir: Path) -> int:
    """One trial in a fresh process: ``qdd-cli fit ARGUMENTS --out TRIAL_DIR``; its exit code.

    The only place that knows how a trial is launched (``params`` are what ``arguments``
    carry, for a launcher that takes them as a config). Output goes to
    ``trial_dir/sweep.log``; the parent's run folder variable is not inherited and W&B
    stays offline unless the user set ``WANDB_MODE``.
    """
    env = {k: v for k, v in os.environ.items() if k != RUN_DIR_ENV}
    env.setdefault("WANDB_MODE", "offline")
    command = [sys.executable, "-m", "qdd", "fit", *arguments, "--out", str(trial_dir)]
    with open(trial_dir / "sweep.log", "w") as log:
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def logged_metrics(trial_dir: Path) -> dict[str, Any]:
    """The metrics a finished trial logged (its metrics.json); {} when it wrote none."""
    path = trial_dir / "metrics.json"
    if not path.is_file():
        return {}
    metrics = json.loads(path.read_text()).get("metrics", {})
    return metrics if isinstance(metrics, dict) else {}


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


def _reached(value: Any, metric: dict[str, Any]) -> bool:
    target = metric.get("target")
    if target is None or not _number(value):
        return False
    return value >= target if metric.get("goal") == "maximize" else value <= target


def _seed(out: Path, seed: int | None) -> int:
    """``--seed``, else the seed an earlier run of this sweep folder recorded, else 0."""
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


def run_sweep(config_path: Path, out: Path, seed: int | None = None) -> list[dict[str, Any]]:
    """Run the sweep's trials under ``out``; returns the trial records (sweep.json's).

    Everything is checked, and every trial's command expanded, before the first trial
    starts. Raises `QddError` when the sweep's metric was logged by no trial.
    """
    config = load_sweep(config_path)
    seed = _seed(out, seed)
    metric = config.get("metric") or {}
    planned = []
    for i, params in enumerate(trials(config, seed)):
        trial_dir = out / f"trial-{i:03d}"
        arguments = expand_command(config, params, trial_dir, config_path)
        planned.append(Trial(trial_dir.name, trial_dir, params, arguments))
    out.mkdir(parents=True, exist_ok=True)
    index = out / "sweep.json"
    earlier = {}
    if index.is_file():
        earlier = {t["trial"]: t for t in json.loads(index.read_text()).get("trials", [])}
    summary = {
        "sweep": str(config_path),
        "method": config["method"],
        "seed": seed,
        "run_cap": config.get("run_cap"),
        "metric": config.get("metric"),
        "trials": [],
    }
    records: list[dict[str, Any]] = summary["trials"]
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
            code = run_trial(trial.arguments, trial.params, trial.dir)
            log = trial.dir / "sweep.log"
            status = "ok" if code == 0 else f"FAILED (exit {code}, see {log})"
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
        index.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        if _reached(value, metric):
            _log(
                f"{trial.name} reached the target {metric['name']} = {metric['target']}: "
                "the sweep stops, as W&B's does"
            )
            summary["stopped"] = f"{trial.name} reached metric.target"
            index.write_text(json.dumps(summary, indent=2, default=str) + "\n")
            break
    finished = [r for r in records if r["returncode"] == 0]
    if metric and finished and all(r["metric"] is None for r in finished):
        print(
            f"warning: no trial logged the sweep's metric {metric['name']!r}; they logged: "
            f"{', '.join(sorted(seen)) or 'nothing'}",
            file=sys.stderr,
        )
        raise QddError(
            f"{config_path}: metric.name {metric['name']!r} was logged by no trial "
            f"(see the warning above for the names they logged): fix metric.name "
            f"and re-run the same command (finished trials are kept)"
        )
    return records


def main(argv: list[str]) -> None:
    """``qdd-cli sweep``: run the sweep, print one line per trial and the sweep folder."""
    parser = argparse.ArgumentParser(
        prog="qdd-cli sweep",
        description="Run a W&B sweep YAML (configs/sweeps/: method grid or random) offline: "
        "one `qdd-cli fit` run folder per trial under --out.",
    )
    parser.add_argument("config", help="W&B sweep YAML with method: grid or random")
    parser.add_argument("--out", help="folder for the trials (default: runs/sweep-NAME-TIME)")
    parser.add_argument(
        "--seed",
        type=int,
        help="seed of a random sweep's draws (default: "
        "the one --out recorded, else 0; recorded in sweep.json)",
    )
    args = parser.parse_args(argv)
    path = Path(args.config)
    out = Path(args.out or f"runs/sweep-{path.stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    records = run_sweep(path, out, args.seed)
    metric = (yaml.safe_load(path.read_text()).get("metric") or {}).get("name", "metric")
    for record in records:
        value = "—" if record["metric"] is None else f"{record['metric']:.4f}"
        print(f"{record['trial']}  {metric}={value}  {record['params']}", file=sys.stderr)
    failed = [r["trial"] for r in records if r["returncode"] != 0]
    if failed:
        raise QddError(
            f"{len(failed)} of {len(records)} trials failed ({', '.join(failed)}): read their "
            f"sweep.log under {out}, fix, and re-run the same command (finished trials are kept)"
        )
    print(out)
