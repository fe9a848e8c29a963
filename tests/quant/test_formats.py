"""Emulated formats against the libraries' own quantize/dequantize, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bnb_reference import bnb_decode  # tests/quant/bnb_reference.py
from safetensors.torch import load_file

from qdd.quant import fake_quantize
from qdd.quant.bnb4bit import BNB_BLOCK, bnb_4bit
from qdd.quant.cuda_rcp import MEASURED_FLIPS, cuda_reciprocal, flip_mantissas
from qdd.quant.formats import round_to_e2m1


def weights(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random weights with the awkward cases: a zero row, outliers, tiny values."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w[0] = 0.0  # a zero row (one or more zero blocks)
    w[1, 7 % shape[1]] = 3.0  # an outlier
    w.view(-1)[-3] = -1e-30  # far below everything else
    return w.to(dtype)


SHAPES = [(64, 128), (48, 96), (96, 40), (5, 64 * 3 + 32)]  # rows not multiples of blocks


DATA = Path(__file__).parent / "data"
#: The full CUDA recordings, beside the repository (a checkout's ../shared); optional.
RECORDINGS = Path(__file__).parents[3] / "shared" / "fixtures" / "gpu"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns (tells -0 from +0, unlike ==)."""
    return a.dtype == b.dtype and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


@pytest.mark.parametrize("precision", ["fp4", "nf4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulation_equals_bitsandbytes_cuda_kernels(precision: str, dtype: str) -> None:
    """Blocks of bitsandbytes' own CUDA output (H200): ties, reciprocal flips, a sample."""
    recorded = load_file(DATA / f"bnb_cuda_4bit_{dtype}.safetensors")
    weight, expected = recorded["weight"], recorded[f"{precision}.dequantized"]
    assert weight.dtype == DTYPES[dtype] and weight.shape[1] == BNB_BLOCK
    assert torch.equal(recorded[f"{precision}.absmax"], weight.float().abs().amax(dim=1))
    decoded = bnb_decode(
        recorded[f"{precision}.packed"], recorded[f"{precision}.absmax"], precision, weight.numel()
    )
    assert same_bits(decoded.view(weight.shape).to(weight.dtype), expected)  # codes × absmax
    assert same_bits(fake_quantize(weight, precision).to(weight.dtype), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_recordings_contain_what_tells_implementations_apart(dtype: str) -> None:
    """The copied blocks hold ties where a nearest-code quantizer differs from CUDA."""
    recorded = load_file(DATA / f"bnb_cuda_4bit_{dtype}.safetensors")
    weight = recorded["weight"]
    nearest = fake_quantize(weight, "fp4", bnb_semantics="cpu").to(weight.dtype)
    differ = (nearest != recorded["fp4.dequantized"]).sum().item()
    assert differ == {"bfloat16": 689, "float16": 77, "float32": 0}[dtype]  # as recorded


@pytest.mark.skipif(
    not RECORDINGS.is_dir(), reason="the full CUDA recordings are not beside the repo"
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulation_equals_full_cuda_recordings(dtype: str) -> None:
    recorded = load_file(RECORDINGS / f"bnb_cuda_4bit_{dtype}.safetensors")
    weight = recorded["weight"]
    for precision in ("fp4", "nf4"):
        ours = fake_quantize(weight, precision).to(weight.dtype)
        assert same_bits(ours, recorded[f"{precision}.dequantized"]), precision


def test_cuda_semantics_at_the_edges() -> None:
    """Kernel pivots are float literals, x > t goes up; an all-zero block gives +0 / -0."""
    absmax = 1.0
    for ratio, fp4, nf4 in [
        (7 / 12, 2 / 3, 0.5626170039176941),  # FP4 tie: 0.583333f < 7/12 goes up
        (5 / 12, 1 / 3, 0.44070982933044434),  # FP4 tie: 0.4166667f > 5/12 goes down
        (-0.0, 0.0, 0.0),
    ]:
        w = torch.zeros(BNB_BLOCK)
        w[0], w[1] = absmax, ratio
        assert bnb_4bit(w, "fp4")[1].item() == pytest.approx(fp4)
        assert bnb_4bit(w, "nf4")[1].item() == pytest.approx(nf4)
    zero = torch.zeros(BNB_BLOCK)
    assert not bnb_4bit(zero, "fp4").signbit().any()
    assert bnb_4bit(zero, "nf4").signbit().all()  # code 0 (-1.0) × absmax 0


def test_cuda_reciprocal_is_the_nearest_or_its_measured_neighbour() -> None:
    a = torch.tensor([1.0, 3.0, 0.064453125, 0.06005859375, 0.0, 0.1])
    ours = cuda_reciprocal(a)
    nearest = 1.0 / a
    ulps = (ours.view(torch.int32) - nearest.view(torch.int32)).abs()
    assert ulps.max() <= 1 and torch.equal(ours[[0, 4]], nearest[[0, 4]])  # 1 and 1/0
    flipped = torch.isin(a.view(torch.int32) & 0x7FFFFF, flip_mantissas())
    assert torch.equal(ulps == 1, flipped)
    assert flipped[2] and 0x040000 in MEASURED_FLIPS  # 0.064453125: measured on the H200
    error = (ours.double() - 1 / a.double()).abs()[:4]
    assert error.le(ours.double()[:4] * 2**-23).all()  # within one ulp of the exact 1/a


BNB_SHAPES = [*SHAPES, (7, 9)]  # (7, 9): a ragged last block


@pytest.mark.parametrize("precision", ["fp4", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", BNB_SHAPES)
def test_cpu_semantics_equal_bitsandbytes_codes(precision: str, dtype: torch.dtype, shape) -> None:
    """bitsandbytes' CPU quantize (its PyTorch op on any CPU), decoded by hand."""
    F = pytest.importorskip("bitsandbytes.functional")
    w = weights(shape, dtype)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type=precision)
    decoded = bnb_decode(packed, state.absmax, precision, w.numel()).view(shape).to(dtype)
    assert same_bits(fake_quantize(w, precision, bnb_semantics="cpu").to(dtype), decoded)


@pytest.mark.parametrize("precision", ["fp4", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", BNB_SHAPES)
def test_cpu_semantics_equal_bitsandbytes_dequantize(precision, dtype, shape) -> None:
    """The library's CPU dequantize equals the emulation; where this machine's library code
    gets a shape wrong (bitsandbytes 0.50's AVX512 dequantize, blocks crossing rows), the
    shape's blocks do cross rows and qdd's probe refuses a layer of that shape."""
    F = pytest.importorskip("bitsandbytes.functional")
    from qdd.quant.backends import bnb_cpu_error

    w = weights(shape, dtype)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type=precision)
    expected = F.dequantize_4bit(packed, state)  # in the weight's dtype
    # Values, not bits: the library's CPU code table has +0 where CUDA's FP4 has -0 (code 8).
    ours = fake_quantize(w, precision, bnb_semantics="cpu").to(dtype)
    if torch.equal(ours, expected):
        return
    assert shape[-1] % BNB_BLOCK != 0, "wrong although no block crosses a row"
    assert bnb_cpu_error(*shape, precision, dtype), f"qdd would run {shape} on this CPU"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_fp8_rowwise_bit_exact_against_torchao(dtype: torch.dtype, shape: tuple) -> None:
    pytest.importorskip("torchao")
    from torchao.quantization.quant_primitives import (
        _choose_scale_float8,
        _dequantize_affine_float8,
        _quantize_affine_float8,
    )

    w = weights(shape, dtype, seed=1)
    block = [1, shape[1]]
    scale = _choose_scale_float8(w, block, torch.float8_e4m3fn)
    expected = _dequantize_affine_float8(_quantize_affine_float8(w, scale), scale, dtype)
    ours = fake_quantize(w, "fp8").to(dtype)
    assert expected[0].isnan().all()  # torchao: the zero row divided by its zero scale
    assert torch.equal(ours[0], torch.zeros_like(ours[0]))  # we keep it zero
    assert torch.equal(ours[1:], expected[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 128), (48, 96), (16, 32)])
def test_nvfp4_bit_exact_against_torchao(dtype: torch.dtype, shape: tuple) -> None:
    pytest.importorskip("torchao")
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

    w = weights(shape, dtype, seed=2)
    tensor_scale = per_tensor_amax_to_scale(torch.max(torch.abs(w)))
    expected = NVFP4Tensor.to_nvfp4(w, per_tensor_scale=tensor_scale).dequantize(dtype)
    assert torch.equal(fake_quantize(w, "nvfp4").to(dtype), expected)


def mx_edge_weights(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """`weights` plus a subnormal block, a block just above a power of two, a linear ramp."""
    w = weights(shape, dtype, seed=3)
    w[1, :32] = 1e-39 if dtype == torch.float32 else 1e-38
    w[2, :32] = 6 * 2.0**-10 * (1 + 2**-23) if dtype == torch.float32 else 0.3
    w[3, :32] = torch.linspace(-1, 1, 32)
    return w


@pytest.mark.parametrize("scaling", ["rceil", "floor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 128), (48, 96), (32, 32), (4, 320)])
def test_mxfp4_bit_exact_against_torchao(scaling: str, dtype: torch.dtype, shape: tuple) -> None:
    pytest.importorskip("torchao")
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx

    from qdd.quant.formats import mxfp4

    w = mx_edge_weights(shape, dtype)
    mode = getattr(ScaleCalculationMode, scaling.upper())
    scale, data = to_mx(w, torch.float4_e2m1fn_x2, 32, mode)
    expected = to_dtype(data, scale, torch.float4_e2m1fn_x2, 32, dtype)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(mxfp4(w, scaling).to(dtype).view(bits), expected.view(bits))


def test_mxfp4_default_is_torchao_inference_recipe_rceil() -> None:
    pytest.importorskip("torchao")
    from torchao.prototype.mx_formats import MXDynamicActivationMXWeightConfig
    from torchao.prototype.mx_formats.config import ScaleCalculationMode

    assert MXDynamicActivationMXWeightConfig().scaling_mode == ScaleCalculationMode.RCEIL
    w = mx_edge_weights((64, 128), torch.float32)
    from qdd.quant.formats import mxfp4

    assert torch.equal(fake_quantize(w, "mxfp4"), mxfp4(w, "rceil"))
    assert not torch.equal(mxfp4(w, "rceil"), mxfp4(w, "floor"))


def test_e2m1_rounds_ties_to_even() -> None:
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0, 0.26, 6.0])
    expected = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -4.0, 0.5, 6.0])
    assert torch.equal(round_to_e2m1(x), expected)


def test_e2m1_rounding_equals_nearest_code_search_and_torchao() -> None:
    from qdd.quant.formats import E2M1_GRID

    x = torch.arange(-6 * 256, 6 * 256 + 1) / 256  # every midpoint and tie included
    x = torch.cat([x, torch.tensor([-0.0, 1e-30, -1e-30, 5.9999995, 0.2499999])])
    grid = torch.tensor(E2M1_GRID)
    distance = (x.abs()[:, None] - grid).abs()
    nearest = distance == distance.min(dim=1, keepdim=True).values
    even = torch.arange(len(E2M1_GRID)) % 2 == 0  # even index = even mantissa
    index = torch.where(
        nearest.sum(1) > 1, (nearest & even).int().argmax(1), nearest.int().argmax(1)
    )
    reference = torch.copysign(grid[index], x)
    ours = round_to_e2m1(x)
    assert torch.equal(ours.view(torch.int32), reference.view(torch.int32))
    kernels = pytest.importorskip("torchao.prototype.mx_formats.kernels")
    torchao = kernels.f4_unpacked_to_f32(kernels.f32_to_f4_unpacked(x))
    assert torch.equal(ours.view(torch.int32), torchao.view(torch.int32))


def test_large_weights_are_processed_in_chunks(monkeypatch) -> None:
    from qdd.quant import formats

    w = weights((96, 128), torch.bfloat16, seed=4)
    whole = {p: fake_quantize(w, p) for p in ("fp4", "fp8", "nvfp4", "mxfp4")}
    from qdd.quant import bnb4bit

    monkeypatch.setattr(formats, "CHUNK", 1000)  # not a multiple of any block
    monkeypatch.setattr(bnb4bit, "CHUNK", 1000)
    for precision, expected in whole.items():
        assert torch.equal(fake_quantize(w, precision), expected), precision


def test_formats_really_quantize() -> None:
    w = weights((64, 128), torch.float32, seed=5)
    levels = {"fp4": 16, "nf4": 16, "nvfp4": 16, "mxfp4": 16}
    for precision, most in levels.items():
        q = fake_quantize(w, precision)
        assert not torch.equal(q, w)
        block = 16 if precision == "nvfp4" else 32 if precision == "mxfp4" else 64
        per_block = q.reshape(-1, block)
        assert max(len(row.unique()) for row in per_block) <= most
    assert fake_quantize(w, "fp8").unique().numel() < w.unique().numel()
    with pytest.raises(ValueError, match="not a quantized precision"):
        fake_quantize(w, "fp16")


def _wrong_blocks(recorded: dict, precision: str, flips: torch.Tensor, rows, monkeypatch):
    """Blocks ``rows`` where the emulation with the flip table ``flips`` misses the GPU."""
    from qdd.quant import bnb4bit, cuda_rcp

    monkeypatch.setattr(cuda_rcp, "flip_mantissas", lambda device="cpu": flips)
    weight = recorded["weight"]
    bits = BITS[weight.dtype]
    blocks = weight.float().reshape(-1, BNB_BLOCK)[rows]
    ours = bnb4bit._cuda_blocks(blocks, precision).to(weight.dtype)
    expected = recorded[f"{precision}.dequantized"].reshape(-1, BNB_BLOCK)[rows]
    return (ours.view(bits) != expected.view(bits)).any(dim=1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reciprocal_table_learned_on_half_the_blocks_predicts_the_other_half(
    dtype: str, monkeypatch
) -> None:
    """Held out: which mantissas flip is read off the even blocks only; the emulation with
    that table must then equal the CUDA output on the odd blocks, which it never saw.

    A held-out block whose absmax mantissa the even blocks never pinned cannot be predicted
    from them (the table says "nearest" for it): such blocks are counted as skipped, with how
    many of them the table gets wrong, and the counts are pinned as docs/quantization.md
    states them."""
    recorded = load_file(DATA / f"bnb_cuda_4bit_{dtype}.safetensors")
    blocks = recorded["weight"].float().reshape(-1, BNB_BLOCK)
    mantissa = blocks.abs().amax(dim=1).view(torch.int32) & 0x7FFFFF
    none, every = torch.tensor([], dtype=torch.int32), mantissa.unique()
    learn = torch.arange(len(blocks)) % 2 == 0
    check = ~learn
    counts = {"decisive": 0, "checked": 0, "skipped": 0, "skipped_wrong": 0}
    for precision in ("fp4", "nf4"):
        near = _wrong_blocks(recorded, precision, none, learn, monkeypatch)
        other = _wrong_blocks(recorded, precision, every, learn, monkeypatch)
        assert not (near & other).any()  # one of the two neighbours explains every block
        flips = mantissa[learn][near].unique()
        pinned = mantissa[learn][near ^ other].unique()
        decisive = _wrong_blocks(recorded, precision, none, check, monkeypatch) ^ _wrong_blocks(
            recorded, precision, every, check, monkeypatch
        )  # blocks where the reciprocal decides a code
        seen = torch.isin(mantissa[check], pinned)
        missed = _wrong_blocks(recorded, precision, flips, check, monkeypatch)
        assert not (missed & (seen | ~decisive)).any()
        counts["decisive"] += int(decisive.sum())
        counts["checked"] += int((decisive & seen).sum())
        counts["skipped"] += int((decisive & ~seen).sum())
        counts["skipped_wrong"] += int((missed & decisive & ~seen).sum())
    print(f"{dtype}: {counts}")
    assert counts == HELD_OUT_COUNTS[dtype]


#: Held-out blocks decided by the reciprocal (FP4 + NF4), checked (mantissa pinned by the
#: learning half: all predicted), skipped (never pinned there) and wrong among the skipped.
HELD_OUT_COUNTS = {
    "bfloat16": {"decisive": 169, "checked": 169, "skipped": 0, "skipped_wrong": 0},
    "float16": {"decisive": 16, "checked": 6, "skipped": 10, "skipped_wrong": 5},
    "float32": {"decisive": 1, "checked": 0, "skipped": 1, "skipped_wrong": 1},
}
