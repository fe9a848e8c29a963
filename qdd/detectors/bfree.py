"""B-Free (Guillaro et al., CVPR 2025): DINOv2 ViT-B/14 with registers, trained bias-free.

The official test code (grip-unina/B-Free ``wrapper5crops``) never resizes: the patch
embedding runs on the whole image, a side shorter than 36 patches is tiled and cut to 36,
and five 36×36-patch windows (centre, top-left, bottom-left, bottom-right, top-right) go
through the rest of the ViT; the five logits are averaged. The released
``model_epoch_best.pth`` is ``{'model': timm keys}``: ``patch_embed.*`` load here at the
top level and the rest under ``vit.``, as the wrapper splits them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from torchvision import transforms

from qdd.detectors.augment import Degrade
from qdd.detectors.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Detector,
    Optimization,
    Transform,
    to_normalized_tensor,
)
from qdd.detectors.cards import CARDS
from qdd.detectors.registry import register
from qdd.detectors.vit import create_vit, patch_grid
from qdd.errors import QddError


def tile_to(embeddings: Tensor, grid: tuple[int, int]) -> Tensor:
    """Repeat a ``(B, C, h, w)`` patch map until it covers ``grid``, then cut it to ``grid``
    (both sides, as the official wrapper does: a long side keeps its first patches)."""
    rows = max(-(-grid[0] // embeddings.shape[-2]), 1)
    cols = max(-(-grid[1] // embeddings.shape[-1]), 1)
    return embeddings.repeat(1, 1, rows, cols)[..., : grid[0], : grid[1]]


def five_windows(embeddings: Tensor, grid: tuple[int, int]) -> list[Tensor]:
    """Centre, top-left, bottom-left, bottom-right, top-right ``grid`` windows of a map."""
    gh, gw = grid
    h, w = embeddings.shape[-2:]
    top, left = max((h - gh) // 2, 0), max((w - gw) // 2, 0)
    return [
        embeddings[..., top : top + gh, left : left + gw],
        embeddings[..., :gh, :gw],
        embeddings[..., h - gh :, :gw],
        embeddings[..., h - gh :, w - gw :],
        embeddings[..., :gh, w - gw :],
    ]


class AtLeastOnePatch:
    """PIL → PIL, unchanged: an image with a side under one patch has no patch to embed, so
    it stops the run in one line (the loader adds which image it is)."""

    def __init__(self, patch: int) -> None:
        self.patch = patch

    def __call__(self, image: Image.Image) -> Image.Image:
        if image.width < self.patch or image.height < self.patch:
            raise QddError(
                f"bfree needs images of at least one patch ({self.patch}×{self.patch} px), got "
                f"{image.width}×{image.height}: drop such images from the shards"
            )
        return image


@register("bfree", card=CARDS["bfree"])
class BFree(Detector):
    """B-Free: timm ``vit_base_patch14_reg4_dinov2``, one class, 504-px windows.

    Args:
        arch: timm architecture.
        window: window side in pixels (504 = 36 patches of 14, as released).
        vit_args: overrides of the timm architecture (tests: a tiny width and depth).
    """

    official_weights = "bfree_model_epoch_best.pth"

    def __init__(
        self,
        arch: str = "vit_base_patch14_reg4_dinov2",
        window: int = 504,
        vit_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.window = window
        self.vit = create_vit(arch, num_classes=1, img_size=window, **(vit_args or {}))
        # The wrapper's split: patch embedding here, the rest of the ViT from tokens on.
        self.patch_embed = self.vit.patch_embed
        self.vit.patch_embed = nn.Identity()
        self.grid = patch_grid(self)

    @classmethod
    def adapt_state(cls, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official timm keys → ``patch_embed.*`` here, everything else under ``vit.``."""
        if any(k.startswith("vit.") for k in state):
            return state
        return {k if k.startswith("patch_embed.") else f"vit.{k}": v for k, v in state.items()}

    def forward(self, x: Tensor) -> Tensor:
        patch = self.patch_embed.patch_size
        if x.shape[-2] < patch[0] or x.shape[-1] < patch[1]:
            raise QddError(
                f"bfree needs images of at least one patch ({patch[0]}×{patch[1]} px), got "
                f"{x.shape[-2]}×{x.shape[-1]}: drop such images from the shards"
            )
        embeddings = self.patch_embed.proj(x)  # remainder rows/columns dropped by the stride
        if embeddings.shape[-2] < self.grid[0] or embeddings.shape[-1] < self.grid[1]:
            embeddings = tile_to(embeddings, self.grid)
        if tuple(embeddings.shape[-2:]) == self.grid:
            windows = [embeddings]  # the five windows coincide: one pass, the same mean
        else:
            windows = five_windows(embeddings, self.grid)
        tokens = torch.cat(windows).flatten(2).transpose(1, 2)
        logits = self.vit(self.patch_embed.norm(tokens)).squeeze(-1)
        return logits.view(len(windows), len(x)).mean(0)

    def eval_transform(self) -> Transform:
        patch = self.patch_embed.patch_size
        return transforms.Compose(
            [AtLeastOnePatch(max(patch)), *to_normalized_tensor(IMAGENET_MEAN, IMAGENET_STD)]
        )

    def train_transform(self) -> Transform:
        """qdd's recipe (no training code is released): blur/JPEG, a window crop, a flip."""
        return transforms.Compose(
            [
                Degrade(p=0.5, sigma=(0.0, 3.0), quality=(65, 100)),
                transforms.RandomCrop(self.window, pad_if_needed=True, padding_mode="reflect"),
                transforms.RandomHorizontalFlip(),
                *to_normalized_tensor(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def configure_optimizer(self, params: Iterable[nn.Parameter]) -> Optimization:
        """AdamW 1e-5: qdd's choice for fine-tuning the released ViT (not published)."""
        return torch.optim.AdamW(params, lr=1e-5), None
