"""Where and with what a sample was made: device, library versions, emulation semantics.

Two images of one recipe can still differ by the machine that made them (a GPU's kernels
round differently from the emulation of them); each sample's json says which, so a reader
can tell a CUDA-made FP4 image from an emulated one years later.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

from qdd.quant.cuda_rcp import table_source
from qdd.quant.deployed import describe

LIBRARIES = ("diffusers", "bitsandbytes", "torchao")

#: What each emulated precision reproduces (see qdd.quant.formats).
EMULATION = {
    "fp8": "torchao-float8-rowwise",
    "nvfp4": "torchao-nvfp4",
    "mxfp4": "torchao-mx-rceil",
    "fp8-w8a8": "comfyui-fp8-scaled-dynamic-input",
    "fp8-w8a8-row": "torchao-float8-dynamic-rowwise",
    "svdq-int4": "svdquant-calibrated/comfy-kitchen-eager",
    "svdq-nvfp4": "svdquant-calibrated",
    "svdq-int4-datafree": "svdquant-data-free/comfy-kitchen-eager",
    "svdq-nvfp4-datafree": "svdquant-data-free",
    "nvfp4-w4a4": "modelopt-nvfp4/torchao-nvfp4-dynamic",
}


def library_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def emulation_semantics(precision: str, backend: str) -> str | None:
    """The numerics an emulated precision follows; ``None`` when a real library ran."""
    if backend != "emulate":
        return None
    if precision in ("fp4", "nf4"):
        return f"bitsandbytes-cuda/rcp-{table_source()}"
    return EMULATION[precision]


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what ``platform`` knows)."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: torch.device | str) -> dict[str, Any]:
    """What decides the kernels: the CPU model and torch's CPU capability (AVX2, AVX512 …:
    bitsandbytes' CPU kernels round by it) on CPU, the compute capability on a GPU."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {"compute_capability": f"{major}.{minor}"}
    return {"cpu_model": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def provenance(
    device: torch.device | str,
    precision: str,
    backend: str,
    compute_dtype: str | None = None,
    kept: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The provenance fields of every sample made on ``device`` with ``backend``: hardware,
    library versions, emulation semantics, and the format (weight/activation formats, group
    size, rank, the Linear layers left unquantized)."""
    return {
        "device": torch.device(device).type,
        "device_name": device_name(device),
        **hardware(device),
        "torch_version": torch.__version__,  # with its build tag (+cu130, +cpu)
        **{f"{name}_version": library_version(name) for name in LIBRARIES},
        "emulation": emulation_semantics(precision, backend),
        **describe(precision, compute_dtype or "unknown"),
        "kept": list(kept),
    }
