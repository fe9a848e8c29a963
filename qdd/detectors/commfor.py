"""Community Forensics (Park & Owens, CVPR 2025): a ViT-S/16 trained on thousands of generators.

The official ``ViTClassifier`` is timm ``vit_small_patch16_384`` (or ``_224``) under
``vit.`` with the head replaced by ``Linear(384, 1)``; its logit, before the sigmoid, is
ours. Published files: ``model.safetensors`` on the Hugging Face hub (flat ``vit.*`` keys)
and the training checkpoint ``model_v11_ViT_384_base_ckpt.pt`` (``'model'``, keys maybe
prefixed ``_orig_mod.`` by torch.compile, stripped as ``utils.load_only_weights`` does).
The input size, 384 or 224, is read from the file's position embedding (577 or 197 tokens).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
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

log = logging.getLogger(__name__)

#: Input size → the test-time resize of the short side before the centre crop.
RESIZE = {384: 440, 224: 256}
COMPILED = "_orig_mod."


@register("commfor", card=CARDS["commfor"])
class CommFor(Detector):
    """Community Forensics ViT-S/16.

    Args:
        input_size: 384 or 224 before weights are loaded (a weight file sets its own).
        vit_args: overrides of the timm architecture (tests: a tiny width and depth).
    """

    official_weights = "commfor_model.safetensors"

    def __init__(self, input_size: int = 384, vit_args: dict[str, Any] | None = None) -> None:
        super().__init__()
        if input_size not in RESIZE:
            raise QddError(f"commfor input_size {input_size}: the released models are 384 or 224")
        self.vit = create_vit(f"vit_small_patch16_{input_size}", num_classes=1, **(vit_args or {}))

    @property
    def input_size(self) -> int:
        return patch_grid(self.vit)[0] * self.vit.patch_embed.patch_size[0]

    @classmethod
    def adapt_state(cls, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The training checkpoint's torch.compile prefix (``_orig_mod.``) is dropped."""
        if next(iter(state), "").startswith(COMPILED):
            return {k.replace(COMPILED, ""): v for k, v in state.items()}
        return state

    def match_state(self, state: dict[str, Tensor]) -> None:
        """384 or 224 as the file's position embedding says (577 or 197 tokens)."""
        pos = state.get("vit.pos_embed")
        if pos is None or pos.ndim != 3 or pos.shape[1] == self.vit.pos_embed.shape[1]:
            return  # nothing to adapt; a mismatch is reported by the strict load
        patch = self.vit.patch_embed.patch_size[0]
        sizes = {(s // patch) ** 2 + 1: s for s in RESIZE}
        if pos.shape[1] in sizes:
            log.info("commfor: input size %d, from the weight file", sizes[pos.shape[1]])
            self.vit.set_input_size(img_size=sizes[pos.shape[1]])

    def forward(self, x: Tensor) -> Tensor:
        return self.vit(x).squeeze(-1)

    def eval_transform(self) -> Transform:
        size = self.input_size
        return transforms.Compose(
            [
                transforms.Resize(RESIZE[size]),  # bilinear, antialiased (PIL), short side
                transforms.CenterCrop(size),
                *to_normalized_tensor(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def train_transform(self) -> Transform:
        """The official order (resize, augment, random crop); its RandomStateAugmentation
        is reduced here to blur/JPEG and a flip."""
        size = self.input_size
        return transforms.Compose(
            [
                transforms.Resize(RESIZE[size]),
                Degrade(p=0.5, sigma=(0.0, 3.0), quality=(30, 100)),
                transforms.RandomCrop(size),
                transforms.RandomHorizontalFlip(),
                *to_normalized_tensor(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def configure_optimizer(self, params: Iterable[nn.Parameter]) -> Optimization:
        """AdamW 1e-5 for fine-tuning the released model: qdd's choice."""
        return torch.optim.AdamW(params, lr=1e-5), None
