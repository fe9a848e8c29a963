"""The reciprocal that bitsandbytes' CUDA kernels compute: ``1.0f / absmax`` under fast math.

bitsandbytes builds its CUDA kernels with ``--use_fast_math``, so ``1.0f / absmax`` in
``kQuantizeBlockwise`` is the GPU's approximate reciprocal (``rcp.approx.ftz.f32``, the SFU's
MUFU.RCP), not the correctly rounded one. PTX documents it to within 1 ulp: it is one of the
two floats around ``1/a``, usually the nearest, sometimes the other. The choice depends only
on the 23-bit mantissa of ``a`` (the exponent just shifts the result), so one set of
mantissas — those where the GPU takes the other neighbour — describes it completely.

``MEASURED_FLIPS`` holds the mantissas known so far to flip, read off bitsandbytes' own CUDA
output recorded on an NVIDIA H200 (tests/quant/data/, the 1024×1024 fixtures in bfloat16,
float16 and float32): for each block whose codes could only come from one neighbour, that
neighbour. 70 other mantissas were seen to round to nearest; the remaining ones are not yet
measured and are taken as nearest. ``scripts/measure_cuda_rcp.py`` measures all 2^23 on any
NVIDIA GPU in seconds and writes ``qdd/quant/data/cuda_rcp_flips.npy``, which replaces this
list when present (see docs/quantization.md).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

#: Mantissas (float32 bits 0–22) whose GPU reciprocal is the farther of the two neighbours.
MEASURED_FLIPS: tuple[int, ...] = (
    0x016000, 0x01C000, 0x040000, 0x07C000, 0x0D0000, 0x160000, 0x304000, 0x394000,
    0x4CC000, 0x514000, 0x5B0000, 0x624FB0, 0x6D0000, 0x730000, 0x760000, 0x778000,
    0x790000, 0x7E4000,
)  # fmt: skip

#: A complete table measured on a GPU (sorted int32 mantissas), used instead when present.
FULL_TABLE = Path(__file__).parent / "data" / "cuda_rcp_flips.npy"


@lru_cache(maxsize=4)
def flip_mantissas(device: str = "cpu") -> Tensor:
    """Sorted int32 tensor of the mantissas where the GPU's reciprocal is not the nearest."""
    if FULL_TABLE.is_file():
        import numpy as np

        values = torch.from_numpy(np.load(FULL_TABLE).astype("int32"))
    else:
        values = torch.tensor(MEASURED_FLIPS, dtype=torch.int32)
    return values.sort().values.to(device)


def table_source() -> str:
    """Which table `cuda_reciprocal` uses, for provenance: ``measured-18`` or ``full``."""
    return "full" if FULL_TABLE.is_file() else f"measured-{len(MEASURED_FLIPS)}"


def cuda_reciprocal(a: Tensor) -> Tensor:
    """``1.0f / a`` as bitsandbytes' CUDA kernels get it (float32 in, float32 out)."""
    a = a.float()
    nearest = 1.0 / a  # correctly rounded; 1/0 = inf as on the GPU
    bits = nearest.view(torch.int32)
    flips = flip_mantissas(str(a.device))
    mantissa = a.view(torch.int32) & 0x7FFFFF
    flip = torch.isin(mantissa, flips) & torch.isfinite(nearest) & (a != 0)
    below = nearest.double() < 1.0 / a.double()  # the other neighbour is one ulp up
    other = torch.where(below, bits + 1, bits - 1).view(torch.float32)
    return torch.where(flip, other, nearest)
