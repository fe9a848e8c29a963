"""The feature networks of a quality run, each from a local file whose identity is recorded.

LPIPS and FID mean something only with the published networks: LPIPS with torchvision's
ImageNet AlexNet/VGG-16 trunk, FID with the Inception-V3 weights of the TF FID code as
torch-fidelity/pytorch-fid ship them. Each file's sha256 is recorded and checked against
the published file's; the publishers give the sha256's first eight hex digits in the file
name, which `torch.hub` checks on download (``check_hash``): qdd checks the same. Any other
file is named in a warning and marked ``verified: false``. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qdd.errors import QddError

log = logging.getLogger(__name__)

#: Published files by network: sha256 prefix → file name (torchvision's model URLs;
#: torch-fidelity's URL_INCEPTION_V3, the same file as pytorch-fid's pt_inception-…).
PUBLISHED = {
    "alex": {"7be5be79": "alexnet-owt-7be5be79.pth"},
    "vgg": {"397923af": "vgg16-397923af.pth"},
    "inception": {"6726825d": "weights-inception-2015-12-05-6726825d.pth"},
}
#: torch-fidelity's Inception-V3 as TF's FID graph (pool3: the 2048 features FID uses).
INCEPTION_NAME, INCEPTION_POOL3 = "inception-v3-compat", "2048"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def provenance(path: Path, network: str, what: str) -> dict[str, Any]:
    """``{weights, sha256, verified, published}`` of a feature network's file; a warning
    names a file that is not the published one (its values are not comparable)."""
    digest = sha256(path)
    published = PUBLISHED[network]
    match = next((name for prefix, name in published.items() if digest.startswith(prefix)), None)
    if match is None:
        log.warning(
            "%s weights %s are not the published file (%s; sha256 %s…): its values are not "
            "comparable with published ones; metrics.json marks them verified: false",
            what,
            path,
            " or ".join(published.values()),
            digest[:16],
        )
    return {
        "weights": str(path),
        "sha256": digest,
        "verified": match is not None,
        "published": match,
    }


def _state_dict(path: Path, what: str, flag: str) -> dict[str, Tensor]:
    if not path.is_file():
        raise QddError(f"{what} weights {path} do not exist: pass the file with {flag}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise QddError(
            f"cannot read {what} weights {path} ({error}): pass a state_dict file"
        ) from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise QddError(f"{what} weights {path} hold no state_dict: pass the published file")
    return state


def load_lpips(weights: str | Path, net: str = "alex") -> tuple[nn.Module, dict[str, Any]]:
    """LPIPS (torchmetrics' network and its bundled linear layers) with the trunk read from a
    local torchvision ``alexnet``/``vgg16`` state_dict, and the file's provenance."""
    from torchmetrics.functional.image.lpips import _LPIPS

    path = Path(weights).expanduser()
    state = _state_dict(path, "LPIPS", "--lpips-weights (torchvision's alexnet-owt-7be5be79.pth)")
    network = _LPIPS(pretrained=True, net=net, pnet_rand=True)  # no download: random trunk
    mapped, missing = {}, []
    for name, _ in network.net.named_parameters():
        _, index, rest = name.split(".", 2)  # slice1.0.weight → torchvision's features.0.weight
        source = f"features.{index}.{rest}"
        if source in state:
            mapped[name] = state[source]
        else:
            missing.append(source)
    if missing:
        raise QddError(
            f"{path} is not a torchvision {net} state_dict (lacks {missing[0]}): pass the "
            f"file torchvision's {net} weights download to, or choose --lpips-net"
        )
    try:
        network.net.load_state_dict(mapped)
    except RuntimeError as error:
        reason = str(error).splitlines()[0]
        raise QddError(f"LPIPS weights {path} do not fit {net} ({reason})") from None
    record = {"net": net, **provenance(path, net, "LPIPS")}
    return network.eval().requires_grad_(False), record


def load_inception(weights: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """torch-fidelity's FID Inception-V3 from a local weights file (its resize to 299 as
    TF 1.x's bilinear, its normalisation), returning pool3 features, and the provenance."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise QddError("FID needs torch-fidelity: pip install torch-fidelity") from None

    path = Path(weights).expanduser()
    flag = "--fid-weights (torch-fidelity's weights-inception-2015-12-05-6726825d.pth)"
    _state_dict(path, "FID Inception", flag)  # refuses a pickle that is not plain tensors
    try:
        network = FeatureExtractorInceptionV3(
            INCEPTION_NAME, [INCEPTION_POOL3], feature_extractor_weights_path=str(path)
        )
    except RuntimeError as error:
        reason = str(error).splitlines()[0]
        raise QddError(f"{path} is not the FID Inception-V3 ({reason}): pass {flag}") from None
    # torch-fidelity < 0.4 leaves the network in training mode (batch-statistics BN)
    return InceptionPool3(network.eval()), provenance(path, "inception", "FID Inception")


class InceptionPool3(nn.Module):
    """uint8 NCHW images → the 2048 pool3 features FID is defined on."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: Tensor) -> Tensor:
        return self.network(images)[0].double()


class ClipFeatures(nn.Module):
    """A CLIP model (open_clip) as the feature network: projected image embeddings of uint8
    NCHW images for fd_clip/kd_clip, and text embeddings of prompts for the CLIP score.

    Images are resized (bicubic, shorter side) and centre-cropped to the tower's input size,
    then normalised with CLIP's mean and standard deviation, as the CLIP detectors do.
    """

    MEAN = (0.48145466, 0.4578275, 0.40821073)
    STD = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, clip: nn.Module, tokenizer: Any, size: int) -> None:
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.size = size
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        from torchvision.transforms.v2.functional import center_crop, resize

        x = images.float() / 255.0
        x = resize(x, [self.size], interpolation=3, antialias=True)  # 3: bicubic
        x = center_crop(x, [self.size, self.size]).clamp(0, 1)
        return self.clip.encode_image((x - self.mean) / self.std).float()

    def encode_text(self, prompts: list[str]) -> Tensor:
        tokens = self.tokenizer(prompts).to(self.mean.device)
        return self.clip.encode_text(tokens).float()


def load_clip(weights: str, model: str) -> tuple[ClipFeatures, dict[str, Any]]:
    """The CLIP model of a local open_clip weight file (the ViT-L/14 the CLIP detectors
    load, `qdd.detectors.clip_backbone`), frozen: fd_clip/kd_clip features, the CLIP score."""
    import open_clip

    from qdd.detectors.clip_backbone import _create_pretrained, _register_configs, image_size

    _register_configs()
    if model not in open_clip.list_models():
        raise QddError(f"unknown --feature-model {model!r}: use an open_clip name (ViT-L-14)")
    clip = _create_pretrained(open_clip, model, weights).eval().requires_grad_(False)
    record = {"model": model, "weights": weights}
    if Path(weights).expanduser().is_file():
        record["sha256"] = sha256(Path(weights).expanduser())
    return ClipFeatures(clip, open_clip.get_tokenizer(model), image_size(clip.visual)), record
