"""What making an image cost: seconds per image and peak accelerator memory, per pipeline call.

Every sample's JSON carries the costs of the call that made it (``denoiser_bytes``,
``seconds_per_image``, ``peak_memory_bytes``, ``offload``, beside ``device_name``), and the
folder's manifest summarises them per group (`summarise_costs`), so a reader can set what a
precision saves against what it does to quality and to detectors.

Peak memory is the accelerator's: ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats`` around the call (tensors PyTorch allocated, what a 24 GB card
must hold; the caching allocator's reserve is not counted). On a CPU it is ``None``: the
process's peak RSS is a high-water mark over its whole life (loading, the half-precision
copy a quantizer reads), not the call's, and the emulation holds its weights dequantized at
the compute dtype, so neither would say what the format needs. `PEAK_MEMORY_NOTES` says so
in the manifest.
"""

from __future__ import annotations

import json
import statistics
import tarfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch

from qdd.identity import group_label

T = TypeVar("T")

OFFLOADS = ("none", "model", "sequential")
#: Sample fields measured while generating: the only ones that differ between two runs of
#: one recipe (pixels and every other field are reproducible; shard bytes therefore are not).
MEASURED = ("seconds_per_image", "peak_memory_bytes")
#: Why a group's ``peak_memory_bytes`` is what it is, by the device type that made it.
PEAK_MEMORY_NOTES = {
    "cuda": "torch.cuda.max_memory_allocated during the pipeline call (reset before it)",
    "cpu": "null: no accelerator; the process's peak RSS is a lifetime high-water mark "
    "(loading, quantizing) and the emulation holds weights dequantized at the compute "
    "dtype, so it would not measure the format",
}


def timed_call(device: torch.device, call: Callable[[], T]) -> tuple[T, float, int | None]:
    """``call()``, its wall time in seconds and the accelerator's peak memory during it."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    result = call()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    peak = int(torch.cuda.max_memory_allocated(device)) if cuda else None
    return result, seconds, peak


def sample_costs(
    denoiser_bytes: int, seconds: float, n_images: int, peak: int | None, offload: str
) -> dict[str, Any]:
    """The cost fields of each sample one pipeline call of ``n_images`` made."""
    return {
        "denoiser_bytes": denoiser_bytes,
        "seconds_per_image": seconds / n_images,
        "peak_memory_bytes": peak,
        "offload": offload,
    }


def _metas(folder: Path) -> list[dict[str, Any]]:
    metas = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    metas.append(json.loads(tar.extractfile(member).read()))  # type: ignore[union-attr]
    return metas


def summarise_costs(folder: str | Path) -> dict[str, dict[str, Any]]:
    """Per group of ``folder``'s complete shards: the costs its samples recorded
    (`summarise_samples`)."""
    return summarise_samples(_metas(Path(folder)))


def summarise_samples(metas: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per group (`qdd.identity.group_label`): the costs the samples recorded; groups
    whose samples recorded none are left out.

    ``seconds_per_image`` is the median over samples (the first call's warm-up does not
    move it), ``seconds_per_image_mean`` the mean; ``peak_memory_bytes`` the largest call's
    (``None`` when no call measured one, with the reason in ``peak_memory_note``).
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for meta in metas:
        if meta.get("seconds_per_image") is not None:
            groups.setdefault(group_label(meta), []).append(meta)
    summary = {}
    for group, metas in sorted(groups.items()):
        seconds = [m["seconds_per_image"] for m in metas]
        peaks = [m["peak_memory_bytes"] for m in metas if m.get("peak_memory_bytes") is not None]
        devices = sorted({m.get("device") or "unknown" for m in metas})
        summary[group] = {
            "n": len(metas),
            "denoiser_bytes": max(m["denoiser_bytes"] for m in metas),
            "seconds_per_image": statistics.median(seconds),
            "seconds_per_image_mean": statistics.fmean(seconds),
            "peak_memory_bytes": max(peaks) if peaks else None,
            "peak_memory_note": "; ".join(
                f"{d}: {PEAK_MEMORY_NOTES.get(d, 'not measured on this device')}" for d in devices
            ),
            "device_names": sorted({m.get("device_name") or "unknown" for m in metas}),
            "offload": sorted({m.get("offload") or "none" for m in metas}),
        }
    return summary
