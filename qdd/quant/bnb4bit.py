"""bitsandbytes 4-bit (``fp4``, ``nf4``) quantize→dequantize, as its kernels compute it.

The weight is flattened row-major into blocks of 64, each with its fp32 absmax; every value
is scaled into [-1, 1], snapped to one of 16 codes, and dequantized as ``code × absmax`` in
fp32. Two implementations of that recipe differ at exact ties, which bfloat16 weights hit
often (|w / absmax| = 7/12 is a midpoint of FP4), so qdd names which one it reproduces:

- ``cuda`` (the default: the study's images are made on GPUs): ``csrc/kernels.cu``.
  Scale by the GPU's approximate reciprocal of the absmax (`cuda_reciprocal`) in every
  block; decide with the kernels' float-literal thresholds, ``x > t`` taking the upper code
  (FP4 on ``|x|`` with the sign apart, so −0 and tiny negatives give +0; NF4 on signed
  ``x``). An all-zero block scales 0 by 1/0 (NaN), which no comparison accepts: FP4 code 0
  (+0) and NF4 code 0 (−1 × 0 = −0).
- ``cpu``: bitsandbytes' portable PyTorch ``quantize_4bit`` (its CPU path): exact midpoints,
  ties to the lower code, the correctly rounded reciprocal, and the ragged last block
  divided instead. Its packed codes are what any CPU gets; its C++ dequantize agrees with
  this on CPUs without AVX512 (the AVX512 kernels round differently).

Checked bit for bit in tests/quant against bitsandbytes' CUDA output recorded on an H200 and
against the library on CPU (docs/quantization.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

from qdd.quant.cuda_rcp import cuda_reciprocal

BNB_BLOCK = 64
SEMANTICS: tuple[str, ...] = ("cuda", "cpu")

#: bitsandbytes' NF4 code book (dequantized value of each code, fp32).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
#: bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit), in code order, before it is
#: divided by its largest value (12) in fp32 — as bitsandbytes builds it.
FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
           -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)  # fmt: skip

#: ``dQuantizeFP4``'s pivots on |x| (float literals of kernels.cu; not the exact midpoints:
#: 0.583333f < 7/12 and 0.4166667f > 5/12), between the ascending magnitudes of FP4_RAW/12.
CUDA_FP4_THRESHOLDS = (0.00260417, 0.0859375, 0.20833333, 0.29166667,
                       0.4166667, 0.583333, 0.8333333)  # fmt: skip
#: ``dQuantizeNF4``'s pivots on signed x, between consecutive NF4 codes.
CUDA_NF4_THRESHOLDS = (
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
)  # fmt: skip

#: Elements processed at once: bounds the temporary memory on Flux-size weights.
CHUNK = 1 << 24


def bnb_code(precision: str, device: torch.device | str = "cpu") -> Tensor:
    """The 16 dequantized values of bitsandbytes' ``fp4`` or ``nf4``, in code order (fp32)."""
    if precision == "nf4":
        return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    raw = torch.tensor(FP4_RAW, dtype=torch.float32, device=device)
    return raw / raw.abs().max()


def _cuda_blocks(blocks: Tensor, precision: str) -> Tensor:
    """Whole blocks (rows) the way ``kQuantizeBlockwise`` + ``kDequantizeBlockwise`` do."""
    absmax = blocks.abs().amax(dim=-1, keepdim=True)
    x = blocks * cuda_reciprocal(absmax)
    code = bnb_code(precision, blocks.device)
    if precision == "fp4":
        magnitudes = code[:8].sort().values
        pivots = torch.tensor(CUDA_FP4_THRESHOLDS, device=blocks.device)
        value = magnitudes[torch.bucketize(x.abs().nan_to_num(0.0), pivots)]
        value = torch.where(x < 0, -value, value)  # NaN and -0 are not < 0: +0
    else:
        pivots = torch.tensor(CUDA_NF4_THRESHOLDS, device=blocks.device)
        value = code[torch.bucketize(x.nan_to_num(-2.0), pivots)]  # NaN: no branch taken
    return value * absmax


def _cpu_blocks(blocks: Tensor, precision: str, reciprocal: bool) -> Tensor:
    """Whole blocks the way bitsandbytes' PyTorch ``quantize_4bit`` does (nearest code)."""
    absmax = blocks.abs().amax(dim=-1, keepdim=True)
    safe = absmax.clamp(min=1e-38)
    scaled = blocks * (1.0 / safe) if reciprocal else blocks / safe
    values = bnb_code(precision, blocks.device).sort(stable=True).values
    midpoints = (values[:-1] + values[1:]) / 2
    index = torch.bucketize(scaled.clamp(-1, 1), midpoints)
    return values[index] * (absmax if reciprocal else safe)


def bnb_4bit(weight: Tensor, precision: str, semantics: str = "cuda") -> Tensor:
    """bitsandbytes ``quantize_4bit`` then ``dequantize_4bit`` (fp32 result).

    ``semantics``: ``cuda`` (its CUDA kernels, the default) or ``cpu`` (its PyTorch path).
    """
    if semantics not in SEMANTICS:
        raise ValueError(f"unknown bitsandbytes semantics {semantics!r}: one of {SEMANTICS}")
    flat = weight.reshape(-1).float()
    out = torch.empty_like(flat)
    block = BNB_BLOCK
    full = flat.numel() - flat.numel() % block
    step = CHUNK - CHUNK % block
    for start in range(0, full, step):
        stop = min(start + step, full)
        blocks = flat[start:stop].view(-1, block)
        if semantics == "cuda":
            out[start:stop] = _cuda_blocks(blocks, precision).view(-1)
        else:
            out[start:stop] = _cpu_blocks(blocks, precision, reciprocal=True).view(-1)
    if full < flat.numel():  # the ragged last block: padded with zeros on the GPU
        tail = flat[None, full:]
        if semantics == "cuda":
            out[full:] = _cuda_blocks(tail, precision)[0]
        else:
            out[full:] = _cpu_blocks(tail, precision, reciprocal=False)[0]
    return out.view(weight.shape)
