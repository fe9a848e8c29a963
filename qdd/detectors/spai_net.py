"""SPAI's network (Karageorgiou et al., CVPR 2025; mever-team/spai ``spai/models/sid.py``).

The tile encoder ``MFViT`` (``mfvit.*`` in the file) with the official parameter names and
shapes; `qdd.detectors.spai.SPAI` holds it beside the official ``PatchBasedMFViT``'s other
modules, so the released ``spai.pth`` loads with strict key matching. Parts the released
model carries but never runs at test time (the MFM ViT's ``head``, ``fc_norm``,
``cls_blocks`` …) are kept as plain parameters: they are in the file, so they must be here
for the keys to match.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from qdd.detectors.base import IMAGENET_MEAN, IMAGENET_STD


def circular_mask(size: int, radius: int) -> Tensor:
    """1 inside ``radius`` of the centred spectrum's centre (the official coordinate grid:
    ``[size/2-1 … 0, 0 … size/2-1]`` on both axes), 0 outside; int64 as in the file."""
    half = torch.arange(size // 2, dtype=torch.float)
    coords = torch.cat([half.flip(0), half])
    radius_map = torch.hypot(coords[None, :], coords[:, None])
    return (radius_map < radius).long()


def split_frequencies(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The low-pass and high-pass parts of ``x`` (float32 FFT, real part of the inverse)."""
    spectrum = torch.fft.fftshift(torch.fft.fft2(x))
    low = torch.fft.ifft2(torch.fft.ifftshift(spectrum * mask)).real
    high = torch.fft.ifft2(torch.fft.ifftshift(spectrum * (1 - mask))).real
    return low, high


class Attention(nn.Module):
    """BEiT-style attention: one ``qkv`` weight, separate q and v biases (k has none)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class MFMViT(nn.Module):
    """The MFM ViT-B/16 as SPAI runs it: the patch tokens after every block (B×N×L×D).

    The unused ``fc_norm``, ``cls_*``, ``intermediate_fc_norm`` and ``head`` only hold the
    released file's tensors.
    """

    def __init__(
        self, tile: int, patch: int, dim: int, depth: int, heads: int, mlp_ratio: float,
        num_classes: int,
    ) -> None:  # fmt: skip
        super().__init__()
        tokens = (tile // patch) ** 2 + 1
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        self.cls_pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        self.actual_cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.cls_blocks = nn.ModuleList([Block(dim, heads, mlp_ratio)])
        self.intermediate_fc_norm = nn.ModuleList(nn.LayerNorm(dim, eps=1e-6) for _ in range(depth))
        self.head = nn.Linear(dim * depth, num_classes)
        for p in (self.pos_embed, self.cls_pos_embed, self.cls_token, self.actual_cls_token):
            nn.init.trunc_normal_(p, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        layers = []
        for block in self.blocks:
            x = block(x)
            layers.append(x[:, 1:])
        return torch.stack(layers, dim=1)


class Projector(nn.Module):
    """[LayerNorm] → (Dropout, Linear, GELU | last activation, Dropout)×n → LayerNorm;
    the Linear layers sit at ``projector.1``, ``projector.4`` … as in the official file."""

    def __init__(
        self, layers: int, in_dim: int, out_dim: int, last_gelu: bool, input_norm: bool = True
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(in_dim) if input_norm else nn.Identity()
        steps: list[nn.Module] = [nn.Dropout(0.5)]
        for i in range(layers):
            last = i == layers - 1
            act = nn.GELU() if (not last or last_gelu) else nn.Identity()
            steps += [nn.Linear(in_dim if i == 0 else out_dim, out_dim), act, nn.Dropout(0.5)]
        self.projector = nn.Sequential(*steps)
        self.norm2 = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm2(self.projector(self.norm1(x)))


class FeatureSpecificProjector(nn.Module):
    def __init__(self, depth: int, layers: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.projectors = nn.ModuleList(
            Projector(layers, in_dim, out_dim, last_gelu=False) for _ in range(depth)
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([p(x[:, i]) for i, p in enumerate(self.projectors)], dim=1)


class FeatureImportanceProjector(nn.Module):
    """The 1024-d branch: per-layer mean and std over patches, softmax(alpha)-weighted sum."""

    def __init__(self, depth: int, dim: int, layers: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.randn(1, depth, dim))
        self.proj1 = Projector(layers, 2 * dim, dim, last_gelu=True, input_norm=False)
        self.proj2 = Projector(layers, dim, dim, last_gelu=True, input_norm=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj1(torch.cat([x.mean(dim=2), x.std(dim=2)], dim=-1))
        return self.proj2((torch.softmax(self.alpha, dim=1) * x).sum(dim=1))


class FrequencyRestorationEstimator(nn.Module):
    """Cosine similarities of image/low/high tokens per layer (mean, std) + the 1024-d branch."""

    def __init__(self, depth: int, dim: int, proj_dim: int, layers: int) -> None:
        super().__init__()
        self.patch_projector = FeatureSpecificProjector(depth, layers, dim, proj_dim)
        self.original_features_processor = FeatureImportanceProjector(depth, proj_dim, layers)

    def forward(self, x: Tensor, low: Tensor, high: Tensor) -> Tensor:
        x, low, high = (self.patch_projector(t) for t in (x, low, high))
        stats = []
        for a, b in ((x, low), (x, high), (low, high)):
            similarity = F.cosine_similarity(a, b, dim=-1)  # B × N × L
            stats += [similarity.mean(dim=-1), similarity.std(dim=-1)]
        return torch.cat([*stats, self.original_features_processor(x)], dim=1)


class MFViT(nn.Module):
    """One 224-px tile → its feature vector (FFT split, clamp, ImageNet norm, frozen ViT)."""

    def __init__(self, vit: MFMViT, depth: int, dim: int, proj_dim: int, layers: int,
                 tile: int, radius: int) -> None:  # fmt: skip
        super().__init__()
        self.vit = vit
        self.features_processor = FrequencyRestorationEstimator(depth, dim, proj_dim, layers)
        self.frequencies_mask = nn.Parameter(circular_mask(tile, radius), requires_grad=False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), False)

    def forward(self, x: Tensor) -> Tensor:
        low, high = split_frequencies(x.float(), self.frequencies_mask)
        # The two parts are clamped to [0, 1]; the image itself is not.
        views = [x] + [part.clamp(0.0, 1.0).to(x.dtype) for part in (low, high)]
        views = [(v - self.mean) / self.std for v in views]
        with torch.no_grad():
            tokens = self.vit(torch.cat(views)).chunk(3)
        return self.features_processor(*tokens)
