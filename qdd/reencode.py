"""Remove the JPEG-vs-PNG confound in one data option (``--data.reencode``).

Real photographs are usually JPEGs; generated images never met a JPEG encoder. A detector
can learn "JPEG artefacts = real" and a benchmark cannot tell that apart from detecting
generation. `qdd-cli shard` records each sample's ``source_format`` and, for JPEGs, the
estimated ``jpeg_quality``; this module uses them, right after decoding and before any
test-time perturbation or the detector's preprocessing:

- ``jpeg:Q``: every image of both classes is JPEG-compressed at quality Q (the same
  in-memory encoder as the ``jpeg:Q`` perturbation), so both classes carry JPEG artefacts
  of one strength;
- ``match``: each fake that did not come from a JPEG is compressed at a quality drawn from
  the real samples' recorded qualities (a real that was not a JPEG contributes "left
  alone", so the share of compressed images matches too). The draw is deterministic per
  key (SHA-256 of the key), so an image and its twins at other precisions, which share the
  key, get the same quality. Reals are never touched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image

from qdd.datamodules.schema import FAKE, REAL
from qdd.errors import QddError
from qdd.perturb import parse

MATCH = "match"
FORMS = "jpeg:Q (every image, Q 1-100) or match (fakes like the real set's JPEG qualities)"


def check_spec(spec: str) -> str:
    """The canonical spec (``"jpeg:75"``, ``"match"``); a `QddError` if it is neither form."""
    text = str(spec).strip().lower()
    if text == MATCH:
        return MATCH
    if text.startswith("jpeg:"):
        try:
            return parse(text).canonical
        except QddError:
            pass
    raise QddError(f"--data.reencode={spec!r} is not a re-encoding: use {FORMS}")


@dataclass(frozen=True)
class Reencoder:
    """JPEG re-encoding by key and label; picklable for DataLoader workers.

    ``qualities`` is the pool drawn from: one quality for ``jpeg:Q``; for ``match`` the
    real samples' recorded qualities, sorted, ``None`` for a real that was not a JPEG.
    """

    spec: str
    qualities: tuple[int | None, ...]

    def quality(self, key: str, meta: Mapping[str, Any]) -> int | None:
        """The JPEG quality this sample is compressed at, or ``None`` (left as decoded)."""
        if self.spec != MATCH:
            return self.qualities[0]
        if int(meta["label"]) != FAKE or meta.get("source_format") == "jpeg":
            return None
        digest = hashlib.sha256(f"{MATCH}\0{key}".encode()).digest()
        return self.qualities[int.from_bytes(digest[:8], "little") % len(self.qualities)]

    def apply(self, image: Image.Image, key: str, meta: Mapping[str, Any]) -> Image.Image:
        quality = self.quality(key, meta)
        return image if quality is None else parse(f"jpeg:{quality}").apply(image, key)


def build_reencoder(spec: str, metas: Iterable[Mapping[str, Any]]) -> Reencoder:
    """The `Reencoder` for ``spec``; ``metas`` (every sample's JSON) feed ``match``."""
    spec = check_spec(spec)
    if spec != MATCH:
        return Reencoder(spec, (int(parse(spec).strength),))
    reals = [meta for meta in metas if int(meta["label"]) == REAL]
    if not reals:
        raise QddError(
            "--data.reencode=match needs real samples in --data to match: add a real shard "
            "folder or use --data.reencode=jpeg:Q"
        )
    unrecorded = sum("source_format" not in meta for meta in reals)
    if unrecorded:
        raise QddError(
            f"{unrecorded} of {len(reals)} real samples do not record their source_format "
            "(sharded by an older qdd): re-create them with `qdd-cli shard --overwrite`"
        )
    qualities = [
        meta.get("jpeg_quality") if meta["source_format"] == "jpeg" else None for meta in reals
    ]
    ordered = sorted(qualities, key=lambda q: (q is None, q or 0))
    return Reencoder(MATCH, tuple(ordered))
