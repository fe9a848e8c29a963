"""The layer-level entry point: one Linear layer (or one weight) in one precision.

Researchers call `quantize_linear` on their own models; `qdd.quant.backends.quantize_module_`
and generation call it for every Linear a precision takes. What each precision does is
declared in `qdd.quant.registry`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qdd.errors import QddError
from qdd.quant import registry

#: The attribute a quantized layer carries: its precision (a second quantization is refused).
QUANTIZED_AS = "qdd_precision"


def act_absmax(calibration: Tensor, in_features: int) -> Tensor:
    """Per-input-channel abs-max (fp32) of ``calibration``: input activations
    (``[..., in_features]``) or their per-channel abs-max (``[in_features]``) — the abs-max
    of a 1-D vector is its own absolute value, so both read the same."""
    if calibration.shape[-1:] != (in_features,):
        raise QddError(
            f"calibration has {tuple(calibration.shape)} values, not [..., {in_features}] "
            "(the layer's input width): collect it from this layer's inputs"
        )
    return calibration.detach().float().abs().reshape(-1, in_features).amax(dim=0)


def quantize_linear(
    linear: nn.Linear,
    precision: str,
    *,
    calibration: Tensor | None = None,
    bnb_semantics: str = "cuda",
) -> nn.Module:
    """Quantize ``linear`` (in its compute dtype) in place to ``precision``; returns it.

    Weight-only formats replace the weight by its dequantized value; formats that quantize
    activations too turn the layer into their own Linear subclass. ``calibration``: the
    layer's input activations or their per-channel abs-max, for precisions that need it
    (``registry.get(p).calibration``), refused by the others. ``bnb_semantics``: which
    bitsandbytes ``fp4``/``nf4`` reproduce (`qdd.quant.bnb4bit`).
    """
    entry = registry.get(precision)
    if not entry.emulated:
        how = "a whole denoiser file (--precision on generate/quantize)" if entry.kind == "gguf" \
            else "no quantization: cast the layer to its dtype"  # fmt: skip
        raise QddError(f"{precision} is not applied per Linear layer: it means {how}")
    if not isinstance(linear, nn.Linear):
        raise QddError(f"quantize_linear takes an nn.Linear, not {type(linear).__name__}")
    done = getattr(linear, QUANTIZED_AS, None)
    if done is not None:
        raise QddError(
            f"this Linear is already quantized ({done}): quantize a fresh copy of the layer"
        )
    if calibration is not None and entry.calibration is None:
        raise QddError(f"{precision} uses no calibration: drop it (or pick a calibrated format)")
    if calibration is None and entry.calibration is not None:
        raise QddError(
            f"{precision} needs calibration ({entry.calibration} of the layer's inputs): pass "
            f"calibration=, or use {uncalibrated_alternative(precision)}"
        )
    if not entry.takes(linear, "", linear):
        raise QddError(
            f"{precision} does not take a {linear.out_features} × {linear.in_features} Linear "
            f"(kept in 16 bit: {entry.keeps})"
        )
    absmax = None if calibration is None else act_absmax(calibration, linear.in_features)
    if absmax is not None and not torch.isfinite(absmax).all():
        raise QddError(
            f"calibration holds inf or NaN (the activations overflowed): calibrate in a wider "
            f"dtype, drop the prompts that overflow, or use {uncalibrated_alternative(precision)}"
        )
    if entry.layer_kernel is not None:
        layer = entry.layer_kernel(linear, entry, absmax)
    else:
        assert entry.weight_kernel is not None
        with torch.no_grad():
            quantized = entry.weight_kernel(linear.weight.detach(), bnb_semantics)
            linear.weight.copy_(quantized.to(linear.weight.dtype))
        if entry.linear_class is not nn.Linear and type(linear) is nn.Linear:
            linear.__class__ = entry.linear_class  # same parameters, the library's op order
        layer = linear
    setattr(layer, QUANTIZED_AS, precision)
    return layer


def uncalibrated_alternative(precision: str) -> str:
    """The precisions of the same formats that need no calibration (for error messages)."""
    entry = registry.get(precision)
    same = [
        name for name in registry.names()
        if (other := registry.get(name)).calibration is None
        and (other.weight_format, other.activation_format)
        == (entry.weight_format, entry.activation_format)
    ]  # fmt: skip
    return " or ".join(same) if same else "a precision without calibration"


def fake_quantize(weight: Tensor, precision: str, bnb_semantics: str = "cuda") -> Tensor:
    """Quantize→dequantize one weight with the exact numerics of a weight-only ``precision``
    (fp32 out). ``bnb_semantics``: ``cuda`` or ``cpu`` bitsandbytes (`qdd.quant.bnb4bit`)."""
    entry = registry.REGISTRY.get(precision)
    if entry is None or entry.weight_kernel is None:
        weight_only = [n for n in registry.names() if registry.REGISTRY[n].weight_kernel]
        raise ValueError(
            f"{precision!r} is not a quantized precision of weights alone: one of {weight_only}"
        )
    with torch.no_grad():
        return entry.weight_kernel(weight.detach(), bnb_semantics)
