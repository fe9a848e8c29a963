"""The trials' parameters: W&B's grid order and its random draws, seeded per trial."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np

from qdd.sweep.schema import DISTRIBUTIONS, distribution


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
