"""GGUF denoiser files: written as city96's ComfyUI-GGUF tools write them, read by diffusers.

The community runs SD3.5 and Flux as GGUF files (city96's Q8_0 … Q4_K conversions). qdd
writes such a file from a model's own weights, or takes a user's file as it is, and loads
either through diffusers' GGUF loader (``from_single_file`` + ``GGUFQuantizationConfig``),
whose dequantization is plain torch and runs on any device.

What a qdd-written file holds (city96's ``tools/convert.py`` and ``lcpp*.patch`` rules, in
diffusers naming because diffusers loads such keys without conversion):

- 1-D tensors and tensors of at most 1,024 values: F32;
- the per-architecture keep list (Flux: ``img_in``, ``txt_in``, ``time_in``, ``vector_in``,
  ``guidance_in``, ``final_layer``; SD3: ``final_layer``, ``time_text_embed``,
  ``context_embedder``, the x/y/t embedders, ``pos_embed``, ``proj_out``) and every tensor
  that is not a 2-D Linear weight (diffusers replaces only Linear layers): unquantized, F32
  (city96 keeps the source's BF16 there: the same values once cast to the bf16 compute dtype);
- a Linear weight whose rows do not divide into the type's blocks: F16 (city96's fallback);
- every other Linear weight: the requested type, quantized by gguf-py (``gguf.quants``),
  whose numpy quantizers reproduce llama.cpp's reference ``quantize_row_*_ref``.

K-quants (``gguf-q4_k``): gguf-py cannot quantize them (NotImplementedError) and llama.cpp's
reference (``make_qkx2_quants``'s search) is not ported here, so qdd does not write them; a
Q4_K file made by llama.cpp/city96's tools runs through ``--denoiser-file``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

from qdd.errors import QddError
from qdd.quant import registry

log = logging.getLogger(__name__)

#: qdd precision → GGML tensor type (the registry's GGUF entries: ``gguf-q8_0`` → Q8_0).
GGUF_TYPES: dict[str, str] = {
    name: name.removeprefix("gguf-").upper() for name in registry.names("gguf")
}
GGUF_PRECISIONS: tuple[str, ...] = tuple(GGUF_TYPES)
#: The types qdd quantizes itself (gguf-py's numpy quantizers); the others need a user file.
WRITABLE: frozenset[str] = frozenset(p for p in GGUF_PRECISIONS if p != "gguf-q4_k")
#: city96: tensors of at most this many values are not quantized (F32).
SMALL_TENSOR = 1024
UNQUANTIZED_TYPES = ("F32", "F16", "BF16", "F64")
#: Keep lists (city96's ``quantize &= name.find(...) == npos``), in diffusers naming.
KEEP: dict[str, tuple[str, ...]] = {
    # img_in, txt_in, time_in/vector_in/guidance_in, final_layer (adaLN + linear)
    "flux": ("x_embedder.", "context_embedder.", "time_text_embed.", "norm_out.", "proj_out."),
    # final_layer, t/y embedders, context_embedder, x_embedder + pos_embed, proj_out
    "sd3": ("norm_out.", "proj_out.", "time_text_embed.", "context_embedder.", "pos_embed."),
}
#: The diffusers model class of each family's denoiser that loads a GGUF file.
DENOISER_CLASS = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}
DEFAULT_FILE = "denoiser.gguf"


def is_gguf(precision: str | None) -> bool:
    """Whether ``precision`` names a GGUF level (qdd's or a user file's label)."""
    return bool(precision) and precision.startswith("gguf-")  # type: ignore[union-attr]


def check_family(family: str, generator: str) -> None:
    """SD3/Flux transformers load GGUF files in diffusers; the UNets do not (one line)."""
    if family not in DENOISER_CLASS:
        raise QddError(
            f"{generator}: GGUF runs for the SD3 and Flux transformers only (diffusers' GGUF "
            "loader replaces Linear layers, city96's UNet files also quantize convolutions): "
            "choose sd3/sd35/flux or another precision"
        )


def check_writable(precision: str) -> None:
    if precision not in GGUF_TYPES:
        raise QddError(
            f"unknown GGUF precision {precision!r}: choose one of {', '.join(GGUF_PRECISIONS)}"
        )
    if precision not in WRITABLE:
        raise QddError(
            f"qdd cannot write {precision} (gguf-py has no {GGUF_TYPES[precision]} quantizer and "
            "llama.cpp's K-quant search is not ported): convert with llama.cpp/city96's tools "
            "and pass the file with --denoiser-file FILE.gguf"
        )


# --- writing -----------------------------------------------------------------------------


def tensor_type(
    name: str, shape: tuple[int, ...], precision: str, family: str, linear_weight: bool
) -> str:
    """The GGML type qdd stores tensor ``name`` in (city96's rules; see the module doc)."""
    import gguf

    if len(shape) == 1 or prod(shape) <= SMALL_TENSOR:
        return "F32"
    if not linear_weight or len(shape) != 2 or name.startswith(KEEP[family]):
        return "F32"
    qtype = GGUF_TYPES[precision]
    block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    return "F16" if shape[-1] % block else qtype


@dataclass(frozen=True)
class WrittenFile:
    """A GGUF file qdd wrote, and how each tensor was stored."""

    path: Path
    precision: str
    types: dict[str, str]  #: tensor name → GGML type name
    keep: tuple[str, ...]  #: the keep list applied
    sha256: str


def quantized_tensors(
    state_dict: Mapping[str, Any], linear_weights: set[str], precision: str, family: str
) -> dict[str, tuple[Any, str]]:
    """Tensor name → (the array as stored: fp32/fp16 values or quantized bytes, type name)."""
    import gguf
    import numpy as np
    import torch

    out: dict[str, tuple[Any, str]] = {}
    for name, tensor in state_dict.items():
        values = tensor.detach().to("cpu", torch.float32).numpy()
        kind = tensor_type(name, tuple(values.shape), precision, family, name in linear_weights)
        qtype = gguf.GGMLQuantizationType[kind]
        stored = gguf.quants.quantize(np.ascontiguousarray(values), qtype)
        out[name] = (stored, kind)
    return out


def write_gguf(
    state_dict: Mapping[str, Any],
    linear_weights: set[str],
    precision: str,
    family: str,
    path: str | Path,
) -> WrittenFile:
    """Write ``state_dict`` (diffusers naming) as a GGUF file at ``precision``, atomically."""
    import gguf

    check_writable(precision)
    path = Path(path)
    tensors = quantized_tensors(state_dict, linear_weights, precision, family)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    writer = gguf.GGUFWriter(str(partial), family)  # city96's architecture names
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string("qdd.precision", precision)
    writer.add_array("qdd.keep", list(KEEP[family]))
    for name, (stored, kind) in tensors.items():
        qtype = gguf.GGMLQuantizationType[kind]
        raw = None if kind in ("F32", "F16") else qtype
        writer.add_tensor(name, stored, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(partial, path)
    types = {name: kind for name, (_, kind) in tensors.items()}
    return WrittenFile(path, precision, types, KEEP[family], file_sha256(path))


# --- reading -----------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_tensor_types(path: str | Path) -> dict[str, str]:
    """Tensor name → GGML type name of a GGUF file (header only; a bad file: one line)."""
    import gguf

    path = Path(path).expanduser()
    if not path.is_file():
        raise QddError(f"GGUF file {path} not found: pass an existing FILE.gguf")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as error:
        raise QddError(f"{path} is not a readable GGUF file ({error}): pass a .gguf file") from None
    return {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}


#: Tensor-name prefixes only one family's denoiser has (diffusers and original naming).
FAMILY_MARKERS: dict[str, tuple[str, ...]] = {
    "flux": ("single_transformer_blocks.", "single_blocks.", "double_blocks."),
    "sd3": ("joint_blocks.", "pos_embed."),  # Flux's position embedding has no weights
}


def file_architecture(path: str | Path) -> str | None:
    """The denoiser family a GGUF file holds: read off its tensor names (what diffusers'
    converter goes by), else its ``general.architecture``; None when neither tells."""
    import gguf

    names = read_tensor_types(path)
    found = {f for f, marks in FAMILY_MARKERS.items() if any(n.startswith(marks) for n in names)}
    if len(found) == 1:
        return found.pop()
    field = gguf.GGUFReader(str(Path(path).expanduser())).fields.get("general.architecture")
    if field is None:
        return None
    declared = field.contents()
    return declared if declared in DENOISER_CLASS else None


def check_architecture(path: str | Path, family: str, generator: str) -> None:
    """Refuse, before anything is written, a GGUF file of another family than ``generator``
    (diffusers' converter would fail deep inside, or load nonsense)."""
    found = file_architecture(path)
    if found is None:
        raise QddError(
            f"{path} holds no SD3 or Flux denoiser (neither its tensor names nor "
            f"general.architecture say one): pass a GGUF file of {generator}'s transformer"
        )
    if found != family:
        raise QddError(
            f"{path} holds a {found} denoiser, not {generator}'s ({family}): pass a {family} "
            f"GGUF file, or a {found} --generator"
        )


def type_counts(types: Mapping[str, str]) -> dict[str, int]:
    """How many tensors of each type (what every sample records as ``gguf_tensor_types``)."""
    return dict(sorted(Counter(types.values()).items()))


def precision_of(path: str | Path) -> str:
    """The label of a GGUF file: its most common quantized type (by tensors, then name).

    A file with no quantized tensor is labelled by its most common float type (gguf-bf16).
    """
    counts = type_counts(read_tensor_types(path))
    if not counts:
        raise QddError(f"{path} holds no tensors: pass a GGUF denoiser file")
    quantized = {k: v for k, v in counts.items() if k not in UNQUANTIZED_TYPES}
    pool = quantized or counts
    best = max(sorted(pool), key=lambda kind: pool[kind])
    return f"gguf-{best.lower()}"


def block_size(precision: str) -> int | None:
    """Values per scale of a GGUF type (``None`` for the float types)."""
    import gguf

    kind = precision.removeprefix("gguf-").upper()
    if kind in UNQUANTIZED_TYPES or kind not in gguf.GGMLQuantizationType.__members__:
        return None
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][0]


def describe(
    path: str | Path, precision: str, compute_dtype: str, keep: tuple[str, ...] | None
) -> dict[str, Any]:
    """The GGUF fields of every sample made with the file at ``path``."""
    from importlib.metadata import version

    return {
        "weight_format": precision,
        "activation_format": compute_dtype,
        "activations_quantized": False,
        "group_size": block_size(precision),
        "gguf_tensor_types": type_counts(read_tensor_types(path)),
        "gguf_file": Path(path).name,
        "gguf_sha256": file_sha256(path),
        "gguf_keep": list(keep) if keep is not None else None,
        "gguf_version": version("gguf"),
    }


def load_denoiser(
    family: str, generator: str, model_path: str, subfolder: str, path: str | Path, dtype: Any
) -> Any:
    """The denoiser in ``path`` through diffusers' GGUF loader, configured from ``model_path``."""
    import diffusers

    check_family(family, generator)
    read_tensor_types(path)  # a missing or broken file: one line before diffusers runs
    model_class = getattr(diffusers, DENOISER_CLASS[family])
    try:
        model = model_class.from_single_file(
            str(Path(path).expanduser()),
            quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=dtype),
            config=model_path,
            subfolder=subfolder,
            torch_dtype=dtype,
        )
    except (ValueError, KeyError, RuntimeError) as error:
        reason = str(error).splitlines()[0][:200]
        raise QddError(
            f"diffusers cannot load {path} as the {subfolder} of {model_path} ({reason}): "
            "pass a GGUF file of this model"
        ) from None
    return model.eval()


def linear_weight_names(module: Any) -> set[str]:
    import torch

    return {
        f"{name}.weight" if name else "weight"
        for name, child in module.named_modules()
        if isinstance(child, torch.nn.Linear)
    }
