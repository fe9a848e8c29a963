"""The shard schema: one sample = ``<key>.png`` + ``<key>.json`` (see DESIGN.md).

Kept free of heavy imports so that the writer, the readers, the generators and the CLI
all share these few definitions without paying for torch or lightning.
"""

from __future__ import annotations

import re
from typing import Any

import qdd

#: Metadata every sample carries (``None`` where it does not apply, e.g. a real photo's
#: precision). Extra fields (``quant_fraction``, ``path`` …) are allowed.
FIELDS: tuple[str, ...] = (
    "label",
    "source",
    "generator",
    "precision",
    "quant_backend",
    "quant_scope",
    "model_id",
    "prompt",
    "prompt_id",
    "seed",
    "steps",
    "guidance",
    "width",
    "height",
    "qdd_version",
)

#: WebDataset splits a key at its first dot, so keys are restricted to these characters.
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")

REAL, FAKE = 0, 1
MANIFEST = "manifest.json"
FORMAT = "qdd-shards/1"


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid sample key, else raise ``ValueError``."""
    if not KEY_PATTERN.match(key):
        raise ValueError(f"invalid sample key {key!r}: use letters, digits, '_' and '-' only")
    return key


def sanitize_key(text: str) -> str:
    """Turn free text (a relative file path) into a valid key."""
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")
    return key or "sample"


def make_meta(label: int, source: str, **fields: Any) -> dict[str, Any]:
    """A complete metadata record: every schema field present, unknown ones ``None``."""
    if label not in (REAL, FAKE):
        raise ValueError(f"label must be 0 (real) or 1 (fake), got {label!r}")
    meta: dict[str, Any] = {name: None for name in FIELDS}
    meta.update(fields)
    meta.update(label=label, source=source, qdd_version=qdd.__version__)
    return meta


#: Precisions whose meaning changed: before calibrated smoothing (session 6), ``svdq-int4``
#: and ``svdq-nvfp4`` were built with data-free smoothing, now ``svdq-*-datafree``.
RENAMED_WITHOUT = {"svdq-int4": ("smoothing", "svdq-int4-datafree"),
                   "svdq-nvfp4": ("smoothing", "svdq-nvfp4-datafree")}  # fmt: skip


def upgrade(meta: dict[str, Any]) -> dict[str, Any]:
    """A sample's JSON in today's terms: a ``svdq-int4`` sample without a ``smoothing``
    record was made by the data-free construction, so it is ``svdq-int4-datafree`` — never
    pooled with calibrated ones under one name. Every reader of sample JSON calls this."""
    renamed = RENAMED_WITHOUT.get(meta.get("precision"))  # type: ignore[arg-type]
    if renamed is not None and meta.get(renamed[0]) is None:
        meta = {**meta, "precision": renamed[1], "precision_recorded": meta["precision"]}
    return meta
