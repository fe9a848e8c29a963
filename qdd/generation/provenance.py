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

LIBRARIES = ("diffusers", "bitsandbytes", "torchao")

#: What each emulated precision reproduces (see qdd.quant.formats).
EMULATION = {
    "fp8": "torchao-float8-rowwise",
    "nvfp4": "torchao-nvfp4",
    "mxfp4": "torchao-mx-rceil",
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
    import platform

    return platform.processor() or platform.machine()


def provenance(device: torch.device | str, precision: str, backend: str) -> dict[str, Any]:
    """The provenance fields of every sample made on ``device`` with ``backend``."""
    return {
        "device": torch.device(device).type,
        "device_name": device_name(device),
        "torch_version": torch.__version__,  # with its build tag (+cu130, +cpu)
        **{f"{name}_version": library_version(name) for name in LIBRARIES},
        "emulation": emulation_semantics(precision, backend),
    }
