"""``qdd-cli quantize``: a generator's denoiser written as the deployable quantized file.

The file is the artifact ``qdd-cli generate --precision gguf-*`` loads (byte for byte), so
the exact weights behind a study's images can also run elsewhere (diffusers, ComfyUI).
The format itself (writing, reading, city96's keep rules) is `qdd.quant.gguf`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from qdd.errors import QddError
from qdd.generation.loading import resolve_model_path
from qdd.generation.registry import get_generator
from qdd.quant.gguf import (
    DENOISER_CLASS,
    WRITABLE,
    WrittenFile,
    check_family,
    check_writable,
    is_gguf,
    linear_weight_names,
    type_counts,
    write_gguf,
)

log = logging.getLogger(__name__)


def write_denoiser(generator: str, model_path: str, precision: str, out: str | Path) -> WrittenFile:
    """Load ``generator``'s denoiser from ``model_path`` in its half dtype and write ``out``."""
    import diffusers
    import torch

    spec = get_generator(generator)
    check_family(spec.family, spec.name)
    check_writable(precision)
    source = resolve_model_path(model_path)
    model_class = getattr(diffusers, DENOISER_CLASS[spec.family])
    try:
        model = model_class.from_pretrained(
            source, subfolder=spec.denoiser, dtype=getattr(torch, spec.half_dtype)
        )
    except OSError as error:
        reason = str(error).splitlines()[0][:200]
        raise QddError(
            f"cannot load the {spec.denoiser} of {model_path} ({reason}): pass a diffusers "
            "folder or a downloaded hub id to --model-path"
        ) from None
    written = write_gguf(
        model.state_dict(), linear_weight_names(model), precision, spec.family, out
    )
    log.info(
        "%s: %s %s, tensor types %s", written.path, spec.name, precision,
        type_counts(written.types),
    )  # fmt: skip
    return written


def build_parser() -> argparse.ArgumentParser:
    """``qdd-cli quantize``'s flags (the keys of `qdd.api.quantize`)."""
    parser = argparse.ArgumentParser(
        prog="qdd-cli quantize",
        description="Write a generator's denoiser as a deployable quantized file (GGUF, "
        "city96's conventions in diffusers naming), loadable by diffusers' GGUF loader.",
    )
    parser.add_argument("--generator", required=True, help="sd3, sd35, sd35-medium, flux-…")
    parser.add_argument("--model-path", help="hub id or local diffusers folder")
    parser.add_argument("--precision", required=True, help=", ".join(sorted(WRITABLE)))
    parser.add_argument("--out", required=True, help="the .gguf file to write")
    return parser


def quantize_to_file(
    generator: str, precision: str, out: str | Path, model_path: str | None = None
) -> WrittenFile:
    """``generator``'s denoiser (from ``model_path``, default its hub id) written to ``out``
    as a deployable ``precision`` file; only GGUF precisions are written (one-line refusal)."""
    spec = get_generator(generator)
    if not is_gguf(precision):
        raise QddError(
            f"qdd-cli quantize writes GGUF files only, not {precision}: choose one of "
            f"{', '.join(sorted(WRITABLE))} (other precisions are applied by generate)"
        )
    return write_denoiser(spec.name, model_path or spec.hub_id, precision, out)
