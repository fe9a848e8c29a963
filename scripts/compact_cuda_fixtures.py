"""Cut bitsandbytes' recorded CUDA 4-bit output down to the blocks that tell implementations apart.

The full recordings (``../shared/fixtures/gpu/bnb_cuda_4bit_<dtype>.safetensors``: a
1024×1024 weight quantized on an NVIDIA H200) are 28 MB; the tests keep, per dtype, every
block where the CUDA kernels and a nearest-code quantizer disagree or where the GPU's
reciprocal decides, plus 128 random blocks — so tests/ stands alone.

    python scripts/compact_cuda_fixtures.py ../shared/fixtures/gpu tests/quant/data
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qdd.quant import cuda_rcp
from qdd.quant.bnb4bit import BNB_BLOCK, bnb_4bit


def compact(source: Path, target: Path, dtype: str, random_blocks: int = 128) -> int:
    recorded = load_file(source / f"bnb_cuda_4bit_{dtype}.safetensors")
    weight = recorded["weight"]
    blocks = weight.reshape(-1, BNB_BLOCK)
    keep = torch.zeros(blocks.shape[0], dtype=torch.bool)
    for precision in ("fp4", "nf4"):
        cuda = recorded[f"{precision}.dequantized"].reshape(-1, BNB_BLOCK)
        nearest = bnb_4bit(weight, precision, "cpu").to(weight.dtype).reshape(-1, BNB_BLOCK)
        keep |= (nearest != cuda).any(dim=1)
        keep |= (_without_reciprocal_table(weight, precision) != cuda).any(dim=1)
    generator = torch.Generator().manual_seed(0)
    keep[torch.randperm(blocks.shape[0], generator=generator)[:random_blocks]] = True
    index = keep.nonzero().squeeze(1)
    tensors = {"weight": blocks[index].contiguous(), "block_index": index}
    for precision in ("fp4", "nf4"):
        packed = recorded[f"{precision}.packed"].reshape(-1, BNB_BLOCK // 2)
        tensors[f"{precision}.packed"] = packed[index].contiguous()
        tensors[f"{precision}.absmax"] = recorded[f"{precision}.absmax"][index].contiguous()
        dequantized = recorded[f"{precision}.dequantized"].reshape(-1, BNB_BLOCK)
        tensors[f"{precision}.dequantized"] = dequantized[index].contiguous()
    metadata = _metadata(source / f"bnb_cuda_4bit_{dtype}.safetensors")
    metadata["what"] = (
        f"{len(index)} of {blocks.shape[0]} blocks of the recorded weight (rows of 64; "
        "block_index = position in the flattened weight): every block where bitsandbytes' "
        "CUDA output differs from a nearest-code quantizer or from its own rule with a "
        "correctly rounded reciprocal, plus 128 random blocks"
    )
    save_file(tensors, target / f"bnb_cuda_4bit_{dtype}.safetensors", metadata=metadata)
    return len(index)


def _without_reciprocal_table(weight: torch.Tensor, precision: str) -> torch.Tensor:
    """The CUDA semantics with a correctly rounded reciprocal: where the GPU's differs."""
    original = cuda_rcp.flip_mantissas
    cuda_rcp.flip_mantissas = lambda device="cpu": torch.empty(0, dtype=torch.int32)
    try:
        return bnb_4bit(weight, precision).to(weight.dtype).reshape(-1, BNB_BLOCK)
    finally:
        cuda_rcp.flip_mantissas = original


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        return dict(handle.metadata() or {})


if __name__ == "__main__":
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    target.mkdir(parents=True, exist_ok=True)
    for dtype in ("bfloat16", "float16", "float32"):
        print(dtype, compact(source, target, dtype), "blocks")
