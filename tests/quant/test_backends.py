"""Quantized modules: the emulation against the real backends' layers, and backend choice."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

from qdd.errors import QddError
from qdd.quant import QuantReport, fake_quantize, quantize_module_, resolve_backend


def tiny_block(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 96, bias=False), nn.LayerNorm(96),
        nn.Linear(96, 32),
    )  # fmt: skip


def aligned_block(seed: int = 0) -> nn.Module:
    """Every Linear input width a multiple of 64: no bitsandbytes block crosses a row."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64, bias=False), nn.LayerNorm(64),
        nn.Linear(64, 32),
    )  # fmt: skip


def library_linear4bit(plain: nn.Linear, precision: str) -> nn.Module:
    """bitsandbytes' own layer built by hand, not through qdd (fused kernel off, as qdd)."""
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(
        plain.in_features, plain.out_features, compute_dtype=torch.float32,
        quant_type=precision, compress_statistics=False, device="meta",
    )  # fmt: skip
    layer.weight = bnb.nn.Params4bit(plain.weight.data, requires_grad=False, quant_type=precision,
                                     blocksize=64, compress_statistics=False).to("cpu")  # fmt: skip
    layer.bias = nn.Parameter(plain.bias.data, requires_grad=False)
    layer.support_avx512bf16_for_cpu = False
    return layer.eval()


@pytest.mark.parametrize("precision", ["fp4", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [(1, 64), (3, 7, 64)])  # gemv-shaped and token batches
def test_emulated_4bit_module_equals_bitsandbytes_linear4bit(precision, dtype, batch) -> None:
    """With the CPU library's semantics, on every CPU (AVX512 ones included)."""
    pytest.importorskip("bitsandbytes")
    emulated, real = aligned_block(), aligned_block()
    r1 = quantize_module_(emulated, precision, "emulate", dtype, bnb_semantics="cpu")
    r2 = quantize_module_(real, precision, "bitsandbytes", dtype)
    assert type(real[0]).__name__ == "Linear4bit" and r1.n_quantized == r2.n_quantized
    x = torch.randn(batch, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.inference_mode():
        assert torch.equal(emulated(x), real(x))


@pytest.mark.parametrize("precision", ["fp4", "nf4"])
def test_rows_crossing_layers_equal_the_emulation_or_are_refused(precision: str) -> None:
    """A 96-wide layer (blocks of 64 cross rows): bitsandbytes' CPU code gets it right on some
    CPUs, wrong on others (its AVX512 dequantize). qdd runs it only where the library, run on
    that shape, is right; elsewhere one line — and the library really is wrong there."""
    from qdd.quant.backends import bnb_cpu_error

    torch.manual_seed(5)
    plain = nn.Linear(96, 32)
    emulated = copy.deepcopy(plain)
    with torch.no_grad():
        emulated.weight.copy_(fake_quantize(plain.weight, precision, bnb_semantics="cpu"))
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        library_right = torch.equal(library_linear4bit(plain, precision)(x), emulated(x))
    assert library_right == (bnb_cpu_error(32, 96, precision, torch.float32) == "")
    block = tiny_block()
    if library_right:
        quantize_module_(block, precision, "bitsandbytes", torch.float32)
        assert type(block[4]).__name__ == "Linear4bit"
        return
    refusal = (
        r"off by up to .* on this machine for 32 × 96 weights; "
        r"1 layer\(s\) are affected \(first: 4\): use --quant-backend emulate$"
    )
    with pytest.raises(QddError, match=refusal):
        quantize_module_(block, precision, "bitsandbytes", torch.float32)


@pytest.mark.parametrize("precision", ["fp8", "nvfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_module_equals_torchao_on_cpu(precision: str, dtype: torch.dtype) -> None:
    pytest.importorskip("torchao")
    emulated, real = tiny_block(2), tiny_block(2)
    quantize_module_(emulated, precision, "emulate", dtype)
    quantize_module_(real, precision, "torchao", dtype)
    assert type(real[0].weight).__name__ in ("Float8Tensor", "NVFP4Tensor")
    x = torch.randn(3, 4, 64).to(dtype)
    with torch.inference_mode():
        assert torch.equal(emulated(x), real(x))


def test_fp8_zero_rows_stay_zero_in_emulation_and_are_refused_by_torchao() -> None:
    pytest.importorskip("torchao")
    block = tiny_block(3)
    with torch.no_grad():
        block[2].weight[5] = 0.0
    emulated = copy.deepcopy(block)
    quantize_module_(emulated, "fp8", "emulate", torch.bfloat16)
    assert not emulated[2].weight[5].any()
    with pytest.raises(QddError, match=r"all-zero weight rows of 1 Linear layer\(s\) \(first: 2\)"):
        quantize_module_(block, "fp8", "torchao", torch.bfloat16)


def test_report_counts_quantized_linear_weights() -> None:
    block = tiny_block()
    report = quantize_module_(block, "nvfp4", "emulate", torch.bfloat16)
    assert isinstance(report, QuantReport) and report.compute_dtype == "bfloat16"
    linear_weights = 64 * 128 + 128 * 96 + 96 * 32
    assert report.n_quantized == linear_weights
    assert report.n_params == sum(p.numel() for p in block.parameters())
    assert 0.9 < report.fraction < 1.0
    assert block[0].weight.dtype == torch.bfloat16
    fp16 = quantize_module_(tiny_block(), "fp16", "none", torch.float16)
    assert fp16.n_quantized == 0 and fp16.fraction == 0.0


def test_formats_that_need_blocks_skip_layers_that_do_not_fit() -> None:
    odd = nn.Sequential(nn.Linear(40, 64), nn.Linear(64, 48))  # 40 is not a multiple of 32
    before = copy.deepcopy(odd)
    report = quantize_module_(odd, "mxfp4", "emulate", torch.float32)
    assert report.n_quantized == 64 * 48
    assert torch.equal(odd[0].weight, before[0].weight)
    assert not torch.equal(odd[1].weight, before[1].weight)


def test_a_library_layer_that_departs_from_its_semantics_is_refused(monkeypatch) -> None:
    """The probe runs the library: a Linear4bit whose output is off (or that raises) for a
    shape is refused in one line naming the first layer, and a right one runs."""
    bnb = pytest.importorskip("bitsandbytes")
    from qdd.quant import backends

    forward = bnb.nn.Linear4bit.forward

    def off_for_63(self, x):
        if self.in_features == 63:
            raise RuntimeError("K must be even")
        return forward(self, x) + (1e-3 if self.in_features == 128 else 0.0)

    backends.bnb_cpu_error.cache_clear()
    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", off_for_63)
    try:
        off = r"off by up to 0.001 on this machine for 64 × 128 weights; 1 layer"
        with pytest.raises(QddError, match=off):
            quantize_module_(aligned_block(), "fp4", "bitsandbytes", torch.float32)
        odd = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 63), nn.Linear(63, 64))
        with pytest.raises(QddError, match=r"fails \(RuntimeError: K must be even\) .*first: 2\)"):
            quantize_module_(odd, "fp4", "bitsandbytes", torch.float32)
        report = quantize_module_(nn.Sequential(nn.Linear(64, 64)), "fp4", "bitsandbytes",
                                  torch.float32)  # fmt: skip
        assert report.backend == "bitsandbytes"
    finally:
        backends.bnb_cpu_error.cache_clear()


def test_resolve_backend_on_cpu() -> None:
    torchao = importlib.util.find_spec("torchao") is not None
    assert resolve_backend("fp8", "auto", "cpu") == ("torchao" if torchao else "emulate")
    for precision in ("fp4", "nf4", "nvfp4", "mxfp4"):
        assert resolve_backend(precision, "auto", "cpu") == "emulate"
    if not torch.cuda.is_available():
        for precision in ("fp4", "nf4", "nvfp4", "mxfp4"):
            assert resolve_backend(precision, "auto", "cuda") == "emulate"
    assert resolve_backend("mxfp4", "auto", "cuda") == "emulate"  # no weight-only MX recipe
    for precision in ("fp8", "fp4", "nf4", "nvfp4", "mxfp4"):
        assert resolve_backend(precision, "emulate", "cpu") == "emulate"
    assert resolve_backend("fp32", "auto", "cpu") == "none"
    assert resolve_backend("fp16", "bitsandbytes", "cpu") == "none"
    with pytest.raises(QddError, match="does not implement fp4: use bitsandbytes or emulate"):
        resolve_backend("fp4", "torchao", "cpu")
    with pytest.raises(QddError, match="does not implement nvfp4: use torchao or emulate"):
        resolve_backend("nvfp4", "bitsandbytes", "cpu")
    with pytest.raises(QddError, match="also quantize activations.*use --quant-backend emulate"):
        resolve_backend("mxfp4", "torchao", "cpu")
    with pytest.raises(QddError, match="unknown quantization backend"):
        resolve_backend("fp4", "tensorrt", "cpu")


def test_resolve_explicit_library_backends_on_cpu() -> None:
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("torchao")
    assert resolve_backend("fp4", "bitsandbytes", "cpu") == "bitsandbytes"
    assert resolve_backend("nf4", "bitsandbytes", "cpu") == "bitsandbytes"
    assert resolve_backend("fp8", "torchao", "cpu") == "torchao"
    assert resolve_backend("nvfp4", "torchao", "cpu") == "torchao"  # weight-only: dequantizes


def test_missing_library_is_a_clear_error(monkeypatch) -> None:
    from qdd.quant import backends

    monkeypatch.setattr(backends, "_installed", lambda library: False)
    assert resolve_backend("fp8", "auto", "cpu") == "emulate"
    with pytest.raises(QddError, match="bitsandbytes is not installed: pip install bitsandbytes"):
        resolve_backend("nf4", "bitsandbytes", "cpu")


def test_diffusers_configs_carry_the_same_recipe() -> None:
    pytest.importorskip("diffusers")
    pytest.importorskip("torchao")
    from qdd.quant import diffusers_quantization_config

    bnb = diffusers_quantization_config("nf4", "bitsandbytes", torch.bfloat16)
    assert type(bnb).__name__ == "BitsAndBytesConfig" and bnb.load_in_4bit
    assert bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_compute_dtype == torch.bfloat16
    assert not bnb.bnb_4bit_use_double_quant  # one fp32 absmax per 64, as emulated
    fp8 = diffusers_quantization_config("fp8", "torchao", torch.bfloat16)
    assert type(fp8.quant_type).__name__ == "Float8WeightOnlyConfig"
    assert type(fp8.quant_type.granularity).__name__ == "PerRow"
    nvfp4 = diffusers_quantization_config("nvfp4", "torchao", torch.bfloat16)
    assert type(nvfp4.quant_type).__name__ == "NVFP4WeightOnlyConfig"
    assert nvfp4.quant_type.use_dynamic_per_tensor_scale
    assert diffusers_quantization_config("fp4", "emulate", torch.bfloat16) is None
    assert diffusers_quantization_config("fp16", "none", torch.float16) is None


@pytest.mark.gpu
def test_real_kernels_on_gpu_match_emulation() -> None:
    """On CUDA the libraries' own kernels run; the emulation reproduces them bit for bit."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import bitsandbytes.functional as F

    from qdd.quant import fake_quantize

    w = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    for precision in ("fp4", "nf4"):
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type=precision)
        real = F.dequantize_4bit(packed, state).view(torch.int16)
        assert torch.equal(real, fake_quantize(w, precision).bfloat16().view(torch.int16))
    for precision in ("fp8", "nvfp4"):
        emulated, real = tiny_block(4).cuda(), tiny_block(4).cuda()
        quantize_module_(emulated, precision, "emulate", torch.bfloat16)
        quantize_module_(real, precision, "torchao", torch.bfloat16)
        x = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            assert torch.equal(emulated(x), real(x)), precision
