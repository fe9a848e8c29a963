"""``qdd-cli generate --dry-run``: what a run or a plan will make and weigh, before any GPU time.

For each job: the images it makes (and how many a resumed folder still lacks), the disk its
shards will take, and its denoiser's deployed size. The denoiser is built from its config on
the meta device (shapes and dtypes, no storage), so no weights are read nor memory taken;
its size follows `qdd.quant.size` over the layers `quantize_module_` would quantize.

Disk estimate: a generated image's PNG is taken at its raw size, 3·H·W bytes (noise-like
content barely compresses at PNG level 1, and generated images come in at 40–100 % of it),
plus 2 KiB per sample for its JSON and the two tar headers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qdd.errors import QddError
from qdd.generation.registry import get_generator

if TYPE_CHECKING:
    from qdd.generation.jobs import Job

#: Bytes per sample beside its pixels: the JSON (~1 KiB) and two 512-byte tar headers.
SAMPLE_OVERHEAD = 2048


def shard_bytes_estimate(n_images: int, height: int, width: int) -> int:
    """The disk ``n_images`` samples of ``height`` × ``width`` take: 3·H·W + 2 KiB each."""
    return n_images * (3 * height * width + SAMPLE_OVERHEAD)


def meta_denoiser(generator: str, model_path: str) -> Any:
    """The generator's denoiser built from its config on the meta device (no weights)."""
    import diffusers
    import torch

    from qdd.generation.loading import is_local_path, resolve_model_path

    spec = get_generator(generator)
    source = resolve_model_path(model_path)
    try:
        index = diffusers.DiffusionPipeline.load_config(source)
        class_name = index[spec.denoiser][1]
        model_class = getattr(diffusers, class_name)
        config = model_class.load_config(source, subfolder=spec.denoiser)
    except (OSError, KeyError, TypeError, AttributeError) as error:
        reason = str(error).splitlines()[0][:200]
        fix = (
            "re-save the pipeline with save_pretrained"
            if is_local_path(model_path)
            else f"download its configs first (`hf download {model_path} --include '*.json'`)"
        )
        raise QddError(
            f"--dry-run needs the config of {model_path}'s {spec.denoiser} ({reason}): {fix}"
        ) from None
    with torch.device("meta"):
        return model_class.from_config(config)


def denoiser_bytes(module: Any, precision: str, dtype: str) -> int:
    """What ``module`` (meta or real) weighs at ``precision`` computed in ``dtype``."""
    import torch

    from qdd.quant import registry
    from qdd.quant.backends import quantized_layers
    from qdd.quant.size import module_bytes

    module.to(getattr(torch, dtype))
    layers = quantized_layers(module, precision) if precision in registry.quantized() else {}
    return module_bytes(module, precision, layers)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def describe_jobs(jobs: list[Job]) -> str:
    """The table ``--dry-run`` prints: per job its images, disk and denoiser bytes."""
    from pathlib import Path

    from qdd.generation.jobs import pending, work_items
    from qdd.generation.loading import compute_dtype_name
    from qdd.generation.prompts import load_prompts
    from qdd.quant import registry

    for precision in sorted({job.precision for job in jobs}):
        registry.get(precision)  # an unknown name: one line listing the known ones
    denoisers: dict[tuple[str, str], Any] = {}
    rows = []
    total_images = total_todo = total_disk = 0
    for job in jobs:
        spec = get_generator(job.generator)
        model_path = job.model_path or spec.hub_id
        items = work_items(load_prompts(job.prompts), job.seed, job.limit)
        out = Path(job.out)
        todo = len(items) if job.overwrite or not out.is_dir() else len(pending(items, out))
        height, width = job.height or spec.resolution, job.width or spec.resolution
        disk = shard_bytes_estimate(len(items), height, width)
        key = (spec.name, model_path)
        if key not in denoisers:
            denoisers[key] = meta_denoiser(spec.name, model_path)
        module = denoisers[key]
        weighs = denoiser_bytes(module, job.precision, compute_dtype_name(spec, job.precision))
        fp32 = denoiser_bytes(module, "fp32", "float32")
        rows.append(
            (spec.name, job.precision, str(len(items)), str(todo), f"{height}x{width}",
             _size(disk), _size(weighs), f"{weighs / fp32:.3f}", job.offload, str(out))
        )  # fmt: skip
        total_images, total_todo, total_disk = (
            total_images + len(items),
            total_todo + todo,
            total_disk + disk,
        )
    header = ("generator", "precision", "images", "to make", "size", "disk", "denoiser",
              "vs fp32", "offload", "out")  # fmt: skip
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in (header, *rows)]  # fmt: skip
    lines.append(
        f"{len(jobs)} job(s), {total_images} images ({total_todo} to make), "
        f"~{_size(total_disk)} of shards (PNG taken at 3·H·W bytes + 2 KiB per sample); "
        "denoiser: deployed size of its format (qdd.quant.size), from its config, no weights read"
    )
    return "\n".join(lines)
