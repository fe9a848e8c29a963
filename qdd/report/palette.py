"""One colour per precision, the same in every figure, and the order to list them in.

Colours go from cool (full precision) to warm (4-bit), so a reader sees "fewer bits" at a
glance; real images are grey. Okabe–Ito-derived hues stay apart for colour-blind readers.
"""

from __future__ import annotations

from collections.abc import Iterable

PRECISION_ORDER: tuple[str, ...] = ("fp32", "fp16", "fp8", "fp4", "nf4", "nvfp4", "mxfp4")
COLORS: dict[str, str] = {
    "fp32": "#0072B2",  # blue
    "fp16": "#56B4E9",  # sky
    "fp8": "#009E73",  # green
    "fp4": "#D55E00",  # vermillion
    "nf4": "#E69F00",  # orange
    "nvfp4": "#CC79A7",  # purple-pink
    "mxfp4": "#8B4513",  # brown
    "real": "#7F7F7F",  # grey
}
GENERATOR_ORDER: tuple[str, ...] = (
    "sd15", "sd21", "sdxl", "sd3", "sd35", "flux-schnell", "flux-dev",
)  # fmt: skip
UNKNOWN = "#333333"


def color(precision: str) -> str:
    return COLORS.get(precision, UNKNOWN)


def _ordered(names: Iterable[str], order: tuple[str, ...]) -> list[str]:
    names = set(names)
    known = [n for n in order if n in names]
    return known + sorted(names - set(order))


def order_precisions(names: Iterable[str]) -> list[str]:
    """Palette order first (fp32 … mxfp4), unknown precisions after, alphabetically."""
    return _ordered(names, PRECISION_ORDER)


def order_generators(names: Iterable[str]) -> list[str]:
    return _ordered(names, GENERATOR_ORDER)
