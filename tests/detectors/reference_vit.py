"""An independent ViT forward pass on a raw state_dict (no timm), for the detector tests.

Written from the papers' and official repositories' descriptions: pre-norm blocks
(LayerNorm eps 1e-6, multi-head attention, optional LayerScale, GELU MLP), a final norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _norm(x: Tensor, state: dict[str, Tensor], name: str) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], 1e-6)


def _linear(x: Tensor, state: dict[str, Tensor], name: str) -> Tensor:
    return x @ state[f"{name}.weight"].T + state[f"{name}.bias"]


def block(x: Tensor, state: dict[str, Tensor], prefix: str, heads: int) -> Tensor:
    batch, tokens, width = x.shape
    qkv = _linear(_norm(x, state, f"{prefix}norm1"), state, f"{prefix}attn.qkv")
    q, k, v = qkv.view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / (width // heads) ** 0.5, dim=-1)
    attended = (weights @ v).transpose(1, 2).reshape(batch, tokens, width)
    attended = _linear(attended, state, f"{prefix}attn.proj")
    if f"{prefix}ls1.gamma" in state:
        attended = attended * state[f"{prefix}ls1.gamma"]
    x = x + attended
    hidden = F.gelu(_linear(_norm(x, state, f"{prefix}norm2"), state, f"{prefix}mlp.fc1"))
    hidden = _linear(hidden, state, f"{prefix}mlp.fc2")
    if f"{prefix}ls2.gamma" in state:
        hidden = hidden * state[f"{prefix}ls2.gamma"]
    return x + hidden


def encode(tokens: Tensor, state: dict[str, Tensor], heads: int) -> Tensor:
    """Every block, then the final norm: ``(B, N, D)`` → ``(B, N, D)``."""
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for i in range(depth):
        tokens = block(tokens, state, f"blocks.{i}.", heads)
    return _norm(tokens, state, "norm")


def patchify(images: Tensor, state: dict[str, Tensor]) -> Tensor:
    """The patch embedding as a ``(B, D, rows, cols)`` map (remainders dropped)."""
    weight = state["patch_embed.proj.weight"]
    return F.conv2d(images, weight, state["patch_embed.proj.bias"], stride=weight.shape[-1])


def randomise(state: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
    """Random values of useful scale for every tensor (norms near 1, LayerScale near 0.3)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state.items():
        noise = torch.randn(value.shape, generator=generator)
        if "norm" in key and key.endswith("weight"):
            out[key] = 1 + 0.1 * noise
        elif key.endswith("gamma"):
            out[key] = 0.3 + 0.1 * noise
        else:
            out[key] = 0.2 * noise
    return out
