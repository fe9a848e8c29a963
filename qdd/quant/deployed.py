"""Deployed formats that quantize activations too, emulated in pure PyTorch (any device).

- ``fp8-w8a8``: ComfyUI ``fp8_scaled`` on FP8 hardware (``comfy/quant_ops.py``
  ``TensorCoreFP8Layout`` + ``torch._scaled_mm``): e4m3 weights with one scale per tensor,
  the input quantized per call with a dynamic per-tensor scale ``amax/448``; values are
  multiplied by the reciprocal scale rounded to the input's dtype, then cast to e4m3.
- ``fp8-w8a8-row``: torchao ``Float8DynamicActivationFloat8WeightConfig(PerRow())``: one
  scale per weight row and per token, ``amax/448`` in the input's dtype, values divided in
  fp32 and clamped to ±448. Layers whose dims are not multiples of 16 stay unquantized, as
  torchao skips them.
- ``svdq-int4`` / ``svdq-nvfp4``: SVDQuant (Nunchaku) W4A4, data-free: weight-span smoothing
  ``s_j = 1/sqrt(max_i |W_ij|)``, a rank-32 16-bit low-rank branch from the SVD of the
  smoothed weight, the residual quantized per group (INT4 ``amax/7`` per 64 or NVFP4 per 16),
  the activations divided by ``s`` and quantized per token per group — the weights as
  diffusers' data-free SVDQuant (``quantizers/nunchaku/data_free.py``), the INT4 activations
  and matmul as comfy-kitchen's eager SVDQuant backend. Calibrated smoothing is not
  reproduced (it needs activations; docs/quantization.md).
- ``nvfp4-w4a4``: NVFP4 weights and activations without a low-rank branch, as ModelOpt
  deploys it for TensorRT; numerics of torchao's NVFP4 (per-tensor ``amax/(448·6)`` and an
  E4M3 scale per 16), the activation's per-tensor scale taken per call.

Each quantized ``nn.Linear`` becomes a `DeployedLinear` whose ``weight`` holds the format's
codes (e4m3 values, INT4 integers or E2M1 values: exact in the compute dtype) and whose
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
    "nvfp4-w4a4": Format("nvfp4", "nvfp4", 16),
}
SVDQ_RANK = 32
#: diffusers' data-free SVDQuant leaves adaLN-style linears in 16 bit, by name.
SVDQ_EXCLUDE = ("norm", "modulation")
#: ModelOpt's Flux NVFP4 recipe leaves these unquantized (proj_out: the final projection).
MODELOPT_EXCLUDE = re.compile(r"^proj_out|time_text_embed|context_embedder|x_embedder|norm_out")
INT4_MAX = 7.0


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


def smooth_factor(weight: Tensor) -> Tensor:
    """Data-free weight-span smoothing (fp32): ``1/sqrt(max_i |W_ij|)``, clamped as diffusers."""
    span = weight.float().abs().amax(dim=0).clamp_min(1e-6)
    scale = 1.0 / span.sqrt()
    return torch.where(torch.isfinite(scale), scale, torch.ones_like(scale)).clamp_min(1e-6)


def low_rank(smoothed: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``up (out×r) = U_r·S_r`` and ``down (r×in) = V_rᵀ`` of the smoothed weight (fp32)."""
    u, s, vh = torch.linalg.svd(smoothed, full_matrices=False)
    rank = min(rank, s.numel())
    return u[:, :rank] * s[:rank], vh[:rank]


def int4_groups(residual: Tensor, group: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Symmetric INT4 per group: codes in [-8, 7], scale ``amax/7`` stored in ``dtype``."""
    rows = residual.unflatten(-1, (-1, group))
    scale = rows.abs().amax(dim=-1, keepdim=True).clamp_min(1e-6) / INT4_MAX
    codes = (rows / scale).round().clamp(-8, 7)
    return codes.flatten(-2), scale.to(dtype)


def _e2m1_nearest_ties_down(x: Tensor) -> Tensor:
    """E2M1 by midpoint thresholds, ties to the smaller magnitude (diffusers' bucketize)."""
    grid = torch.tensor((0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0), device=x.device)
    index = torch.bucketize(x.abs(), (grid[:-1] + grid[1:]) / 2, right=False)
    return torch.copysign(grid[index], x)


def nvfp4_svdq_groups(residual: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """diffusers' data-free NVFP4 residual: E2M1 codes, scale = e4m3 block × tensor scale."""
    rows = residual.unflatten(-1, (-1, 16))
    effective = rows.abs().amax(dim=-1, keepdim=True).clamp_min(1e-6) / E2M1_MAX
    tensor_scale = (effective.amax() / E4M3_MAX).clamp_min(1e-12)
    block = (effective / tensor_scale).clamp(0.0, E4M3_MAX).to(torch.float8_e4m3fn).float()
    codes = _e2m1_nearest_ties_down(rows / (block * tensor_scale))
    # The kernel receives the tensor scale in the compute dtype (``wtscale``).
    return codes.flatten(-2), block * tensor_scale.to(dtype).float()


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


def int4_activation(x: Tensor, group: int = 64) -> Tensor:
    """comfy-kitchen's eager SVDQuant activations: symmetric [-7, 7] per 64, in x's dtype."""
    groups = x.unflatten(-1, (-1, group))
    scale = groups.abs().amax(dim=-1, keepdim=True).clamp(min=1e-10) / INT4_MAX
    codes = (groups / scale).round().clamp(-INT4_MAX, INT4_MAX)
    return (codes.to(x.dtype) * scale.to(x.dtype)).flatten(-2)


def nvfp4_block_activation(x: Tensor) -> Tensor:
    """NVFP4 activations per 16 per token with an E4M3 block scale ``amax/6`` (fp32 out).

    Nunchaku keeps activation scales as ``float8_e4m3fn`` (K/16 × tokens) with no
    per-tensor factor; its kernel's exact rounding is not reproduced (no CPU reference).
    """
    groups = x.float().unflatten(-1, (-1, 16))
    scale = (groups.abs().amax(dim=-1, keepdim=True) / E2M1_MAX).clamp(max=E4M3_MAX)
    scale = scale.to(torch.float8_e4m3fn).float()
    elements = round_to_e2m1((groups / _safe(scale)).clamp(-E2M1_MAX, E2M1_MAX))
    return (elements * scale).flatten(-2)


# --- the layer -----------------------------------------------------------------------------


class DeployedLinear(nn.Linear):
    """A Linear in a deployed W+A format; ``weight`` holds codes, ``weight_scale`` scales.

    ``svdq-*`` layers also hold ``smooth`` (in), ``proj_down`` (r×in, 1/smooth folded in)
    and ``proj_up`` (out×r), all in the compute dtype, as Nunchaku's kernels receive them.
    """

    precision: str

    def dequantized_weight(self) -> Tensor:
        """The weight the format computes with (fp32; INT4 in the compute dtype)."""
        out_features, in_features = self.weight.shape
        scale = self.weight_scale
        if self.precision in ("fp8-w8a8", "fp8-w8a8-row"):
            return self.weight.float() * scale
        if self.precision == "svdq-int4":
            groups = self.weight.unflatten(-1, (-1, 64))
            return (groups * scale).flatten(-2)
        groups = self.weight.float().unflatten(-1, (-1, 16))
        return (groups * scale).flatten(-2)

    def forward(self, x: Tensor) -> Tensor:
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, shape[-1])
        bias = self.bias
        if self.precision in ("fp8-w8a8", "fp8-w8a8-row"):
            per_tensor = self.precision == "fp8-w8a8"
            codes, scale = (fp8_tensor_activation if per_tensor else fp8_token_activation)(x)
            accumulated = codes @ self.weight.float().t()
            out = accumulated * scale * self.weight_scale.reshape(1, -1)
            out = (out if bias is None else out + bias.float()).to(dtype)
        elif self.precision == "nvfp4-w4a4":
            # An all-zero input has a zero tensor scale (NaN in torchao): it stays zero here.
            activations = nvfp4(x) if x.any() else x.float()
            out = activations @ self.dequantized_weight().t()
            out = (out if bias is None else out + bias.float()).to(dtype)
        else:
            lora = (x.float() @ self.proj_down.float().t()) @ self.proj_up.float().t()
            smoothed = x / self.smooth
            if self.precision == "svdq-int4":
                main = int4_activation(smoothed) @ self.dequantized_weight().t()
            else:
                main = (nvfp4_block_activation(smoothed) @ self.dequantized_weight().t()).to(dtype)
            out = main + lora.to(dtype)
            out = out if bias is None else out + bias
        return out.reshape(*shape[:-1], out.shape[-1])


def quantize_deployed_(linear: nn.Linear, precision: str) -> None:
    """Turn ``linear`` (already in its compute dtype) into a `DeployedLinear` in place."""
    weight = linear.weight.detach()
    dtype = weight.dtype
    extra: dict[str, Tensor] = {}
    if precision == "fp8-w8a8":
        codes, scale = fp8_tensor_weight(weight)
        scale = scale.reshape(1)
    elif precision == "fp8-w8a8-row":
        codes, scale = fp8_row_weight(weight)
        scale = scale.reshape(-1)
    elif precision == "nvfp4-w4a4":
        codes, scale = nvfp4_torchao_weight(weight)
    else:
        smooth = smooth_factor(weight)
        smoothed = weight.float() * smooth
        up, down = low_rank(smoothed, SVDQ_RANK)
        residual = smoothed - up @ down
        if precision == "svdq-int4":
            codes, scale = int4_groups(residual, 64, dtype)
        else:
            codes, scale = nvfp4_svdq_groups(residual, dtype)
        extra = {
            "smooth": smooth.to(dtype),
            "proj_down": (down / smooth).to(dtype),
            "proj_up": up.to(dtype),
        }
    with torch.no_grad():
        linear.weight.copy_(codes.to(dtype))  # e4m3 / INT4 / E2M1 values: exact in 16 bit
    linear.register_buffer("weight_scale", scale)
    for name, value in extra.items():
        linear.register_buffer(name, value)
    linear.__class__ = DeployedLinear
    linear.precision = precision
