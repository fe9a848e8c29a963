"""An independent SPAI forward pass written from the official code (mever-team/spai
``sid.py``, ``vision_transformer.py``, ``filters.py``, ``utils.patchify_image``,
``data_finetune.build_transform``): plain functions over the released state dict's keys,
one image at a time as ``forward_arbitrary_resolution_batch`` runs them. Nothing here
imports qdd's SPAI code."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision.transforms.functional import five_crop

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def pad_if_needed(pixels: np.ndarray, size: int) -> np.ndarray:
    """albumentations PadIfNeeded: centred (top = floor), cv2.BORDER_REFLECT_101 (numpy's
    'reflect' is the same border: the edge pixel is not repeated)."""
    h, w = pixels.shape[:2]
    top, left = max(size - h, 0) // 2, max(size - w, 0) // 2
    bottom, right = max(size - h, 0) - top, max(size - w, 0) - left
    return np.pad(pixels, ((top, bottom), (left, right), (0, 0)), mode="reflect")


def circular_mask(size: int, radius: int) -> Tensor:
    values = torch.arange(0, size // 2, dtype=torch.float)
    values = torch.cat([values.flip(dims=(0,)), values])
    xs = values.unsqueeze(0).expand(size, -1)
    coords = torch.stack([xs, xs.t()], dim=2)
    return torch.where(torch.linalg.vector_norm(coords, dim=-1) < radius, 1, 0)


def layer_norm(x: Tensor, s: dict, key: str, eps: float = 1e-5) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], s[f"{key}.weight"], s[f"{key}.bias"], eps)


def linear(x: Tensor, s: dict, key: str) -> Tensor:
    return F.linear(x, s[f"{key}.weight"], s.get(f"{key}.bias"))


def vit_layers(x: Tensor, s: dict, heads: int) -> Tensor:
    """B×C×224×224 → B×N×L×D: every block's patch tokens (return_features=True)."""
    x = F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=16)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([s["cls_token"].expand(x.size(0), -1, -1), x], dim=1) + s["pos_embed"]
    depth = len({k.split(".")[1] for k in s if k.startswith("blocks.")})
    out = []
    for i in range(depth):
        p = f"blocks.{i}"
        b, n, c = x.shape
        h = layer_norm(x, s, f"{p}.norm1", 1e-6)
        bias = torch.cat([s[f"{p}.attn.q_bias"], torch.zeros_like(s[f"{p}.attn.v_bias"]),
                          s[f"{p}.attn.v_bias"]])  # fmt: skip
        qkv = F.linear(h, s[f"{p}.attn.qkv.weight"], bias)
        qkv = qkv.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q * (c // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        h = (attn @ v).transpose(1, 2).reshape(b, n, -1)
        x = x + linear(h, s, f"{p}.attn.proj")
        h = layer_norm(x, s, f"{p}.norm2", 1e-6)
        x = x + linear(F.gelu(linear(h, s, f"{p}.mlp.fc1")), s, f"{p}.mlp.fc2")
        out.append(x[:, 1:])
    return torch.stack(out, dim=1)


def projector(x: Tensor, s: dict, key: str, last_gelu: bool, input_norm: bool) -> Tensor:
    if input_norm:
        x = layer_norm(x, s, f"{key}.norm1")
    x = F.gelu(linear(x, s, f"{key}.projector.1"))
    x = linear(x, s, f"{key}.projector.4")
    if last_gelu:
        x = F.gelu(x)
    return layer_norm(x, s, f"{key}.norm2")


def tile_features(x: Tensor, s: dict, heads: int) -> Tensor:
    """MFViT.forward: T×3×224×224 tiles in [0, 1] → T × (6N + proj_dim)."""
    mask = s["mfvit.frequencies_mask"]
    spectrum = torch.fft.fftshift(torch.fft.fft2(x.float()))
    low = torch.fft.ifft2(torch.fft.ifftshift(spectrum * mask)).real
    high = torch.fft.ifft2(torch.fft.ifftshift(spectrum * (1 - mask))).real
    low, high = torch.clamp(low, 0.0, 1.0), torch.clamp(high, 0.0, 1.0)
    vit = {k.removeprefix("mfvit.vit."): v for k, v in s.items() if k.startswith("mfvit.vit.")}
    feats = [vit_layers((t - MEAN) / STD, vit, heads) for t in (x, low, high)]
    depth = feats[0].shape[1]
    fp = "mfvit.features_processor"
    proj = [
        torch.stack(
            [
                projector(f[:, i], s, f"{fp}.patch_projector.projectors.{i}", False, True)
                for i in range(depth)
            ],
            dim=1,
        )  # fmt: skip
        for f in feats
    ]
    orig, lo, hi = proj
    stats = []
    for a, b in ((orig, lo), (orig, hi), (lo, hi)):
        sim = F.cosine_similarity(a, b, dim=-1)
        stats += [sim.mean(dim=-1), sim.std(dim=-1)]
    op = f"{fp}.original_features_processor"
    y = torch.cat([orig.mean(dim=2), orig.std(dim=2)], dim=-1)
    y = projector(y, s, f"{op}.proj1", True, False)
    y = (torch.softmax(s[f"{op}.alpha"], dim=1) * y).sum(dim=1)
    y = projector(y, s, f"{op}.proj2", True, False)
    return torch.cat([*stats, y], dim=1)


def spai_logit(pixels: np.ndarray, s: dict, vit_heads: int, attn_heads: int,
               minimum_patches: int = 4) -> float:  # fmt: skip
    """One H×W×3 uint8 image → SPAI's logit (pre-sigmoid)."""
    img = torch.from_numpy(pad_if_needed(pixels, 224)).permute(2, 0, 1)[None].float() / 255
    patched = img.unfold(2, 224, 224).unfold(3, 224, 224).permute(0, 2, 3, 1, 4, 5)
    patched = patched.contiguous().view(1, -1, 3, 224, 224)
    if patched.size(1) < minimum_patches:
        patched = torch.stack(five_crop(img, [224, 224]), dim=1)
    x = tile_features(patched[0], s, vit_heads)[None]  # 1 × L × D
    kv = F.linear(x, s["to_kv.weight"]).chunk(2, dim=-1)
    k, v = (t.reshape(1, t.shape[1], attn_heads, -1).permute(0, 2, 1, 3) for t in kv)
    agg = s["patch_aggregator"].expand(1, -1, -1, -1)
    attn = torch.softmax(agg @ k.transpose(-1, -2) * agg.shape[-1] ** -0.5, dim=-1)
    x = (attn @ v).permute(0, 2, 1, 3).reshape(1, 1, -1)
    x = F.linear(x, s["to_out.0.weight"]).squeeze(1)
    x = layer_norm(x, s, "norm")
    x = F.relu(linear(x, s, "cls_head.head.0"))
    x = F.relu(linear(x, s, "cls_head.head.3"))
    return float(linear(x, s, "cls_head.head.6")[0, 0])
