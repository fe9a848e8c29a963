"""RINE (Koutlis & Papadopoulos, ECCV 2024): CLIP's intermediate encoder blocks.

The CLS token at the input of every block's MLP (the output of ``ln_2``) of a frozen
OpenAI CLIP ViT-L/14, each projected by a shared MLP (``proj1``), weighted per layer and
feature by ``softmax(alpha)`` over the layers, summed, projected again (``proj2``) and
classified (``head``). Parameter names are those of the released head files
``ckpt/model_*_trainable.pth`` (a plain dict without the CLIP weights), whose depth
(``nproj``) and width (``proj_dim``) differ per file: they are read from the file.
The official code runs CLIP in float16 on a GPU; here the tower runs in float32.
"""

from __future__ import annotations

import re
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

#: A Linear of ``proj1`` in the file: ``proj1.<index>.weight`` (Dropout, then Linear/ReLU/Dropout).
_PROJ1_LINEAR = re.compile(r"proj1\.(\d+)\.weight")


def projection(in_features: int, width: int, depth: int) -> nn.Sequential:
    """Dropout, then ``depth`` × (Linear, ReLU, Dropout): the official module indices."""
    layers: list[nn.Module] = [nn.Dropout()]
    for i in range(depth):
        layers += [nn.Linear(in_features if i == 0 else width, width), nn.ReLU(), nn.Dropout()]
    return nn.Sequential(*layers)


def classifier(width: int) -> nn.Sequential:
    """Linear/ReLU/Dropout twice, then Linear(width, 1): ``head.{0,3,6}`` in the file."""
    return nn.Sequential(
        nn.Linear(width, width), nn.ReLU(), nn.Dropout(),
        nn.Linear(width, width), nn.ReLU(), nn.Dropout(),
        nn.Linear(width, 1),
    )  # fmt: skip


@register("rine", card=CARDS["rine"])
class Rine(Detector):
    """RINE on OpenAI's quick-GELU ViT-L/14 by default.

    Args:
        backbone: open_clip architecture (its blocks and width set ``alpha``'s shape).
        backbone_weights: local open_clip file or pretrained tag; ``None`` = random (tests).
        nproj: Linear layers of each projection before a file sets it (training from scratch).
        proj_dim: their width before a file sets it.
    """

    official_weights = "rine_model_1class_trainable.pth"
    frozen_prefixes = ("backbone.",)

    def __init__(
        self,
        backbone: str = "ViT-L-14-quickgelu",
        backbone_weights: str | None = "openai",
        nproj: int = 4,
        proj_dim: int = 1024,
    ) -> None:
        super().__init__()
        self.backbone = load_image_tower(backbone, backbone_weights, projected=False)
        if (file := local_file(backbone_weights)) is not None:
            self.weight_files[str(file)] = file_sha256(file)
        self.mlp_inputs = [block.ln_2 for block in self.backbone.transformer.resblocks]
        self.build_head(nproj, proj_dim)

    def build_head(self, nproj: int, proj_dim: int) -> None:
        """The trainable part, random: ``alpha`` (1, blocks, proj_dim), proj1, proj2, head."""
        width = self.backbone.transformer.width
        self.alpha = nn.Parameter(torch.randn(1, len(self.mlp_inputs), proj_dim))
        self.proj1 = projection(width, proj_dim, nproj)
        self.proj2 = projection(proj_dim, proj_dim, nproj)
        self.head = classifier(proj_dim)

    def match_state(self, state: dict[str, Tensor]) -> None:
        """Take ``nproj`` and ``proj_dim`` from the file, as each released head has its own."""
        alpha = state.get("alpha")
        depth = sum(1 for key in state if _PROJ1_LINEAR.fullmatch(key))
        if alpha is None or alpha.ndim != 3 or depth == 0:
            return  # not a RINE head: the strict comparison names what is wrong
        if (depth, alpha.shape[-1]) != (self.nproj, self.proj_dim):
            self.build_head(depth, int(alpha.shape[-1]))

    @property
    def nproj(self) -> int:
        return sum(isinstance(m, nn.Linear) for m in self.proj1)

    @property
    def proj_dim(self) -> int:
        return int(self.alpha.shape[-1])

    def block_tokens(self, x: Tensor) -> Tensor:
        """(N, blocks, width): the CLS token entering each block's MLP."""
        outputs: list[Tensor] = []
        handles = [
            norm.register_forward_hook(lambda _m, _i, out: outputs.append(out))
            for norm in self.mlp_inputs
        ]
        try:
            with torch.no_grad():
                self.backbone(x)
        finally:
            for handle in handles:
                handle.remove()
        batch_first = getattr(self.backbone.transformer, "batch_first", True)
        return torch.stack([out[:, 0] if batch_first else out[0] for out in outputs], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        g = self.proj1(self.block_tokens(x).float())
        z = (torch.softmax(self.alpha, dim=1) * g).sum(dim=1)
        return self.head(self.proj2(z)).squeeze(1)

    def eval_transform(self) -> Transform:
        """CenterCrop without resizing: torchvision pads a smaller image with zeros."""
        size = image_size(self.backbone)
        return transforms.Compose([transforms.CenterCrop(size), *normalized(CLIP_MEAN, CLIP_STD)])

    def train_transform(self) -> Transform:
        """Blur/JPEG (p 0.5 each), random 224 crop (zero-padded), flip: the official recipe.

        The official JPEG quality is 30 or 100 (a coin flip) and through cv2 or PIL; here it
        is uniform in [30, 100] through PIL, as for UnivFD.
        """
        size = image_size(self.backbone)
        return transforms.Compose(
            [
                Degrade(p=0.5, sigma=(0.0, 3.0), quality=(30, 100)),
                transforms.RandomCrop(size, pad_if_needed=True),
                transforms.RandomHorizontalFlip(),
                *normalized(CLIP_MEAN, CLIP_STD),
            ]
        )

    def configure_optimizer(self, params: Iterable[nn.Parameter]) -> Optimization:
        """Adam, lr 1e-3 (the released runs); the paper's SupCon term is not part of it."""
        return torch.optim.Adam(params, lr=1e-3), None
