"""What a denoiser weighs as each format stores it: the deployed size, not the emulation's.

The emulation holds dequantized weights at the compute dtype, so its tensors say nothing
about what a user of the real format keeps in memory. These functions count the bytes the
real storage layout holds, from the weight's shape alone, so the same figure comes out of
an emulated run, a real-library run and a ``--dry-run`` on a meta-device model:

- bitsandbytes ``fp4``/``nf4`` (``Params4bit``, ``bitsandbytes/functional.py``
  ``quantize_4bit``): the flattened weight packed two codes per byte, one fp32 absmax per
  block of 64. Nested quantization of the absmax (``compress_statistics``) is off in qdd's
  recipe and in diffusers' ``BitsAndBytesConfig`` default (``bnb_4bit_use_double_quant``
  False), so it is not modelled. The 16-entry code book (64 B per layer) is left out.
- torchao float8 (``Float8Tensor``): one e4m3 byte per value and an fp32 scale per row
  (``PerRow``, weight-only and ``fp8-w8a8-row``) or per tensor (``fp8-w8a8``).
- torchao NVFP4 (``NVFP4Tensor``): two E2M1 values per byte, one e4m3 scale per 16 values
  stored swizzled (padded to tiles of 128 rows × 4 scale columns), one fp32 per-tensor scale.
- MXFP4 (OCP MX v1.0, torchao ``MXTensor``): two E2M1 values per byte, one e8m0 byte per 32.
- GGUF (ggml ``ggml-common.h`` block structs, ``gguf.GGML_QUANT_SIZES``): rows quantized in
  blocks along the input dimension; a GGUF file's size is the sum of its tensors' bytes.
- nunchaku SVDQuant (``nunchaku/models/linear.py`` ``SVDQW4A4Linear``): packed 4-bit
  weights (``qweight``), ``wscales`` (int4: a 16-bit scale per 64 inputs; nvfp4: an e4m3
  scale per 16, plus a 16-bit ``wcscales`` per output and an fp32 ``wtscale``), the rank-32
  low-rank branch ``proj_down`` (in × r) + ``proj_up`` (out × r) in 16 bit, and the 16-bit
  smoothing vector (nunchaku also carries an unused copy, ``smooth_factor_orig``: not counted).

Everything else the checkpoint holds (biases, norms, convolutions, embeddings, persistent
buffers, layers a format leaves out) counts at its own dtype. Activation scales of the
W8A8/W4A4 formats are computed on the fly: no bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from math import ceil
from pathlib import Path

import torch
from torch import nn

FP32_BYTES = 4
HALF_BYTES = 2  #: fp16/bf16 scales, low-rank branches and smoothing vectors
BNB_BLOCK = 64
NVFP4_BLOCK, MXFP4_BLOCK = 16, 32
#: torchao's swizzled NVFP4 scale layout pads the (rows, in/16) scale matrix to these tiles.
NVFP4_SCALE_TILE = (128, 4)
SVDQ_RANK = 32
SVDQ_INT4_GROUP = 64

#: GGUF block types: (values per block, bytes per block), as ggml's block structs define them
#: (Q8_0: fp16 scale + 32 int8; Q5_0: fp16 scale + 4 B high bits + 16 B nibbles; Q5_1: + an
#: fp16 min; Q4_0: fp16 scale + 16 B; Q4_1: + fp16 min; Q4_K: super-blocks of 256 with fp16
#: d/dmin, 12 B of 6-bit sub-scales and 128 B of nibbles).
GGUF_BLOCKS: dict[str, tuple[int, int]] = {
    "q8_0": (32, 34),
    "q5_0": (32, 22),
    "q5_1": (32, 24),
    "q4_0": (32, 18),
    "q4_1": (32, 20),
    "q4_k": (256, 144),
}


def dense_bytes(numel: int, dtype: torch.dtype) -> int:
    """An unquantized tensor: its values at their dtype."""
    return numel * dtype.itemsize


def bnb_4bit_bytes(numel: int) -> int:
    """bitsandbytes fp4/nf4: ``ceil(n/2)`` packed codes + an fp32 absmax per 64 values."""
    return ceil(numel / 2) + FP32_BYTES * ceil(numel / BNB_BLOCK)


def fp8_bytes(rows: int, cols: int, per_row: bool = True) -> int:
    """torchao float8: one byte per value + an fp32 scale per row (or one per tensor)."""
    return rows * cols + FP32_BYTES * (rows if per_row else 1)


def nvfp4_bytes(rows: int, cols: int) -> int:
    """torchao NVFP4: ½ byte per value + swizzled e4m3 scales per 16 + an fp32 tensor scale."""
    tile_rows, tile_cols = NVFP4_SCALE_TILE
    scale_rows = ceil(rows / tile_rows) * tile_rows
    scale_cols = ceil(ceil(cols / NVFP4_BLOCK) / tile_cols) * tile_cols
    return ceil(rows * cols / 2) + scale_rows * scale_cols + FP32_BYTES


def mxfp4_bytes(numel: int) -> int:
    """MXFP4: ½ byte per value + one e8m0 byte per block of 32."""
    return ceil(numel / 2) + ceil(numel / MXFP4_BLOCK)


def gguf_bytes(rows: int, cols: int, block_type: str) -> int:
    """A GGUF-quantized matrix: each row in whole blocks of its type along the inputs."""
    values, size = GGUF_BLOCKS[block_type]
    return rows * ceil(cols / values) * size


def svdq_bytes(rows: int, cols: int, weight_format: str, rank: int = SVDQ_RANK) -> int:
    """nunchaku SVDQuant W4A4: 4-bit residual + scales + low-rank branch + smoothing vector.

    ``weight_format``: ``int4`` (a 16-bit scale per 64 inputs) or ``nvfp4`` (an e4m3 scale
    per 16 inputs, a 16-bit scale per output and an fp32 tensor scale).
    """
    codes = ceil(rows * cols / 2)
    if weight_format == "int4":
        scales = HALF_BYTES * rows * ceil(cols / SVDQ_INT4_GROUP)
    elif weight_format == "nvfp4":
        scales = rows * ceil(cols / NVFP4_BLOCK) + HALF_BYTES * rows + FP32_BYTES
    else:
        raise ValueError(f"unknown SVDQuant weight format {weight_format!r}: int4 or nvfp4")
    low_rank = HALF_BYTES * rank * (rows + cols)
    smoothing = HALF_BYTES * cols
    return codes + scales + low_rank + smoothing


def quantized_weight_bytes(precision: str, rows: int, cols: int) -> int:
    """The bytes of one (rows × cols) Linear weight stored in ``precision``'s format."""
    if precision in ("fp4", "nf4"):
        return bnb_4bit_bytes(rows * cols)
    if precision in ("fp8", "fp8-w8a8-row"):
        return fp8_bytes(rows, cols, per_row=True)
    if precision == "fp8-w8a8":
        return fp8_bytes(rows, cols, per_row=False)
    if precision in ("nvfp4", "nvfp4-w4a4"):
        return nvfp4_bytes(rows, cols)
    if precision == "mxfp4":
        return mxfp4_bytes(rows * cols)
    if precision.startswith("gguf-"):
        return gguf_bytes(rows, cols, precision.removeprefix("gguf-"))
    if precision.startswith("svdq-"):  # the smoothing does not change the stored layout
        return svdq_bytes(rows, cols, precision.removeprefix("svdq-").removesuffix("-datafree"))
    raise ValueError(f"{precision!r} has no quantized storage format")


def module_bytes(module: nn.Module, precision: str, quantized: Iterable[str] = ()) -> int:
    """Deployed bytes of ``module``: the weights of the Linear layers named in ``quantized``
    in ``precision``'s format, every other tensor of its state dict (parameters and
    persistent buffers, e.g. SD3's position embedding) at its own dtype.

    Works on a meta-device module too (shapes and dtypes only), which is how ``--dry-run``
    weighs a denoiser without its weights.
    """
    names = set(quantized)
    layers = dict(module.named_modules())
    missing = names - set(layers)
    if missing:
        raise ValueError(f"no layer named {sorted(missing)[0]!r} in the module")
    total = 0
    stored: set[int] = set()
    for name in names:
        layer = layers[name]
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"{name} is a {type(layer).__name__}, not a Linear layer")
        total += quantized_weight_bytes(precision, layer.out_features, layer.in_features)
        stored.add(id(layer.weight))
    for tensor in module.state_dict(keep_vars=True).values():  # shared tensors count once
        if id(tensor) not in stored:
            stored.add(id(tensor))
            total += dense_bytes(tensor.numel(), tensor.dtype)
    return total


def gguf_file_bytes(path: str | Path) -> int:
    """A GGUF file's tensor data: the sum of its tensors' ``n_bytes`` (header excluded)."""
    from gguf import GGUFReader

    return sum(int(tensor.n_bytes) for tensor in GGUFReader(str(path)).tensors)
