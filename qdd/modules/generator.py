"""GeneratorModule: a diffusion pipeline at one precision inside Lightning's predict loop.

Lightning brings the device placement and the DDP launch (``--trainer.devices N``,
torchrun, SLURM); the module loads its own pipeline copy on its rank's device, generates
its share of the prompts and writes them through its own `ShardWriter` (prefix ``r<rank>``),
so ranks never touch each other's shards. The command merges them in one manifest.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch

from qdd.datamodules.writer import ShardWriter
from qdd.errors import QddError
from qdd.generation.calibration import (
    CACHE,
    calibrate_pipeline,
    load_cache,
    save_cache,
    smoothing_record,
)
from qdd.generation.costs import sample_costs, timed_call
from qdd.generation.images import image_failure, to_uint8
from qdd.generation.jobs import Recipe, WorkItem
from qdd.generation.loading import QuantSummary, apply_precision, gguf_file, load_pipeline
from qdd.generation.provenance import provenance
from qdd.generation.registry import get_generator
from qdd.generation.vae import (
    LATENTS_MEMBER,
    decode_latents,
    dtype_label,
    encode_latents,
    latent_factors,
    set_vae_precision,
    unpacked_latents,
    vae_dtype,
)

log = logging.getLogger(__name__)


class GeneratorModule(L.LightningModule):
    """Generate and write the images of one recipe; ``predict_step`` returns nothing."""

    def __init__(
        self,
        recipe: Recipe,
        model_path: str,
        out_dir: str | Path,
        shard_size: int = 100,
        offload: str = "none",
        calibration_prompts: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.recipe = recipe
        self.spec = get_generator(recipe.generator)
        self.model_path = model_path
        self.out_dir = Path(out_dir)
        self.shard_size = shard_size
        self.offload = offload  #: diffusers' CPU offload: none, model or sequential
        #: calibrated SVDQuant's prompts (`qdd.generation.calibration`); empty otherwise
        self.calibration_prompts = list(calibration_prompts or [])
        self.pipeline: Any = None  # a DiffusionPipeline is not an nn.Module: Lightning leaves it
        self.summary: QuantSummary | None = None
        self.provenance: dict[str, Any] = {}
        self.writer: ShardWriter | None = None
        self.n_written = 0
        self.n_failed = 0

    def setup(self, stage: str) -> None:
        if self.pipeline is not None:
            return
        device = self.trainer.strategy.root_device
        recipe = self.recipe
        scope = recipe.quant_scope or "denoiser"
        gguf = gguf_file(recipe.denoiser_file, recipe.precision, self.out_dir)
        if gguf is not None:
            self.trainer.strategy.barrier("gguf-written")  # the launch leader wrote it
        offloaded = self.offload != "none"
        # Offloaded runs load on the CPU; the quantized components still quantize on the
        # accelerator (the numerics the recipe names), then diffusers moves all to the CPU.
        load_device = torch.device("cpu") if offloaded else device
        self.pipeline = load_pipeline(self.spec, self.model_path, recipe.dtype, load_device, gguf)
        if offloaded and recipe.quant_scope is not None:
            for name in self.spec.components[scope]:
                component = getattr(self.pipeline, name, None)
                if isinstance(component, torch.nn.Module):
                    component.to(device)
        calibration = self.calibrate(scope) if recipe.calibration_digest else None
        self.summary = apply_precision(
            self.pipeline,
            self.spec,
            recipe.precision,
            recipe.quant_backend,
            scope,
            str(device),
            denoiser_file=gguf,
            written_by_qdd=recipe.denoiser_file is None,
            calibration=calibration,
        )
        if self.offload == "model":
            self.pipeline.enable_model_cpu_offload(device=device)
        elif self.offload == "sequential":
            self.pipeline.enable_sequential_cpu_offload(device=device)
        self.vae_record = self.prepare_vae(device)
        self.provenance = {
            **provenance(
                device, recipe.precision, self.summary.backend, self.summary.dtype,
                self.summary.kept,
            ),
            **self.summary.details,
            **self.vae_record,
        }  # fmt: skip
        components = [getattr(self.pipeline, name, None) for name in self.spec.components[scope]]
        smoothing = smoothing_record(
            [c for c in components if isinstance(c, torch.nn.Module)],
            recipe.calibration_digest, len(self.calibration_prompts) or None,
        )  # fmt: skip
        if smoothing is not None:
            self.provenance["smoothing"] = smoothing
        if self.summary.backend != recipe.quant_backend:
            raise RuntimeError(
                f"backend {self.summary.backend!r} on {device}, but the recipe says "
                f"{recipe.quant_backend!r}"
            )
        if self.trainer.is_global_zero:
            log.info(
                "%s %s on %s: backend %s, scope %s, %.1f%% of %d parameters quantized, compute %s",
                recipe.generator,
                recipe.precision,
                device,
                self.summary.backend,
                self.summary.scope,
                100 * self.summary.fraction,
                self.summary.n_params,
                self.summary.dtype,
            )

    def prepare_vae(self, device: torch.device) -> dict[str, Any]:
        """Set the VAE to ``--vae-precision`` (when given); what every sample records of it."""
        recipe = self.recipe
        if recipe.vae_precision is None:
            usual = dtype_label(vae_dtype(self.pipeline))
            return {"vae_precision": usual, "vae_dtype": usual}
        half = getattr(torch, self.spec.half_dtype)
        return set_vae_precision(self.pipeline, recipe.vae_precision, half, str(device))

    def calibrate(self, scope: str) -> dict[str, torch.Tensor]:
        """The input abs-max of every layer the precision quantizes: from the folder's cache,
        else gathered by the global-zero rank over the calibration prompts and cached."""
        from qdd.quant.backends import quantized_layers

        recipe = self.recipe
        digest = recipe.calibration_digest
        assert digest is not None and self.calibration_prompts
        layers: dict[str, torch.nn.Linear] = {}
        for name in self.spec.components[scope]:
            component = getattr(self.pipeline, name, None)
            if isinstance(component, torch.nn.Module):
                found = quantized_layers(component, recipe.precision)
                layers |= {f"{name}.{layer}": m for layer, m in found.items()}
        if self.trainer.is_global_zero and load_cache(self.out_dir, digest) is None:
            call = {
                "num_inference_steps": recipe.steps, "guidance_scale": recipe.guidance,
                "height": recipe.height, "width": recipe.width,
                "output_type": "np" if "vae" in self.spec.components[scope] else "latent",
                **self.spec.call_kwargs,
            }  # fmt: skip
            absmax = calibrate_pipeline(
                self.pipeline, layers, self.calibration_prompts, recipe.base_seed,
                recipe.batch_size, call,
            )  # fmt: skip
            path = save_cache(self.out_dir, digest, absmax, len(self.calibration_prompts))
            log.info("%s: calibrated on %d prompts", path, len(self.calibration_prompts))
        self.trainer.strategy.barrier("calibration")
        cached = load_cache(self.out_dir, digest)
        if cached is None or set(cached) != set(layers):
            raise QddError(
                f"{self.out_dir / CACHE} does not hold this model's layers (the model at "
                f"{recipe.model_id} changed?): pass --overwrite to calibrate again"
            )
        device = self.trainer.strategy.root_device
        return {name: t.to(device) for name, t in cached.items()}

    def on_predict_start(self) -> None:
        prefix = f"r{self.trainer.global_rank}"
        self.writer = ShardWriter(
            self.out_dir, prefix=prefix, max_count=self.shard_size, mode="append"
        )

    def generate(self, batch: list[WorkItem]) -> tuple[Any, Any]:
        """The float images (N, H, W, 3) in [0, 1] of one batch, one CPU generator per image,
        and their final latents (N, C, h, w) when the run keeps them or sets the VAE apart
        (then the latents are decoded by `qdd.generation.vae`, as the pipeline would)."""
        recipe = self.recipe
        split = bool(recipe.save_latents) or recipe.vae_precision is not None
        output = self.pipeline(
            prompt=[item.prompt for item in batch],
            generator=[torch.Generator("cpu").manual_seed(item.seed) for item in batch],
            num_inference_steps=recipe.steps,
            guidance_scale=recipe.guidance,
            height=recipe.height,
            width=recipe.width,
            output_type="latent" if split else "np",
            **self.spec.call_kwargs,
        ).images
        if not split:
            return output, None
        family = self.spec.family
        latents = unpacked_latents(self.pipeline, family, output, recipe.height, recipe.width)
        return decode_latents(self.pipeline, family, latents), latents

    def predict_step(self, batch: list[WorkItem], batch_idx: int) -> None:
        assert self.writer is not None and self.summary is not None
        device = self.trainer.strategy.root_device
        (images, latents), seconds, peak = timed_call(device, lambda: self.generate(batch))
        costs = sample_costs(self.summary.denoiser_bytes, seconds, len(batch), peak, self.offload)
        for i, (item, image) in enumerate(zip(batch, images, strict=True)):
            meta = self.recipe.meta(item, self.summary.fraction, self.provenance, costs)
            extra = {}
            if self.recipe.save_latents:
                extra[LATENTS_MEMBER] = encode_latents(latents[i])
                meta["latents"] = {
                    "shape": list(latents[i].shape),
                    "dtype": str(latents.dtype).removeprefix("torch."),
                    "stored_as": "float32, before the VAE's scaling (qdd.generation.vae)",
                    **latent_factors(self.pipeline),
                }
            reason = image_failure(image)
            if reason is None:
                self.writer.write(item.key, to_uint8(image), meta, extra=extra)
                self.n_written += 1
            else:
                log.warning("%s %s: %s", self.out_dir.name, item.key, reason)
                self.writer.record_failure(item.key, meta, reason)
                self.n_failed += 1

    def on_predict_end(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
