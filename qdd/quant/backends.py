"""Applying a precision to a module: the real library backends and the exact emulation.

The emulation is bit-exact against each library's own quantize/dequantize, so ``auto`` may
take either; it takes the library where the library runs here (see `resolve_backend`).
What ran is recorded in every sample's metadata.

What bitsandbytes' ``Linear4bit`` computes on CPU (0.50): ``x`` and the bias are cast to
``compute_dtype``; without autograd, ``matmul_4bit`` calls the default ``gemm_4bit`` for every
batch size (batch 1 too: no separate gemv), which dequantizes the weight to ``compute_dtype``
(``code × absmax`` in fp32, then one cast) and calls ``F.linear(x, W, bias)``; the result is
cast back to the input's dtype. The emulated module holds that same dequantized ``W`` and
calls the same ``F.linear``, so outputs are equal. On CPUs with AVX512-BF16 the library would
instead repack the weight for a fused kernel with bf16 inputs and bf16 absmax (another
recipe); qdd keeps it on the dequantize path (`_linear4bit`). Where the library's CPU code is
wrong for a shape (its AVX512 dequantize, blocks crossing rows), `bnb_cpu_error` finds it by
running that shape, and the layer is refused. On CUDA its kernels differ (`qdd.quant.bnb4bit`).
torchao's weight-only layers (fp8, nvfp4) dequantize and run a plain matmul as well.

The deployed formats that quantize activations too (``fp8-w8a8`` …, `qdd.quant.deployed`)
are emulated everywhere; ``fp8-w8a8``/``fp8-w8a8-row`` also run torchao's FP8 kernels on
GPUs with FP8 tensor cores (compute capability 8.9 or newer).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from qdd.errors import QddError
from qdd.quant import registry
from qdd.quant.layer import fake_quantize, quantize_linear, uncalibrated_alternative
from qdd.quant.size import module_bytes

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("auto", "emulate", "torchao", "bitsandbytes")
#: FP8 tensor cores (torch._scaled_mm): Ada (sm89), Hopper (sm90) and newer.
FP8_COMPUTE_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class QuantReport:
    """What `quantize_module_` did: format, backend, and how much of the module it covers."""

    precision: str
    backend: str
    compute_dtype: str
    n_quantized: int  #: parameters in quantized Linear weights
    n_params: int  #: all parameters of the module
    weight_format: str = ""  #: e.g. ``e4m3-tensor``, ``int4+lowrank`` (`qdd.quant.deployed`)
    activation_format: str = ""  #: the compute dtype when activations are not quantized
    activations_quantized: bool = False
    group_size: int | None = None  #: values per scale (None: per tensor / row / token)
    rank: int | None = None  #: the 16-bit low-rank branch (SVDQuant)
    kept: tuple[str, ...] = field(default_factory=tuple)  #: Linear layers left unquantized
    #: the module's size as the real format stores it (`qdd.quant.size`), also when emulated
    deployed_bytes: int = 0
    #: SVDQuant's smoothing: ``{"kind": "data-free"}`` or ``{"kind": "calibrated", "alpha":
    #: {min, median, max}, "beta": {…}}`` over the layers; None for other formats
    smoothing: dict[str, Any] | None = None

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
    entry = registry.get(precision)
    if not entry.emulated:
        return "none"
    device = torch.device(device)
    library = entry.library
    if backend == "auto":
        return library if library and _runs_here(entry, device) else "emulate"
    if backend == "emulate":
        return backend
    if library is None:
        raise QddError(
            f"{precision} runs in {entry.runtime} only, which qdd cannot call: "
            "use --quant-backend emulate"
        )
    if backend != library:
        raise QddError(
            f"--quant-backend {backend} does not implement {precision}: use {library} or emulate"
        )
    if entry.library_refusal:
        raise QddError(entry.library_refusal)
    if not _installed(library):
        raise QddError(f"{library} is not installed: pip install {library}, or use emulate")
    if entry.activations_quantized and not _has_fp8_compute(device):
        raise QddError(
            f"{precision} through torchao needs a CUDA GPU of compute capability 8.9 or newer "
            f"(FP8 tensor cores), not {_device_label(device)}: use --quant-backend emulate"
        )
    return backend


def _has_fp8_compute(device: torch.device) -> bool:
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= FP8_COMPUTE_CAPABILITY


def _device_label(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        return f"{device} (compute capability {major}.{minor})"
    return str(device)


def _runs_here(entry: registry.Precision, device: torch.device) -> bool:
    """Whether ``auto`` should pick the real library for ``entry`` on ``device``."""
    if entry.library is None or entry.library_refusal or not _installed(entry.library):
        return False
    if entry.library_device == "sm89":
        return _has_fp8_compute(device)
    if entry.library_device == "cpu+cuda":
        return device.type in ("cpu", "cuda")
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if entry.library_device == "sm100":  # FP4 tensor cores: Blackwell (sm100) and newer
        return torch.cuda.get_device_capability(device) >= (10, 0)
    return True  # cuda


def _installed(library: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(library) is not None


def quantized_layers(module: nn.Module, precision: str) -> dict[str, nn.Linear]:
    """The Linear layers ``precision`` quantizes in ``module``, by name (the others stay)."""
    takes = registry.get(precision).takes
    if takes is None:
        return {}
    linears = {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}
    return {n: m for n, m in linears.items() if takes(module, n, m)}


def quantize_module_(
    module: nn.Module,
    precision: str,
    backend: str,
    compute_dtype: torch.dtype,
    bnb_semantics: str = "cuda",
    calibration: Mapping[str, Tensor] | None = None,
) -> QuantReport:
    """Cast ``module`` to ``compute_dtype``, then quantize its Linear layers in place.

    The emulation applies `qdd.quant.layer.quantize_linear` to every Linear the precision
    takes, with ``calibration.get(name)`` (input activations or their per-channel abs-max,
    by layer name) for precisions that need it. ``bnb_semantics``: which bitsandbytes the
    emulated fp4/nf4 reproduce (`qdd.quant.bnb4bit`).
    """
    entry = registry.get(precision)
    module.to(compute_dtype)
    n_params = sum(p.numel() for p in module.parameters())
    dtype_name = str(compute_dtype).removeprefix("torch.")
    if not entry.emulated:
        if calibration:
            raise QddError(f"{precision} uses no calibration: drop it")
        fields = registry.describe(precision, dtype_name)
        return QuantReport(
            precision, "none", dtype_name, 0, n_params, **fields,
            deployed_bytes=module_bytes(module, precision),
        )  # fmt: skip
    if backend == "auto":
        raise ValueError("resolve the backend first (resolve_backend)")
    linears = {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}
    targets = quantized_layers(module, precision)
    n_quantized = sum(m.weight.numel() for m in targets.values())
    deployed_bytes = module_bytes(module, precision, targets)  # before layers are swapped
    _check_calibration(module, entry, targets, calibration, backend)
    smoothing = None
    if backend == "emulate":
        layers = []
        for name, linear in targets.items():
            layer_calibration = calibration.get(name) if calibration else None
            layer = quantize_linear(
                linear, precision, calibration=layer_calibration, bnb_semantics=bnb_semantics
            )
            if layer is not linear:  # a kernel that builds its own module (SVDQuant)
                parent, _, child = name.rpartition(".")
                setattr(module.get_submodule(parent) if parent else module, child, layer)
            layers.append(layer)
        smoothing = _smoothing_record(layers)
    elif backend == "bitsandbytes":
        _to_bitsandbytes(module, targets, precision, compute_dtype)
    elif backend == "torchao":
        if precision in ("fp8", "fp8-w8a8-row"):
            _refuse_zero_rows(targets)
        if precision == "fp8-w8a8-row" and compute_dtype != torch.bfloat16:
            raise QddError(
                f"torchao's per-row FP8 needs bfloat16 weights, not {dtype_name}: "
                "use --quant-backend emulate"
            )
        _to_torchao(module, set(targets), precision)
    else:
        raise ValueError(f"unknown backend {backend!r}")
    kept = tuple(name for name in linears if name not in targets)
    log.debug("%s/%s: %d of %d parameters quantized", precision, backend, n_quantized, n_params)
    return QuantReport(
        precision, backend, dtype_name, n_quantized, n_params,
        **registry.describe(precision, dtype_name), kept=kept, deployed_bytes=deployed_bytes,
        smoothing=smoothing,
    )  # fmt: skip


def _smoothing_record(layers: list[nn.Module]) -> dict[str, Any] | None:
    """SVDQuant's smoothing over the module's layers (`svdquant.smoothing_summary`)."""
    from qdd.quant.svdquant import SVDQuantLinear, smoothing_summary

    return smoothing_summary(layer for layer in layers if isinstance(layer, SVDQuantLinear))


def _check_calibration(
    module: nn.Module,
    entry: registry.Precision,
    targets: dict[str, nn.Linear],
    calibration: Mapping[str, Tensor] | None,
    backend: str,
) -> None:
    """Calibration is joined to layers by name: a name the module lacks, a quantized layer
    without statistics, or statistics for a format that uses none are refused in one line
    (before any layer changes)."""
    if entry.calibration is None:
        if calibration:
            raise QddError(f"{entry.name} uses no calibration: drop it")
        return
    if backend != "emulate":
        raise QddError(f"{entry.name} is calibrated in qdd's emulation only: use emulate")
    calibration = calibration or {}
    layers = {name for name, m in module.named_modules() if isinstance(m, nn.Linear)}
    stray = sorted(set(calibration) - layers)
    if stray:
        raise QddError(
            f"calibration names {len(stray)} layer(s) this module has no Linear of "
            f"(first: {stray[0]!r}): collect it on the same module"
        )
    missing = [name for name in targets if name not in calibration]
    if missing:
        raise QddError(
            f"{entry.name} needs calibration ({entry.calibration}) for every quantized layer; "
            f"{len(missing)} of {len(targets)} have none (first: {missing[0]!r}): calibrate "
            f"this module, or use {uncalibrated_alternative(entry.name)}"
        )
    for name, linear in targets.items():
        width = calibration[name].shape[-1:]
        if width != (linear.in_features,):
            raise QddError(
                f"calibration for {name} ends in {tuple(width)}, not its input width "
                f"{linear.in_features}: collect it from this module's own layers"
            )


def _to_bitsandbytes(
    module: nn.Module, targets: dict[str, nn.Linear], precision: str, dtype: torch.dtype
) -> None:
    """Swap each Linear for bnb's Linear4bit holding the same weights, quantized."""
    _refuse_wrong_cpu_shapes(targets, precision, dtype)
    for name, linear in targets.items():
        layer = _linear4bit(linear.weight.data, linear.bias, precision, dtype)
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, layer)


def _linear4bit(
    weight: Tensor, bias: Tensor | None, precision: str, dtype: torch.dtype
) -> nn.Module:
    """bitsandbytes' ``Linear4bit`` holding ``weight`` quantized, in eval mode.

    On CPUs with AVX512-BF16 bitsandbytes would repack the weight at the first forward for
    a fused kernel that casts inputs *and absmax* to bf16 — another recipe than the one qdd
    reproduces (fp32 absmax, dequantize to the compute dtype, then the matmul, as its CUDA
    path does). Its public switch ``support_avx512bf16_for_cpu`` keeps the library on its
    dequantize-then-matmul path on every CPU.
    """
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(
        in_features, out_features, bias=bias is not None, compute_dtype=dtype,
        compress_statistics=False, quant_type=precision, quant_storage=torch.uint8,
        device="meta",
    )  # fmt: skip
    layer.weight = bnb.nn.Params4bit(
        weight.to("cpu"), requires_grad=False, quant_type=precision,
        blocksize=64, compress_statistics=False,
    ).to(weight.device)  # fmt: skip
    if bias is not None:
        layer.bias = nn.Parameter(bias.data, requires_grad=False)
    layer.support_avx512bf16_for_cpu = False
    return layer.eval()


@functools.cache
def bnb_cpu_error(out_features: int, in_features: int, precision: str, dtype: torch.dtype) -> str:
    """How bitsandbytes' CPU ``Linear4bit`` of this shape departs from its own semantics here
    ("" where it does not), found by running it: a seeded layer and input through the library
    against the same weight quantized by `fake_quantize` (its CPU semantics) and ``F.linear``.

    Probed, never predicted from CPU flags: bitsandbytes 0.50's AVX512 C++ dequantize indexes
    the absmax per row and is wrong where blocks of 64 cross rows *and* the width is a multiple
    of 16 (a 96→32 layer off by ~0.02); on other CPUs, widths and releases it is right.
    """
    g = torch.Generator().manual_seed(out_features * 7919 + in_features)
    weight = (torch.randn(out_features, in_features, generator=g) * 0.05).to(dtype)
    x = torch.randn(3, in_features, generator=g).to(dtype)
    emulated = fake_quantize(weight, precision, "cpu").to(dtype)
    linear = nn.functional.linear
    expected = torch.cat([linear(x[:1], emulated), linear(x, emulated)])
    try:
        with torch.inference_mode():
            layer = _linear4bit(weight, None, precision, dtype)
            got = torch.cat([layer(x[:1]), layer(x)])  # batch 1 (a gemv) and a batch
    except Exception as error:  # the library's own failure on this shape, named to the user
        return f"fails ({type(error).__name__}: {error})"
    if torch.equal(got, expected):
        return ""
    return f"is off by up to {(got.float() - expected.float()).abs().max().item():.3g}"


def _refuse_wrong_cpu_shapes(
    targets: dict[str, nn.Linear], precision: str, dtype: torch.dtype
) -> None:
    """Refuse, in one line, the layers whose shape bitsandbytes gets wrong on this CPU."""
    wrong = {
        name: error
        for name, m in targets.items()
        if m.weight.device.type == "cpu"
        and (error := bnb_cpu_error(m.out_features, m.in_features, precision, dtype))
    }
    if wrong:
        first = next(iter(wrong))
        layer = targets[first]
        raise QddError(
            f"bitsandbytes' CPU Linear4bit {wrong[first]} on this machine for "
            f"{layer.out_features} × {layer.in_features} weights; {len(wrong)} layer(s) are "
            f"affected (first: {first}): use --quant-backend emulate"
        )


def torchao_config(precision: str) -> Any:
    """The torchao config that stores weights (and for W8A8 quantizes inputs) in ``precision``."""
    if precision in ("fp8-w8a8", "fp8-w8a8-row"):
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            PerRow,
            PerTensor,
        )

        granularity = PerRow() if precision == "fp8-w8a8-row" else PerTensor()
        return Float8DynamicActivationFloat8WeightConfig(granularity=granularity)
    if precision == "fp8":
        from torchao.quantization import Float8WeightOnlyConfig, PerRow

        return Float8WeightOnlyConfig(granularity=PerRow())
    if precision == "nvfp4":
        from torchao.prototype.mx_formats import NVFP4WeightOnlyConfig

        return NVFP4WeightOnlyConfig(use_dynamic_per_tensor_scale=True)
    raise ValueError(f"torchao has no weight-only recipe for {precision}")


def _refuse_zero_rows(targets: dict[str, nn.Linear]) -> None:
    """torchao's float8 divides an all-zero row (or tensor) by its zero scale: NaN weights."""
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
    if precision not in registry.quantized() or backend in ("emulate", "none"):
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
