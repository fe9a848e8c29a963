"""timm Vision Transformers for the ViT detectors (B-Free, Community Forensics, RIGID).

The real architectures come from timm by name, never fetched (``pretrained=False``): the
weights are the official files. Tests pass ``vit_args`` (a small width and depth) so a
tiny model runs through the same timm code path as the real one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qdd.errors import QddError


def create_vit(arch: str, **kwargs: Any) -> nn.Module:
    """timm ``arch`` with ``kwargs`` over its defaults, random init seeded (repeatable)."""
    import timm

    if not timm.is_model(arch):
        raise QddError(f"unknown timm architecture {arch!r}: use a timm model name")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            return timm.create_model(arch, pretrained=False, **kwargs)
        except TypeError as error:
            raise QddError(f"bad arguments for timm {arch}: {error}") from None


def patch_grid(vit: nn.Module) -> tuple[int, int]:
    """Rows and columns of patches the ViT's position embedding is built for."""
    return tuple(int(n) for n in vit.patch_embed.grid_size)  # type: ignore[return-value]


def hub_position_embedding(pos_embed: Tensor, grid: tuple[int, int]) -> Tensor:
    """DINOv2's torch.hub resampling of a ``(1, 1 + M², D)`` embedding to ``grid`` patches.

    As the hub model does at run time: the class position kept, the M×M patch grid
    resampled bicubically (no antialias) with scale factors ``(n + 0.1) / M``, computed in
    float32.
    """
    dtype = pos_embed.dtype
    pos_embed = pos_embed.float()
    side = math.isqrt(pos_embed.shape[1] - 1)
    if side * side != pos_embed.shape[1] - 1:
        raise QddError(
            f"pos_embed of {pos_embed.shape[1]} tokens is not a class token plus a square grid"
        )
    if (side, side) == grid:
        return pos_embed.to(dtype)
    dim = pos_embed.shape[-1]
    patches = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    scale = ((grid[0] + 0.1) / side, (grid[1] + 0.1) / side)
    patches = F.interpolate(patches, scale_factor=scale, mode="bicubic", antialias=False)
    if tuple(patches.shape[-2:]) != grid:  # pragma: no cover - the 0.1 offset prevents it
        raise RuntimeError(f"resampled grid {tuple(patches.shape[-2:])} is not {grid}")
    patches = patches.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((pos_embed[:, :1], patches), dim=1).to(dtype)
