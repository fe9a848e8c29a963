"""UnivFD (Ojha et al., CVPR 2023): a linear probe on OpenAI CLIP ViT-L/14 embeddings.

The feature is the 768-d projected image embedding, not normalised; ``fc`` (768 → 1).
The released ``fc_weights.pth`` holds a bare ``weight``/``bias``: mapped onto ``fc``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torchvision import transforms

from qdd.detectors.augment import Degrade
from qdd.detectors.base import CLIP_MEAN, CLIP_STD, Detector, Optimization, Transform
from qdd.detectors.base import to_normalized_tensor as normalized
from qdd.detectors.cards import CARDS
from qdd.detectors.clip_backbone import image_size, load_image_tower, local_file
from qdd.detectors.registry import register
from qdd.detectors.weights import file_sha256


@register("univfd", card=CARDS["univfd"])
class UnivFD(Detector):
    """UnivFD with OpenAI's quick-GELU ViT-L/14 by default.

    Args:
        backbone: open_clip architecture.
        backbone_weights: local open_clip file or pretrained tag; ``None`` = random (tests).
    """

    official_weights = "univfd_fc_weights.pth"
    frozen_prefixes = ("backbone.",)

    def __init__(
        self, backbone: str = "ViT-L-14-quickgelu", backbone_weights: str | None = "openai"
    ) -> None:
        super().__init__()
        self.backbone = load_image_tower(backbone, backbone_weights, projected=True)
        if (file := local_file(backbone_weights)) is not None:
            self.weight_files[str(file)] = file_sha256(file)
        self.fc = nn.Linear(self.backbone.output_dim, 1)

    @classmethod
    def adapt_state(cls, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The released head is a bare nn.Linear state: ``weight``/``bias`` → ``fc.*``."""
        if set(state) == {"weight", "bias"}:
            return {f"fc.{k}": v for k, v in state.items()}
        return state

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            features = self.backbone(x)
        return self.fc(features).squeeze(1)

    def eval_transform(self) -> Transform:
        size = image_size(self.backbone)
        return transforms.Compose([transforms.CenterCrop(size), *normalized(CLIP_MEAN, CLIP_STD)])

    def train_transform(self) -> Transform:
        """Blur/JPEG (p 0.5 each), resize short side 256/224 of the crop, crop, flip."""
        size = image_size(self.backbone)
        return transforms.Compose(
            [
                Degrade(p=0.5, sigma=(0.0, 3.0), quality=(30, 100)),
                transforms.Resize(round(size * 256 / 224)),
                transforms.RandomCrop(size),
                transforms.RandomHorizontalFlip(),
                *normalized(CLIP_MEAN, CLIP_STD),
            ]
        )

    def configure_optimizer(self, params: Iterable[nn.Parameter]) -> Optimization:
        """The paper's recipe: AdamW, lr 1e-4 (betas 0.9/0.999)."""
        return torch.optim.AdamW(params, lr=1e-4), None
