"""One colour per precision, the same in every figure, and the order to list things in.

Each precision's colour and place are declared in its registry entry
(`qdd.quant.precisions`): from cool (full precision) to warm (4-bit), so a reader sees
"fewer bits" at a glance; real images are grey. The hues are Okabe–Ito's, which stay apart
for colour-blind readers. Generators get their own, darker set (used where one figure shows
one precision per generator), so a generator is never mistaken for a precision.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from qdd.quant import registry

#: The colour of real images.
REAL = "#7F7F7F"  # grey
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


def colors() -> dict[str, str]:
    """Every registered precision's colour, and real's."""
    return {name: registry.REGISTRY[name].color for name in registry.names()} | {"real": REAL}


def color(precision: str) -> str:
    """The precision's colour (a label's: ``fp4@emulate`` and ``fp4-vaefp32`` take fp4's);
    ``real`` is grey, unknown precisions dark grey."""
    from qdd.identity import base_precision

    known = colors()
    return known.get(precision, known.get(base_precision(precision), UNKNOWN))


def bits(precision: str) -> int | None:
    """Bits per weight named by a precision ("fp4" → 4, "nvfp4-w4a4" → 4, "gguf-q8_0" → 8)."""
    match = re.search(r"(?:fp|int|nf|q)(\d+)", precision)
    return int(match.group(1)) if match else None


def _ordered(names: Iterable[str], order: Iterable[str]) -> list[str]:
    names = {str(n) for n in names}
    order = tuple(order)
    known = [n for n in order if n in names]
    return known + sorted(names - set(order))


def order_precisions(names: Iterable[str]) -> list[str]:
    """Palette order first (fp32 … nvfp4-w4a4; a label beside its precision: ``fp4``,
    ``fp4@emulate``, ``fp4-vaefp32``), unknown precisions after, alphabetically."""
    from qdd.identity import base_precision

    place = {name: i for i, name in enumerate(registry.names())}
    names = sorted({str(n) for n in names})
    known = [n for n in names if base_precision(n) in place]
    known.sort(key=lambda n: (place[base_precision(n)], n != base_precision(n), n))
    return known + [n for n in names if n not in known]


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
