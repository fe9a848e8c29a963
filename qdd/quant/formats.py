"""The precision formats as exact pure-PyTorch quantize→dequantize ("fake quantization").

Each function reproduces one library's numerics operation for operation, so that an image
made with the emulation equals one made with the library's real kernels (checked bit for
bit in tests/quant). Where this code and a paper disagree, the library wins: the study
measures what people actually deploy.

- ``fp4``/``nf4``: bitsandbytes 4-bit, blocks of 64 with an fp32 absmax, as its CUDA
  kernels compute it (their approximate reciprocal and float-literal pivots; the CPU
  library's nearest-code variant on request): `qdd.quant.bnb4bit`.
- ``fp8``: torchao ``Float8WeightOnlyConfig``: e4m3, one scale per output row,
  ``amax / 448`` computed in the weight's own dtype, values divided by it in fp32. An
  all-zero row stays zero here; torchao divides it by its zero scale and gets NaN.
- ``nvfp4``: torchao ``NVFP4WeightOnlyConfig``: E2M1 per 16 values, an E4M3 block scale
  relative to an fp32 per-tensor scale ``amax / (448·6)``; values are multiplied by
  ``(1/tensor_scale)/block_scale``.
- ``mxfp4``: torchao MX: E2M1 per 32 values, a power-of-two E8M0 scale. By default the
  RCEIL rule of torchao's MX inference recipe (``MXDynamicActivationMXWeightConfig``) and of
  Blackwell hardware, ``2^ceil(log2(amax/6))``, so the block maximum is never clipped;
  ``scaling="floor"`` gives ``to_mx``'s default (OCP MX v1.0), ``2^(floor(log2 amax) − 2)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from qdd.quant.bnb4bit import CHUNK, bnb_4bit

#: Weight-only levels (activations stay in the compute dtype).
WEIGHT_ONLY: tuple[str, ...] = ("fp32", "fp16", "fp8", "fp4", "nf4", "nvfp4", "mxfp4")
#: Deployed formats that quantize activations too (`qdd.quant.deployed`).
DEPLOYED: tuple[str, ...] = (
    "fp8-w8a8", "fp8-w8a8-row", "svdq-int4", "svdq-nvfp4", "svdq-int4-datafree",
    "svdq-nvfp4-datafree", "nvfp4-w4a4",
)  # fmt: skip
#: GGUF files, loaded through diffusers' GGUF loader (`qdd.quant.gguf`).
GGUF: tuple[str, ...] = tuple(f"gguf-{t}" for t in ("q8_0", "q5_0", "q5_1", "q4_0", "q4_1", "q4_k"))
PRECISIONS: tuple[str, ...] = WEIGHT_ONLY + DEPLOYED + GGUF
QUANTIZED: frozenset[str] = frozenset({"fp8", "fp4", "nf4", "nvfp4", "mxfp4", *DEPLOYED})

#: E2M1 (FP4 of NVFP4/MXFP4): the non-negative values; the sign is a separate bit.
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_EPS = torch.finfo(torch.float8_e4m3fn).tiny  # torchao clamps block scales to this
NVFP4_BLOCK, MXFP4_BLOCK = 16, 32


def fp8_rowwise(weight: Tensor) -> Tensor:
    """torchao float8 weight-only (e4m3, per-row scale) quantize→dequantize."""
    rows = weight.reshape(weight.shape[0], -1)
    out = torch.empty(rows.shape, dtype=torch.float32, device=weight.device)
    step = max(1, CHUNK // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        chunk = rows[start : start + step]
        scale = (chunk.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).float()
        scaled = torch.where(scale > 0, chunk.float() / scale, 0.0)  # torchao: 0/0 = NaN
        scaled = scaled.clamp(-E4M3_MAX, E4M3_MAX)
        out[start : start + step] = scaled.to(torch.float8_e4m3fn).float() * scale
    return out.view(weight.shape)


def round_to_e2m1(x: Tensor) -> Tensor:
    """Round fp32 values (already within ±6) to the nearest E2M1 value, ties to even.

    E2M1 is evenly spaced within each binade: steps of 0.5 below 2, 1 below 4, 2 up to 6.
    Dividing by the step is exact (a power of two) and ``torch.round`` rounds half to even,
    which is the even-mantissa neighbour: the same result as a nearest-code search with
    ties to even, 2.6x faster.
    """
    magnitude = x.abs()
    step = torch.where(magnitude < 2, 0.5, torch.where(magnitude < 4, 1.0, 2.0))
    return torch.copysign(torch.round(magnitude / step) * step, x)


def _e2m1_blocks(
    weight: Tensor, block: int, scales: Callable[[Tensor], tuple[Tensor, Tensor]]
) -> Tensor:
    """Blocks of ``block`` along the last dim: scale from ``scales``, E2M1 elements."""
    rows = weight.reshape(-1, weight.shape[-1])
    out = torch.empty(rows.shape, dtype=torch.float32, device=weight.device)
    step = max(1, CHUNK // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        blocks = rows[start : start + step].float().unflatten(-1, (-1, block))
        divide_by, multiply_by = scales(blocks)
        elements = round_to_e2m1((blocks * divide_by).clamp(-E2M1_MAX, E2M1_MAX))
        out[start : start + step] = (elements * multiply_by).flatten(-2)
    return out.view(weight.shape)


def nvfp4(weight: Tensor) -> Tensor:
    """torchao NVFP4 weight-only with the dynamic per-tensor scale."""
    if weight.shape[-1] % NVFP4_BLOCK:
        raise ValueError(f"nvfp4 needs the last dim divisible by {NVFP4_BLOCK}")
    tensor_scale = weight.abs().max().float() / (E4M3_MAX * E2M1_MAX)

    def scales(blocks: Tensor) -> tuple[Tensor, Tensor]:
        block_scale = blocks.abs().amax(dim=-1, keepdim=True) / E2M1_MAX
        fp8 = (block_scale / tensor_scale).clamp(E4M3_EPS, E4M3_MAX).to(torch.float8_e4m3fn)
        fp8 = fp8.float()
        return (1.0 / tensor_scale) / fp8, fp8 * tensor_scale

    return _e2m1_blocks(weight, NVFP4_BLOCK, scales)


def _power_of_two(biased_exponent: Tensor) -> Tensor:
    """``2^(e − 127)`` as fp32, bit for bit (``e = 0`` is the subnormal ``2^−127``)."""
    bits = torch.where(biased_exponent > 0, biased_exponent.int() << 23, 1 << 22)
    return bits.view(torch.float32)


def _mx_scales_rceil(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """torchao ``_to_mx_rceil`` (its eager path, also taken on CUDA without compile)."""
    descale = blocks.abs().amax(dim=-1, keepdim=True) / E2M1_MAX
    exponent = torch.ceil(torch.log2(descale)).clamp(-127, 127) + 127
    reciprocal = torch.where(exponent == 0, 1.0, torch.exp2(127 - exponent))
    return reciprocal, _power_of_two(exponent)


def _mx_scales_floor(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """torchao ``to_mx`` FLOOR: ``2^(floor(log2 amax) − 2)``, 2 being log2 of E2M1's max."""
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    exponent = ((amax.view(torch.int32) >> 23) & 0xFF) - 127  # floor(log2(amax))
    biased = (exponent - 2).clamp(-127, 128) + 127
    divisor = (biased << 23).view(torch.float32).clamp(min=torch.finfo(torch.float32).tiny)
    return 1.0 / divisor, _power_of_two(biased)  # ×(1/2^k) is exact: same as torchao's ÷2^k


MX_SCALINGS: dict[str, Callable[[Tensor], tuple[Tensor, Tensor]]] = {
    "rceil": _mx_scales_rceil,
    "floor": _mx_scales_floor,
}


def mxfp4(weight: Tensor, scaling: str = "rceil") -> Tensor:
    """torchao MXFP4 quantize→dequantize (``scaling``: ``rceil`` or ``floor``)."""
    if weight.shape[-1] % MXFP4_BLOCK:
        raise ValueError(f"mxfp4 needs the last dim divisible by {MXFP4_BLOCK}")
    return _e2m1_blocks(weight, MXFP4_BLOCK, MX_SCALINGS[scaling])


FAKE_QUANTIZERS: dict[str, Callable[[Tensor], Tensor]] = {
    "fp8": fp8_rowwise,
    "nvfp4": nvfp4,
    "mxfp4": mxfp4,
}

#: Block size along the last dim that a format needs (Linear layers that miss it stay
#: unquantized, as the real backends refuse them).
LAST_DIM_MULTIPLE = {"nvfp4": NVFP4_BLOCK, "mxfp4": MXFP4_BLOCK}


def fake_quantize(weight: Tensor, precision: str, bnb_semantics: str = "cuda") -> Tensor:
    """Quantize→dequantize one weight with the exact numerics of ``precision`` (fp32 out).

    ``bnb_semantics`` picks which bitsandbytes implementation fp4/nf4 reproduce: ``cuda``
    (its CUDA kernels, the default) or ``cpu`` (its PyTorch path); see `qdd.quant.bnb4bit`.
    """
    if precision in ("fp4", "nf4"):
        with torch.no_grad():
            return bnb_4bit(weight.detach(), precision, bnb_semantics)
    try:
        quantizer = FAKE_QUANTIZERS[precision]
    except KeyError:
        raise ValueError(
            f"{precision!r} is not a quantized precision: one of "
            f"{sorted(['fp4', 'nf4', *FAKE_QUANTIZERS])}"
        ) from None
    with torch.no_grad():
        return quantizer(weight.detach())
