"""Tiny variants of every detector: the same code paths at a size CPU tests can afford."""

from __future__ import annotations

import copy
from typing import Any

from qdd.detectors.clip_backbone import TINY_CONFIG

#: A tiny timm ViT: the real architecture's code path, patch size as released.
TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}

#: A tiny SPAI: 224-px tiles and patch 16 as released, narrow and shallow everywhere else.
TINY_SPAI = {"dim": 16, "depth": 2, "heads": 2, "proj_dim": 8, "attn_dim": 8, "attn_heads": 2,
             "head_ratio": 1}  # fmt: skip

#: Detector arguments that make each detector tiny (random, seeded CLIP towers and ViTs).
TINY_ARGS: dict[str, dict[str, Any]] = {
    "bfree": {"vit_args": TINY_VIT},
    "commfor": {"vit_args": TINY_VIT},
    "rigid": {"backbone_weights": None, "vit_args": TINY_VIT},
    "npr": {"resize": 64, "crop": 56},
    "corvi": {"layers": [1, 1, 1, 1], "crop": 32},
    "clipd": {"backbone": TINY_CONFIG.stem, "backbone_weights": None},
    "rine": {"backbone": TINY_CONFIG.stem, "backbone_weights": None, "nproj": 2, "proj_dim": 8},
    "univfd": {"backbone": TINY_CONFIG.stem, "backbone_weights": None},
    "spai": {"net_args": TINY_SPAI},
}


def tiny_detector_args(detector: str) -> dict[str, Any]:
    """``--model.detector_args`` for a tiny ``detector``."""
    from qdd.detectors.registry import detector_class

    return copy.deepcopy(TINY_ARGS[detector_class(detector).name])
