"""The small base class every detector follows (one score convention for all)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import ClassVar

import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms

from qdd.detectors.card import DetectorCard

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Transform = Callable[[Image.Image], Tensor]
Optimization = tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]


def checkpoints_dir() -> Path:
    """``$QDD_CHECKPOINTS`` or ./checkpoints: where official weight files are looked for."""
    return Path(os.environ.get("QDD_CHECKPOINTS", "checkpoints"))


def to_normalized_tensor(mean: tuple[float, ...], std: tuple[float, ...]) -> list[Callable]:
    """PIL → float tensor in [0, 1] → normalised with the backbone's statistics."""
    return [transforms.ToTensor(), transforms.Normalize(mean, std)]


class Detector(torch.nn.Module):
    """A forensic detector: image batch → one logit per image, > 0 means fake.

    Subclasses keep the official parameter names at the top level, so official weight
    files load unchanged. Frozen parts (a CLIP backbone) live under ``frozen_prefixes``:
    never trained, never saved with the head, never part of the official weight file.
    """

    name: ClassVar[str]
    #: Family, input policy, files and licence (set by ``@register``).
    card: ClassVar[DetectorCard]
    #: File name of the official weights under ``checkpoints/`` (see checkpoints/README.md).
    official_weights: ClassVar[str]
    frozen_prefixes: ClassVar[tuple[str, ...]] = ()
    #: Where the trained weights came from (a file), or "random": recorded in metrics.json.
    weights_source: str = "random"

    def __init__(self) -> None:
        super().__init__()
        #: Every weight file this detector was built from → its sha256 (run outputs record it).
        self.weight_files: dict[str, str] = {}

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def eval_transform(self) -> Transform:  # pragma: no cover - abstract
        raise NotImplementedError

    def train_transform(self) -> Transform:  # pragma: no cover - abstract
        raise NotImplementedError

    def configure_optimizer(
        self, params: Iterable[torch.nn.Parameter]
    ) -> Optimization:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def adapt_state(cls, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Rename keys of a published weight file to this module's names (identity here)."""
        return state

    def match_state(self, state: dict[str, Tensor]) -> None:
        """Adapt the architecture to a weight file's sizes where the official loader does
        (Community Forensics: 384 or 224 from the position embedding); nothing here."""

    def head_state_dict(self) -> dict[str, Tensor]:
        """What a weight file of this detector holds: everything but the frozen parts."""
        return {
            k: v for k, v in self.state_dict().items() if not k.startswith(self.frozen_prefixes)
        }

    @classmethod
    def official_path(cls) -> Path:
        """Where the official weights are expected (``$QDD_CHECKPOINTS`` or ./checkpoints)."""
        return checkpoints_dir() / cls.official_weights
