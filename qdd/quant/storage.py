"""Storage layouts: the bytes one Linear weight takes in each format, from its shape alone.

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

Which formula a precision uses is declared in `qdd.quant.registry`; `qdd.quant.size` adds
up a whole module. Activation scales of the W8A8/W4A4 formats are computed on the fly: no
bytes.
"""

from __future__ import annotations

from math import ceil

import torch

from qdd.quant.bnb4bit import BNB_BLOCK
from qdd.quant.formats import MXFP4_BLOCK, NVFP4_BLOCK

FP32_BYTES = 4
HALF_BYTES = 2  #: fp16/bf16 scales, low-rank branches and smoothing vectors
#: torchao's swizzled NVFP4 scale layout pads the (rows, in/16) scale matrix to these tiles.
NVFP4_SCALE_TILE = (128, 4)

#: GGUF block types: (values per block, bytes per block), as ggml's block structs define them
#: (Q8_0: fp16 scale + 32 int8; Q5_0: fp16 scale + 4 B high bits + 16 B nibbles; Q5_1: + an
#: fp16 min; Q4_0: fp16 scale + 16 B; Q4_1: + fp16 min; Q4_K: super-blocks of 256 with fp16
#: d/dmin, 12 B of 6-bit sub-scales and 128 B of nibbles).
GGUF_BLOCKS: dict[str, tuple[int, int]] = {
    "Q8_0": (32, 34),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q4_K": (256, 144),
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


def svdq_bytes(rows: int, cols: int, weight_format: str, rank: int, group: int) -> int:
    """nunchaku SVDQuant W4A4: 4-bit residual + scales + low-rank branch + smoothing vector.

    ``weight_format``: ``int4`` (a 16-bit scale per ``group`` inputs) or ``nvfp4`` (an e4m3
    scale per ``group`` inputs, a 16-bit scale per output and an fp32 tensor scale).
    """
    codes = ceil(rows * cols / 2)
    if weight_format == "int4":
        scales = HALF_BYTES * rows * ceil(cols / group)
    elif weight_format == "nvfp4":
        scales = rows * ceil(cols / group) + HALF_BYTES * rows + FP32_BYTES
    else:
        raise ValueError(f"unknown SVDQuant weight format {weight_format!r}: int4 or nvfp4")
    low_rank = HALF_BYTES * rank * (rows + cols)
    smoothing = HALF_BYTES * cols
    return codes + scales + low_rank + smoothing


