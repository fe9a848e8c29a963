"""Precision formats: one registry, exact emulations and the real bitsandbytes/torchao backends."""

from qdd.quant import precisions  # noqa: F401  (fills the registry before anything reads it)
from qdd.quant.backends import (
    BACKENDS,
    QuantReport,
    diffusers_quantization_config,
    quantize_module_,
    resolve_backend,
)
from qdd.quant.layer import fake_quantize, quantize_linear
from qdd.quant.registry import Precision, register

__all__ = [
    "BACKENDS",
    "Precision",
    "QuantReport",
    "diffusers_quantization_config",
    "fake_quantize",
    "quantize_linear",
    "quantize_module_",
    "register",
    "resolve_backend",
]
