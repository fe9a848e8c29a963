"""One colour per precision, the same in every figure, and the order to list things in.

Precision colours go from cool (full precision) to warm (4-bit), so a reader sees "fewer
bits" at a glance; real images are grey. The hues are Okabe–Ito's, which stay apart for
colour-blind readers. Generators get their own, darker set (used where one figure shows
one precision per generator), so a generator is never mistaken for a precision.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: Fewer bits to the right; within a width, weight-only before weights-and-activations
#: (the same weights, the activations quantized too: fp8 → fp8-w8a8, nvfp4 → nvfp4-w4a4),
#: GGUF's block formats beside the weight-only format of their width, and the SVDQuant
#: formats (4-bit activations rescued by a 16-bit low-rank branch) before plain NVFP4 W4A4,
#: the coarsest recipe.
PRECISION_ORDER: tuple[str, ...] = (
    "fp32", "fp16",
    "fp8", "fp8-w8a8", "fp8-w8a8-row", "gguf-q8_0",
    "gguf-q5_1", "gguf-q5_0",
    "fp4", "nf4", "gguf-q4_k", "gguf-q4_1", "gguf-q4_0", "nvfp4", "mxfp4",
    "svdq-int4", "svdq-int4-datafree", "svdq-nvfp4", "svdq-nvfp4-datafree", "nvfp4-w4a4",
)  # fmt: skip
COLORS: dict[str, str] = {
    "fp32": "#0072B2",  # blue
    "fp16": "#56B4E9",  # sky
    "fp8": "#009E73",  # green
    "fp8-w8a8": "#00664A",  # dark green: fp8 with activations
    "fp8-w8a8-row": "#66C5AB",  # light green
    "gguf-q8_0": "#2A9D8F",  # teal: the 8-bit GGUF
    "gguf-q5_1": "#8AB17D",  # sage
    "gguf-q5_0": "#B5C99A",  # pale sage
    "fp4": "#D55E00",  # vermillion
    "nf4": "#E69F00",  # orange
    "gguf-q4_k": "#F0C05A",  # light orange: 4-bit GGUF
    "gguf-q4_1": "#C9A227",  # ochre
    "gguf-q4_0": "#A07800",  # dark ochre
    "nvfp4": "#CC79A7",  # reddish purple
    "mxfp4": "#8B4513",  # brown
    "svdq-int4": "#7B3294",  # purple: 4-bit weights and activations + low-rank
    "svdq-int4-datafree": "#A366C2",  # light purple: data-free smoothing
    "svdq-nvfp4": "#B07AA1",  # mauve
    "svdq-nvfp4-datafree": "#D4B0CB",  # pale mauve
    "nvfp4-w4a4": "#6A1B1A",  # dark red: 4-bit weights and activations, nothing else
    "real": "#7F7F7F",  # grey
}
#: Colour of a precision the palette does not know.
UNKNOWN = "#333333"
GENERATOR_ORDER: tuple[str, ...] = (
    "sd15", "sd21", "sdxl", "sd3", "sd35", "flux-schnell", "flux-dev",
)  # fmt: skip
#: Paul Tol's "muted" scheme, in generator order, chosen so that the usual set (sd15, sdxl,
#: sd3, flux-schnell) gets four well-separated hues.
GENERATOR_COLORS: tuple[str, ...] = (
    "#332288", "#88CCEE", "#117733", "#CC6677", "#882255", "#44AA99", "#999933", "#AA4499",
)  # fmt: skip
MARKERS: tuple[str, ...] = ("o", "s", "^", "D", "v", "P", "X", "*")


def color(precision: str) -> str:
    """The precision's colour; ``real`` is grey, unknown precisions dark grey."""
    return COLORS.get(precision, UNKNOWN)


def bits(precision: str) -> int | None:
    """Bits per weight named by a precision ("fp4" → 4, "nvfp4-w4a4" → 4, "gguf-q8_0" → 8)."""
    match = re.search(r"(?:fp|int|nf|q)(\d+)", precision)
    return int(match.group(1)) if match else None


def _ordered(names: Iterable[str], order: tuple[str, ...]) -> list[str]:
    names = {str(n) for n in names}
    known = [n for n in order if n in names]
    return known + sorted(names - set(order))


def order_precisions(names: Iterable[str]) -> list[str]:
    """Palette order first (fp32 … nvfp4-w4a4), unknown precisions after, alphabetically."""
    return _ordered(names, PRECISION_ORDER)


def order_generators(names: Iterable[str]) -> list[str]:
    """Generators by release (sd15 … flux-dev), unknown ones after, alphabetically."""
    return _ordered(names, GENERATOR_ORDER)


def generator_style(generators: Iterable[str]) -> dict[str, tuple[str, str]]:
    """(colour, marker) per generator, fixed by its place in the generator order."""
    known = {g: i for i, g in enumerate(GENERATOR_ORDER)}
    styles, extra = {}, len(GENERATOR_ORDER)
    for name in order_generators(generators):
        i = known.get(name)
        if i is None:
            i, extra = extra, extra + 1
        styles[name] = (GENERATOR_COLORS[i % len(GENERATOR_COLORS)], MARKERS[i % len(MARKERS)])
    return styles
