"""GGUF files qdd writes: city96's type rules, llama.cpp's bytes, and what diffusers reads back."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from qdd.errors import QddError
from qdd.quant.gguf import (
    GGUF_PRECISIONS,
    KEEP,
    WRITABLE,
    check_writable,
    linear_weight_names,
    precision_of,
    read_tensor_types,
    tensor_type,
    type_counts,
    write_gguf,
)

Q = gguf.GGMLQuantizationType


class TinyDiT(nn.Module):
    """Names and shapes as in a diffusers SD3 transformer: blocks, keep-listed layers, odd rows."""

    def __init__(self) -> None:
        super().__init__()
        self.pos_embed = nn.Module()
        self.pos_embed.proj = nn.Conv2d(4, 64, 2)  # 1,024 values: F32 whatever the list says
        self.pos_embed.register_buffer("pos_embed", torch.randn(1, 64, 64))  # 3-D: F32
        self.context_embedder = nn.Linear(64, 64)  # keep-listed
        self.block = nn.Module()
        self.block.to_q = nn.Linear(64, 64)
        self.block.ff = nn.Linear(256, 64)
        self.block.odd = nn.Linear(48, 64)  # 48 values per row: no 32-block divides it (F16)
        self.block.small = nn.Linear(16, 32)  # 512 values: F32
        self.proj_out = nn.Linear(64, 16)  # keep-listed
        with torch.no_grad():
            self.block.to_q.weight[3] = 0.0  # an all-zero block
            self.block.ff.weight[0, 5] = 0.9  # an outlier
            self.block.ff.weight[1, :32] = 1e-30  # tiny values
        self.to(torch.bfloat16)  # qdd quantizes the half-dtype weights


@pytest.fixture(scope="module")
def tiny_dit() -> TinyDiT:
    torch.manual_seed(0)
    return TinyDiT()


def test_type_rules_follow_city96() -> None:
    rules = {
        ("pos_embed.proj.bias", (64,), True): "F32",  # 1-D
        ("block.small.weight", (32, 16), True): "F32",  # <= 1,024 values
        ("pos_embed.pos_embed", (1, 64, 64), False): "F32",  # not a Linear weight
        ("context_embedder.weight", (64, 64), True): "F32",  # keep list
        ("proj_out.weight", (16, 64), True): "F32",
        ("block.odd.weight", (64, 48), True): "F16",  # rows not made of blocks: F16 fallback
        ("block.ff.weight", (64, 256), True): "Q4_0",
    }
    for (name, shape, linear), expected in rules.items():
        assert tensor_type(name, shape, "gguf-q4_0", "sd3", linear) == expected, name
    assert tensor_type("x_embedder.weight", (64, 64), "gguf-q8_0", "flux", True) == "F32"
    assert tensor_type("x_embedder.weight", (64, 64), "gguf-q8_0", "sd3", True) == "Q8_0"


@pytest.mark.parametrize("precision", sorted(WRITABLE))
def test_written_tensors_round_trip_bit_for_bit(
    precision: str, tiny_dit: TinyDiT, tmp_path: Path
) -> None:
    """What the file holds is llama.cpp's quantization (gguf-py's reference port) of the
    half-dtype weights, dequantizes to values that quantize back to the same bytes, and the
    unquantized tensors are the weights exactly."""
    state = tiny_dit.state_dict()
    written = write_gguf(
        state, linear_weight_names(tiny_dit), precision, "sd3", tmp_path / "m.gguf"
    )
    qtype = precision.removeprefix("gguf-").upper()
    assert type_counts(written.types) == {"F16": 1, "F32": 12, qtype: 2}
    assert written.keep == KEEP["sd3"]
    reader = gguf.GGUFReader(str(written.path))
    assert {t.name: t.tensor_type.name for t in reader.tensors} == written.types
    for tensor in reader.tensors:
        source = state[tensor.name].float().numpy()
        kind = tensor.tensor_type
        stored = np.asarray(tensor.data)
        assert np.array_equal(stored, gguf.quants.quantize(source, kind)), tensor.name
        values = gguf.quants.dequantize(stored, kind).reshape(source.shape)
        if kind == Q.F32:
            assert np.array_equal(values, source)
        elif kind == Q.F16:
            assert np.array_equal(values, source.astype(np.float16).astype(np.float32))
        else:
            again = gguf.quants.quantize(values.reshape(stored.shape[0], -1), kind)
            assert np.array_equal(gguf.quants.dequantize(again, kind).reshape(source.shape), values)
            # the bytes too, but for the sign of a zero scale (Q4_0: 0 / -8 = -0; 1e-30 / 8
            # underflows in float16): such blocks dequantize to zeros either way
            size = gguf.GGML_QUANT_SIZES[kind][1]
            blocks, blocks_again = stored.reshape(-1, size), again.reshape(-1, size)
            scaled = blocks[:, :2].copy().view(np.float16)[:, 0] != 0
            assert np.array_equal(blocks_again[scaled], blocks[scaled]), tensor.name
            assert (~scaled).sum() < 8
            err = np.abs(values - source).max() / np.abs(source).max()
            assert 0 < err < 0.2


def float16_dequantize(stored: np.ndarray, kind: Q) -> np.ndarray:
    """llama.cpp's dequantization formula with every operation rounded to float16.

    The codes ``q`` are read back from gguf-py's float32 dequantization (``d * q`` is exact
    in float32), then ``d * q`` (and ``+ m`` for the _1 types) are rounded to float16.
    """
    block, size = gguf.GGML_QUANT_SIZES[kind]
    blocks = stored.reshape(-1, size)
    d = blocks[:, :2].copy().view(np.float16)
    exact = gguf.quants.dequantize(stored, kind).reshape(-1, block)
    divisor = np.where(d == 0, 1, d).astype(np.float32)
    if kind in (Q.Q4_1, Q.Q5_1):
        m = blocks[:, 2:4].copy().view(np.float16)
        q = np.rint((exact - m.astype(np.float32)) / divisor).astype(np.float16)
        return (d * q + m).astype(np.float32)
    q = np.rint(exact / divisor).astype(np.float16)
    return (d * q).astype(np.float32)


@pytest.mark.parametrize("precision", sorted(WRITABLE))
def test_diffusers_dequantizes_in_float16(precision: str, tiny_dit: TinyDiT) -> None:
    """diffusers' ``dequantize_gguf_tensor`` (pure torch, any device) equals llama.cpp's
    formula evaluated in float16, not gguf-py's float32: documented in docs/quantization.md."""
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor

    kind = Q[precision.removeprefix("gguf-").upper()]
    generator = torch.Generator().manual_seed(1)
    weight = (torch.randn(256, 512, generator=generator) * 0.02).bfloat16().float().numpy()
    stored = gguf.quants.quantize(weight, kind)
    ours = float16_dequantize(stored, kind).reshape(weight.shape)
    theirs = dequantize_gguf_tensor(GGUFParameter(torch.from_numpy(stored), quant_type=kind))
    assert theirs.dtype == torch.float16
    assert np.array_equal(theirs.float().numpy(), ours)


def test_q4_k_is_not_written_and_says_how_to_get_it() -> None:
    with pytest.raises(QddError, match="--denoiser-file"):
        check_writable("gguf-q4_k")
    with pytest.raises(NotImplementedError):  # gguf-py's own limit: if it lifts, port it
        gguf.quants.quantize(np.zeros((1, 256), np.float32), Q.Q4_K)
    assert set(GGUF_PRECISIONS) - WRITABLE == {"gguf-q4_k"}


def write_raw(path: Path, tensors: dict[str, tuple[np.ndarray, Q]]) -> Path:
    """A GGUF file written with gguf-py alone (no qdd code)."""
    writer = gguf.GGUFWriter(str(path), "sd3")
    for name, (data, kind) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=None if kind in (Q.F32, Q.F16) else kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def random_q4_k(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Valid Q4_K bytes (llama.cpp's block layout: d, dmin, 12 scale bytes, 128 code bytes)."""
    rng = np.random.default_rng(seed)
    blocks = rows * cols // 256
    scales = np.full((blocks, 2), 0.002, np.float16).view(np.uint8)
    rest = rng.integers(0, 256, (blocks, 140), dtype=np.uint8)
    return np.concatenate([scales, rest], axis=1).reshape(rows, -1)


def test_label_is_the_most_common_quantized_type(tmp_path: Path) -> None:
    f32 = np.zeros(64, np.float32)
    w = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    mixed = write_raw(
        tmp_path / "mixed.gguf",
        {
            "a": (gguf.quants.quantize(w, Q.Q8_0), Q.Q8_0),
            "b": (random_q4_k(64, 256), Q.Q4_K),
            "c": (random_q4_k(64, 256, 1), Q.Q4_K),
            "d": (f32, Q.F32),
            "e": (f32 + 1, Q.F32),
            "f": (f32 + 2, Q.F32),
        },
    )
    assert precision_of(mixed) == "gguf-q4_k"
    assert type_counts(read_tensor_types(mixed)) == {"F32": 3, "Q4_K": 2, "Q8_0": 1}
    floats = write_raw(tmp_path / "f16.gguf", {"a": (w.astype(np.float16), Q.F16)})
    assert precision_of(floats) == "gguf-f16"


def test_missing_or_broken_files_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(QddError, match="not found"):
        read_tensor_types(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(QddError, match="not a readable GGUF"):
        read_tensor_types(bad)
