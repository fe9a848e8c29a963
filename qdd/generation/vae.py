"""The decoder side of a pipeline: final latents → pixels, and the VAE at another precision.

Deployments quantize the denoiser and keep the VAE in 16 bits, and forensic traces such as
NPR's up-sampling artefacts are made by the decoder. To tell which side moves a detector,
qdd keeps each sample's final latents (``generate --save-latents``) and decodes them again
with the pipeline's own VAE at any precision (``generate --vae-precision``, ``qdd-cli
decode``): the 2×2 denoiser fp32/fp4 × decoder fp32/fp4 is two commands.

`decode_latents` repeats what each diffusers pipeline does after its last denoising step
(diffusers 0.42: ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
``StableDiffusion3Pipeline``, ``FluxPipeline``), so decoding a run's own latents with its own
VAE gives the same pixels the pipeline gave (tests check the bytes). Stored latents are the
denoiser's output *before* the VAE's scaling: ``latents / scaling_factor (+ shift_factor)``
(SDXL with ``latents_mean``/``latents_std``: ``latents · std / scaling_factor + mean``) is
applied at decode time, as the pipeline does, and every sample records the factors. Flux's
packed token latents are stored unpacked, (channels, height/8, width/8), like the others.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from torch import Tensor

from qdd.errors import QddError

#: What ``--vae-precision`` takes: a dtype, or a weight format applied to the VAE's Linear
#: layers (the mid-block attention; its convolutions stay in the compute dtype, as the
#: libraries that quantize Linear layers only leave them).
VAE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VAE_FORMATS = ("fp8", "fp4", "nf4")
VAE_PRECISIONS: tuple[str, ...] = (*VAE_DTYPES, *VAE_FORMATS)
LATENTS_MEMBER = "latents.npy"


def check_vae_precision(precision: str | None) -> None:
    if precision is not None and precision not in VAE_PRECISIONS:
        raise QddError(
            f"unknown --vae-precision {precision!r}: choose one of {', '.join(VAE_PRECISIONS)}"
        )


def dtype_label(dtype: torch.dtype) -> str:
    return {v: k for k, v in VAE_DTYPES.items()}.get(dtype, str(dtype).removeprefix("torch."))


def set_vae_precision(pipeline: Any, precision: str, half: torch.dtype, device: str) -> dict:
    """Cast (fp32/fp16/bf16) or quantize (fp8/fp4/nf4, emulated as the denoiser's formats,
    compute in the generator's half dtype ``half``) the pipeline's VAE; returns what to record."""
    from qdd.quant import quantize_module_, resolve_backend

    check_vae_precision(precision)
    vae = pipeline.vae
    if precision in VAE_DTYPES:
        vae.to(VAE_DTYPES[precision])
        return {"vae_precision": precision, "vae_dtype": precision, "vae_quant_fraction": 0.0}
    backend = resolve_backend(precision, "auto", device)
    report = quantize_module_(vae, precision, backend, half)
    return {
        "vae_precision": precision,
        "vae_dtype": dtype_label(half),
        "vae_quant_backend": report.backend,
        "vae_quant_fraction": report.fraction,
    }


def vae_dtype(pipeline: Any) -> torch.dtype:
    """The dtype the VAE's decoder computes in (its first convolution's)."""
    return pipeline.vae.decoder.conv_in.weight.dtype


def unpacked_latents(pipeline: Any, family: str, latents: Tensor, height: int, width: int):
    """The denoiser's output (``output_type="latent"``) as (N, C, h, w)."""
    if family == "flux":  # tokens of 2×2 patches → the VAE's layout, as the pipeline does
        return type(pipeline)._unpack_latents(latents, height, width, pipeline.vae_scale_factor)
    return latents


def latent_factors(pipeline: Any) -> dict[str, Any]:
    """The VAE's scaling of latents, recorded with every stored latent array."""
    config = pipeline.vae.config
    return {
        "scaling_factor": config.scaling_factor,
        "shift_factor": getattr(config, "shift_factor", None),
        "latents_mean": getattr(config, "latents_mean", None),
        "latents_std": getattr(config, "latents_std", None),
    }


def decode_latents(pipeline: Any, family: str, latents: Tensor) -> np.ndarray:
    """Unpacked latents (N, C, h, w) → float images (N, H, W, 3) in [0, 1], as the
    pipeline's ``output_type="np"`` path computes them after its denoising loop."""
    vae = pipeline.vae
    config = vae.config
    upcast = family == "sdxl" and vae.dtype == torch.float16 and config.force_upcast
    if upcast:  # SDXL's VAE overflows in fp16: the pipeline decodes in fp32, then casts back
        vae.to(torch.float32)
    latents = latents.to(vae_dtype(pipeline))
    if family in ("sd3", "flux"):
        latents = latents / config.scaling_factor + config.shift_factor
    elif family == "sdxl" and getattr(config, "latents_mean", None) is not None and getattr(
        config, "latents_std", None
    ) is not None:
        mean = torch.tensor(config.latents_mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(config.latents_std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor
    with torch.inference_mode():
        image = vae.decode(latents, return_dict=False)[0]
    if upcast:
        vae.to(torch.float16)
    if getattr(pipeline, "watermark", None) is not None:
        image = pipeline.watermark.apply_watermark(image)
    return pipeline.image_processor.postprocess(image, output_type="np")


def encode_latents(latents: Tensor) -> bytes:
    """One sample's latents as ``.npy`` bytes, float32 (exact for fp32/fp16/bf16 latents)."""
    buffer = io.BytesIO()
    np.save(buffer, latents.detach().to(torch.float32).cpu().numpy(), allow_pickle=False)
    return buffer.getvalue()


def decode_npy(payload: bytes) -> Tensor:
    return torch.from_numpy(np.load(io.BytesIO(payload), allow_pickle=False))
