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
from torch import Tensor, nn

from qdd.quant.bnb4bit import CHUNK

#: E2M1 (FP4 of NVFP4/MXFP4): the non-negative values; the sign is a separate bit.
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_EPS = torch.finfo(torch.float8_e4m3fn).tiny  # torchao clamps block scales to this
NVFP4_BLOCK, MXFP4_BLOCK = 16, 32


def safe_scale(scale: Tensor) -> Tensor:
    """A zero scale (all-zero input) divides as 1: the values stay zero instead of NaN."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def fp8_row_codes(rows: Tensor) -> tuple[Tensor, Tensor]:
    """torchao ``_choose_scale_float8`` + ``_quantize_affine_float8`` per row: e4m3 codes and
    the fp32 scale ``amax/448`` (computed in the rows' own dtype). A zero row stays zero
    (torchao: 0/0 = NaN)."""
    scale = (rows.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).float()
    codes = (rows.float() / safe_scale(scale)).clamp(-E4M3_MAX, E4M3_MAX)
    return codes.to(torch.float8_e4m3fn), scale


def fp8_rowwise(weight: Tensor) -> Tensor:
    """torchao float8 weight-only (e4m3, per-row scale) quantize→dequantize."""
    rows = weight.reshape(weight.shape[0], -1)
    out = torch.empty(rows.shape, dtype=torch.float32, device=weight.device)
    step = max(1, CHUNK // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        codes, scale = fp8_row_codes(rows[start : start + step])
        out[start : start + step] = codes.float() * scale
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


def _nvfp4_scales(weight: Tensor) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """torchao NVFP4's block scales: E4M3 relative to the fp32 tensor scale ``amax/(448·6)``;
    values are multiplied by ``(1/tensor_scale)/block_scale``."""
    if weight.shape[-1] % NVFP4_BLOCK:
        raise ValueError(f"nvfp4 needs the last dim divisible by {NVFP4_BLOCK}")
    tensor_scale = weight.abs().max().float() / (E4M3_MAX * E2M1_MAX)

    def scales(blocks: Tensor) -> tuple[Tensor, Tensor]:
        block_scale = blocks.abs().amax(dim=-1, keepdim=True) / E2M1_MAX
        fp8 = (block_scale / tensor_scale).clamp(E4M3_EPS, E4M3_MAX).to(torch.float8_e4m3fn)
        fp8 = fp8.float()
        return (1.0 / tensor_scale) / fp8, fp8 * tensor_scale

    return scales


def nvfp4(weight: Tensor) -> Tensor:
    """torchao NVFP4 weight-only with the dynamic per-tensor scale."""
    return _e2m1_blocks(weight, NVFP4_BLOCK, _nvfp4_scales(weight))


def nvfp4_codes(weight: Tensor) -> tuple[Tensor, Tensor]:
    """torchao NVFP4 as E2M1 codes (fp32, the weight's shape) and the per-block scale
    ``e4m3 × tensor scale`` (``[..., in/16, 1]``): ``nvfp4(w)`` is their product."""
    blocks = weight.float().unflatten(-1, (-1, NVFP4_BLOCK))
    divide_by, multiply_by = _nvfp4_scales(weight)(blocks)
    codes = round_to_e2m1((blocks * divide_by).clamp(-E2M1_MAX, E2M1_MAX))
    return codes.flatten(-2), multiply_by


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


class UnfusedBiasLinear(nn.Linear):
    """``x @ W.T`` then ``+ bias``: torchao's float8 weight-only layers add the bias apart
    from the matmul, which rounds differently from ``F.linear``'s fused add in bf16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.matmul(x, self.weight.t())
        return out if self.bias is None else out + self.bias
