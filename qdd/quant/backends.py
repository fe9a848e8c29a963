"""Applying a precision to a module: the real library backends and the exact emulation.

The emulation is bit-exact against each library's own quantize/dequantize, so ``auto`` may
take either; it takes the library where the library runs here (see `resolve_backend`).
What ran is recorded in every sample's metadata.

What bitsandbytes' ``Linear4bit`` computes on CPU (0.50, CPUs without AVX512-BF16, as here):
``x`` and the bias are cast to ``compute_dtype``; without autograd, ``matmul_4bit`` calls
the default ``gemm_4bit`` for every batch size (batch 1 too: no separate gemv), which
dequantizes the weight to ``compute_dtype`` (``code × absmax`` in fp32, then one cast) and
calls ``F.linear(x, W, bias)``; the result is cast back to the input's dtype. The emulated
module holds that same dequantized ``W`` and calls the same ``F.linear``, so outputs are
equal. On CPUs with AVX512-BF16, ``Linear4bit`` repacks its weight for a fused bf16 kernel
(bf16 absmax, bias added afterwards), whose rounding differs; on CUDA its kernels differ too.
torchao's weight-only layers (fp8, nvfp4) dequantize and run a plain matmul as well.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qdd.errors import QddError
from qdd.quant.formats import LAST_DIM_MULTIPLE, QUANTIZED, fake_quantize
from qdd.quant.size import module_bytes

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("auto", "emulate", "torchao", "bitsandbytes")
#: Which real library implements each format.
LIBRARY = {"fp4": "bitsandbytes", "nf4": "bitsandbytes", "fp8": "torchao",
           "nvfp4": "torchao", "mxfp4": "torchao"}  # fmt: skip


@dataclass(frozen=True)
class QuantReport:
    """What `quantize_module_` did: format, backend, and how much of the module it covers."""

    precision: str
    backend: str
    compute_dtype: str
    n_quantized: int  #: parameters in quantized Linear weights
    n_params: int  #: all parameters of the module
    #: the module's size as the real format stores it (`qdd.quant.size`), also when emulated
    deployed_bytes: int = 0

    @property
    def fraction(self) -> float:
        return self.n_quantized / self.n_params if self.n_params else 0.0


def resolve_backend(precision: str, backend: str, device: torch.device | str) -> str:
    """The backend that will run ``precision`` on ``device`` ('none' when unquantized).

    ``auto`` takes the real library where it runs here: bitsandbytes for fp4/nf4 on CUDA,
    torchao for fp8 (CPU or CUDA) and for nvfp4 on sm100+; the emulation otherwise, and
    always for mxfp4 (torchao has no weight-only MX recipe).
    """
    if backend not in BACKENDS:
        raise QddError(f"unknown quantization backend {backend!r}: one of {', '.join(BACKENDS)}")
    if precision not in QUANTIZED:
        return "none"
    device = torch.device(device)
    library = LIBRARY[precision]
    if backend == "auto":
        return library if _runs_here(precision, device) else "emulate"
    if backend == "emulate":
        return backend
    if backend != library:
        raise QddError(
            f"--quant-backend {backend} does not implement {precision}: use {library} or emulate"
        )
    if precision == "mxfp4":
        raise QddError(
            "mxfp4 through torchao would also quantize activations (its only MX recipe, "
            "MXDynamicActivationMXWeightConfig, is W4A4): use --quant-backend emulate, "
            "bit-exact with torchao's MX weights"
        )
    if not _installed(library):
        raise QddError(f"{library} is not installed: pip install {library}, or use emulate")
    return backend


def _runs_here(precision: str, device: torch.device) -> bool:
    """Whether ``auto`` should pick the real library for ``precision`` on ``device``."""
    if precision == "mxfp4" or not _installed(LIBRARY[precision]):
        return False
    if precision == "fp8":
        return device.type in ("cpu", "cuda")
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if precision == "nvfp4":  # FP4 tensor cores: Blackwell (sm100) and newer
        return torch.cuda.get_device_capability(device) >= (10, 0)
    return True  # bitsandbytes fp4/nf4


def _installed(library: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(library) is not None


class UnfusedBiasLinear(nn.Linear):
    """``x @ W.T`` then ``+ bias``: torchao's float8 weight-only layers add the bias apart
    from the matmul, which rounds differently from ``F.linear``'s fused add in bf16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.matmul(x, self.weight.t())
        return out if self.bias is None else out + self.bias


def _quantizable(module: nn.Module, precision: str) -> bool:
    if not isinstance(module, nn.Linear):
        return False
    shape = module.weight.shape
    if precision == "nvfp4":  # torchao refuses NVFP4 weights unless both dims fit
        return shape[0] % 16 == 0 and shape[1] % 16 == 0
    multiple = LAST_DIM_MULTIPLE.get(precision)
    return multiple is None or shape[-1] % multiple == 0


def quantized_layers(module: nn.Module, precision: str) -> dict[str, nn.Linear]:
    """The Linear layers ``precision`` quantizes in ``module``, by name (the others stay)."""
    return {name: m for name, m in module.named_modules() if _quantizable(m, precision)}


def quantize_module_(
    module: nn.Module,
    precision: str,
    backend: str,
    compute_dtype: torch.dtype,
    bnb_semantics: str = "cuda",
) -> QuantReport:
    """Cast ``module`` to ``compute_dtype``, then quantize its Linear weights in place.

    ``bnb_semantics``: which bitsandbytes the emulated fp4/nf4 reproduce (`qdd.quant.bnb4bit`).
    """
    module.to(compute_dtype)
    n_params = sum(p.numel() for p in module.parameters())
    dtype_name = str(compute_dtype).removeprefix("torch.")
    if precision not in QUANTIZED:
        return QuantReport(
            precision, "none", dtype_name, 0, n_params, module_bytes(module, precision)
        )
    if backend == "auto":
        raise ValueError("resolve the backend first (resolve_backend)")
    targets = quantized_layers(module, precision)
    n_quantized = sum(m.weight.numel() for m in targets.values())
    deployed_bytes = module_bytes(module, precision, targets)  # before layers are swapped
    if backend == "emulate":
        with torch.no_grad():
            for linear in targets.values():
                quantized = fake_quantize(linear.weight, precision, bnb_semantics)
                linear.weight.copy_(quantized.to(compute_dtype))
                if precision == "fp8" and type(linear) is nn.Linear:
                    linear.__class__ = UnfusedBiasLinear  # same parameters, torchao's op order
    elif backend == "bitsandbytes":
        _to_bitsandbytes(module, targets, precision, compute_dtype)
    elif backend == "torchao":
        if precision == "fp8":
            _refuse_zero_rows(targets)
        _to_torchao(module, set(targets), precision)
    else:
        raise ValueError(f"unknown backend {backend!r}")
    log.debug("%s/%s: %d of %d parameters quantized", precision, backend, n_quantized, n_params)
    return QuantReport(precision, backend, dtype_name, n_quantized, n_params, deployed_bytes)


def _to_bitsandbytes(
    module: nn.Module, targets: dict[str, nn.Linear], precision: str, dtype: torch.dtype
) -> None:
    """Swap each Linear for bnb's Linear4bit holding the same weights, quantized."""
    import bitsandbytes as bnb

    _refuse_fused_cpu_shapes(targets)
    for name, linear in targets.items():
        device = linear.weight.device
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            compute_dtype=dtype, compress_statistics=False, quant_type=precision,
            quant_storage=torch.uint8, device="meta",
        )  # fmt: skip
        layer.weight = bnb.nn.Params4bit(
            linear.weight.data.to("cpu"), requires_grad=False, quant_type=precision,
            blocksize=64, compress_statistics=False,
        ).to(device)  # fmt: skip
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        layer.eval()
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, layer)


def _refuse_fused_cpu_shapes(targets: dict[str, nn.Linear]) -> None:
    """bitsandbytes' fused CPU kernel (AVX512-BF16 CPUs) repacks weights in tiles of 32
    outputs × 64 inputs and crashes at the first forward on layers that do not tile."""
    from bitsandbytes.functional import has_avx512bf16

    cpu = {name: m for name, m in targets.items() if m.weight.device.type == "cpu"}
    odd = [name for name, m in cpu.items() if m.in_features % 64 or m.out_features % 32]
    if odd and has_avx512bf16():
        first = cpu[odd[0]]
        raise QddError(
            "bitsandbytes' fused CPU kernel needs Linear layers of 32·n outputs × 64·n inputs, "
            f"{len(odd)} layer(s) are not (first: {odd[0]}, {first.out_features} × "
            f"{first.in_features}): use --quant-backend emulate"
        )


def torchao_config(precision: str) -> Any:
    """The torchao config that stores weights in ``precision``."""
    if precision == "fp8":
        from torchao.quantization import Float8WeightOnlyConfig, PerRow

        return Float8WeightOnlyConfig(granularity=PerRow())
    if precision == "nvfp4":
        from torchao.prototype.mx_formats import NVFP4WeightOnlyConfig

        return NVFP4WeightOnlyConfig(use_dynamic_per_tensor_scale=True)
    raise ValueError(f"torchao has no weight-only recipe for {precision}")


def _refuse_zero_rows(targets: dict[str, nn.Linear]) -> None:
    """torchao's float8 divides an all-zero row by its zero scale: NaN weights, NaN images."""
    zero = [name for name, m in targets.items() if (m.weight.abs().amax(dim=1) == 0).any()]
    if zero:
        raise QddError(
            f"torchao float8 would turn the all-zero weight rows of {len(zero)} Linear "
            f"layer(s) (first: {zero[0]}) into NaN: use --quant-backend emulate, which keeps "
            "them zero and is bit-exact with torchao elsewhere"
        )


def _to_torchao(module: nn.Module, names: set[str], precision: str) -> None:
    from torchao.quantization import quantize_

    quantize_(module, torchao_config(precision), filter_fn=lambda _, fqn: fqn in names)


def diffusers_quantization_config(precision: str, backend: str, compute_dtype: torch.dtype) -> Any:
    """The diffusers config that quantizes a component inside ``from_pretrained`` (GPU).

    ``None`` for the emulation and the unquantized levels, which are applied after loading.
    """
    if precision not in QUANTIZED or backend in ("emulate", "none"):
        return None
    if backend == "bitsandbytes":
        from diffusers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=precision, bnb_4bit_compute_dtype=compute_dtype
        )
    if backend == "torchao":
        from diffusers import TorchAoConfig

        return TorchAoConfig(torchao_config(precision))
    raise ValueError(f"unknown backend {backend!r}")
