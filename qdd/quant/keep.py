"""Which Linear layers a precision takes: the keep rules of the libraries qdd reproduces.

A rule is ``(module, name, linear) -> bool``: True when ``precision`` quantizes the Linear
``name`` of ``module``; the others stay in the compute dtype and are recorded as ``kept``.
Each registry entry (`qdd.quant.registry`) names its rule.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

Rule = Callable[[nn.Module, str, nn.Linear], bool]

#: diffusers' data-free SVDQuant leaves adaLN-style linears in 16 bit, by name.
SVDQ_EXCLUDE = ("norm", "modulation")
#: ModelOpt's diffusers example, ``filter_func_default`` (SD3, SD3.5, Flux-schnell, SDXL):
#: names matching anywhere stay unquantized; the top-level ``proj_out`` is quantized.
MODELOPT_DEFAULT_EXCLUDE = re.compile(
    r"time_emb_proj|time_embedding|conv_in|conv_out|conv_shortcut|add_embedding|pos_embed"
    r"|time_text_embed|context_embedder|norm_out|x_embedder"
)
#: ModelOpt's ``filter_func_flux_dev``: also the top-level ``proj_out`` (the final layer).
MODELOPT_FLUX_EXCLUDE = re.compile(
    r"^proj_out|time_text_embed|context_embedder|x_embedder|norm_out|time_guidance_embed"
    r"|stream_modulation"
)


def every_linear(module: nn.Module, name: str, linear: nn.Linear) -> bool:
    """ComfyUI's fp8_scaled files as qdd models them: every Linear."""
    return True


def widths_divisible_by(multiple: int) -> Rule:
    """Both widths multiples of ``multiple`` (torchao refuses or skips the others)."""

    def rule(module: nn.Module, name: str, linear: nn.Linear) -> bool:
        out_features, in_features = linear.weight.shape
        return out_features % multiple == 0 and in_features % multiple == 0

    return rule


def inputs_divisible_by(multiple: int) -> Rule:
    """The input width a multiple of the format's block (blocks run along the inputs)."""

    def rule(module: nn.Module, name: str, linear: nn.Linear) -> bool:
        return linear.in_features % multiple == 0

    return rule


def _block_stack_prefixes(module: nn.Module) -> list[str]:
    """Prefixes of ModuleLists of ≥ 2 identical blocks (where a DiT keeps its compute)."""
    return [
        f"{name}."
        for name, child in module.named_modules()
        if isinstance(child, nn.ModuleList)
        and len(child) >= 2
        and len({type(c) for c in child}) == 1
    ]


def svdquant_blocks(group: int) -> Rule:
    """diffusers' data-free SVDQuant: Linears inside the block stacks (if any), not adaLN
    (``norm``/``modulation``) nor ``_keep_in_fp32_modules``, input width a multiple of
    ``group``."""

    def rule(module: nn.Module, name: str, linear: nn.Linear) -> bool:
        keep_fp32 = getattr(module, "_keep_in_fp32_modules", None) or []
        stacks = _block_stack_prefixes(module)
        return (
            (not stacks or any(name.startswith(p) for p in stacks))
            and not any(pattern in name for pattern in (*SVDQ_EXCLUDE, *keep_fp32))
            and linear.in_features % group == 0
        )

    return rule


def modelopt_filter(module: nn.Module, name: str, linear: nn.Linear) -> bool:
    """ModelOpt's diffusers example filters: Flux transformers ``filter_func_flux_dev``,
    every other model ``filter_func_default``; and both widths 16·n (NVFP4 blocks)."""
    flux = type(module).__name__.startswith("Flux")
    exclude = MODELOPT_FLUX_EXCLUDE if flux else MODELOPT_DEFAULT_EXCLUDE
    return widths_divisible_by(16)(module, name, linear) and not exclude.search(name)
