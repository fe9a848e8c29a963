"""Deployed W+A formats: against independent references and the public implementations."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qdd.errors import QddError
from qdd.quant import quantize_module_, resolve_backend
from qdd.quant.deployed import DeployedLinear
from qdd.quant.registry import describe
from qdd.quant.svdquant import SVDQuantLinear

E4M3 = torch.float8_e4m3fn
DEPLOYED = (
    "fp8-w8a8", "fp8-w8a8-row", "svdq-int4-datafree", "svdq-nvfp4-datafree", "nvfp4-w4a4"
)  # fmt: skip


def linear(in_features: int = 256, out_features: int = 128, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_features, out_features))


def tokens(n: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def per_tensor_e4m3(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Written out here, apart from qdd: ComfyUI's ``x * (1/scale)`` with ``scale = amax/448``."""
    scale = (t.abs().max() / 448).float()
    return (t * (1 / scale).to(t.dtype)).clamp(-448, 448).to(E4M3).float(), scale


def test_fp8_w8a8_equals_a_per_tensor_reference_and_differs_from_weight_only() -> None:
    module, reference = linear(), linear()
    report = quantize_module_(module, "fp8-w8a8", "emulate", torch.float32)
    assert isinstance(module[0], DeployedLinear) and report.activations_quantized
    x = tokens(64, 256)
    w, b = reference[0].weight.detach(), reference[0].bias.detach()
    qx, sx = per_tensor_e4m3(x)
    qw, sw = per_tensor_e4m3(w)
    expected = (qx @ qw.t()) * sx * sw + b
    with torch.no_grad():
        ours = module(x)
        weight_only = quantize_module_(linear(), "fp8", "emulate", torch.float32)
        assert not weight_only.activations_quantized
    assert torch.equal(ours, expected)
    fp8_only = linear()
    quantize_module_(fp8_only, "fp8", "emulate", torch.float32)
    with torch.no_grad():
        assert not torch.equal(ours, fp8_only(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_w8a8_row_quantizes_like_torchao_float8_tensor(dtype: torch.dtype) -> None:
    """Weights per row and activations per token: torchao's own Float8Tensor.from_hp (CPU)."""
    pytest.importorskip("torchao")
    from torchao.quantization import PerRow
    from torchao.quantization.quantize_.workflows import Float8Tensor

    module, reference = linear(seed=2), linear(seed=2)
    quantize_module_(module, "fp8-w8a8-row", "emulate", dtype)
    layer = module[0]
    w = reference[0].weight.detach().to(dtype)
    real_w = Float8Tensor.from_hp(w, granularity=PerRow())
    assert torch.equal(layer.weight.float(), real_w.qdata.float())
    assert torch.equal(layer.weight_scale, real_w.scale.reshape(-1))
    x = tokens(32, 256, seed=3).to(dtype)
    real_x = Float8Tensor.from_hp(x, granularity=PerRow())
    from qdd.quant.deployed import fp8_token_activation

    codes, scale = fp8_token_activation(x)
    assert torch.equal(codes, real_x.qdata.float()) and torch.equal(scale, real_x.scale)
    # The matmul torchao's _scaled_mm does on FP8 GPUs: fp32 accumulation, both scales, bias.
    expected = (real_x.qdata.float() @ real_w.qdata.float().t()) * real_x.scale
    bias = reference[0].bias.detach().to(dtype).float()
    expected = (expected * real_w.scale.reshape(1, -1) + bias).to(dtype)
    with torch.no_grad():
        assert torch.equal(module(x), expected)


def test_fp8_w8a8_row_leaves_layers_torchao_skips() -> None:
    block = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 40))  # 40 outputs: not 16·n
    report = quantize_module_(block, "fp8-w8a8-row", "emulate", torch.float32)
    assert report.kept == ("1",) and report.n_quantized == 64 * 48
    assert type(block[1]) is nn.Linear


def outlier_layer(seed: int = 4) -> nn.Sequential:
    """A layer whose weight has a few large input columns (what smoothing + low rank absorb)."""
    module = linear(512, 256, seed)
    with torch.no_grad():
        module[0].weight[:, [3, 77, 300]] *= 40
    return module


def relative_error(precision: str, dtype: torch.dtype = torch.bfloat16) -> float:
    reference, module = outlier_layer(), outlier_layer()
    quantize_module_(module, precision, "emulate", dtype)
    x = tokens(128, 512, seed=5)
    with torch.no_grad():
        exact = reference(x)
        return ((module(x.to(dtype)).float() - exact).norm() / exact.norm()).item()


def test_low_rank_branch_beats_plain_nvfp4_w4a4_on_outlier_columns() -> None:
    plain = relative_error("nvfp4-w4a4")
    assert relative_error("svdq-nvfp4-datafree") < 0.7 * plain
    assert relative_error("svdq-int4-datafree") < 0.7 * plain
    assert 0 < relative_error("fp8-w8a8-row") < relative_error("svdq-nvfp4-datafree")


def kitchen_weights(layer: SVDQuantLinear) -> dict[str, torch.Tensor]:
    """Our svdq-int4 layer in comfy-kitchen's natural layout (its eager backend's inputs)."""
    from comfy_kitchen.backends.eager.svdquant import _pack_int4_row_major

    out_features = layer.weight.shape[0]
    return {
        "wgt": _pack_int4_row_major(layer.weight.to(torch.int8)),
        "wscales": layer.weight_scale.reshape(out_features, -1).t().contiguous(),
        "lora_down": layer.proj_down.t().contiguous(),
        "lora_up": layer.proj_up,
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_svdq_int4_equals_comfy_kitchen_eager_backend(dtype: torch.dtype) -> None:
    """Activation quantization, INT4 GEMM and the low-rank branch: comfy-kitchen's eager
    SVDQuant reference, bit for bit, given the weights qdd's data-free quantizer made."""
    svdquant = pytest.importorskip("comfy_kitchen.backends.eager.svdquant")
    module = outlier_layer(6)
    quantize_module_(module, "svdq-int4-datafree", "emulate", dtype)
    layer = module[0]
    assert layer.proj_up.shape == (256, 32) and layer.proj_down.shape == (32, 512)
    assert layer.weight.abs().max() <= 8 and torch.equal(layer.weight, layer.weight.round())
    packed = kitchen_weights(layer)
    x = tokens(256, 512, seed=7).to(dtype)  # 256 tokens: kitchen pads to 256, nothing added
    q_x, ascales, lora_act = svdquant.quantize_svdquant_w4a4(x, layer.smooth, packed["lora_down"])
    expected = svdquant.scaled_mm_svdquant_w4a4(
        q_x, packed["wgt"], ascales, packed["wscales"], lora_act, packed["lora_up"], layer.bias
    )
    with torch.no_grad():
        assert torch.equal(module(x), expected)


def test_svdq_reconstructs_the_smoothed_weight() -> None:
    """Low rank + dequantized residual, unsmoothed, is close to the original weight."""
    reference, module = outlier_layer(), outlier_layer()
    quantize_module_(module, "svdq-nvfp4-datafree", "emulate", torch.float32)
    layer = module[0]
    smooth = layer.smooth.float()
    low_rank = layer.proj_up.float() @ (layer.proj_down.float() * smooth)
    rebuilt = (layer.dequantized_weight() + low_rank) / smooth
    w = reference[0].weight.detach()
    assert ((rebuilt - w).norm() / w.norm()).item() < 0.1
    assert layer.weight.unique().numel() <= 15  # E2M1 values only


def test_nvfp4_w4a4_quantizes_weights_and_activations_like_torchao() -> None:
    pytest.importorskip("torchao")
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

    def torchao_nvfp4(t: torch.Tensor) -> torch.Tensor:
        scale = per_tensor_amax_to_scale(torch.max(torch.abs(t)))
        return NVFP4Tensor.to_nvfp4(t, per_tensor_scale=scale).dequantize(torch.float32)

    module, reference = linear(seed=8), linear(seed=8)
    quantize_module_(module, "nvfp4-w4a4", "emulate", torch.float32)
    w = reference[0].weight.detach()
    assert torch.equal(module[0].dequantized_weight(), torchao_nvfp4(w))
    x = tokens(16, 256, seed=9)
    expected = torchao_nvfp4(x) @ torchao_nvfp4(w).t() + reference[0].bias
    with torch.no_grad():
        assert torch.equal(module(x), expected)


class TinyDiT(nn.Module):
    """The names the keep lists look for: embedders, adaLN norms, a stack of blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.x_embedder = nn.Linear(64, 64)
        self.context_embedder = nn.Linear(64, 64)
        self.transformer_blocks = nn.ModuleList(
            nn.ModuleDict({"norm1": nn.ModuleDict({"linear": nn.Linear(64, 128)}),
                           "ff": nn.Linear(64, 64)})
            for _ in range(2)
        )  # fmt: skip
        self.norm_out = nn.ModuleDict({"linear": nn.Linear(64, 128)})
        self.proj_out = nn.Linear(64, 64)


class FluxTransformer2DModel(TinyDiT):
    """Named as diffusers' Flux transformer: ModelOpt picks its keep list by model."""


def test_keep_lists_follow_nunchaku_and_modelopt() -> None:
    svdq = quantize_module_(TinyDiT(), "svdq-int4-datafree", "emulate", torch.float32)
    assert set(svdq.kept) == {
        "x_embedder", "context_embedder", "transformer_blocks.0.norm1.linear",
        "transformer_blocks.1.norm1.linear", "norm_out.linear", "proj_out",
    }  # fmt: skip
    # ModelOpt's filter_func_default (SD3, SD3.5): the final proj_out is quantized
    modelopt = quantize_module_(TinyDiT(), "nvfp4-w4a4", "emulate", torch.float32)
    assert set(modelopt.kept) == {"x_embedder", "context_embedder", "norm_out.linear"}
    # filter_func_flux_dev: Flux keeps its top-level proj_out too
    flux = quantize_module_(FluxTransformer2DModel(), "nvfp4-w4a4", "emulate", torch.float32)
    assert set(flux.kept) == {"x_embedder", "context_embedder", "norm_out.linear", "proj_out"}
    assert modelopt.rank is None and svdq.rank == 32 and svdq.group_size == 64


def test_every_precision_describes_its_format() -> None:
    assert describe("fp16", "bfloat16") == {
        "weight_format": "bfloat16", "activation_format": "bfloat16",
        "activations_quantized": False, "group_size": None, "rank": None,
    }  # fmt: skip
    assert describe("svdq-nvfp4-datafree", "bfloat16")["activation_format"] == "nvfp4"
    assert describe("gguf-q4_0", "bfloat16")["weight_format"] == "gguf-q4_0"  # names itself
    report = quantize_module_(linear(), "fp4", "emulate", torch.bfloat16)
    assert report.weight_format == "bnb-fp4" and report.activation_format == "bfloat16"


def test_deployed_layers_keep_zero_inputs_finite() -> None:
    """An all-zero input has a zero scale (NaN in ComfyUI/torchao): the emulation keeps 0."""
    for precision in ("fp8-w8a8", "fp8-w8a8-row", "svdq-int4-datafree", "svdq-nvfp4-datafree",
                      "nvfp4-w4a4"):  # fmt: skip
        module = linear()
        quantize_module_(module, precision, "emulate", torch.bfloat16)
        with torch.no_grad():
            out = module(torch.zeros(2, 256, dtype=torch.bfloat16))
        assert torch.isfinite(out).all(), precision


def test_backends_for_deployed_formats_on_cpu() -> None:
    for precision in DEPLOYED:
        assert resolve_backend(precision, "auto", "cpu") == "emulate"
        assert resolve_backend(precision, "emulate", "cpu") == "emulate"
    pytest.importorskip("torchao")
    with pytest.raises(QddError, match="compute capability 8.9 or newer.*not cpu"):
        resolve_backend("fp8-w8a8-row", "torchao", "cpu")
    with pytest.raises(QddError, match="svdq-int4-datafree runs in Nunchaku only"):
        resolve_backend("svdq-int4-datafree", "torchao", "cpu")
    with pytest.raises(QddError, match="does not implement fp8-w8a8: use torchao"):
        resolve_backend("fp8-w8a8", "bitsandbytes", "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp8-w8a8", "fp8-w8a8-row"])
def test_emulation_close_to_torchao_fp8_kernels(precision: str) -> None:
    """On an FP8 GPU (sm89+): torchao's real kernels against the emulation; prints how close."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs a CUDA GPU of compute capability 8.9 or newer")
    pytest.importorskip("torchao")
    real, emulated = outlier_layer(10).cuda(), outlier_layer(10).cuda()
    exact = copy.deepcopy(real)
    quantize_module_(real, precision, "torchao", torch.bfloat16)
    quantize_module_(emulated, precision, "emulate", torch.bfloat16)
    assert type(real[0].weight).__name__ == "Float8Tensor"
    x = tokens(256, 512, seed=11).cuda().bfloat16()
    with torch.inference_mode():
        a, b, c = real(x).float(), emulated(x).float(), exact.float()(x.float())
    differ = (a != b).float().mean().item()
    gap = ((a - b).norm() / (a - c).norm()).item()
    print(f"{precision}: {differ:.4f} of outputs differ; |real-emu| / |real-exact| = {gap:.4f}")
    assert gap < 0.1  # far below the quantization error itself


def test_nvfp4_w4a4_keeps_what_modelopt_keeps_in_diffusers_sd3_and_flux() -> None:
    """ModelOpt's diffusers example: SD3 → filter_func_default (proj_out quantized), Flux →
    filter_func_flux_dev (proj_out kept); checked on diffusers' own transformer classes."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from qdd.quant.backends import quantized_layers

    torch.manual_seed(0)
    sd3 = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
        pooled_projection_dim=32, out_channels=4,
    )  # fmt: skip
    flux = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
    )  # fmt: skip
    embedders = {
        "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
        "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2",
        "context_embedder", "norm_out.linear",
    }  # fmt: skip
    for model, kept in ((sd3, embedders), (flux, embedders | {"x_embedder", "proj_out"})):
        linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        assert linears - set(quantized_layers(model, "nvfp4-w4a4")) == kept, type(model)
