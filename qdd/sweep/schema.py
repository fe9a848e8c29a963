"""A W&B sweep config, checked for what a local sweep can run (`load_sweep`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from qdd.errors import QddError
from qdd.sweep.macros import config_error, expand_command

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


def read_sweep(path: Path) -> dict[str, Any]:
    """The sweep YAML as a dict (unchecked: `load_sweep` checks it)."""
    if not path.is_file():
        raise QddError(f"sweep config {path} does not exist: check the path")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise QddError(f"{path} is not valid YAML ({error}): fix the file") from None
    if not isinstance(config, dict):
        raise QddError(f"{path} is not a sweep config (a mapping with method/parameters)")
    return config


def load_sweep(path: Path, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The sweep config (``config``, else the YAML at ``path``; ``path`` names it in
    messages), every key and parameter checked for what a local sweep runs."""
    config = read_sweep(path) if config is None else dict(config)
    for key in config:
        if key in UNSUPPORTED:
            raise config_error(
                path,
                f"`{key}` is not supported by qdd-cli sweep ({UNSUPPORTED[key]}): "
                "remove it, or run the sweep with `wandb sweep` + `wandb agent`",
            )
        if key not in KEYS:
            raise config_error(
                path, f"unknown key `{key}`: a W&B sweep has {', '.join(sorted(KEYS))}"
            )
    method = config.get("method")
    if method not in METHODS:
        raise config_error(
            path,
            f"method is {method!r}; qdd-cli sweep runs `method: grid` or "
            "`method: random` offline (bayes needs a W&B server: `wandb sweep` + "
            "`wandb agent`)",
        )
    cap = config.get("run_cap")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise config_error(
            path, f"run_cap must be a whole number of trials above 0 (found {cap!r})"
        )
    if method == "random" and cap is None:
        raise config_error(path, "method: random draws trials until stopped: set `run_cap: N`")
    _check_metric(config.get("metric"), path)
    parameters = config.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise config_error(
            path, "no `parameters:`: list each with `values: [...]` or a distribution"
        )
    for name, spec in parameters.items():
        kind = distribution(name, spec, path)
        if method == "grid" and kind not in GRID:
            raise config_error(
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
        raise config_error(path, f"W&B's sweep validator refuses it: {violations[0]}")


def _check_metric(metric: Any, path: Path) -> None:
    if metric is None:
        return
    if not isinstance(metric, dict) or not isinstance(metric.get("name"), str):
        raise config_error(path, "metric needs a `name:` (a metric of the fit's metrics.json)")
    unknown = set(metric) - METRIC_KEYS
    if unknown:
        raise config_error(path, f"metric has unknown key(s) {', '.join(sorted(unknown))}")
    if metric.get("goal", "minimize") not in ("minimize", "maximize"):
        raise config_error(
            path, f"metric goal must be minimize or maximize (found {metric['goal']!r})"
        )
    target = metric.get("target")
    if target is not None and (isinstance(target, bool) or not isinstance(target, int | float)):
        raise config_error(path, f"metric target must be a number (found {target!r})")


def distribution(name: str, spec: Any, path: Path) -> str:
    """The W&B distribution of one parameter (inferred as W&B does), its keys checked."""
    if isinstance(spec, dict) and "parameters" in spec:
        inner = spec["parameters"] if isinstance(spec["parameters"], dict) else {}
        example = next(iter(inner), "lr")
        raise config_error(
            path,
            f"parameter {name} nests `parameters:` (a W&B dict parameter, which "
            f"W&B passes as one value); qdd-cli fit sets nested keys by their dotted "
            f"name: write `{name}.{example}:` at the top of `parameters:` instead",
        )
    if not isinstance(spec, dict):
        raise config_error(
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
            raise config_error(
                path,
                f"parameter {name} needs `values: [...]`, `value: X`, "
                "`min`/`max` or a `distribution:`",
            )
    if kind not in DISTRIBUTIONS:
        raise config_error(
            path,
            f"parameter {name}: distribution {kind!r} is not supported by "
            f"qdd-cli sweep (it supports {', '.join(DISTRIBUTIONS)})",
        )
    required, optional = DISTRIBUTIONS[kind]
    missing = [k for k in required if k not in spec]
    unknown = set(spec) - {"distribution", *required, *optional}
    if missing or unknown:
        wrong = f"lacks {', '.join(missing)}" if missing else f"has {', '.join(sorted(unknown))}"
        raise config_error(
            path,
            f"parameter {name} ({kind}) {wrong}: it takes "
            f"{', '.join([*required, *optional]) or 'mu, sigma'}",
        )
    _check_values(name, kind, {**optional, **spec}, path)
    return kind


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_values(name: str, kind: str, spec: dict[str, Any], path: Path) -> None:
    """The ranges W&B's schema enforces, in qdd's one-line form."""
    if "values" in spec and (not isinstance(spec["values"], list) or not spec["values"]):
        raise config_error(path, f"parameter {name}: `values` must be a non-empty list")
    if kind == "categorical_w_probabilities":
        probabilities = spec["probabilities"]
        if (
            not isinstance(probabilities, list)
            or len(probabilities) != len(spec["values"])
            or not all(is_number(p) and p >= 0 for p in probabilities)
            or not math.isclose(sum(probabilities), 1.0)
        ):
            raise config_error(
                path,
                f"parameter {name}: `probabilities` must be one number ≥ 0 per value, summing to 1",
            )
    for key in ("min", "max", "mu", "sigma", "q"):
        if key in spec and not is_number(spec[key]):
            raise config_error(
                path, f"parameter {name}: `{key}` must be a number (found {spec[key]!r})"
            )
    if "min" in spec and spec["min"] >= spec["max"]:
        raise config_error(
            path, f"parameter {name}: min {spec['min']} is not less than max {spec['max']}"
        )
    if kind == "int_uniform" and not all(isinstance(spec[k], int) for k in ("min", "max")):
        raise config_error(path, f"parameter {name}: int_uniform needs whole-number min and max")
    if kind in ("log_uniform_values", "q_log_uniform_values") and spec["min"] <= 0:
        raise config_error(path, f"parameter {name}: {kind} needs min > 0 (found {spec['min']})")
    if spec.get("sigma", 0) < 0 or spec.get("q", 1) <= 0:
        raise config_error(path, f"parameter {name}: sigma must be ≥ 0 and q > 0")
