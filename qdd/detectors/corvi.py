"""Corvi et al. (ICASSP 2023, "DMID"): ResNet-50 with no early down-sampling.

Diffusion fingerprints live in the highest frequencies, so conv1 and the max-pool keep
stride 1 and the detector sees the image at full resolution (batch 1 for mixed sizes).
Parameter names follow torchvision's ResNet, as the official weight file does.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torchvision import transforms
from torchvision.models.resnet import Bottleneck, ResNet

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


@register("corvi", card=CARDS["corvi"])
class Corvi(Detector):
    """ResNet-50 (conv1 and max-pool at stride 1), dropout 0.5, fc 2048 → 1.

    Args:
        layers: bottlenecks per stage; ``[3, 4, 6, 3]`` is ResNet-50 (tests use fewer).
        crop: train-time random crop size (the training script's 96-pixel patches).
    """

    official_weights = "corvi2023.pth"

    def __init__(self, layers: list[int] | None = None, crop: int = 96) -> None:
        super().__init__()
        self.crop = crop
        trunk = ResNet(Bottleneck, list(layers or [3, 4, 6, 3]), num_classes=1)
        trunk.conv1.stride = (1, 1)
        trunk.maxpool.stride = 1
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(trunk, name))
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(512 * Bottleneck.expansion, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.dropout(x.mean(dim=(2, 3)))).squeeze(1)

    def eval_transform(self) -> Transform:
        return transforms.Compose(to_normalized_tensor(IMAGENET_MEAN, IMAGENET_STD))

    def train_transform(self) -> Transform:
        return transforms.Compose(
            [
                transforms.RandomCrop(self.crop, pad_if_needed=True, padding_mode="symmetric"),
                transforms.RandomHorizontalFlip(),
                *to_normalized_tensor(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def configure_optimizer(self, params: Iterable[nn.Parameter]) -> Optimization:
        """Adam 1e-4; the released training recipe is not pinned down in the paper."""
        return torch.optim.Adam(params, lr=1e-4), None
