"""Detector names → classes (DeepfakeBench's decorator, anomalib's forgiving lookup).

qdd's detector modules are imported on the first lookup of a class (`available`,
`detector_class`), all of them, and import errors are never turned into "not found": a
broken import fails as itself. A name or a card alone (`registered_name`, `card_of`,
`cards`: what the CLI's checks, `qdd-cli detectors` and the report read) imports none.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qdd.detectors.card import DetectorCard
from qdd.detectors.cards import CARDS
from qdd.errors import QddError

#: Each detector's packaged preset (its published recipe), named by its registered name.
PRESETS = Path(__file__).parent.parent / "configs" / "detectors"

if TYPE_CHECKING:
    from qdd.detectors.base import Detector

_REGISTRY: dict[str, type[Detector]] = {}
#: qdd's detector modules (``qdd.detectors.<name>``): one per card of `CARDS`.
MODULES = tuple(CARDS)


def _import_detectors() -> None:
    """Import (so register) every qdd detector module; cheap once they are imported."""
    for name in MODULES:
        importlib.import_module(f"qdd.detectors.{name}")


def _canonical(name: str) -> str:
    """``NPRDetector``, ``npr_detector``, ``clip-d`` → ``npr``, ``npr``, ``clipd``."""
    key = name.lower().replace("_", "").replace("-", "")
    return key.removesuffix("detector") or key


def register(name: str, card: DetectorCard) -> Callable[[type[Detector]], type[Detector]]:
    """Class decorator: make a detector available under ``name``, described by ``card``."""

    def decorate(cls: type[Detector]) -> type[Detector]:
        key = _canonical(name)
        if key in _REGISTRY or (key in CARDS and cls.__module__ != f"qdd.detectors.{key}"):
            raise ValueError(f"detector {name!r} registered twice")  # qdd's name, even unloaded
        cls.name = name
        cls.card = card
        _REGISTRY[key] = cls
        return cls

    return decorate


def available() -> list[str]:
    _import_detectors()
    return sorted(cls.name for cls in _REGISTRY.values())


def registered_name(name: str) -> str | None:
    """The name ``name`` is registered under (``NPRDetector``, ``clip-d`` → ``npr``,
    ``clipd``), or None; the one identity of a detector name, read without importing a
    detector module: a registered class's, else qdd's own card's."""
    key = _canonical(name)
    cls = _REGISTRY.get(key)
    return cls.name if cls is not None else (key if key in CARDS else None)


def preset_file(name: str) -> Path | None:
    """The packaged preset ``qdd/configs/detectors/<registered name>.yaml`` of the detector
    called ``name`` (any spelling), or None; the one place a detector name finds its file."""
    registered = registered_name(name) or name
    path = PRESETS / f"{registered}.yaml"
    return path if registered.isidentifier() and path.is_file() else None


def cards() -> dict[str, DetectorCard]:
    """Registered name → card of every detector known here: qdd's own and any registered
    in this process (a user's), without importing a detector module."""
    return {**CARDS, **{cls.name: cls.card for cls in _REGISTRY.values()}}


def card_of(name: str) -> DetectorCard | None:
    """The card of the detector called ``name`` (any spelling `detector_class` takes), or
    None, without importing a detector module: a registered class's, else qdd's own."""
    key = _canonical(name)
    cls = _REGISTRY.get(key)
    return cls.card if cls is not None else CARDS.get(key)


def detector_class(name: str) -> type[Detector]:
    """The class registered as ``name`` (snake_case, PascalCase or short form)."""
    _import_detectors()
    try:
        return _REGISTRY[_canonical(name)]
    except KeyError:
        names = available()
        close = difflib.get_close_matches(_canonical(name), names, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        if "." in name:  # a class path: the registry knows names (a user's: once imported)
            hint = "a detector is named by its registered name, not a class path; " + hint
        raise QddError(f"unknown detector {name!r}: {hint}choose from {', '.join(names)}") from None


def build_detector(name: str, **kwargs: Any) -> Detector:
    """A detector with its architecture's initial weights (no head weights loaded)."""
    cls = detector_class(name)
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise QddError(f"bad arguments for detector {cls.name!r}: {error}") from None
