"""One colour per precision, the same in every figure, and the order to list things in.

Precision colours go from cool (full precision) to warm (4-bit), so a reader sees "fewer
bits" at a glance; real images are grey. The hues are Okabe–Ito's, which stay apart for
colour-blind readers. Generators get their own, darker set (used where one figure shows
one precision per generator), so a generator is never mistaken for a precision.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

PRECISION_ORDER: tuple[str, ...] = ("fp32", "fp16", "fp8", "fp4", "nf4", "nvfp4", "mxfp4")
COLORS: dict[str, str] = {
    "fp32": "#0072B2",  # blue
    "fp16": "#56B4E9",  # sky
    "fp8": "#009E73",  # green
    "fp4": "#D55E00",  # vermillion
    "nf4": "#E69F00",  # orange
    "nvfp4": "#CC79A7",  # reddish purple
    "mxfp4": "#8B4513",  # brown
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
    """Bits per weight named by a precision ("fp4" → 4, "nvfp4" → 4, "int8" → 8)."""
    match = re.search(r"(\d+)$", precision)
    return int(match.group(1)) if match else None


def _ordered(names: Iterable[str], order: tuple[str, ...]) -> list[str]:
    names = {str(n) for n in names}
    known = [n for n in order if n in names]
    return known + sorted(names - set(order))


def order_precisions(names: Iterable[str]) -> list[str]:
    """Palette order first (fp32 … mxfp4), unknown precisions after, alphabetically."""
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
