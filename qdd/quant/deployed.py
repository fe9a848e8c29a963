"""Deployed formats that quantize activations too, emulated in pure PyTorch (any device).

- ``fp8-w8a8``: ComfyUI ``fp8_scaled`` on FP8 hardware (``comfy/quant_ops.py``
  ``TensorCoreFP8Layout`` + ``torch._scaled_mm``): e4m3 weights with one scale per tensor,
  the input quantized per call with a dynamic per-tensor scale ``amax/448``; values are
  multiplied by the reciprocal scale rounded to the input's dtype, then cast to e4m3.
- ``fp8-w8a8-row``: torchao ``Float8DynamicActivationFloat8WeightConfig(PerRow())``: one
  scale per weight row and per token, ``amax/448`` in the input's dtype, values divided in
  fp32 and clamped to ±448. Layers whose dims are not multiples of 16 stay unquantized, as
  torchao skips them.
- ``svdq-int4`` / ``svdq-nvfp4`` (calibrated smoothing, as released Nunchaku models) and
  ``svdq-int4-datafree`` / ``svdq-nvfp4-datafree`` (diffusers' data-free smoothing):
  SVDQuant W4A4 with a rank-32 16-bit low-rank branch, `qdd.quant.svdquant`.
- ``nvfp4-w4a4``: NVFP4 weights and activations without a low-rank branch, as ModelOpt
  deploys it for TensorRT; numerics of torchao's NVFP4 (per-tensor ``amax/(448·6)`` and an
  E4M3 scale per 16), the activation's per-tensor scale taken per call.

Each quantized ``nn.Linear`` becomes a `DeployedLinear` whose ``weight`` holds the format's
codes (e4m3 or E2M1 values: exact in the compute dtype) and whose
``weight_scale`` buffer holds the scales, so no fp32 copy of the weights is kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qdd.quant.formats import E2M1_MAX, E4M3_MAX, nvfp4, round_to_e2m1


@dataclass(frozen=True)
class Format:
    """What a precision stores and computes: recorded in every sample's JSON."""

    weight_format: str
    activation_format: str | None  #: ``None``: activations stay in the compute dtype
    group_size: int | None = None
    rank: int | None = None


#: Weight-only formats (activations in the compute dtype) and the deployed W+A formats.
FORMATS: dict[str, Format] = {
    "fp8": Format("e4m3-row", None),
    "fp4": Format("bnb-fp4", None, 64),
    "nf4": Format("bnb-nf4", None, 64),
    "nvfp4": Format("nvfp4", None, 16),
    "mxfp4": Format("mxfp4", None, 32),
    "fp8-w8a8": Format("e4m3-tensor", "e4m3-tensor"),
    "fp8-w8a8-row": Format("e4m3-row", "e4m3-token"),
    "svdq-int4": Format("int4+lowrank", "int4", 64, 32),
    "svdq-nvfp4": Format("nvfp4+lowrank", "nvfp4", 16, 32),
    "svdq-int4-datafree": Format("int4+lowrank", "int4", 64, 32),
    "svdq-nvfp4-datafree": Format("nvfp4+lowrank", "nvfp4", 16, 32),
    "nvfp4-w4a4": Format("nvfp4", "nvfp4", 16),
}
#: SVDQuant precisions: (weight format, smoothing), `qdd.quant.svdquant`.
SVDQ = {"svdq-int4": ("int4", "calibrated"), "svdq-nvfp4": ("nvfp4", "calibrated"),
        "svdq-int4-datafree": ("int4", "data-free"),
        "svdq-nvfp4-datafree": ("nvfp4", "data-free")}  # fmt: skip
#: diffusers' data-free SVDQuant leaves adaLN-style linears in 16 bit, by name.
SVDQ_EXCLUDE = ("norm", "modulation")
#: ModelOpt's Flux NVFP4 recipe leaves these unquantized (proj_out: the final projection).
MODELOPT_EXCLUDE = re.compile(r"^proj_out|time_text_embed|context_embedder|x_embedder|norm_out")


def describe(precision: str, compute_dtype: str) -> dict[str, object]:
    """The format fields of a sample: weight/activation formats, group size, rank."""
    unquantized = Format(compute_dtype if precision in ("fp32", "fp16") else precision, None)
    spec = FORMATS.get(precision, unquantized)  # other formats (GGUF) name themselves
    return {
        "weight_format": spec.weight_format,
        "activation_format": spec.activation_format or compute_dtype,
        "activations_quantized": spec.activation_format is not None,
        "group_size": spec.group_size,
        "rank": spec.rank,
    }


# --- targets: which Linear layers each deployed format quantizes ---------------------------


def _block_stack_prefixes(module: nn.Module) -> list[str]:
    """Prefixes of ModuleLists of ≥ 2 identical blocks (where a DiT keeps its compute)."""
    return [
        f"{name}."
        for name, child in module.named_modules()
        if isinstance(child, nn.ModuleList)
        and len(child) >= 2
        and len({type(c) for c in child}) == 1
    ]


def quantizes(module: nn.Module, name: str, linear: nn.Linear, precision: str) -> bool:
    """Whether ``precision`` quantizes the Linear ``name`` of ``module`` (the rest stays)."""
    out_features, in_features = linear.weight.shape
    if precision == "fp8-w8a8":
        return True
    fits_16 = out_features % 16 == 0 and in_features % 16 == 0
    if precision == "fp8-w8a8-row":  # torchao skips what _scaled_mm cannot take
        return fits_16
    if precision == "nvfp4-w4a4":
        return fits_16 and not MODELOPT_EXCLUDE.search(name)
    group = FORMATS[precision].group_size
    assert group is not None
    keep_fp32 = getattr(module, "_keep_in_fp32_modules", None) or []
    stacks = _block_stack_prefixes(module)
    return (
        (not stacks or any(name.startswith(p) for p in stacks))
        and not any(pattern in name for pattern in (*SVDQ_EXCLUDE, *keep_fp32))
        and in_features % group == 0
    )


# --- weights -------------------------------------------------------------------------------


def _e4m3(x: Tensor) -> Tensor:
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def _safe(scale: Tensor) -> Tensor:
    """A zero scale (all-zero input) divides as 1: the values stay zero instead of NaN."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def fp8_tensor_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """ComfyUI ``TensorCoreFP8Layout.quantize``: e4m3 codes and the fp32 scale."""
    scale = (weight.abs().amax() / E4M3_MAX).float()
    reciprocal = (1.0 / _safe(scale)).to(weight.dtype)
    return _e4m3(weight * reciprocal), scale


def fp8_row_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """torchao ``_choose_scale_float8`` + ``_quantize_affine_float8`` per row."""
    scale = (weight.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).float()
    return _e4m3(weight.float() / _safe(scale)), scale


def nvfp4_torchao_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """torchao NVFP4 as codes (E2M1 values) and per-block scales ``e4m3 × tensor scale``."""
    tensor_scale = weight.abs().max().float() / (E4M3_MAX * E2M1_MAX)
    rows = weight.float().unflatten(-1, (-1, 16))
    block = rows.abs().amax(dim=-1, keepdim=True) / E2M1_MAX
    tiny = torch.finfo(torch.float8_e4m3fn).tiny
    fp8 = (block / tensor_scale).clamp(tiny, E4M3_MAX).to(torch.float8_e4m3fn).float()
    codes = round_to_e2m1((rows * ((1.0 / tensor_scale) / fp8)).clamp(-E2M1_MAX, E2M1_MAX))
    return codes.flatten(-2), fp8 * tensor_scale


# --- activations ---------------------------------------------------------------------------


def fp8_tensor_activation(x: Tensor) -> tuple[Tensor, Tensor]:
    """ComfyUI's dynamic input quantization: e4m3 values (fp32) and the fp32 scale."""
    codes, scale = fp8_tensor_weight(x)
    return codes.float(), scale


def fp8_token_activation(x: Tensor) -> tuple[Tensor, Tensor]:
    """torchao's per-token (PerRow) activation quantization: e4m3 values and scales (fp32)."""
    codes, scale = fp8_row_weight(x)
    return codes.float(), scale


# --- the layer -----------------------------------------------------------------------------


class DeployedLinear(nn.Linear):
    """A Linear in a deployed W+A format; ``weight`` holds codes, ``weight_scale`` scales.

    (SVDQuant layers are `qdd.quant.svdquant.SVDQuantLinear`.)
    """

    precision: str

    def dequantized_weight(self) -> Tensor:
        """The weight the format computes with (fp32)."""
        if self.precision in ("fp8-w8a8", "fp8-w8a8-row"):
            return self.weight.float() * self.weight_scale
        groups = self.weight.float().unflatten(-1, (-1, 16))
        return (groups * self.weight_scale).flatten(-2)

    def forward(self, x: Tensor) -> Tensor:
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, shape[-1])
        bias = self.bias
        if self.precision in ("fp8-w8a8", "fp8-w8a8-row"):
            per_tensor = self.precision == "fp8-w8a8"
            codes, scale = (fp8_tensor_activation if per_tensor else fp8_token_activation)(x)
            accumulated = codes @ self.weight.float().t()
            out = accumulated * scale * self.weight_scale.reshape(1, -1)
        else:  # nvfp4-w4a4
            # An all-zero input has a zero tensor scale (NaN in torchao): it stays zero here.
            activations = nvfp4(x) if x.any() else x.float()
            out = activations @ self.dequantized_weight().t()
        out = (out if bias is None else out + bias.float()).to(dtype)
        return out.reshape(*shape[:-1], out.shape[-1])


def quantize_deployed_(linear: nn.Linear, precision: str) -> None:
    """Turn ``linear`` (already in its compute dtype) into a `DeployedLinear` in place."""
    weight = linear.weight.detach()
    if precision == "fp8-w8a8":
        codes, scale = fp8_tensor_weight(weight)
        scale = scale.reshape(1)
    elif precision == "fp8-w8a8-row":
        codes, scale = fp8_row_weight(weight)
        scale = scale.reshape(-1)
    elif precision == "nvfp4-w4a4":
        codes, scale = nvfp4_torchao_weight(weight)
    else:
        raise ValueError(f"{precision} is not a DeployedLinear format")
    with torch.no_grad():
        linear.weight.copy_(codes.to(weight.dtype))  # e4m3 / E2M1 values: exact in 16 bit
    linear.register_buffer("weight_scale", scale)
    linear.__class__ = DeployedLinear
    linear.precision = precision
