"""AEROBLADE (Ricker et al., CVPR 2024): training-free, by autoencoder reconstruction.

A latent-diffusion image is reconstructed almost perfectly by its generator's own
autoencoder; a real photo is not. As ``scripts/run_aeroblade.py`` of jonasricker/aeroblade:
at full resolution, each autoencoder (float16) encodes ``2x - 1``, a KL posterior is
*sampled* with a CPU generator seeded 1 (here afresh for each image and autoencoder, so a
score does not depend on the batch), a VQ model's latents are decoded without quantizing;
the reconstruction ``(y / 2 + 0.5).clamp(0, 1)`` is truncated to 8 bits as the saved PNG
is; the distance is LPIPS-vgg v0.1 layer 2, averaged over space. The logit is minus the
smallest distance over the autoencoders (larger = fake, not calibrated at 0).

Sides that are not multiples of the autoencoders' cell (8 px; the official code crashes on
them) are cropped at the bottom and right to the nearest multiple: top-left anchored, the
8×8 grid of JPEG blocks and latent cells stays where the image has it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn
from torchvision import transforms

from qdd.detectors.base import Detector, Optimization, Transform, checkpoints_dir
from qdd.detectors.cards import CARDS, VGG_FILE
from qdd.detectors.lpips_layer import LpipsLayer2, lpips_linear_file
from qdd.detectors.registry import register
from qdd.detectors.weights import file_sha256
from qdd.errors import QddError
from qdd.loading_report import loading_problems

log = logging.getLogger(__name__)

SEED = 1  # the official reconstruction seed
#: diffusers autoencoder classes AEROBLADE uses, and the pipeline folder holding each.
KINDS = {"AutoencoderKL": "vae", "VQModel": "movq"}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def autoencoder_folder(folder: str | Path) -> tuple[Path, str]:
    """The folder of a diffusers AutoencoderKL or VQModel (given itself or its pipeline's),
    as given or under checkpoints/."""
    path = Path(folder).expanduser()
    if not path.is_dir() and not path.is_absolute() and (checkpoints_dir() / path).is_dir():
        path = checkpoints_dir() / path
    if not path.is_dir():
        raise QddError(
            f"aeroblade: autoencoder folder {folder} not found (nor under {checkpoints_dir()}): "
            "download it (see checkpoints/README.md) or pass --model.detector_args.vae='[DIR,...]'"
        )
    for candidate in (path, *(path / sub for sub in KINDS.values())):
        config = candidate / "config.json"
        if config.is_file():
            kind = json.loads(config.read_text()).get("_class_name")
            if kind in KINDS:
                return candidate, kind
    raise QddError(
        f"aeroblade: {folder} is not a diffusers AutoencoderKL or VQModel folder (nor a "
        "pipeline with vae/ or movq/): pass the autoencoders' folders as "
        "--model.detector_args.vae='[DIR,...]'"
    )


def load_autoencoder(path: Path, kind: str, dtype: torch.dtype) -> tuple[nn.Module, list[Path]]:
    """The frozen ``kind`` autoencoder in ``dtype`` and its weight files (for their sha256)."""
    import diffusers

    files = sorted(path.glob("diffusion_pytorch_model*.safetensors")) or sorted(
        path.glob("diffusion_pytorch_model*.bin")
    )
    if not files:
        raise QddError(f"aeroblade: {path} has no diffusion_pytorch_model weights: download them")
    try:
        model, info = getattr(diffusers, kind).from_pretrained(
            path, torch_dtype=dtype, local_files_only=True, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
        raise QddError(f"aeroblade: cannot load the {kind} in {path} ({reason})") from None
    problems = loading_problems(info)  # diffusers fills a bad key with random weights
    if problems:
        raise QddError(
            f"aeroblade: the {kind} in {path} does not fit its config ({problems}): "
            "download the autoencoder folder again (see checkpoints/README.md)"
        )
    model.requires_grad_(False)
    return model.eval(), files


class CropToMultiple:
    """Crop a PIL image's bottom and right to multiples of ``multiple`` (picklable)."""

    def __init__(self, multiple: int) -> None:
        self.multiple = multiple

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        w, h = width - width % self.multiple, height - height % self.multiple
        if not w or not h:
            raise QddError(
                f"aeroblade: a {width}×{height} image is smaller than the autoencoders' "
                f"{self.multiple}-px cell: drop such images from the shards"
            )
        return image if (w, h) == (width, height) else image.crop((0, 0, w, h))


@register("aeroblade", card=CARDS["aeroblade"])
class Aeroblade(Detector):
    """AEROBLADE over one or more autoencoders.

    Args:
        vae: diffusers autoencoder folders (AutoencoderKL; VQModel for Kandinsky's movq),
            or their pipelines' folders. The official set is SD1, SD2 and Kandinsky 2.1.
        lpips_weights: torchvision's VGG16 ImageNet file (a path, or a name under
            checkpoints/); only ``features.{0,2,5,7}`` are read.
        autoencoder_dtype: ``float16`` as the official code; ``float32`` for SDXL's VAE
            (it overflows in float16; the official pipeline upcasts it) or on CPUs, where
            float16 convolutions run several times slower than float32.
    """

    frozen_prefixes = ("autoencoders.", "lpips.")

    def __init__(
        self,
        vae: list[str] | None = None,
        lpips_weights: str = VGG_FILE,
        autoencoder_dtype: str = "float16",
    ) -> None:
        super().__init__()
        if not vae:
            raise QddError(
                "aeroblade needs autoencoders: pass --model.detector_args.vae='[DIR,...]' "
                "(diffusers AutoencoderKL/VQModel folders, see checkpoints/README.md)"
            )
        if autoencoder_dtype not in DTYPES:
            raise QddError(
                f"aeroblade: autoencoder_dtype {autoencoder_dtype!r}: one of {', '.join(DTYPES)}"
            )
        self.autoencoders = nn.ModuleList()
        folders = [autoencoder_folder(v) for v in vae]
        for folder, kind in dict.fromkeys((f.resolve(), k) for f, k in folders):  # once each
            model, files = load_autoencoder(folder, kind, DTYPES[autoencoder_dtype])
            self.autoencoders.append(model)
            self.weight_files |= {str(f): file_sha256(f) for f in files}
        self.lpips = LpipsLayer2()
        vgg = resolve(lpips_weights)
        self.lpips.load_vgg(vgg)
        self.lpips.load_linear(lpips_linear_file())
        self.weight_files[str(vgg)] = file_sha256(vgg)
        self.lpips.requires_grad_(False)
        self.lpips.eval()

    @property
    def cell(self) -> int:
        """The side every autoencoder needs a multiple of (2 ** down-sampling stages)."""
        factors = [2 ** (len(ae.config.block_out_channels) - 1) for ae in self.autoencoders]
        return math.lcm(*factors)

    def reconstruct(self, autoencoder: nn.Module, x: Tensor) -> Tensor:
        """The 8-bit reconstruction of images ``x`` in [0, 1], back in [0, 1] (float32)."""
        dtype = autoencoder.dtype
        inputs = (x.to(dtype) * 2.0 - 1.0).contiguous(memory_format=torch.channels_last)
        encoded = autoencoder.encode(inputs)
        if hasattr(encoded, "latent_dist"):  # KL: a sample, seeded afresh for each image
            posterior = encoded.latent_dist
            latents = torch.cat([
                type(posterior)(posterior.parameters[i : i + 1]).sample(
                    generator=torch.Generator().manual_seed(SEED)
                )
                for i in range(len(x))
            ])  # fmt: skip
            decoded = autoencoder.decode(latents, return_dict=False)[0]
        else:  # VQ: the encoder's latents, decoded without quantizing
            decoded = autoencoder.decode(
                encoded.latents, force_not_quantize=True, return_dict=False
            )[0]
        pixels = (decoded / 2 + 0.5).clamp(0, 1).mul(255).byte()  # as to_pil_image(...).save
        return pixels.float() / 255

    def distances(self, x: Tensor) -> Tensor:
        """(autoencoders, N): LPIPS layer-2 distance of each image to each reconstruction."""
        with torch.no_grad():
            x = x.float()
            return torch.stack([self.lpips(x, self.reconstruct(ae, x)) for ae in self.autoencoders])

    def forward(self, x: Tensor) -> Tensor:
        return -self.distances(x).min(dim=0).values

    def eval_transform(self) -> Transform:
        """Full resolution, cropped to the cell; pixels in [0, 1] (Normalize is the identity,
        so the loader ships uint8 and the device divides by 255)."""
        return transforms.Compose(
            [
                CropToMultiple(self.cell),
                transforms.ToTensor(),
                transforms.Normalize((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
            ]
        )

    def train_transform(self) -> Transform:
        """Nothing is trained: validation (calibration) sees the test-time input."""
        return self.eval_transform()

    def configure_optimizer(self, params: Iterable[nn.Parameter]) -> Optimization:
        raise QddError(
            "aeroblade is training-free: there is nothing to fit (`qdd-cli fit --detector "
            "aeroblade` calibrates a threshold without training)"
        )


def resolve(weights: str) -> Path:
    """A path as given, else the name under ``checkpoints/``; missing: one line with the fix."""
    path = Path(weights).expanduser()
    if not path.is_file() and not path.is_absolute() and (checkpoints_dir() / path).is_file():
        path = checkpoints_dir() / path
    if not path.is_file():
        raise QddError(
            f"aeroblade: VGG16 file {weights} not found (nor under {checkpoints_dir()}): "
            f"download {VGG_FILE} (checkpoints/README.md) and pass "
            "--model.detector_args.lpips_weights FILE"
        )
    return path
