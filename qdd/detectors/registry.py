"""Detector names → classes (DeepfakeBench's decorator, anomalib's forgiving lookup).

Import errors are never turned into "not found": the detector modules are imported
eagerly by `qdd.detectors`, so a broken import fails as itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qdd.detectors.base import Detector
from qdd.detectors.card import DetectorCard
from qdd.errors import QddError

_REGISTRY: dict[str, type[Detector]] = {}


def _canonical(name: str) -> str:
    """``NPRDetector``, ``npr_detector``, ``clip-d`` → ``npr``, ``npr``, ``clipd``."""
    key = name.lower().replace("_", "").replace("-", "")
    return key.removesuffix("detector") or key


def register(name: str, card: DetectorCard) -> Callable[[type[Detector]], type[Detector]]:
    """Class decorator: make a detector available under ``name``, described by ``card``."""

    def decorate(cls: type[Detector]) -> type[Detector]:
        key = _canonical(name)
        if key in _REGISTRY:
            raise ValueError(f"detector {name!r} registered twice")
        cls.name = name
        cls.card = card
        _REGISTRY[key] = cls
        return cls

    return decorate


def available() -> list[str]:
    return sorted(cls.name for cls in _REGISTRY.values())


def detector_class(name: str) -> type[Detector]:
    """The class registered as ``name`` (snake_case, PascalCase or short form)."""
    try:
        return _REGISTRY[_canonical(name)]
    except KeyError:
        raise QddError(f"unknown detector {name!r}: choose from {', '.join(available())}") from None


def build_detector(name: str, **kwargs: Any) -> Detector:
    """A detector with its architecture's initial weights (no head weights loaded)."""
    cls = detector_class(name)
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise QddError(f"bad arguments for detector {cls.name!r}: {error}") from None
