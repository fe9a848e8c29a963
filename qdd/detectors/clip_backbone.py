"""Frozen open_clip image towers for the feature-based detectors (CLIP-D, UnivFD).

Only the image tower is kept: the text tower of ViT-L/14 is 123 M parameters the detectors
never use. Weights come from a local open_clip file or an open_clip pretrained tag; a tag
that cannot be fetched (offline machine) is a user error with the fix in one line.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from qdd.detectors.weights import state_mismatch, why_unreadable
from qdd.errors import QddError

log = logging.getLogger(__name__)

#: Our tiny config (same code path as ViT-L/14, random init) for tests and the demo.
TINY_CONFIG = Path(__file__).with_name("configs") / "qdd-tiny-vit.json"


def _register_configs() -> None:
    import open_clip

    if TINY_CONFIG.stem not in open_clip.list_models():
        open_clip.add_model_config(TINY_CONFIG)


def load_image_tower(model: str, weights: str | None, *, projected: bool) -> nn.Module:
    """The frozen, eval-mode image tower of open_clip ``model``.

    Args:
        model: open_clip architecture name (``ViT-L-14``, ``ViT-L-14-quickgelu``, …).
        weights: a local weight file, an open_clip pretrained tag, or ``None`` for a
            random tower (seeded, so a fitted head reloads onto the same features).
        projected: keep the final projection (UnivFD) or drop it for the pre-projection
            token after ``ln_post`` (CLIP-D).
    """
    import open_clip

    _register_configs()
    if model not in open_clip.list_models():
        raise QddError(
            f"unknown CLIP backbone {model!r}: use an open_clip model name such as ViT-L-14"
        )
    if weights is None:
        log.warning("CLIP backbone %s has random weights (asked for explicitly)", model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            clip = open_clip.create_model(model, pretrained=None)
    else:
        clip = _create_pretrained(open_clip, model, weights)
    tower = clip.visual
    if not projected:
        tower.proj = None
    tower.requires_grad_(False)
    return tower.eval()


def _create_pretrained(open_clip: ModuleType, model: str, weights: str) -> nn.Module:
    local = Path(weights).expanduser()
    looks_like_path = local.suffix in (".bin", ".pt", ".pth", ".safetensors") or "/" in weights
    if looks_like_path and not local.is_file():
        raise QddError(
            f"CLIP backbone weights {weights} do not exist: download them (see "
            "checkpoints/README.md) and pass --model.detector_args.backbone_weights FILE"
        )
    if looks_like_path:
        return _create_from_file(open_clip, model, local)
    try:
        return open_clip.create_model(model, pretrained=weights, require_pretrained=True)
    except Exception as error:  # network, missing tag: both need the user
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise QddError(
            f"cannot load CLIP backbone {model} weights {weights!r} ({reason}): on an offline "
            "machine download the open_clip weight file and pass "
            "--model.detector_args.backbone_weights FILE"
        ) from None


def _create_from_file(open_clip: ModuleType, model: str, path: Path) -> nn.Module:
    """open_clip ``model`` with a local file loaded strictly, as open_clip loads it (its
    format conversions included); a file that does not fit is named with its keys."""
    try:
        return open_clip.create_model(model, pretrained=str(path), require_pretrained=True)
    except Exception as error:
        problems = _file_problems(open_clip, model, path, error)
        raise QddError(
            f"CLIP backbone weights {path} do not fit open_clip {model} ({problems}): pass "
            "that architecture's open_clip file (see checkpoints/README.md) as "
            "--model.detector_args.backbone_weights, or the file's architecture as "
            "--model.detector_args.backbone"
        ) from None


def _file_problems(open_clip: ModuleType, model: str, path: Path, error: Exception) -> str:
    """Why ``path`` did not load into open_clip ``model``: the keys that do not match."""
    from open_clip.factory import convert_state_dict, load_state_dict, resize_pos_embed

    try:
        state = load_state_dict(str(path), weights_only=True)
    except Exception as read_error:
        raise QddError(
            f"cannot read CLIP backbone weights {path}: {why_unreadable(read_error)}; pass "
            "the open_clip weight file (see checkpoints/README.md)"
        ) from None
    if isinstance(state, dict) and state:
        clip = open_clip.create_model(model, pretrained=None)  # the keys it expects
        state = convert_state_dict(clip, state)  # as open_clip.load_checkpoint does
        resize_pos_embed(state, clip)
        problems = state_mismatch(clip.state_dict(), state)
        if problems:
            return problems
    text = str(error).strip()
    return f"{error.__class__.__name__}: {text.splitlines()[0][:120] if text else ''}"


def local_file(weights: str | None) -> Path | None:
    """The local file ``weights`` names, if it names one (not a pretrained tag)."""
    path = Path(weights).expanduser() if weights else None
    return path if path is not None and path.is_file() else None


def image_size(tower: nn.Module) -> int:
    """The square input size the tower was built for (224 for ViT-L/14)."""
    size = tower.image_size
    return int(size[0] if isinstance(size, tuple | list) else size)
