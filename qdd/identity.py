"""The joins of qdd, each defined once: a sample's twin, a sample's group.

* A **twin** is the image the same generator (same model id or path) made from the same
  prompt text, seed, steps, guidance and size at another precision: `twin_key`. The shard
  key (``p00042-s1042``) only says where to look; two folders of different prompts, step
  counts or models share keys, so keys alone would pair images that are not twins.
* A **group** is what a per-group metric pools: ``real/<source>`` for real photos,
  ``<generator>/<precision>`` for generated ones, with ``@<backend>`` appended when the
  recorded backend is not the precision's reference one (`group_label`): the library that
  defines the format (``fp4`` = bitsandbytes, ``fp8`` = torchao), the emulation where no
  library runs it (``svdq-int4``), diffusers' loader for GGUF. So bitsandbytes FP4 is
  ``sd3/fp4`` and its emulation ``sd3/fp4@emulate`` — two groups, never merged, and a
  sample's label depends on its own metadata only (the same in every run and report).

Every command that pairs or groups samples (quality, the report's paired views, test
metrics, splits, manifests) calls these functions; none rebuilds the keys itself.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

from qdd.datamodules.schema import REAL

#: What makes two images twins (besides the precision, which must differ).
TWIN_FIELDS: tuple[str, ...] = (
    "generator",
    "model_id",
    "prompt",
    "seed",
    "steps",
    "guidance",
    "width",
    "height",
)
#: Backends that are no quantization at all (fp32, fp16, real photos, older shards; "" is
#: how a collated batch carries None).
UNQUANTIZED_BACKENDS = (None, "", "none")


def _value(value: Any) -> Any:
    """JSON numbers as one type: guidance 7 and 7.0 are the same setting."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    number = float(value)
    return int(number) if math.isfinite(number) and number.is_integer() else number


def twin_key(meta: dict[str, Any]) -> tuple[Any, ...]:
    """The identity a sample shares with its twins at every other precision."""
    return tuple(_value(meta.get(name)) for name in TWIN_FIELDS)


def twin_id(meta: dict[str, Any]) -> str | None:
    """`twin_key` as a short string, for tables that keep one column per sample
    (scores.parquet's ``twin``); None for a real photo, which has no twin."""
    if meta.get("label") == REAL:
        return None
    return hashlib.sha256(repr(twin_key(meta)).encode()).hexdigest()[:16]


def twin_mismatches(meta: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """The twin fields in which two samples differ, each as ``field a≠b`` (for one line)."""
    return [
        f"{name} {meta.get(name)!r}≠{other.get(name)!r}"
        for name in TWIN_FIELDS
        if _value(meta.get(name)) != _value(other.get(name))
    ]


#: The suffix of images whose VAE ran at a set precision (`qdd.generation.jobs.vae_label`).
VAE_SUFFIX = re.compile(r"-vae[a-z0-9]+$")


def base_precision(label: str) -> str:
    """The registry name inside a label: ``fp4`` of ``fp4@emulate`` and ``fp4-vaefp32``."""
    return VAE_SUFFIX.sub("", label.partition("@")[0])


def reference_backend(precision: str) -> str | None:
    """The backend a precision's plain name stands for: its library, else the emulation
    (formats no library runs here); None for unquantized precisions."""
    from qdd.quant import registry

    name = base_precision(precision)
    entry = registry.REGISTRY.get(name)
    if entry is None:
        return "gguf" if name.startswith("gguf-") else None  # a user file's label
    if entry.kind == "gguf":
        return "gguf"  # diffusers' GGUF loader, the only one that reads the file
    if not entry.emulated:
        return None
    return entry.library or "emulate"


def precision_label(precision: str | None, backend: str | None) -> str:
    """``fp4`` for bitsandbytes FP4, ``fp4@emulate`` for its emulation, ``fp32`` for fp32."""
    name = precision or "unknown"
    if backend in UNQUANTIZED_BACKENDS or backend == reference_backend(name):
        return name
    return f"{name}@{backend}"


def group_key(meta: dict[str, Any]) -> tuple[str, str, str | None]:
    """(generator or ``real``, precision or source, backend as recorded)."""
    if meta["label"] == REAL:
        return ("real", str(meta["source"]), None)
    generator = str(meta.get("generator") or meta["source"])
    return (generator, str(meta.get("precision") or "unknown"), meta.get("quant_backend"))


def group_label(meta: dict[str, Any]) -> str:
    """The group's name in metrics.json, scores, manifests and tables (see the module doc)."""
    generator, precision, backend = group_key(meta)
    if meta["label"] == REAL:
        return f"real/{precision}"
    return f"{generator}/{precision_label(precision, backend)}"
