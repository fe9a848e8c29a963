"""qdd's precisions, one `Precision` each (the registry: `qdd.quant.registry`).

Listed in palette order: fewer bits to the right; within a width weight-only before
weights-and-activations (fp8 → fp8-w8a8, nvfp4 → nvfp4-w4a4), GGUF's block formats beside
the weight-only formats of their width, and the W4A4 formats last, SVDQuant (4-bit
activations rescued by a 16-bit low-rank branch) before plain NVFP4 W4A4. Colours:
Okabe–Ito hues from cool (full precision) to warm (4-bit); greens for 8 bit (darker =
activations quantized too), teal/sage/ochre for GGUF, purples and a dark red for W4A4.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import Tensor, nn

from qdd.quant import keep, storage
from qdd.quant.bnb4bit import BNB_BLOCK, bnb_4bit
from qdd.quant.deployed import deployed_linear
from qdd.quant.formats import MXFP4_BLOCK, NVFP4_BLOCK, UnfusedBiasLinear, fp8_rowwise, mxfp4, nvfp4
from qdd.quant.registry import Precision, WeightKernel, register
from qdd.quant.svdquant import INT4_GROUP as SVDQ_INT4_GROUP
from qdd.quant.svdquant import SVDQ_RANK, become_svdquant_, svdquant_linear

#: What calibrated SVDQuant needs per quantized layer (`qdd.quant.layer.quantize_linear`).
ACT_ABSMAX = "activation abs-max"


def _bnb(weight: Tensor, semantics: str, *, precision: str) -> Tensor:
    return bnb_4bit(weight, precision, semantics)


def _only_weight(kernel: Callable[[Tensor], Tensor]) -> WeightKernel:
    """A weight kernel that ignores the bitsandbytes semantics."""
    return lambda weight, _semantics: kernel(weight)


def _deployed(linear: nn.Linear, precision: Precision, act_absmax: Tensor | None) -> nn.Module:
    return deployed_linear(linear, precision.name)


def _svdquant(linear: nn.Linear, precision: Precision, act_absmax: Tensor | None) -> nn.Module:
    assert precision.group_size and precision.rank and precision.smoothing
    built = svdquant_linear(
        linear, weight_format=precision.weight_format.removesuffix("+lowrank"),
        rank=precision.rank, group=precision.group_size, smoothing=precision.smoothing,
        act_absmax=act_absmax,
    )  # fmt: skip
    return become_svdquant_(linear, built)  # in place, as quantize_linear promises


def _svdq_bytes(rows: int, cols: int, *, weight_format: str, group: int) -> int:
    return storage.svdq_bytes(rows, cols, weight_format, SVDQ_RANK, group)


def _elementwise(formula: Callable[[int], int]) -> Callable[[int, int], int]:
    """A layout that packs the flattened weight (bitsandbytes, MX): bytes of rows × cols."""
    return lambda rows, cols: formula(rows * cols)


def _gguf_bytes(rows: int, cols: int, *, block_type: str) -> int:
    return storage.gguf_bytes(rows, cols, block_type)


UNQUANTIZED_EVIDENCE = "–"
BNB_EXACT = "bit for bit (bitsandbytes' CUDA kernels, ties included)"
BNB_EVIDENCE = (
    "recorded H200 outputs (0 of 1,048,576 values differ, each dtype); "
    "tests/quant/test_formats.py"
)
BNB_KEEPS = "none (every Linear)"

register(Precision(
    "fp32", "unquantized", "everything float32", order=0, color="#0072B2",
))  # fmt: skip
register(Precision(
    "fp16", "unquantized", "float16 (bf16 for SD3/Flux, which overflow in fp16)",
    order=10, color="#56B4E9",
))  # fmt: skip
register(Precision(
    "fp8", "weight-only", "e4m3 weights, one scale per output row",
    weight_format="e4m3-row", scale_format="fp32 per row, amax/448 in the weight's dtype",
    takes=keep.every_linear, keeps="none", weight_bytes=partial(storage.fp8_bytes, per_row=True),
    weight_kernel=_only_weight(fp8_rowwise), linear_class=UnfusedBiasLinear,
    emulation="torchao-float8-rowwise",
    library="torchao", library_device="cpu+cuda", runtime="torchao",
    reproduces="torchao `Float8WeightOnlyConfig(PerRow())`",
    exactness="bit for bit (an all-zero row stays 0; torchao: NaN)",
    evidence="equal to torchao on CPU and on an H200; tests/quant/test_backends.py",
    order=20, color="#009E73",
))  # fmt: skip
register(Precision(
    "fp8-w8a8", "weights+activations", "e4m3 weights and inputs, one scale per tensor",
    weight_format="e4m3-tensor", activation_format="e4m3-tensor",
    scale_format="fp32 per tensor, amax/448; input scale per call", takes=keep.every_linear,
    keeps="none (ComfyUI's files vary by file: not modelled)",
    weight_bytes=partial(storage.fp8_bytes, per_row=False), layer_kernel=_deployed,
    emulation="comfyui-fp8-scaled-dynamic-input",
    library="torchao", library_device="sm89", runtime="ComfyUI fp8_scaled",
    reproduces="ComfyUI `fp8_scaled` (`TensorCoreFP8Layout`, `torch._scaled_mm`)",
    exactness="approximate: codes and scales exact, the GEMM's accumulation order not",
    evidence="equal to an independent per-tensor reference; tests/quant/test_deployed.py",
    order=30, color="#00664A",
))  # fmt: skip
register(Precision(
    "fp8-w8a8-row", "weights+activations", "e4m3 weights and inputs, per row and per token",
    weight_format="e4m3-row", activation_format="e4m3-token",
    scale_format="fp32 per row / per token, amax/448", takes=keep.widths_divisible_by(16),
    keeps="layers with a width not 16·n (torchao skips them)",
    weight_bytes=partial(storage.fp8_bytes, per_row=True), layer_kernel=_deployed,
    emulation="torchao-float8-dynamic-rowwise",
    library="torchao", library_device="sm89", runtime="torchao",
    reproduces="torchao `Float8DynamicActivationFloat8WeightConfig(PerRow())`",
    exactness="approximate: codes and scales bit for bit, the GEMM's accumulation order not",
    evidence="codes equal `Float8Tensor.from_hp` on CPU; tests/quant/test_deployed.py",
    order=40, color="#66C5AB",
))  # fmt: skip
#: name, GGML type, palette order, colour, bf16 weights diffusers' fp16 dequantization changes
GGUF_LEVELS = (
    ("gguf-q8_0", "Q8_0", 50, "#2A9D8F", "5.9 %"),
    ("gguf-q5_1", "Q5_1", 60, "#8AB17D", "16 %"),
    ("gguf-q5_0", "Q5_0", 70, "#B5C99A", "0.3 %"),
    ("gguf-q4_k", "Q4_K", 100, "#F0C05A", "not measured"),
    ("gguf-q4_1", "Q4_1", 110, "#C9A227", "14 %"),
    ("gguf-q4_0", "Q4_0", 120, "#A07800", "0 %"),
)
for _name, _ggml, _order, _color, _fp16 in GGUF_LEVELS:
    _values, _ = storage.GGUF_BLOCKS[_ggml]
    register(Precision(
        _name, "gguf", f"a GGUF {_ggml} denoiser file, run by diffusers' GGUF loader",
        weight_format=_name, group_size=_values,
        scale_format="fp16 per block" + (" (+ min)" if _ggml.endswith("_1") else ""),
        keeps="city96's list (embedders, final layer), tensors ≤ 1,024 values",
        weight_bytes=partial(_gguf_bytes, block_type=_ggml), runtime="llama.cpp / ComfyUI-GGUF",
        reproduces="llama.cpp (gguf-py `quantize`); diffusers' GGUF loader",
        exactness=(
            "file bytes bit for bit; diffusers dequantizes in fp16 "
            f"({_fp16} of bf16 weights differ from llama.cpp)"
        ) if _ggml != "Q4_K" else "a user's file (qdd does not write Q4_K)",
        evidence="tests/quant/test_gguf.py, tests/generation/test_generate_gguf.py",
        order=_order, color=_color,
    ))  # fmt: skip
register(Precision(
    "fp4", "weight-only", "bitsandbytes FP4, the common load_in_4bit recipe",
    weight_format="bnb-fp4", group_size=BNB_BLOCK, scale_format="fp32 absmax per 64 (row-major)",
    takes=keep.every_linear, keeps=BNB_KEEPS, weight_bytes=_elementwise(storage.bnb_4bit_bytes),
    emulation="bitsandbytes-cuda", weight_kernel=partial(_bnb, precision="fp4"),
    library="bitsandbytes", runtime="bitsandbytes",
    reproduces="bitsandbytes CUDA `kQuantizeBlockwise`", exactness=BNB_EXACT,
    evidence=BNB_EVIDENCE, order=80, color="#D55E00",
))  # fmt: skip
register(Precision(
    "nf4", "weight-only", "bitsandbytes NF4",
    weight_format="bnb-nf4", group_size=BNB_BLOCK, scale_format="fp32 absmax per 64 (row-major)",
    takes=keep.every_linear, keeps=BNB_KEEPS, weight_bytes=_elementwise(storage.bnb_4bit_bytes),
    emulation="bitsandbytes-cuda", weight_kernel=partial(_bnb, precision="nf4"),
    library="bitsandbytes", runtime="bitsandbytes",
    reproduces="bitsandbytes CUDA `kQuantizeBlockwise`", exactness=BNB_EXACT,
    evidence=BNB_EVIDENCE, order=90, color="#E69F00",
))  # fmt: skip
register(Precision(
    "nvfp4", "weight-only", "E2M1 weights, E4M3 scale per 16 × fp32 tensor scale",
    weight_format="nvfp4", group_size=NVFP4_BLOCK,
    scale_format="e4m3 per 16 × fp32 amax/(448·6)", takes=keep.widths_divisible_by(NVFP4_BLOCK),
    keeps="layers with a width not 16·n (torchao refuses them)", weight_bytes=storage.nvfp4_bytes,
    weight_kernel=_only_weight(nvfp4), emulation="torchao-nvfp4", library="torchao",
    library_device="sm100",
    runtime="torchao", reproduces="torchao `NVFP4WeightOnlyConfig`", exactness="bit for bit",
    evidence="equal to torchao on CPU and on an H200; tests/quant/test_backends.py",
    order=130, color="#CC79A7",
))  # fmt: skip
register(Precision(
    "mxfp4", "weight-only", "E2M1 weights, power-of-two E8M0 scale per 32",
    weight_format="mxfp4", group_size=MXFP4_BLOCK, scale_format="e8m0 per 32, RCEIL",
    takes=keep.inputs_divisible_by(MXFP4_BLOCK), keeps="layers whose input width is not 32·n",
    weight_bytes=_elementwise(storage.mxfp4_bytes), weight_kernel=_only_weight(mxfp4),
    emulation="torchao-mx-rceil",
    library="torchao", runtime="torchao MX",
    library_refusal=(
        "mxfp4 through torchao would also quantize activations (its only MX recipe, "
        "MXDynamicActivationMXWeightConfig, is W4A4): use --quant-backend emulate, "
        "bit-exact with torchao's MX weights"
    ),
    reproduces="torchao MX `to_mx` (RCEIL, the MX inference recipe)", exactness="bit for bit",
    evidence="equal to `to_mx` → `to_dtype` (RCEIL and FLOOR); tests/quant/test_formats.py",
    order=140, color="#8B4513",
))  # fmt: skip
SVDQ_KEEPS = (
    "outside the block stacks, adaLN (`norm`, `modulation`), `_keep_in_fp32_modules`, "
    "input width not a multiple of the group"
)
SVDQ_REPRODUCES = (
    "SVDQuant / Nunchaku W4A4; weights as diffusers' data-free SVDQuant, INT4 activations "
    "and GEMM as comfy-kitchen's eager backend"
)
for _base, _fmt, _group, _order, _colors in (
    ("svdq-int4", "int4", SVDQ_INT4_GROUP, 150, ("#7B3294", "#C2A5CF")),
    ("svdq-nvfp4", "nvfp4", NVFP4_BLOCK, 160, ("#B07AA1", "#DCC3D6")),
):
    _scale = "16-bit amax/7 per 64" if _fmt == "int4" else "e4m3 per 16 × tensor scale"
    _exact = (
        "the forward bit for bit against comfy-kitchen (given the weights)" if _fmt == "int4"
        else "weights as diffusers' data-free NVFP4; Nunchaku's activation rounding unchecked"
    )
    for _smoothing, _suffix, _color, _step in (
        ("calibrated", "", _colors[0], 0), ("data-free", "-datafree", _colors[1], 5),
    ):
        _calibrated = _smoothing == "calibrated"
        register(Precision(
            _base + _suffix, "weights+activations",
            f"SVDQuant {_fmt.upper()} W4A4 + rank-{SVDQ_RANK} 16-bit branch, "
            f"{_smoothing} smoothing",
            weight_format=f"{_fmt}+lowrank", activation_format=_fmt, group_size=_group,
            rank=SVDQ_RANK, scale_format=_scale, takes=keep.svdquant_blocks(_group),
            keeps=SVDQ_KEEPS, weight_bytes=partial(_svdq_bytes, weight_format=_fmt, group=_group),
            layer_kernel=_svdquant, calibration=ACT_ABSMAX if _calibrated else None,
            smoothing=_smoothing, runtime="Nunchaku", reproduces=SVDQ_REPRODUCES,
            emulation=f"svdquant-{_smoothing}" + ("/comfy-kitchen-eager" if _fmt == "int4" else ""),
            exactness=(
                "approximate: smoothing from the activation abs-max of calibration prompts "
                "(`qdd.quant.svdquant`); " if _calibrated
                else "approximate: data-free smoothing `1/√max|W_j|` (not the released "
                "models' calibrated one); "
            ) + _exact,
            evidence="comfy-kitchen on CPU, outlier-layer errors; tests/quant/test_deployed.py",
            order=_order + _step, color=_color,
        ))  # fmt: skip
register(Precision(
    "nvfp4-w4a4", "weights+activations", "NVFP4 weights and inputs, no low-rank branch",
    weight_format="nvfp4", activation_format="nvfp4", group_size=NVFP4_BLOCK,
    scale_format="e4m3 per 16 × fp32 per tensor (input: per call)", takes=keep.modelopt_filter,
    keeps=(
        "ModelOpt's diffusers filters: Flux `filter_func_flux_dev` (top-level `proj_out`, "
        "`time_text_embed`, `context_embedder`, `x_embedder`, `norm_out`, …), other models "
        "`filter_func_default` (SD3 quantizes `proj_out`); widths not 16·n"
    ),
    weight_bytes=storage.nvfp4_bytes, layer_kernel=_deployed, runtime="ModelOpt/TensorRT",
    emulation="modelopt-nvfp4/torchao-nvfp4-dynamic",
    reproduces="NVIDIA ModelOpt NVFP4 for TensorRT, with torchao's NVFP4 numerics",
    exactness="approximate: codes bit for bit (torchao); input amax dynamic, not calibrated",
    evidence="equal to torchao `NVFP4Tensor.to_nvfp4` on CPU; tests/quant/test_deployed.py",
    order=170, color="#6A1B1A",
))  # fmt: skip
