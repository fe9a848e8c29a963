"""The generators the study knows: pipeline class, hub id and the settings each was made for.

Defaults follow the model cards (REFERENCE.md, "Per-model defaults"): generating SD1.5 at
1024² or Flux-schnell with 50 steps would measure a misuse, not the model. Only names and
numbers live here, so that ``qdd-cli generate --help`` does not import diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qdd.errors import QddError


@dataclass(frozen=True)
class GeneratorSpec:
    """One text-to-image generator as the study runs it."""

    name: str  #: short name: also the ``generator`` field of every sample (a valid key part)
    family: str  #: architecture family: sd (UNet), sdxl (UNet), sd3 (MMDiT), flux
    pipeline_class: str  #: diffusers pipeline class name
    hub_id: str  #: default ``--model-path``
    resolution: int  #: native square resolution (pixels)
    steps: int  #: default number of denoising steps
    guidance: float  #: default classifier-free guidance scale (Flux-dev: distilled guidance)
    denoiser: str  #: pipeline attribute of the denoiser: ``unet`` or ``transformer``
    half_dtype: str  #: dtype of the "fp16" level: float16, or bfloat16 where fp16 overflows
    text_encoders: tuple[str, ...]  #: pipeline attributes of the text encoders
    #: extra keyword arguments of every pipeline call (e.g. the T5 sequence length)
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    #: extra keyword arguments of ``from_pretrained`` (no safety checker, no watermark)
    load_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def components(self) -> dict[str, tuple[str, ...]]:
        """Pipeline attributes quantized under each ``--quant-scope``."""
        text = (self.denoiser, *self.text_encoders)
        return {"denoiser": (self.denoiser,), "text": text, "all": (*text, "vae")}


# SD1.5's safety checker replaces flagged images by black squares and SDXL's invisible
# watermark (when installed) edits pixels: both would confound a detector study, so
# neither runs, whatever is installed.
_SD_LOAD = {"safety_checker": None, "requires_safety_checker": False}
_SDXL_LOAD = {"add_watermarker": False}

GENERATORS: dict[str, GeneratorSpec] = {
    spec.name: spec
    for spec in (
        GeneratorSpec(
            name="sd15",
            family="sd",
            pipeline_class="StableDiffusionPipeline",
            hub_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
            resolution=512,
            steps=50,
            guidance=7.5,
            denoiser="unet",
            half_dtype="float16",
            text_encoders=("text_encoder",),
            load_kwargs=_SD_LOAD,
        ),
        GeneratorSpec(
            name="sd21",
            family="sd",
            pipeline_class="StableDiffusionPipeline",
            hub_id="stabilityai/stable-diffusion-2-1",
            resolution=768,
            steps=50,
            guidance=7.5,
            denoiser="unet",
            half_dtype="float16",
            text_encoders=("text_encoder",),
            load_kwargs=_SD_LOAD,
        ),
        GeneratorSpec(
            name="sdxl",
            family="sdxl",
            pipeline_class="StableDiffusionXLPipeline",
            hub_id="stabilityai/stable-diffusion-xl-base-1.0",
            resolution=1024,
            steps=50,
            guidance=5.0,
            denoiser="unet",
            half_dtype="float16",
            text_encoders=("text_encoder", "text_encoder_2"),
            load_kwargs=_SDXL_LOAD,
        ),
        GeneratorSpec(
            name="sd3",
            family="sd3",
            pipeline_class="StableDiffusion3Pipeline",
            hub_id="stabilityai/stable-diffusion-3-medium-diffusers",
            resolution=1024,
            steps=28,
            guidance=7.0,
            denoiser="transformer",
            half_dtype="bfloat16",
            text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),
            call_kwargs={"max_sequence_length": 256},
        ),
        GeneratorSpec(
            name="sd35",
            family="sd3",
            pipeline_class="StableDiffusion3Pipeline",
            hub_id="stabilityai/stable-diffusion-3.5-large",
            resolution=1024,
            steps=28,
            guidance=3.5,
            denoiser="transformer",
            half_dtype="bfloat16",
            text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),
            call_kwargs={"max_sequence_length": 256},
        ),
        GeneratorSpec(
            name="sd35-medium",
            family="sd3",
            pipeline_class="StableDiffusion3Pipeline",
            hub_id="stabilityai/stable-diffusion-3.5-medium",
            resolution=1024,
            steps=40,
            guidance=4.5,
            denoiser="transformer",
            half_dtype="bfloat16",
            text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),
            call_kwargs={"max_sequence_length": 256},
        ),
        GeneratorSpec(
            name="flux-schnell",
            family="flux",
            pipeline_class="FluxPipeline",
            hub_id="black-forest-labs/FLUX.1-schnell",
            resolution=1024,
            steps=4,
            guidance=0.0,
            denoiser="transformer",
            half_dtype="bfloat16",
            text_encoders=("text_encoder", "text_encoder_2"),
            call_kwargs={"max_sequence_length": 256},
        ),
        GeneratorSpec(
            name="flux-dev",
            family="flux",
            pipeline_class="FluxPipeline",
            hub_id="black-forest-labs/FLUX.1-dev",
            resolution=1024,
            steps=50,
            guidance=3.5,
            denoiser="transformer",
            half_dtype="bfloat16",
            text_encoders=("text_encoder", "text_encoder_2"),
            call_kwargs={"max_sequence_length": 512},
        ),
    )
}


def get_generator(name: str) -> GeneratorSpec:
    """The spec registered under ``name``; a `QddError` naming the choices otherwise."""
    try:
        return GENERATORS[name]
    except KeyError:
        raise QddError(
            f"unknown generator {name!r}: choose one of {', '.join(GENERATORS)}"
        ) from None
