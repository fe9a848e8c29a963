"""SVDQuant W4A4 (Li et al., ICLR 2025; deployed through Nunchaku), emulated in PyTorch.

A Linear ``y = x Wᵀ`` becomes ``y = q(x/s) · q(R)ᵀ + x · (U Vᵀ/s)ᵀ``: the input is divided
by a per-channel smoothing vector ``s`` (folded into the weight as ``W·s``), a rank-32
16-bit branch ``U Vᵀ`` takes the largest singular directions of the smoothed weight, and
the residual ``R`` and the smoothed input are quantized to 4 bits per group.

- ``weight_format="int4"``: symmetric INT4 per 64, ``amax/7`` scales in the compute dtype
  (weights: diffusers' data-free SVDQuant ``quantizers/nunchaku/data_free.py``; activations
  and matmul: comfy-kitchen's eager SVDQuant backend, bit for bit).
- ``weight_format="nvfp4"``: E2M1 per 16 with an e4m3 block scale relative to the fp32
  tensor scale (diffusers' data-free NVFP4; midpoint rounding with ties to the smaller
  value); activations E2M1 per 16 per token with an e4m3 scale ``amax/6``.

Smoothing: ``data-free`` is ``s_j = 1/√max_i|W_ij|`` (diffusers' data-free code, bit for
bit). The calibrated smoothing the released models use (activation statistics) arrives
through ``act_absmax``; which smoothings this build computes is `SMOOTHINGS`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qdd.quant.formats import E2M1_GRID, E2M1_MAX, E4M3_MAX, round_to_e2m1, safe_scale

INT4_MAX = 7.0
#: Smoothing vectors this module computes (``svdquant_linear``'s ``smoothing``).
SMOOTHINGS: tuple[str, ...] = ("data-free",)
WEIGHT_FORMATS: tuple[str, ...] = ("int4", "nvfp4")


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
    grid = torch.tensor(E2M1_GRID, device=x.device)
    index = torch.bucketize(x.abs(), (grid[:-1] + grid[1:]) / 2, right=False)
    return torch.copysign(grid[index], x)


def nvfp4_svdq_groups(residual: Tensor, group: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """diffusers' data-free NVFP4 residual: E2M1 codes, scale = e4m3 block × tensor scale."""
    rows = residual.unflatten(-1, (-1, group))
    effective = rows.abs().amax(dim=-1, keepdim=True).clamp_min(1e-6) / E2M1_MAX
    tensor_scale = (effective.amax() / E4M3_MAX).clamp_min(1e-12)
    block = (effective / tensor_scale).clamp(0.0, E4M3_MAX).to(torch.float8_e4m3fn).float()
    codes = _e2m1_nearest_ties_down(rows / (block * tensor_scale))
    # The kernel receives the tensor scale in the compute dtype (``wtscale``).
    return codes.flatten(-2), block * tensor_scale.to(dtype).float()


def int4_activation(x: Tensor, group: int) -> Tensor:
    """comfy-kitchen's eager SVDQuant activations: symmetric [-7, 7] per group, in x's dtype."""
    groups = x.unflatten(-1, (-1, group))
    scale = groups.abs().amax(dim=-1, keepdim=True).clamp(min=1e-10) / INT4_MAX
    codes = (groups / scale).round().clamp(-INT4_MAX, INT4_MAX)
    return (codes.to(x.dtype) * scale.to(x.dtype)).flatten(-2)


def nvfp4_block_activation(x: Tensor, group: int) -> Tensor:
    """NVFP4 activations per group per token with an E4M3 block scale ``amax/6`` (fp32 out).

    Nunchaku keeps activation scales as ``float8_e4m3fn`` (K/16 × tokens) with no
    per-tensor factor; its kernel's exact rounding is not reproduced (no CPU reference).
    """
    groups = x.float().unflatten(-1, (-1, group))
    scale = (groups.abs().amax(dim=-1, keepdim=True) / E2M1_MAX).clamp(max=E4M3_MAX)
    scale = scale.to(torch.float8_e4m3fn).float()
    elements = round_to_e2m1((groups / safe_scale(scale)).clamp(-E2M1_MAX, E2M1_MAX))
    return (elements * scale).flatten(-2)


class SVDQuantLinear(nn.Linear):
    """An SVDQuant W4A4 Linear: ``weight`` holds the residual's codes, ``weight_scale`` its
    group scales; ``smooth`` (in), ``proj_down`` (r×in, 1/smooth folded in) and ``proj_up``
    (out×r) are in the compute dtype, as Nunchaku's kernels receive them."""

    weight_format: str
    group: int

    def dequantized_weight(self) -> Tensor:
        """The residual weight the format computes with (INT4: in the compute dtype)."""
        if self.weight_format == "int4":
            return (self.weight.unflatten(-1, (-1, self.group)) * self.weight_scale).flatten(-2)
        groups = self.weight.float().unflatten(-1, (-1, self.group))
        return (groups * self.weight_scale).flatten(-2)

    def forward(self, x: Tensor) -> Tensor:
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, shape[-1])
        lora = (x.float() @ self.proj_down.float().t()) @ self.proj_up.float().t()
        smoothed = x / self.smooth
        if self.weight_format == "int4":
            main = int4_activation(smoothed, self.group) @ self.dequantized_weight().t()
        else:
            activations = nvfp4_block_activation(smoothed, self.group)
            main = (activations @ self.dequantized_weight().t()).to(dtype)
        out = main + lora.to(dtype)
        out = out if self.bias is None else out + self.bias
        return out.reshape(*shape[:-1], out.shape[-1])


def svdquant_linear(
    linear: nn.Linear,
    *,
    weight_format: str,
    rank: int,
    group: int,
    smoothing: str,
    act_absmax: Tensor | None,
    alpha: float | None = None,
) -> SVDQuantLinear:
    """Turn ``linear`` (already in its compute dtype) into an `SVDQuantLinear` in place.

    ``smoothing``: one of `SMOOTHINGS`; ``act_absmax`` (per input channel) and ``alpha``
    are the calibrated smoothing's inputs, refused by the data-free one.
    """
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"unknown SVDQuant weight format {weight_format!r}: {WEIGHT_FORMATS}")
    if smoothing not in SMOOTHINGS:
        raise ValueError(f"unknown SVDQuant smoothing {smoothing!r}: one of {SMOOTHINGS}")
    if act_absmax is not None or alpha is not None:
        raise ValueError("data-free smoothing takes no activation statistics (act_absmax, alpha)")
    weight = linear.weight.detach()
    dtype = weight.dtype
    smooth = smooth_factor(weight)
    smoothed = weight.float() * smooth
    up, down = low_rank(smoothed, rank)
    residual = smoothed - up @ down
    if weight_format == "int4":
        codes, scale = int4_groups(residual, group, dtype)
    else:
        codes, scale = nvfp4_svdq_groups(residual, group, dtype)
    with torch.no_grad():
        linear.weight.copy_(codes.to(dtype))  # INT4 integers / E2M1 values: exact in 16 bit
    linear.register_buffer("weight_scale", scale)
    linear.register_buffer("smooth", smooth.to(dtype))
    linear.register_buffer("proj_down", (down / smooth).to(dtype))
    linear.register_buffer("proj_up", up.to(dtype))
    linear.__class__ = SVDQuantLinear
    assert isinstance(linear, SVDQuantLinear)
    linear.weight_format, linear.group = weight_format, group
    return linear
