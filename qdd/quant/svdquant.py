"""SVDQuant W4A4 (Li et al., ICLR 2025; deepcompressor → Nunchaku), emulated in pure PyTorch.

A Linear ``y = x Wᵀ`` becomes ``y = Q(x/s) Q(R)ᵀ + (x/s) Lᵀ``: the inputs are divided by a
per-channel smoothing vector ``s`` and quantized per token per group, the smoothed weight
``W·s`` is split into a rank-32 16-bit branch ``L = U_r S_r V_rᵀ`` (its SVD) and a 4-bit
residual ``R`` (INT4 ``amax/7`` per 64, or NVFP4 per 16).

Two smoothings:

- ``data-free`` (``svdq-*-datafree``): ``s_j = 1/sqrt(max_i |W_ij|)``, never looking at
  activations — diffusers' data-free SVDQuant (``quantizers/nunchaku/data_free.py``), whose
  weights this reproduces bit for bit; the INT4 activations and matmul are comfy-kitchen's
  eager SVDQuant backend, bit for bit.
- ``calibrated`` (``svdq-int4``, ``svdq-nvfp4``: what released Nunchaku models use):
  SmoothQuant's ``s_j = max|X_j|^α / max_i|W_ij|^β`` from the per-channel input abs-max of
  calibration prompts. The (α, β) search follows deepcompressor
  (``calib/smooth.py``, ``calib/config/smooth.py``; ``configs/svdquant/__default__.yaml``:
  ``alpha: 0.5, beta: -2, num_grids: 20, spans: [AbsMax, AbsMax], objective: OutputsError,
  granularity: Layer, allow_low_rank: true``): the candidates are ``(0, 0)`` (no smoothing),
  ``(k/20, 0)`` and ``(k/20, 1 − k/20)`` for ``k = 1 … 19``; each is scored by the layer's
  output error (sum of squares) with the weights *and* the low-rank branch quantized as
  deployed, and the first smallest wins; a zero scale becomes 1 and a non-finite vector all
  ones, as there.

  Kept: the grid, the spans, the objective with the low-rank branch inside the search, the
  first-minimum rule. Simplified: (1) the error is measured on a seeded Gaussian probe whose
  channel ``j`` has spread ``max|X_j|/3`` (clipped to ``±max|X_j|``), not on cached
  calibration activations — qdd keeps only the abs-max per layer; (2) one search per layer,
  not one per group of layers sharing an input (deepcompressor smooths q/k/v together);
  (3) the low-rank branch is one SVD of the smoothed weight, not deepcompressor's iterative
  refinement (``low_rank.num_iters: 100``), and while searching a seeded randomized SVD
  (`sketched_low_rank`) stands in for it, so a candidate costs O(out·in·r), not a full
  SVD (the chosen smoothing is then factorized exactly); (4) the data-free vector is one
  more candidate (last), so calibrated smoothing is never worse than data-free on the probe.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from qdd.quant.formats import E2M1_GRID, E2M1_MAX, E4M3_MAX, round_to_e2m1

SVDQ_RANK = 32
INT4_GROUP = 64
NVFP4_GROUP = 16
INT4_MAX = 7.0
#: deepcompressor's ``smooth.proj.num_grids`` in configs/svdquant/__default__.yaml.
ALPHA_GRIDS = 20
WEIGHT_FORMATS = ("int4", "nvfp4")
SMOOTHINGS = ("calibrated", "data-free")
PROBE_TOKENS = 256
PROBE_SEED = 0


# --- smoothing -------------------------------------------------------------------------------


def smooth_factor(weight: Tensor) -> Tensor:
    """Data-free weight-span smoothing (fp32): ``1/sqrt(max_i |W_ij|)``, clamped as diffusers."""
    span = weight.float().abs().amax(dim=0).clamp_min(1e-6)
    scale = 1.0 / span.sqrt()
    return torch.where(torch.isfinite(scale), scale, torch.ones_like(scale)).clamp_min(1e-6)


def calibrated_smooth(act_absmax: Tensor, weight: Tensor, alpha: float, beta: float) -> Tensor:
    """``max|X_j|^α / max_i|W_ij|^β`` (fp32), deepcompressor's ``get_smooth_scale``."""
    if not (0 <= alpha <= 1 and 0 <= beta <= 1):
        raise ValueError(f"smoothing exponents must lie in [0, 1], got α={alpha}, β={beta}")
    x_span = act_absmax.float()
    w_span = weight.float().abs().amax(dim=0)
    if alpha == 0 and beta == 0:
        return torch.ones_like(x_span)
    scale = x_span.pow(alpha) if alpha > 0 else torch.ones_like(x_span)
    if beta > 0:
        scale = scale / w_span.pow(beta)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    if not torch.isfinite(scale).all():
        scale = torch.ones_like(scale)
    return scale


def smoothing_candidates(grids: int = ALPHA_GRIDS) -> list[tuple[float, float]]:
    """deepcompressor's (α, β) grid for ``alpha > 0, beta = -2``: none, (a, 0), (a, 1 − a)."""
    choices = [k / grids for k in range(1, grids)]
    return [(0.0, 0.0)] + [(a, 0.0) for a in choices] + [(a, 1.0 - a) for a in choices]


# --- weights and activations -----------------------------------------------------------------


def low_rank(smoothed: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``up (out×r) = U_r·S_r`` and ``down (r×in) = V_rᵀ`` of the smoothed weight (fp32)."""
    u, s, vh = torch.linalg.svd(smoothed, full_matrices=False)
    rank = min(rank, s.numel())
    return u[:, :rank] * s[:rank], vh[:rank]


def sketched_low_rank(smoothed: Tensor, rank: int, oversample: int = 8) -> tuple[Tensor, Tensor]:
    """`low_rank` by a seeded randomized SVD (Halko et al. 2011, two power iterations): the
    search's stand-in, O(out·in·r) instead of a full SVD per candidate; exact when small."""
    width = rank + oversample
    if width >= min(smoothed.shape):
        return low_rank(smoothed, rank)
    seeded = torch.Generator().manual_seed(PROBE_SEED)
    sketch = torch.randn(smoothed.shape[1], width, generator=seeded).to(smoothed.device)
    basis = torch.linalg.qr(smoothed @ sketch).Q
    for _ in range(2):
        basis = torch.linalg.qr(smoothed @ torch.linalg.qr(smoothed.t() @ basis).Q).Q
    u, s, vh = torch.linalg.svd(basis.t() @ smoothed, full_matrices=False)
    return (basis @ u[:, :rank]) * s[:rank], vh[:rank]


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


def nvfp4_svdq_groups(residual: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """diffusers' data-free NVFP4 residual: E2M1 codes, scale = e4m3 block × tensor scale."""
    rows = residual.unflatten(-1, (-1, NVFP4_GROUP))
    effective = rows.abs().amax(dim=-1, keepdim=True).clamp_min(1e-6) / E2M1_MAX
    tensor_scale = (effective.amax() / E4M3_MAX).clamp_min(1e-12)
    block = (effective / tensor_scale).clamp(0.0, E4M3_MAX).to(torch.float8_e4m3fn).float()
    codes = _e2m1_nearest_ties_down(rows / (block * tensor_scale))
    # The kernel receives the tensor scale in the compute dtype (``wtscale``).
    return codes.flatten(-2), block * tensor_scale.to(dtype).float()


def int4_activation(x: Tensor, group: int = INT4_GROUP) -> Tensor:
    """comfy-kitchen's eager SVDQuant activations: symmetric [-7, 7] per group, in x's dtype."""
    groups = x.unflatten(-1, (-1, group))
    scale = groups.abs().amax(dim=-1, keepdim=True).clamp(min=1e-10) / INT4_MAX
    codes = (groups / scale).round().clamp(-INT4_MAX, INT4_MAX)
    return (codes.to(x.dtype) * scale.to(x.dtype)).flatten(-2)


def nvfp4_block_activation(x: Tensor) -> Tensor:
    """NVFP4 activations per 16 per token with an E4M3 block scale ``amax/6`` (fp32 out).

    Nunchaku keeps activation scales as ``float8_e4m3fn`` (K/16 × tokens) with no
    per-tensor factor; its kernel's exact rounding is not reproduced (no CPU reference).
    """
    groups = x.float().unflatten(-1, (-1, NVFP4_GROUP))
    scale = (groups.abs().amax(dim=-1, keepdim=True) / E2M1_MAX).clamp(max=E4M3_MAX)
    scale = scale.to(torch.float8_e4m3fn).float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    elements = round_to_e2m1((groups / safe).clamp(-E2M1_MAX, E2M1_MAX))
    return (elements * scale).flatten(-2)


# --- the layer -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SvdqWeights:
    """What Nunchaku's kernels receive, in the compute dtype (scales: see the formats)."""

    codes: Tensor  #: INT4 integers or E2M1 values (exact in 16 bit)
    scale: Tensor  #: per group
    smooth: Tensor  #: (in,)
    proj_down: Tensor  #: (r × in), 1/smooth folded in
    proj_up: Tensor  #: (out × r)


def svdq_weights(
    weight: Tensor,
    smooth: Tensor,
    weight_format: str,
    rank: int,
    group: int,
    dtype: torch.dtype,
    factorize: Callable[[Tensor, int], tuple[Tensor, Tensor]] = low_rank,
) -> SvdqWeights:
    """Smooth (fp32), split off the rank-``rank`` branch, quantize the residual per group."""
    smoothed = weight.float() * smooth
    up, down = factorize(smoothed, rank)
    residual = smoothed - up @ down
    if weight_format == "int4":
        codes, scale = int4_groups(residual, group, dtype)
    else:
        codes, scale = nvfp4_svdq_groups(residual, dtype)
    return SvdqWeights(
        codes.to(dtype), scale, smooth.to(dtype), (down / smooth).to(dtype), up.to(dtype)
    )


def dequantized(weights: SvdqWeights, weight_format: str, group: int) -> Tensor:
    """The residual the format computes with (INT4 in the compute dtype, NVFP4 in fp32)."""
    if weight_format == "int4":
        return (weights.codes.unflatten(-1, (-1, group)) * weights.scale).flatten(-2)
    return (weights.codes.float().unflatten(-1, (-1, NVFP4_GROUP)) * weights.scale).flatten(-2)


def svdq_matmul(
    x: Tensor, weights: SvdqWeights, residual: Tensor, weight_format: str, group: int
) -> Tensor:
    """``Q(x/s)·Q(R)ᵀ + x·(down/s)ᵀ·upᵀ`` for 2-D ``x``, in x's dtype (no bias)."""
    dtype = x.dtype
    lora = (x.float() @ weights.proj_down.float().t()) @ weights.proj_up.float().t()
    smoothed = x / weights.smooth
    if weight_format == "int4":
        main = int4_activation(smoothed, group) @ residual.t()
    else:
        main = (nvfp4_block_activation(smoothed) @ residual.t()).to(dtype)
    return main + lora.to(dtype)


class SVDQuantLinear(nn.Linear):
    """A Linear in SVDQuant W4A4: ``weight`` holds the residual's codes, ``weight_scale``
    its scales; ``smooth``, ``proj_down`` and ``proj_up`` as Nunchaku's kernels take them."""

    weight_format: str
    group: int
    alpha: float | None  #: the smoothing's α (None: data-free)
    beta: float | None

    def __init__(
        self,
        weights: SvdqWeights,
        bias: Tensor | None,
        weight_format: str,
        group: int,
        alpha: float | None,
        beta: float | None,
    ) -> None:
        out_features, in_features = weights.codes.shape
        super().__init__(in_features, out_features, bias=bias is not None, device="meta")
        self.weight = nn.Parameter(weights.codes, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.register_buffer("weight_scale", weights.scale)
        self.register_buffer("smooth", weights.smooth)
        self.register_buffer("proj_down", weights.proj_down)
        self.register_buffer("proj_up", weights.proj_up)
        self.weight_format, self.group, self.alpha, self.beta = weight_format, group, alpha, beta

    def _weights(self) -> SvdqWeights:
        return SvdqWeights(
            self.weight, self.weight_scale, self.smooth, self.proj_down, self.proj_up
        )

    def dequantized_weight(self) -> Tensor:
        """The residual the format computes with (INT4 in the compute dtype, NVFP4 in fp32)."""
        return dequantized(self._weights(), self.weight_format, self.group)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        out = svdq_matmul(
            flat, self._weights(), self.dequantized_weight(), self.weight_format, self.group
        )
        out = out if self.bias is None else out + self.bias
        return out.reshape(*shape[:-1], out.shape[-1])


def become_svdquant_(linear: nn.Linear, built: SVDQuantLinear) -> SVDQuantLinear:
    """Turn ``linear`` itself into ``built`` (its place in the model and its hooks kept), so
    SVDQuant quantizes in place as every other precision does."""
    linear.__class__ = SVDQuantLinear
    assert isinstance(linear, SVDQuantLinear)
    linear.weight = built.weight
    linear.bias = built.bias
    for name, buffer in built.named_buffers(recurse=False):
        linear.register_buffer(name, buffer)
    linear.weight_format, linear.group = built.weight_format, built.group
    linear.alpha, linear.beta = built.alpha, built.beta
    return linear


# --- the alpha search ------------------------------------------------------------------------


def probe_inputs(act_absmax: Tensor, dtype: torch.dtype, tokens: int = PROBE_TOKENS) -> Tensor:
    """Seeded Gaussian tokens with channel ``j`` spread ``max|X_j|/3``, clipped to ``±max|X_j|``."""
    span = act_absmax.float().cpu()
    noise = torch.randn(tokens, span.numel(), generator=torch.Generator().manual_seed(PROBE_SEED))
    probe = torch.maximum(torch.minimum(noise * span / 3, span), -span)
    return probe.to(device=act_absmax.device, dtype=dtype)


def search_smoothing(
    weight: Tensor, act_absmax: Tensor, weight_format: str, rank: int, group: int
) -> tuple[Tensor, float, float]:
    """The smoothing vector and (α, β) with the smallest output error on the probe."""
    dtype = weight.dtype
    probe = probe_inputs(act_absmax, dtype)
    exact = probe.float() @ weight.float().t()
    best: tuple[float, Tensor, float, float] | None = None
    candidates: list[tuple[Tensor, float, float]] = [
        (calibrated_smooth(act_absmax, weight, a, b), a, b) for a, b in smoothing_candidates()
    ]
    candidates.append((smooth_factor(weight), 0.0, 0.5))  # data-free, as a last candidate
    for smooth, alpha, beta in candidates:
        weights = svdq_weights(
            weight, smooth, weight_format, rank, group, dtype, factorize=sketched_low_rank
        )
        out = svdq_matmul(
            probe, weights, dequantized(weights, weight_format, group), weight_format, group
        )
        error = (out.float() - exact).square().sum().item()
        if best is None or error < best[0]:
            best = (error, smooth, alpha, beta)
    assert best is not None
    return best[1], best[2], best[3]


def svdquant_linear(
    linear: nn.Linear,
    *,
    weight_format: str,
    rank: int,
    group: int,
    smoothing: str,
    act_absmax: Tensor | None,
    alpha: float | None = None,
) -> nn.Module:
    """``linear`` (in its compute dtype) as an `SVDQuantLinear`; ``linear`` is left as it is.

    ``smoothing``: ``calibrated`` needs ``act_absmax`` (the per-channel max of ``|input|``
    over calibration prompts); ``alpha`` fixes ``s = max|X|^α / max|W|^(1−α)``, else (α, β)
    are searched as deepcompressor does (module docstring). ``data-free`` takes neither.
    """
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"unknown SVDQuant weight format {weight_format!r}: int4 or nvfp4")
    if smoothing not in SMOOTHINGS:
        raise ValueError(f"unknown smoothing {smoothing!r}: calibrated or data-free")
    if weight_format == "nvfp4" and group != NVFP4_GROUP:
        raise ValueError(f"nvfp4 quantizes groups of {NVFP4_GROUP}, not {group}")
    weight = linear.weight.detach()
    if weight.shape[1] % group:
        raise ValueError(f"in_features {weight.shape[1]} is not a multiple of the group {group}")
    beta: float | None
    if smoothing == "data-free":
        if act_absmax is not None or alpha is not None:
            raise ValueError("data-free smoothing takes no act_absmax nor alpha")
        smooth, alpha, beta = smooth_factor(weight), None, None
    else:
        if act_absmax is None:
            raise ValueError("calibrated smoothing needs act_absmax (per-channel max |input|)")
        if act_absmax.shape != (weight.shape[1],):
            raise ValueError(
                f"act_absmax has shape {tuple(act_absmax.shape)}, the layer takes "
                f"{weight.shape[1]} input channels"
            )
        if not torch.isfinite(act_absmax).all():
            raise ValueError("act_absmax holds inf or NaN: the calibration overflowed")
        act_absmax = act_absmax.to(weight.device)
        if alpha is None:
            smooth, alpha, beta = search_smoothing(weight, act_absmax, weight_format, rank, group)
        else:
            beta = 1.0 - alpha
            smooth = calibrated_smooth(act_absmax, weight, alpha, beta)
    weights = svdq_weights(weight, smooth, weight_format, rank, group, weight.dtype)
    return SVDQuantLinear(weights, linear.bias, weight_format, group, alpha, beta)


def smoothing_summary(layers: Iterable[SVDQuantLinear]) -> dict[str, Any] | None:
    """``{"kind": "data-free"}``, or ``{"kind": "calibrated", "alpha": {min, median, max},
    "beta": {…}}`` over ``layers``; None when there are none."""
    layers = list(layers)
    if not layers:
        return None
    if all(layer.alpha is None for layer in layers):
        return {"kind": "data-free"}
    summary: dict[str, Any] = {"kind": "calibrated"}
    for name in ("alpha", "beta"):
        values = [round(v, 4) for v in (getattr(layer, name) for layer in layers) if v is not None]
        summary[name] = {
            "min": min(values), "median": statistics.median(values), "max": max(values)
        }  # fmt: skip
    return summary
