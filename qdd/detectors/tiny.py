"""Tiny variants of every detector: the same code paths at a size CPU tests can afford."""

from __future__ import annotations

from typing import Any

from qdd.detectors.clip_backbone import TINY_CONFIG

#: Detector arguments that make each detector tiny (random, seeded CLIP towers).
TINY_ARGS: dict[str, dict[str, Any]] = {
    "npr": {"resize": 64, "crop": 56},
    "corvi": {"layers": [1, 1, 1, 1], "crop": 32},
    "clipd": {"backbone": TINY_CONFIG.stem, "backbone_weights": None},
    "univfd": {"backbone": TINY_CONFIG.stem, "backbone_weights": None},
}


def tiny_detector_args(detector: str) -> dict[str, Any]:
    """``--model.detector_args`` for a tiny ``detector``."""
    from qdd.detectors.registry import detector_class

    return dict(TINY_ARGS[detector_class(detector).name])
