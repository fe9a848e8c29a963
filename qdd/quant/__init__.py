"""Precision formats: exact emulations and the real bitsandbytes/torchao backends."""

from qdd.quant.backends import (
    BACKENDS,
    QuantReport,
    diffusers_quantization_config,
    quantize_module_,
    resolve_backend,
)
from qdd.quant.formats import DEPLOYED, PRECISIONS, QUANTIZED, WEIGHT_ONLY, fake_quantize

__all__ = [
    "BACKENDS",
    "DEPLOYED",
    "PRECISIONS",
    "QUANTIZED",
    "QuantReport",
    "WEIGHT_ONLY",
    "diffusers_quantization_config",
    "fake_quantize",
    "quantize_module_",
    "resolve_backend",
]
