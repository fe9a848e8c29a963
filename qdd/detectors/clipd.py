"""CLIP-D (Cozzolino et al., CVPRW 2024): a linear head on frozen CLIP ViT-L/14 features.

The feature is the 1024-d CLS token after ``ln_post`` and before the projection,
L2-normalised; the head ``fc`` (1024 → 1) outputs a log-likelihood ratio, > 0 = fake.
The official head file holds only ``fc.weight``/``fc.bias``; the backbone is open_clip's.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import transforms

from qdd.detectors.base import CLIP_MEAN, CLIP_STD, Detector, Optimization, Transform
from qdd.detectors.base import to_normalized_tensor as normalized
from qdd.detectors.cards import CARDS
from qdd.detectors.clip_backbone import image_size, load_image_tower, local_file
from qdd.detectors.registry import register
from qdd.detectors.weights import file_sha256


@register("clipd", card=CARDS["clipd"])
class ClipD(Detector):
    """CLIP-D with the paper's CommonPool-XL ViT-L/14 by default.

    Args:
        backbone: open_clip architecture.
        backbone_weights: local open_clip file or pretrained tag; ``None`` = random (tests).
    """

    official_weights = "clipd_latent10k_plus.pth"
    frozen_prefixes = ("backbone.",)

    def __init__(
        self, backbone: str = "ViT-L-14", backbone_weights: str | None = "commonpool_xl_s13b_b90k"
    ) -> None:
        super().__init__()
        self.backbone = load_image_tower(backbone, backbone_weights, projected=False)
        if (file := local_file(backbone_weights)) is not None:
            self.weight_files[str(file)] = file_sha256(file)
        width = self.backbone.ln_post.normalized_shape[0]
        self.fc = nn.Linear(width, 1)
        nn.init.normal_(self.fc.weight, 0.0, 0.02)
        nn.init.zeros_(self.fc.bias)

    def features(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return F.normalize(self.backbone(x), dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x)).squeeze(1)

    def eval_transform(self) -> Transform:
        size = image_size(self.backbone)
        return transforms.Compose(
            [
                transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.CenterCrop(size),
                *normalized(CLIP_MEAN, CLIP_STD),
            ]
        )

    def train_transform(self) -> Transform:
        size = image_size(self.backbone)
        return transforms.Compose(
            [
                transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.RandomCrop(size),
                transforms.RandomHorizontalFlip(),
                *normalized(CLIP_MEAN, CLIP_STD),
            ]
        )

    def configure_optimizer(self, params: Iterable[nn.Parameter]) -> Optimization:
        """Adam 1e-3 on the linear head (the paper fits a linear SVM on the same features)."""
        return torch.optim.Adam(params, lr=1e-3), None
