"""``qdd-cli decode``: a shard's stored latents decoded again, with the VAE at another precision.

The denoiser side of the 2×2: ``generate --save-latents`` at fp32 and at fp4; the decoder
side: ``decode --vae-precision fp32|fp4`` of each. Each output sample keeps its source's key
(its twin) and recipe, and records ``denoiser_precision``, ``vae_precision`` and where it came
from (``source_sample``: folder, key, the source PNG's sha256); its ``precision`` is
``<denoiser>-vae<P>`` so the four groups never merge.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import tarfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from qdd.datamodules.schema import upgrade
from qdd.errors import QddError
from qdd.generation.vae import LATENTS_MEMBER, VAE_PRECISIONS, check_vae_precision
from qdd.loading_report import loading_problems

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qdd-cli decode",
        description="Decode the latents a `generate --save-latents` shard folder stored, with "
        "the pipeline's own VAE at --vae-precision, into a new shard folder (same keys).",
    )
    parser.add_argument("--src", required=True, help="a shard folder written with --save-latents")
    parser.add_argument("--vae-precision", required=True, help=", ".join(VAE_PRECISIONS))
    parser.add_argument("--out", required=True, help="the new shard folder")
    parser.add_argument(
        "--model-path", help="the diffusers folder of the VAE (default: the recipe's model)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    return parser


def source_samples(src: Path) -> list[dict[str, Any]]:
    """Every sample of ``src`` (manifest order): key, json, PNG sha256 and latents bytes."""
    from qdd.datamodules.reader import read_manifest

    manifest = read_manifest(src)
    samples = []
    for shard in manifest["shards"]:
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(src / shard["name"], "r:") as tar:
            for member in tar:
                if member.isfile():
                    key, _, ext = member.name.partition(".")
                    members.setdefault(key, {})[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
        for key, parts in members.items():
            if LATENTS_MEMBER not in parts:
                raise QddError(
                    f"{src} holds no latents ({key} has none): generate it with --save-latents"
                )
            samples.append({
                "key": key,
                "meta": upgrade(json.loads(parts["json"])),
                "png_sha256": hashlib.sha256(parts["png"]).hexdigest(),
                "latents": parts[LATENTS_MEMBER],
            })  # fmt: skip
    return samples


def load_vae(model_path: str, dtype: str) -> SimpleNamespace:
    """The pipeline's VAE (``vae/`` of the diffusers folder) and the image post-processing
    its pipeline applies, in the dtype the generation run loaded it in."""
    import diffusers
    import torch
    from diffusers.image_processor import VaeImageProcessor

    from qdd.generation.loading import resolve_model_path

    source = resolve_model_path(model_path)
    index = Path(source) / "model_index.json"
    if not index.is_file():
        raise QddError(f"{model_path} is not a local diffusers folder: pass --model-path DIR")
    vae_class = json.loads(index.read_text())["vae"][1]
    vae, info = getattr(diffusers, vae_class).from_pretrained(
        source, subfolder="vae", dtype=getattr(torch, dtype), output_loading_info=True
    )
    problems = loading_problems(info)  # diffusers fills a bad key with random weights
    if problems:
        raise QddError(
            f"the VAE in {source}/vae does not fit its config ({problems}): "
            "pass --model-path a complete diffusers folder"
        )
    vae.eval()
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    return SimpleNamespace(vae=vae, image_processor=VaeImageProcessor(vae_scale_factor=scale))


def check_vae_fits(vae: Any, samples: list[dict[str, Any]], src: Path, model: str) -> None:
    """Refuse, before anything is written, a VAE whose latent space is not the one the
    latents were stored for: other channels, or other scaling factors than each sample
    recorded (another model's VAE would decode them into noise, or crash half-way)."""
    from qdd.generation.vae import latent_factors

    own = latent_factors(SimpleNamespace(vae=vae))
    for sample in samples:
        stored = sample["meta"].get("latents") or {}
        channels = (stored.get("shape") or [None])[0]
        if channels != vae.config.latent_channels:
            raise QddError(
                f"the VAE of {model} takes {vae.config.latent_channels} latent channels, "
                f"{src}'s {sample['key']} has {channels}: pass --model-path the model it was "
                "generated with"
            )
        differing = [k for k, v in own.items() if stored.get(k) != v]
        if differing:
            raise QddError(
                f"the VAE of {model} scales latents otherwise ({', '.join(differing)}) than "
                f"{src}'s {sample['key']} recorded: pass --model-path the model it was "
                "generated with"
            )


def run_decode(
    src: str | Path,
    vae_precision: str,
    out: str | Path,
    model_path: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Decode ``src``'s latents at ``vae_precision`` into ``out``; returns ``out``."""
    import torch

    from qdd.datamodules.writer import ShardWriter, write_manifest
    from qdd.generation.images import image_failure, to_uint8
    from qdd.generation.jobs import RECIPE, vae_label
    from qdd.generation.registry import get_generator
    from qdd.generation.vae import decode_latents, decode_npy, set_vae_precision

    check_vae_precision(vae_precision)
    src, out = Path(src), Path(out)
    if src.resolve() == out.resolve():
        raise QddError(f"--out is --src ({src}): decode into another folder")
    recipe_path = src / RECIPE
    if not recipe_path.is_file():
        raise QddError(f"{src} has no {RECIPE}: decode needs a folder written by qdd-cli generate")
    recipe = json.loads(recipe_path.read_text())
    if recipe.get("decoded_from") is not None:  # not `vae_precision`: generate sets it too
        raise QddError(
            f"{src} was decoded from {recipe['decoded_from']} already: decode the folder "
            "its latents came from"
        )
    samples = source_samples(src)
    spec = get_generator(recipe["generator"])
    decoder = load_vae(model_path or recipe["model_id"], recipe["dtype"])
    check_vae_fits(decoder.vae, samples, src, model_path or recipe["model_id"])
    record = set_vae_precision(
        decoder, vae_precision, getattr(torch, spec.half_dtype), "cpu"
    )  # fmt: skip
    batch = recipe.get("batch_size") or 1  # the generation's batches: the same convolutions
    samples.sort(key=lambda s: (s["meta"]["prompt_id"], s["key"]))
    writer = ShardWriter(out, prefix="decoded", mode="overwrite" if overwrite else "new")
    (out / RECIPE).write_text(
        json.dumps({**recipe, "vae_precision": vae_precision, "decoded_from": str(src)},
                   indent=2, sort_keys=True) + "\n"  # fmt: skip
    )
    n_failed = 0
    with writer:
        for start in range(0, len(samples), batch):
            chunk = samples[start : start + batch]
            latents = torch.stack([decode_npy(s["latents"]) for s in chunk])
            images = decode_latents(decoder, spec.family, latents)
            for sample, image in zip(chunk, images, strict=True):
                denoiser = sample["meta"].get("denoiser_precision") or sample["meta"]["precision"]
                meta = {
                    **{k: v for k, v in sample["meta"].items() if k != "latents"},
                    **record,
                    "precision": vae_label(denoiser, vae_precision),
                    "denoiser_precision": denoiser,
                    "source_sample": {"folder": str(src), "key": sample["key"],
                                      "png_sha256": sample["png_sha256"]},
                }  # fmt: skip
                reason = image_failure(image)
                if reason is None:
                    writer.write(sample["key"], to_uint8(image), meta)
                else:
                    writer.record_failure(sample["key"], meta, reason)
                    n_failed += 1
    manifest = write_manifest(out)
    log.info("%s: %d decoded at vae %s, %d failed", out, manifest["total"], vae_precision,
             n_failed)  # fmt: skip
    return out
