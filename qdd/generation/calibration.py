"""Calibration for SVDQuant's smoothing: each quantized layer's per-channel input abs-max.

As deepcompressor collects its calibration set (``app/diffusion/dataset/collect/calib``):
the full-precision pipeline — here in the half dtype it is deployed in — runs its whole
denoising loop over calibration prompts, and a forward pre-hook on every Linear layer the
precision will quantize keeps the running ``max |x_j|`` of its input channels over all
steps, tokens and prompts. That vector is the ``act_absmax`` of `qdd.quant.svdquant`.

It runs once per job: the result is cached in the output folder (``calibration.safetensors``)
with a digest of everything it depends on (model, precision, scope, dtype, prompts, steps,
guidance, size, seed, batch size) and reused by a resumed run; a cache of another digest is
recomputed, never reused. A layer the pipeline never calls gets zeros, which the search
smooths as "no smoothing" (every candidate scores zero error; the first wins).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdd.errors import QddError

log = logging.getLogger(__name__)

CACHE = "calibration.safetensors"
#: deepcompressor's ``calib.num_samples`` in its fast SVDQuant config (the default is 128).
DEFAULT_COUNT = 64


def calibration_prompts(job_prompts: list[str], file: str | None, count: int | None) -> list[str]:
    """The first ``count`` prompts of ``file`` (default: the job's own prompt set)."""
    from qdd.generation.prompts import load_prompts

    count = DEFAULT_COUNT if count is None else count
    if count < 1:
        raise QddError(f"--calibration-count must be at least 1, got {count}")
    if file is not None and not Path(file).is_file():
        raise QddError(
            f"calibration prompt file {file} not found: pass --calibration-prompts FILE (one "
            "prompt a line), or leave it out to calibrate on the job's prompts"
        )
    prompts = job_prompts if file is None else load_prompts(file)
    return prompts[:count]


def calibrates(precision: str, backend: str) -> bool:
    """Whether ``precision`` on ``backend`` smooths with calibration activations."""
    from qdd.quant.registry import REGISTRY

    entry = REGISTRY.get(precision)
    return backend == "emulate" and entry is not None and entry.calibration is not None


#: The recipe fields the calibration activations (and the layers hooked) depend on.
DIGEST_FIELDS = ("generator", "model_id", "precision", "quant_scope", "dtype", "steps",
                 "guidance", "height", "width", "base_seed", "batch_size")  # fmt: skip


def recipe_digest(recipe: Any, prompts: list[str]) -> str:
    """sha256 of the calibration prompts and the recipe fields the activations depend on."""
    fields = {name: getattr(recipe, name) for name in DIGEST_FIELDS}
    payload = json.dumps({"prompts": prompts, **fields}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def gather_act_absmax(
    layers: dict[str, nn.Linear], run: Callable[[], None]
) -> dict[str, torch.Tensor]:
    """Per-channel ``max |input|`` (fp32, CPU) of every layer while ``run()`` runs."""
    absmax = {name: torch.zeros(m.in_features, dtype=torch.float32) for name, m in layers.items()}
    seen: set[str] = set()

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            current = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float().cpu()
            torch.maximum(absmax[name], current, out=absmax[name])
            seen.add(name)

        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers.items()]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    unseen = len(layers) - len(seen)
    if unseen:
        log.info("calibration: %d of %d layers never ran (kept unsmoothed)", unseen, len(layers))
    return absmax


def calibrate_pipeline(
    pipeline: Any,
    layers: dict[str, nn.Linear],
    prompts: list[str],
    seed: int,
    batch_size: int,
    call: dict[str, Any],
) -> dict[str, torch.Tensor]:
    """Run ``pipeline`` over ``prompts`` (prompt ``i`` with seed ``seed + i``, ``batch_size``
    per call as the job generates) and gather."""

    def run() -> None:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            seeds = range(seed + start, seed + start + len(batch))
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            pipeline(prompt=batch, generator=generators, **call)

    return gather_act_absmax(layers, run)


def load_cache(out_dir: Path, digest: str) -> dict[str, torch.Tensor] | None:
    """The cached abs-max of this ``digest``; None when absent or made for another recipe."""
    from safetensors import safe_open

    path = Path(out_dir) / CACHE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as cached:
        held = (cached.metadata() or {}).get("digest")
        if held != digest:
            log.info("%s was made for another recipe (%s): calibrating again", path, held)
            return None
        return {name: cached.get_tensor(name) for name in cached.keys()}  # noqa: SIM118


def save_cache(out_dir: Path, digest: str, absmax: dict[str, torch.Tensor], n: int) -> Path:
    """Write the cache atomically (a killed run leaves no half file)."""
    from safetensors.torch import save_file

    path = Path(out_dir) / CACHE
    tmp = path.with_name(f".{CACHE}.tmp")
    save_file(absmax, str(tmp), metadata={"digest": digest, "prompts": str(n)})
    tmp.replace(path)
    return path


def smoothing_record(
    modules: Iterable[nn.Module], digest: str | None, n_prompts: int | None
) -> dict[str, Any] | None:
    """The ``smoothing`` field of a sample: `smoothing_summary` over every SVDQuant layer of
    ``modules``, with the calibration's prompt count and digest; None without SVDQuant."""
    from qdd.quant.svdquant import SVDQuantLinear, smoothing_summary

    layers = [m for module in modules for m in module.modules() if isinstance(m, SVDQuantLinear)]
    summary = smoothing_summary(layers)
    if summary is not None and summary["kind"] == "calibrated":
        summary |= {"calibration_prompts": n_prompts, "calibration_digest": digest}
    return summary
