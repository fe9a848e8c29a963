"""SPAI (Karageorgiou et al., CVPR 2025): spectral AI-image detection at any resolution.

As the official test code (mever-team/spai, ``configs/spai.yaml``, ``TEST.ORIGINAL_RESOLUTION``):
the image at native resolution in [0, 1]; a side under 224 padded to 224, centred, with
reflect-101 borders (albumentations' ``PadIfNeeded``); 224-px tiles at stride 224 (the
remainder dropped), or the five-crop when there are fewer than 4 tiles; per tile, the
MFM ViT-B/16 reads the image and its low/high-frequency parts, and the spectral-context
attention pools the tiles into one logit (pre-sigmoid, > 0 means fake).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchvision import transforms
from torchvision.transforms.functional import five_crop

from qdd.detectors.augment import Degrade
from qdd.detectors.base import Detector, Optimization, Transform
from qdd.detectors.cards import CARDS
from qdd.detectors.registry import register
from qdd.detectors.spai_checkpoint import read_spai_checkpoint
from qdd.detectors.spai_net import MFMViT, MFViT

#: The released model (``configs/spai.yaml``): MFM ViT-B/16 on 224-px tiles, all 12 layers,
#: 1024-d projections, FFT radius 16, 12-head attention of width 1536, head MLP ratio 3.
ARCHITECTURE: dict[str, Any] = {
    "tile": 224, "patch": 16, "dim": 768, "depth": 12, "heads": 12, "mlp_ratio": 4.0,
    "vit_classes": 2, "proj_dim": 1024, "proj_layers": 2, "radius": 16, "attn_dim": 1536,
    "attn_heads": 12, "head_ratio": 3,
}  # fmt: skip


def reflect101_indices(size: int, target: int) -> np.ndarray:
    """Source rows for a side of ``size`` padded to ``target``: centred (the smaller half
    before), reflected without repeating the edge (OpenCV's BORDER_REFLECT_101), for any
    pad, also one wider than the image."""
    before = (target - size) // 2
    index = np.arange(target) - before
    if size == 1:
        return np.zeros(target, dtype=np.int64)
    period = 2 * (size - 1)
    index = np.mod(index, period)
    return np.where(index >= size, period - index, index)


class PadToTile:
    """PIL → PIL: sides under ``tile`` padded to ``tile`` as `reflect101_indices` says."""

    def __init__(self, tile: int) -> None:
        self.tile = tile

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if width >= self.tile and height >= self.tile:
            return image
        pixels = np.asarray(image)
        rows = reflect101_indices(height, max(height, self.tile))
        cols = reflect101_indices(width, max(width, self.tile))
        return Image.fromarray(np.ascontiguousarray(pixels[rows][:, cols]))

    def __repr__(self) -> str:
        return f"PadToTile({self.tile}, reflect-101, centred)"


@register("spai", card=CARDS["spai"])
class SPAI(Detector):
    """SPAI: MFM ViT-B/16 spectral features per 224-px tile, attention over the tiles.

    Args:
        minimum_tiles: below this many tiles an image is read as its five crops
            (``spai.yaml``: 4; the checkpoint's stale config says 1).
        tile_batch: tiles per ViT pass (memory only; the official FEATURE_EXTRACTION_BATCH).
        net_args: overrides of the architecture (tests: tiny widths and depth).
    """

    official_weights = "spai.pth"
    weights_reader = staticmethod(read_spai_checkpoint)

    def __init__(
        self,
        minimum_tiles: int = 4,
        tile_batch: int = 64,
        net_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        unknown = sorted(set(net_args or {}) - set(ARCHITECTURE))
        if unknown:  # build_detector turns this into one line
            raise TypeError(f"unknown net_args {unknown}: choose from {', '.join(ARCHITECTURE)}")
        a = {**ARCHITECTURE, **(net_args or {})}
        self.tile, self.minimum_tiles, self.tile_batch = a["tile"], minimum_tiles, tile_batch
        # The official PatchBasedMFViT's modules, under its names (spai.pth loads unchanged).
        vit = MFMViT(a["tile"], a["patch"], a["dim"], a["depth"], a["heads"], a["mlp_ratio"],
                     a["vit_classes"])  # fmt: skip
        vit.requires_grad_(False)  # SPAI trains with its MFM backbone frozen
        self.mfvit = MFViT(vit, a["depth"], a["dim"], a["proj_dim"], a["proj_layers"],
                           a["tile"], a["radius"])  # fmt: skip
        width = 6 * a["depth"] + a["proj_dim"]  # per-layer statistics + the 1024-d branch
        self.heads = a["attn_heads"]
        self.to_kv = nn.Linear(width, a["attn_dim"] * 2, bias=False)
        self.patch_aggregator = nn.Parameter(
            torch.zeros(self.heads, 1, a["attn_dim"] // self.heads)
        )
        nn.init.trunc_normal_(self.patch_aggregator, std=0.02)
        self.to_out = nn.Sequential(nn.Linear(a["attn_dim"], width, bias=False), nn.Dropout(0.5))
        self.norm = nn.LayerNorm(width)
        hidden = width * a["head_ratio"]
        self.cls_head = nn.Module()
        self.cls_head.head = nn.Sequential(
            nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(0.5), nn.Linear(hidden, 1),
        )  # fmt: skip

    def aggregate(self, features: Tensor) -> Tensor:
        """B × L × D tile features → B logits: a learned query attends over the tiles (the
        spectral-context attention), then LayerNorm and the 3-layer MLP."""
        b, n, _ = features.shape
        k, v = (
            t.reshape(b, n, self.heads, -1).transpose(1, 2)
            for t in self.to_kv(features).chunk(2, dim=-1)
        )
        query = self.patch_aggregator.expand(b, -1, -1, -1)
        x = F.scaled_dot_product_attention(query, k, v)  # B × heads × 1 × d
        x = self.to_out(x.transpose(1, 2).reshape(b, -1))
        return self.cls_head.head(self.norm(x)).squeeze(-1)

    def tiles(self, x: Tensor) -> Tensor:
        """B×C×H×W in [0, 1] (H, W ≥ tile) → B×L×C×tile×tile, as the official code cuts them."""
        t = self.tile
        if x.shape[-2] < t or x.shape[-1] < t:
            raise ValueError(f"SPAI tiles need sides of at least {t} px, got {tuple(x.shape)}")
        grid = x.unfold(2, t, t).unfold(3, t, t)  # B × C × rows × cols × t × t
        tiles = grid.permute(0, 2, 3, 1, 4, 5).reshape(len(x), -1, x.shape[1], t, t)
        if tiles.shape[1] >= self.minimum_tiles:
            return tiles
        if x.shape[-2:] == (t, t):
            return tiles  # the five crops would coincide: the same attention output
        return torch.stack(five_crop(x, [t, t]), dim=1)

    def forward(self, x: Tensor) -> Tensor:
        tiles = self.tiles(x)
        flat = tiles.flatten(0, 1)
        features = torch.cat(
            [self.mfvit(flat[i : i + self.tile_batch])
             for i in range(0, len(flat), self.tile_batch)]
        )  # fmt: skip
        return self.aggregate(features.view(len(x), tiles.shape[1], -1))

    def eval_transform(self) -> Transform:
        # Normalize(0, 1) is the official ``A.Normalize(mean=0, std=1)``: x / 255; the
        # ImageNet normalisation runs inside, after the frequency split.
        unit = transforms.Normalize((0.0,) * 3, (1.0,) * 3)
        return transforms.Compose([PadToTile(self.tile), transforms.ToTensor(), unit])

    def train_transform(self) -> Transform:
        """qdd's recipe (the official one augments with albumentations): blur/JPEG, one
        tile-sized crop, a flip."""
        return transforms.Compose(
            [
                Degrade(p=0.5, sigma=(0.0, 3.0), quality=(65, 100)),
                PadToTile(self.tile),
                transforms.RandomCrop(self.tile),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize((0.0,) * 3, (1.0,) * 3),
            ]
        )

    def configure_optimizer(self, params: Iterable[nn.Parameter]) -> Optimization:
        """AdamW 5e-4, weight decay 0.05: qdd's choice after ``spai.yaml``'s base rate (its
        batch scaling, warm-up, layer decay and cosine schedule are left out). The backbone
        stays frozen as in SPAI, but runs without the stochastic depth (0.1) the official
        training keeps active in it."""
        return torch.optim.AdamW(params, lr=5e-4, weight_decay=0.05), None
