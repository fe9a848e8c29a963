"""Deployed sizes (qdd.quant.size) against the bytes the real libraries store, on CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from qdd.quant import quantize_module_
from qdd.quant.backends import quantized_layers
from qdd.quant.size import gguf_file_bytes, module_bytes, quantized_weight_bytes
from qdd.quant.storage import GGUF_BLOCKS, gguf_bytes, svdq_bytes

FOUR_BIT = ("fp4", "nf4", "nvfp4", "mxfp4")


class TinyDenoiser(nn.Module):
    """Linear layers of several shapes (one too narrow for the block formats), a conv and a
    norm: the parts a denoiser has, small enough to count by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 32, 3)  # never quantized
        self.proj = nn.Linear(32, 128)
        self.mlp = nn.Linear(128, 256)
        self.out = nn.Linear(256, 96, bias=False)
        self.odd = nn.Linear(40, 32)  # 40 inputs: no whole NVFP4/MXFP4 block
        self.norm = nn.LayerNorm(96)


def tiny(dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    torch.manual_seed(0)
    return TinyDenoiser().to(dtype)


def library_weight_bytes(weight: torch.Tensor, precision: str) -> int:
    """What the real library stores for one weight, read off its own tensors (CPU)."""
    if precision in ("fp4", "nf4"):
        import bitsandbytes as bnb

        param = bnb.nn.Params4bit(
            weight.clone(), requires_grad=False, quant_type=precision, blocksize=64,
            compress_statistics=False,
        ).to("cpu")  # fmt: skip
        return param.data.nbytes + param.quant_state.absmax.nbytes
    if precision == "mxfp4":
        from torchao.prototype.mx_formats.mx_tensor import MXTensor

        mx = MXTensor.to_mx(weight, torch.float4_e2m1fn_x2, block_size=32)
        return mx.qdata.nbytes + mx.scale.nbytes
    from torchao.quantization import quantize_

    from qdd.quant.backends import torchao_config

    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    layer.weight.data.copy_(weight)
    quantize_(layer, torchao_config(precision))
    stored = layer.weight
    names = [*stored.tensor_data_names, *getattr(stored, "optional_tensor_data_names", [])]
    return sum(getattr(stored, n).nbytes for n in names if getattr(stored, n) is not None)


@pytest.mark.parametrize("precision", ["fp4", "nf4", "fp8", "nvfp4", "mxfp4"])
def test_denoiser_bytes_equal_the_libraries_storage(precision: str) -> None:
    """Quantized weights as the library stores them + every other parameter at bf16."""
    module = tiny()
    report = quantize_module_(tiny(), precision, "emulate", torch.bfloat16)
    layers = quantized_layers(module, precision)
    expected = sum(library_weight_bytes(m.weight.data, precision) for m in layers.values())
    skipped = {id(m.weight) for m in layers.values()}
    expected += sum(2 * p.numel() for p in module.parameters() if id(p) not in skipped)
    assert report.deployed_bytes == module_bytes(module, precision, layers) == expected
    narrow = precision in ("nvfp4", "mxfp4")
    assert ("odd" in layers) is not narrow  # the 40-input layer stays bf16 where it must


def test_hand_count_of_fp4_and_fp8() -> None:
    """The same figures from arithmetic alone, layer by layer."""
    module = tiny()
    linear = [(128, 32), (256, 128), (96, 256), (32, 40)]  # (out, in)
    weights = sum(o * i for o, i in linear)
    others = (32 * 4 * 9 + 32) + 128 + 256 + 32 + 2 * 96  # conv, biases, norm
    # fp4/nf4: half a byte per value + a 4-byte absmax per 64 values (every layer divides)
    fp4 = sum(o * i // 2 + 4 * (o * i // 64) for o, i in linear) + 2 * others
    assert quantize_module_(module, "fp4", "emulate", torch.bfloat16).deployed_bytes == fp4
    # fp8: one byte per value + a 4-byte scale per output row
    fp8 = sum(o * i + 4 * o for o, i in linear) + 2 * others
    assert quantize_module_(tiny(), "fp8", "emulate", torch.bfloat16).deployed_bytes == fp8
    assert quantize_module_(tiny(), "fp32", "none", torch.float32).deployed_bytes == 4 * (
        weights + others
    )
    assert quantize_module_(tiny(), "fp16", "none", torch.float16).deployed_bytes == 2 * (
        weights + others
    )


@pytest.mark.parametrize("precision", ["fp4", "nf4", "fp8", "nvfp4", "mxfp4"])
def test_quantized_denoiser_shrinks(precision: str) -> None:
    """4-bit formats below 0.4x of fp32, fp8 below 0.6x, on a denoiser that is mostly Linear."""
    fp32 = quantize_module_(tiny(torch.float32), "fp32", "none", torch.float32).deployed_bytes
    size = quantize_module_(tiny(), precision, "emulate", torch.bfloat16).deployed_bytes
    assert size / fp32 < (0.4 if precision in FOUR_BIT else 0.6)


def test_real_torchao_fp8_module_matches() -> None:
    """torchao's float8 on CPU: the quantized module's own tensors sum to the report."""
    module = tiny()
    report = quantize_module_(module, "fp8", "torchao", torch.bfloat16)
    total = 0
    for parameter in module.parameters():
        data = parameter.data  # a torchao Float8Tensor for the quantized weights
        if hasattr(data, "tensor_data_names"):
            total += sum(getattr(data, n).nbytes for n in data.tensor_data_names)
        else:
            total += parameter.nbytes
    assert report.deployed_bytes == total


def test_meta_module_weighs_the_same() -> None:
    """--dry-run weighs a meta-device module: same shapes, same bytes, no storage."""
    with torch.device("meta"):
        meta = TinyDenoiser().to(torch.bfloat16)
    assert all(p.is_meta for p in meta.parameters())
    for precision in ("fp4", "fp8", "nvfp4", "mxfp4"):
        real = quantize_module_(tiny(), precision, "emulate", torch.bfloat16).deployed_bytes
        assert module_bytes(meta, precision, quantized_layers(meta, precision)) == real


@pytest.mark.parametrize("block_type", sorted(GGUF_BLOCKS))
def test_gguf_blocks_match_the_gguf_library(block_type: str) -> None:
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, block_type)
    values, size = gguf.GGML_QUANT_SIZES[qtype]
    assert gguf_bytes(12, 512, block_type) == 12 * 512 // values * size
    precision = f"gguf-{block_type.lower()}"
    assert quantized_weight_bytes(precision, 12, 512) == gguf_bytes(12, 512, block_type)
    if block_type != "Q4_K":  # gguf-py quantizes the legacy types in numpy
        data = np.random.default_rng(0).standard_normal((12, 512)).astype(np.float32)
        assert gguf.quants.quantize(data, qtype).nbytes == gguf_bytes(12, 512, block_type)


def test_gguf_file_bytes_sum_its_tensors(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "qdd-test")
    rng = np.random.default_rng(0)
    q8 = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32),
                              gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
    writer.add_tensor("blk.0.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.bias", rng.standard_normal(4).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf_file_bytes(path) == gguf_bytes(4, 64, "Q8_0") + 4 * 4


@pytest.mark.parametrize("weight_format", ["int4", "nvfp4"])
def test_svdquant_layout(weight_format: str) -> None:
    """nunchaku's SVDQW4A4Linear tensors for a 256 -> 128 layer, rank 32, bf16."""
    out_features, in_features, rank = 128, 256, 32
    group = 64 if weight_format == "int4" else 16
    scale_dtype = torch.bfloat16 if weight_format == "int4" else torch.float8_e4m3fn
    with torch.device("meta"):
        tensors = [
            torch.empty(out_features, in_features // 2, dtype=torch.int8),  # qweight
            torch.empty(in_features // group, out_features, dtype=scale_dtype),  # wscales
            torch.empty(in_features, dtype=torch.bfloat16),  # smooth_factor
            torch.empty(in_features, rank, dtype=torch.bfloat16),  # proj_down
            torch.empty(out_features, rank, dtype=torch.bfloat16),  # proj_up
        ]
        if weight_format == "nvfp4":
            tensors += [torch.empty(out_features, dtype=torch.bfloat16),  # wcscales
                        torch.empty((), dtype=torch.float32)]  # wtscale  # fmt: skip
    expected = sum(t.numel() * t.element_size() for t in tensors)
    assert svdq_bytes(out_features, in_features, weight_format, rank, group) == expected
    for precision in (f"svdq-{weight_format}", f"svdq-{weight_format}-datafree"):
        assert quantized_weight_bytes(precision, out_features, in_features) == expected


def test_w8a8_and_w4a4_formats() -> None:
    assert quantized_weight_bytes("fp8-w8a8", 128, 256) == 128 * 256 + 4
    assert quantized_weight_bytes("fp8-w8a8-row", 128, 256) == 128 * 256 + 4 * 128
    # NVFP4: 128 x 256 fills whole 128 x 4 scale tiles: no padding
    assert quantized_weight_bytes("nvfp4-w4a4", 128, 256) == 128 * 128 + 128 * 16 + 4
    with pytest.raises(ValueError, match="no quantized storage"):
        quantized_weight_bytes("fp32", 4, 4)
