"""Forensic detectors, registered by short name; one logit per image, > 0 means fake.

Importing this package imports no model library: the names below load on first use, and
the registry imports every detector module on its first lookup (`qdd.detectors.registry`),
so an import error surfaces as itself rather than as "unknown detector", while a card
(`qdd.detectors.registry.card_of`: what the report reads) costs no torch model import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qdd.detectors.base import Detector
    from qdd.detectors.registry import available, build_detector, detector_class
    from qdd.detectors.weights import apply_state, load_detector, read_state

#: Public name → the module defining it.
_HOMES = {
    "Detector": "qdd.detectors.base",
    "available": "qdd.detectors.registry",
    "build_detector": "qdd.detectors.registry",
    "detector_class": "qdd.detectors.registry",
    "apply_state": "qdd.detectors.weights",
    "load_detector": "qdd.detectors.weights",
    "read_state": "qdd.detectors.weights",
}

__all__ = [
    "Detector",
    "apply_state",
    "available",
    "build_detector",
    "detector_class",
    "load_detector",
    "read_state",
]


def __getattr__(name: str) -> Any:
    """``from qdd.detectors import build_detector`` (PEP 562): the name from its module."""
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
