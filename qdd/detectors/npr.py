"""NPR (Tan et al., CVPR 2024): a truncated ResNet-50 on neighbouring-pixel residuals.

Nearest-neighbour up-sampling in generators leaves correlated 2×2 pixel blocks; NPR feeds
the residual ``x - up(down(x))`` to a small ResNet (conv1 3×3/2, layer1, layer2, fc1), with
parameter names equal to the official ``NPR.pth`` so it loads unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import transforms
from torchvision.models.resnet import Bottleneck

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


def npr_residual(x: Tensor) -> Tensor:
    """``x - up2(down2(x))`` with nearest interpolation; odd sizes lose their last row/col."""
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    x = x[..., :h, :w]
    down = F.interpolate(x, scale_factor=0.5, mode="nearest", recompute_scale_factor=True)
    return x - F.interpolate(down, scale_factor=2.0, mode="nearest", recompute_scale_factor=True)


def _stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """A ResNet stage of bottlenecks with a projection shortcut on the first block."""
    downsample = nn.Sequential(
        nn.Conv2d(inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
        nn.BatchNorm2d(planes * Bottleneck.expansion),
    )
    layers = [Bottleneck(inplanes, planes, stride, downsample)]
    layers += [Bottleneck(planes * Bottleneck.expansion, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


@register("npr", card=CARDS["npr"])
class NPR(Detector):
    """NPR detector; ``resize`` is the square test-time resize (256 in the paper).

    Args:
        resize: resize to ``resize``² at test time and before the training crop; ``None``
            keeps the original size (the official GANGen-Detection protocol; batch 1 for
            mixed sizes).
        crop: train-time random crop (224 in the paper).
    """

    official_weights = "NPR.pth"

    def __init__(self, resize: int | None = 256, crop: int = 224) -> None:
        super().__init__()
        self.resize, self.crop = resize, crop
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = _stage(64, 64, blocks=3, stride=1)
        self.layer2 = _stage(256, 128, blocks=4, stride=2)
        self.fc1 = nn.Linear(512, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(npr_residual(x) * (2.0 / 3.0))
        x = self.maxpool(self.relu(self.bn1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc1(x.mean(dim=(2, 3))).squeeze(1)

    def _resize(self) -> list[Transform]:
        return [] if self.resize is None else [transforms.Resize((self.resize, self.resize))]

    def eval_transform(self) -> Transform:
        return transforms.Compose(
            [*self._resize(), *to_normalized_tensor(IMAGENET_MEAN, IMAGENET_STD)]
        )

    def train_transform(self) -> Transform:
        return transforms.Compose(
            [
                *self._resize(),
                transforms.RandomCrop(self.crop, pad_if_needed=True),
                transforms.RandomHorizontalFlip(),
                *to_normalized_tensor(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def configure_optimizer(self, params: Iterable[nn.Parameter]) -> Optimization:
        """The paper's recipe: Adam 2e-4, betas (0.9, 0.999), lr × 0.9 every 10 epochs."""
        optimizer = torch.optim.Adam(params, lr=2e-4, betas=(0.9, 0.999))
        return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.9)
