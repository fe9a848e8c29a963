"""RIGID (He et al., 2024): training-free, real images keep their DINOv2 features under noise.

No code from the authors; this follows the WaRPAD baseline ``rigid_imgn.py``: DINOv2
ViT-L/14 from the torch.hub file ``dinov2_vitl14_pretrain.pth``, Resize 224 (bicubic),
CenterCrop 224, ImageNet normalisation, then ``x + 0.05·ε`` after normalisation; the score
is minus the cosine similarity of the two normalised CLS features (larger = fake). ε is
drawn from a CPU generator seeded ``noise_seed`` for every image, so a run repeats exactly
and an image's score does not depend on its batch. Scores lie in [-1, 1] and are not
calibrated at 0: thresholds come from calibration; AUROC/AP need none.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import transforms

from qdd.detectors.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Detector,
    Optimization,
    Transform,
    checkpoints_dir,
    to_normalized_tensor,
)
from qdd.detectors.cards import CARDS, DINOV2_FILE, RIGID_SIZE
from qdd.detectors.registry import register
from qdd.detectors.vit import create_vit, hub_position_embedding, patch_grid
from qdd.detectors.weights import file_sha256, load_tensor_file, state_mismatch, unwrap_state
from qdd.errors import QddError

log = logging.getLogger(__name__)

NOISE_LEVEL = 0.05
SIZE = RIGID_SIZE
#: In the hub file, not used by the forward pass (masked pre-training only).
HUB_ONLY = ("mask_token",)


def load_hub_backbone(vit: nn.Module, path: Path) -> None:
    """Load a DINOv2 torch.hub file into timm's ViT, strictly, position embedding resampled."""
    state = unwrap_state(load_tensor_file(path))
    missing_hub = [k for k in HUB_ONLY if k not in state]
    state = {k: v for k, v in state.items() if k not in HUB_ONLY}
    pos = state.get("pos_embed")
    if (
        pos is not None
        and pos.ndim == 3
        and pos.shape[-1] == vit.pos_embed.shape[-1]
        and math.isqrt(pos.shape[1] - 1) ** 2 == pos.shape[1] - 1
    ):  # a class position and a square grid: resampled; anything else is a mismatch below
        state["pos_embed"] = hub_position_embedding(pos, patch_grid(vit))
    problems = state_mismatch(vit.state_dict(), state)
    if missing_hub:
        problems = "; ".join(p for p in (problems, f"missing keys {', '.join(missing_hub)}") if p)
    if problems:
        raise QddError(
            f"{path} is not a DINOv2 torch.hub backbone for rigid ({problems}): pass "
            f"{DINOV2_FILE} (see checkpoints/README.md) as --model.detector_args.backbone_weights"
        )
    vit.load_state_dict(state)


def resolve_backbone(weights: str) -> Path:
    """A path as given, else the name under ``checkpoints/``; missing: one line with the fix."""
    path = Path(weights).expanduser()
    if not path.is_file() and not path.is_absolute() and (checkpoints_dir() / path).is_file():
        path = checkpoints_dir() / path
    if not path.is_file():
        raise QddError(
            f"DINOv2 backbone {weights} not found (nor under {checkpoints_dir()}): download "
            f"{DINOV2_FILE} (checkpoints/README.md) and pass "
            "--model.detector_args.backbone_weights FILE"
        )
    return path


@register("rigid", card=CARDS["rigid"])
class Rigid(Detector):
    """RIGID on a frozen DINOv2 ViT-L/14.

    Args:
        backbone_weights: the torch.hub DINOv2 file (a path, or a name under checkpoints/);
            ``None`` = a random, seeded backbone (tests and throughput only).
        noise_seed: seed of the noise, the same ε for every image.
        arch: timm architecture of the hub model.
        vit_args: overrides of the timm architecture (tests: a tiny width and depth).
    """

    frozen_prefixes = ("backbone.",)

    def __init__(
        self,
        backbone_weights: str | None = DINOV2_FILE,
        noise_seed: int = 0,
        arch: str = "vit_large_patch14_dinov2",
        vit_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.noise_seed = noise_seed
        path = None if backbone_weights is None else resolve_backbone(backbone_weights)
        self.backbone = create_vit(arch, num_classes=0, img_size=SIZE, **(vit_args or {}))
        if path is None:
            log.warning("rigid: DINOv2 backbone has random weights (asked for explicitly)")
        else:
            load_hub_backbone(self.backbone, path)
            self.weight_files[str(path)] = file_sha256(path)
        self.backbone.requires_grad_(False)
        self.backbone.eval()

    def noise(self, like: Tensor) -> Tensor:
        """ε for one image, from a fresh CPU generator seeded ``noise_seed``, for each row."""
        generator = torch.Generator("cpu").manual_seed(self.noise_seed)
        epsilon = torch.randn((1, *like.shape[1:]), generator=generator)
        return epsilon.to(like.device, like.dtype).expand_as(like)

    def features(self, x: Tensor) -> Tensor:
        """The CLS token after DINOv2's final norm (the hub's ``x_norm_clstoken``)."""
        return self.backbone.forward_features(x)[:, 0]

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            clean = self.features(x)
            noisy = self.features(x + NOISE_LEVEL * self.noise(x))
        return -F.cosine_similarity(clean, noisy, dim=-1)

    def eval_transform(self) -> Transform:
        return transforms.Compose(
            [
                transforms.Resize(SIZE, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.CenterCrop(SIZE),
                *to_normalized_tensor(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def train_transform(self) -> Transform:
        """Nothing is trained: validation (calibration) sees the test-time input."""
        return self.eval_transform()

    def configure_optimizer(self, params: Iterable[nn.Parameter]) -> Optimization:
        raise QddError(
            "rigid is training-free: there is nothing to fit (`qdd-cli fit --detector rigid` "
            "calibrates a threshold without training)"
        )
