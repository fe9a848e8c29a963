"""Deployed formats that quantize activations too, emulated in pure PyTorch (any device).

- ``fp8-w8a8``: ComfyUI ``fp8_scaled`` on FP8 hardware (``comfy/quant_ops.py``
  ``TensorCoreFP8Layout`` + ``torch._scaled_mm``): e4m3 weights with one scale per tensor,
  the input quantized per call with a dynamic per-tensor scale ``amax/448``; values are
  multiplied by the reciprocal scale rounded to the input's dtype, then cast to e4m3.
- ``fp8-w8a8-row``: torchao ``Float8DynamicActivationFloat8WeightConfig(PerRow())``: one
  scale per weight row and per token, ``amax/448`` in the input's dtype, values divided in
  fp32 and clamped to ±448 (`qdd.quant.formats.fp8_row_codes`).
- ``nvfp4-w4a4``: NVFP4 weights and activations without a low-rank branch, as ModelOpt
  deploys it for TensorRT; numerics of torchao's NVFP4 (per-tensor ``amax/(448·6)`` and an
  E4M3 scale per 16), the activation's per-tensor scale taken per call.

SVDQuant (``svdq-*``) lives in `qdd.quant.svdquant`. Which layers each format takes is
declared in `qdd.quant.registry`.

Each quantized ``nn.Linear`` becomes a `DeployedLinear` whose ``weight`` holds the format's
codes (e4m3 or E2M1 values: exact in the compute dtype) and whose ``weight_scale`` buffer
holds the scales, so no fp32 copy of the weights is kept.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qdd.quant.formats import E4M3_MAX, fp8_row_codes, nvfp4, nvfp4_codes, safe_scale

#: The deployed W+A formats this module computes.
FORMATS: tuple[str, ...] = ("fp8-w8a8", "fp8-w8a8-row", "nvfp4-w4a4")


def fp8_tensor_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """ComfyUI ``TensorCoreFP8Layout.quantize``: e4m3 codes and the fp32 scale."""
    scale = (weight.abs().amax() / E4M3_MAX).float()
    reciprocal = (1.0 / safe_scale(scale)).to(weight.dtype)
    return (weight * reciprocal).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def fp8_tensor_activation(x: Tensor) -> tuple[Tensor, Tensor]:
    """ComfyUI's dynamic input quantization: e4m3 values (fp32) and the fp32 scale."""
    codes, scale = fp8_tensor_weight(x)
    return codes.float(), scale


def fp8_token_activation(x: Tensor) -> tuple[Tensor, Tensor]:
    """torchao's per-token (PerRow) activation quantization: e4m3 values and scales (fp32)."""
    codes, scale = fp8_row_codes(x)
    return codes.float(), scale


class DeployedLinear(nn.Linear):
    """A Linear in a deployed W+A format; ``weight`` holds codes, ``weight_scale`` scales."""

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
        else:
            # An all-zero input has a zero tensor scale (NaN in torchao): it stays zero here.
            activations = nvfp4(x) if x.any() else x.float()
            out = activations @ self.dequantized_weight().t()
        out = (out if bias is None else out + bias.float()).to(dtype)
        return out.reshape(*shape[:-1], out.shape[-1])


def deployed_linear(linear: nn.Linear, precision: str) -> DeployedLinear:
    """Turn ``linear`` (already in its compute dtype) into a `DeployedLinear` in place."""
    if precision not in FORMATS:
        raise ValueError(f"{precision!r} is not one of {FORMATS}")
    weight = linear.weight.detach()
    if precision == "fp8-w8a8":
        codes, scale = fp8_tensor_weight(weight)
        scale = scale.reshape(1)
    elif precision == "fp8-w8a8-row":
        codes, scale = fp8_row_codes(weight)
        scale = scale.reshape(-1)
    else:
        codes, scale = nvfp4_codes(weight)
    with torch.no_grad():
        linear.weight.copy_(codes.to(weight.dtype))  # e4m3 / E2M1 values: exact in 16 bit
    linear.register_buffer("weight_scale", scale)
    linear.__class__ = DeployedLinear
    assert isinstance(linear, DeployedLinear)
    linear.precision = precision
    return linear
