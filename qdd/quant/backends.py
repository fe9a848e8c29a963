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

The deployed formats that quantize activations too (``fp8-w8a8`` …, `qdd.quant.deployed`)
are emulated everywhere; ``fp8-w8a8``/``fp8-w8a8-row`` also run torchao's FP8 kernels on
GPUs with FP8 tensor cores (compute capability 8.9 or newer).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qdd.errors import QddError
from qdd.quant.deployed import FORMATS, SVDQ, describe, quantize_deployed_, quantizes
from qdd.quant.formats import DEPLOYED, LAST_DIM_MULTIPLE, QUANTIZED, fake_quantize
from qdd.quant.size import module_bytes

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("auto", "emulate", "torchao", "bitsandbytes")
#: Which real library implements each format.
LIBRARY = {"fp4": "bitsandbytes", "nf4": "bitsandbytes", "fp8": "torchao",
           "nvfp4": "torchao", "mxfp4": "torchao", "fp8-w8a8": "torchao",
           "fp8-w8a8-row": "torchao"}  # fmt: skip
#: Deployed formats with no library that runs here: Nunchaku (CUDA only, not on the package
#: index) and ModelOpt/TensorRT engines. Only the emulation runs them.
EMULATION_ONLY = {"svdq-int4": "Nunchaku", "svdq-nvfp4": "Nunchaku",
                  "svdq-int4-datafree": "Nunchaku", "svdq-nvfp4-datafree": "Nunchaku",
                  "nvfp4-w4a4": "ModelOpt/TensorRT"}  # fmt: skip
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
    if precision not in QUANTIZED:
        return "none"
    device = torch.device(device)
    library = LIBRARY.get(precision)
    if backend == "auto":
        return library if _runs_here(precision, device) else "emulate"
    if backend == "emulate":
        return backend
    if library is None:
        raise QddError(
            f"{precision} runs in {EMULATION_ONLY[precision]} only, which qdd cannot call: "
            "use --quant-backend emulate"
        )
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
    if precision in DEPLOYED and not _has_fp8_compute(device):
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


def _runs_here(precision: str, device: torch.device) -> bool:
    """Whether ``auto`` should pick the real library for ``precision`` on ``device``."""
    if precision == "mxfp4" or precision in EMULATION_ONLY or not _installed(LIBRARY[precision]):
        return False
    if precision in DEPLOYED:
        return _has_fp8_compute(device)
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
    linears = {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}
    if precision in DEPLOYED:
        return {n: m for n, m in linears.items() if quantizes(module, n, m, precision)}
    return {n: m for n, m in linears.items() if _quantizable(m, precision)}


def quantize_module_(
    module: nn.Module,
    precision: str,
    backend: str,
    compute_dtype: torch.dtype,
    bnb_semantics: str = "cuda",
    *,
    calibration: Mapping[str, torch.Tensor] | None = None,
) -> QuantReport:
    """Cast ``module`` to ``compute_dtype``, then quantize its Linear layers in place.

    Weight-only formats quantize the weights; the deployed formats (`qdd.quant.deployed`)
    also quantize each layer's input. ``bnb_semantics``: which bitsandbytes the emulated
    fp4/nf4 reproduce (`qdd.quant.bnb4bit`). ``calibration``: layer name (within
    ``module``) → per-channel abs-max of its input, for calibrated SVDQuant
    (`qdd.generation.calibration` gathers it).
    """
    module.to(compute_dtype)
    n_params = sum(p.numel() for p in module.parameters())
    dtype_name = str(compute_dtype).removeprefix("torch.")
    if precision not in QUANTIZED:
        fields = describe(precision, dtype_name)
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
    smoothing = None
    if backend == "emulate" and precision in SVDQ:
        smoothing = _to_svdquant(module, targets, precision, calibration)
    elif backend == "emulate" and precision in DEPLOYED:
        for linear in targets.values():
            quantize_deployed_(linear, precision)
    elif backend == "emulate":
        with torch.no_grad():
            for linear in targets.values():
                quantized = fake_quantize(linear.weight, precision, bnb_semantics)
                linear.weight.copy_(quantized.to(compute_dtype))
                if precision == "fp8" and type(linear) is nn.Linear:
                    linear.__class__ = UnfusedBiasLinear  # same parameters, torchao's op order
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
        **describe(precision, dtype_name), kept=kept, deployed_bytes=deployed_bytes,
        smoothing=smoothing,
    )  # fmt: skip


def _to_svdquant(
    module: nn.Module,
    targets: dict[str, nn.Linear],
    precision: str,
    calibration: Mapping[str, torch.Tensor] | None,
) -> dict[str, Any] | None:
    """Swap each target for its `SVDQuantLinear`; the smoothing record of the module."""
    from qdd.quant.svdquant import SVDQuantLinear, smoothing_summary, svdquant_linear

    weight_format, smoothing = SVDQ[precision]
    calibrated = smoothing == "calibrated"
    if calibrated:
        missing = [name for name in targets if calibration is None or name not in calibration]
        if missing:
            raise QddError(
                f"{precision} smooths with calibration activations, and {len(missing)} of "
                f"{len(targets)} layers have none (first: {missing[0]}): gather them "
                f"(qdd.generation.calibration) or use {precision}-datafree"
            )
        extra = sorted(set(calibration or {}) - set(targets))
        if extra:
            raise QddError(
                f"the calibration names {len(extra)} layer(s) {precision} does not quantize "
                f"here (first: {extra[0]}): gather it on this same module"
            )
    elif calibration is not None:
        raise QddError(f"{precision} smooths without data: leave out the calibration")
    spec = FORMATS[precision]
    assert spec.group_size is not None and spec.rank is not None
    layers = []
    for name, linear in targets.items():
        act_absmax = calibration[name] if calibration is not None and calibrated else None
        layer = svdquant_linear(
            linear, weight_format=weight_format, rank=spec.rank, group=spec.group_size,
            smoothing=smoothing, act_absmax=act_absmax,
        )  # fmt: skip
        assert isinstance(layer, SVDQuantLinear)
        layers.append(layer)
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, layer)
    return smoothing_summary(layers)


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


def bnb_cpu_kernel() -> str:
    """Which bitsandbytes 0.50 CPU kernel dequantizes 4-bit weights on this CPU.

    ``fused-bf16`` (AVX512-BF16: Linear4bit repacks weights for a fused kernel), ``avx512``
    (torch's CPU capability AVX512, as bitsandbytes detects it: its C++ dequantize indexes
    the absmax per row, wrong when blocks of 64 cross rows), or ``plain``.
    """
    from bitsandbytes.functional import has_avx512bf16

    if has_avx512bf16():
        return "fused-bf16"
    return "avx512" if torch.backends.cpu.get_cpu_capability() == "AVX512" else "plain"


def bnb_cpu_refuses(in_features: int, out_features: int, kernel: str) -> bool:
    """Whether bitsandbytes' CPU ``kernel`` gets a layer of this shape wrong (or crashes)."""
    if kernel == "fused-bf16":  # tiles of 32 outputs × 64 inputs, else a crash
        return bool(in_features % 64 or out_features % 32)
    if kernel == "avx512":  # blocks cross rows (odd widths take the plain fallback)
        return bool(in_features % 64 and in_features % 2 == 0)
    return False


def _refuse_fused_cpu_shapes(targets: dict[str, nn.Linear]) -> None:
    """bitsandbytes' AVX512 CPU kernels: the fused bf16 one (AVX512-BF16) crashes on layers
    that do not tile 32 outputs × 64 inputs; the AVX512 dequantize (any AVX512 CPU) is wrong
    when the input width is not a multiple of 64 (48×96: 4,419 of 4,608 values)."""
    cpu = {name: m for name, m in targets.items() if m.weight.device.type == "cpu"}
    if not cpu:
        return
    kernel = bnb_cpu_kernel()
    odd = [n for n, m in cpu.items() if bnb_cpu_refuses(m.in_features, m.out_features, kernel)]
    if odd:
        first = cpu[odd[0]]
        need = "32·n outputs × 64·n inputs" if kernel == "fused-bf16" else "64·n inputs"
        raise QddError(
            f"bitsandbytes' {kernel} CPU kernel needs Linear layers of {need}, "
            f"{len(odd)} layer(s) are not (first: {odd[0]}, {first.out_features} × "
            f"{first.in_features}): use --quant-backend emulate"
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
