"""Detectors in the order and look of the study's claim: grouped by family.

The users' question is per family ("do CLIP-feature detectors hold at FP4 where end-to-end
ones collapse?"), so every figure and table lists detectors family by family, in the order
of `qdd.detectors.card.FAMILIES`, then by name; a detector the registry does not know
(a YAML detector, an older run's name) comes last, as family ``other``. A report's name for
a detector with several weight files (``npr-retrained``) keeps its detector's family.

In a figure that draws one line per detector, the marker says the family and the colour
the detector (`detector_styles`): ten detectors get ten colours, and no two detectors of
one report share colour, marker and line style.
"""

from __future__ import annotations

from collections.abc import Mapping

#: A detector the registry does not know.
OTHER = "other"
#: One colour per detector (matplotlib's "tab10", then darker extras): distinct in hue and
#: lightness, and unlike the precision palette's ordered cool → warm ramp.
DETECTOR_COLORS: tuple[str, ...] = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#393b79", "#637939",
)  # fmt: skip
#: One marker per family, in `FAMILIES` order, then `OTHER`'s.
FAMILY_MARKERS: tuple[str, ...] = ("o", "s", "^", "D", "v", "P", "X")
#: Where colours run out, the next round of detectors is drawn with another line style.
LINESTYLES: tuple[str, ...] = ("-", "--", ":", "-.")


def family_of(detector: str) -> str:
    """The family on ``detector``'s card, or `OTHER`; read from the cards alone, without
    importing a detector's model code (`qdd.detectors.registry.card_of`)."""
    from qdd.detectors.registry import card_of

    card = card_of(detector)
    return card.family if card is not None else OTHER


def families() -> tuple[str, ...]:
    """Every family, in the order the study compares them, then `OTHER`."""
    from qdd.detectors.card import FAMILIES

    return (*FAMILIES, OTHER)


def lineup(detectors: Mapping[str, str]) -> dict[str, str]:
    """Report names → family, family by family, then by name.

    ``detectors`` maps each report name (``npr``, ``npr-retrained``) to the registered
    detector it ran (metrics.json's ``detector``).
    """
    order = families()
    named = {name: family_of(detector) for name, detector in detectors.items()}
    return dict(sorted(named.items(), key=lambda item: (order.index(item[1]), item[0])))


def detector_styles(lined_up: Mapping[str, str]) -> dict[str, tuple[str, str, str]]:
    """(colour, marker, line style) per detector of a `lineup`: the marker from its family,
    the colour from its place, the line style from the round of colours it falls in."""
    order = families()
    styles = {}
    for i, (name, family) in enumerate(lined_up.items()):
        colour = DETECTOR_COLORS[i % len(DETECTOR_COLORS)]
        linestyle = LINESTYLES[(i // len(DETECTOR_COLORS)) % len(LINESTYLES)]
        styles[name] = (colour, FAMILY_MARKERS[order.index(family)], linestyle)
    return styles
