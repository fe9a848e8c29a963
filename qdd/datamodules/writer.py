"""Write samples into WebDataset shards and seal a folder with its manifest.

Every part that produces images (``qdd-cli shard``, ``qdd-cli generate``) writes through
`ShardWriter`, so the schema, the key rules and the crash-safety live in one place:

- a shard is written as ``<name>.tar.partial`` and renamed to ``<name>.tar`` only when it is
  complete, so a killed run never leaves a truncated ``.tar`` behind;
- ``manifest.json`` is written last, atomically, by `write_manifest`, from the complete
  shards actually on disk (several writers, e.g. one per DDP rank, share one folder);
- tar headers carry no time or owner, so the same samples give byte-identical shards;
- every sample's JSON says what format its pixels came from (``source_format``, and
  ``jpeg_quality`` for JPEG sources): ``qdd-cli shard`` fills them in from the source file,
  and samples written from pixels (``qdd-cli generate``) default to ``png``, ``None``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

import qdd
from qdd.datamodules.schema import FORMAT, MANIFEST, check_key, upgrade
from qdd.errors import QddError
from qdd.identity import group_label

FAILED = "failed.jsonl"
#: Provenance of samples whose caller does not say otherwise: pixels saved losslessly.
SOURCE_DEFAULTS: dict[str, Any] = {"source_format": "png", "jpeg_quality": None}
Mode = Literal["new", "append", "overwrite"]


def shard_files(folder: Path) -> list[Path]:
    """The complete shards of a folder, in name order."""
    return sorted(p for p in Path(folder).glob("*.tar") if p.is_file())


def _partial_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("*.tar.partial"))


def encode_png(image: Image.Image | np.ndarray) -> bytes:
    """Lossless PNG of an RGB image (never JPEG: encoding bias confounds detectors)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mode = 0o644
    info.mtime = 0
    tar.addfile(info, io.BytesIO(payload))


def _dump_json(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, ensure_ascii=False).encode("utf-8")


class ShardWriter:
    """Append samples (PNG + JSON) to size-limited tar shards in ``out_dir``.

    ``mode="new"`` refuses a folder that already holds shards (nothing is clobbered by
    accident), ``"overwrite"`` removes the old shards and manifest first, ``"append"`` adds
    new shards next to complete ones (resuming an interrupted run) and drops leftover
    ``.partial`` files, whose samples the caller writes again.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        prefix: str = "shard",
        max_count: int = 1000,
        max_bytes: int = 1 << 30,
        mode: Mode = "new",
    ) -> None:
        self.out_dir = Path(out_dir)
        self.prefix = check_key(prefix)
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.out_dir.mkdir(parents=True, exist_ok=True)
        existing = shard_files(self.out_dir)
        if mode == "new" and (existing or (self.out_dir / MANIFEST).exists()):
            raise QddError(
                f"{self.out_dir} already holds shards: pass --overwrite to replace them "
                "or choose another --out"
            )
        if mode == "overwrite":
            for path in [*existing, self.out_dir / MANIFEST, self.out_dir / FAILED]:
                path.unlink(missing_ok=True)
            existing = []
        for path in _partial_files(self.out_dir):
            if path.name.startswith(f"{self.prefix}-"):  # other writers' (ranks') stay
                path.unlink()
        if mode != "overwrite":
            (self.out_dir / MANIFEST).unlink(missing_ok=True)  # stale once anything is added
        taken = [p.name for p in existing if p.name.startswith(f"{self.prefix}-")]
        self._index = len(taken)
        while self._shard_path(self._index).exists():
            self._index += 1
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        self._bytes = 0
        self._keys: set[str] = set()
        self.written: list[Path] = []

    def _shard_path(self, index: int) -> Path:
        return self.out_dir / f"{self.prefix}-{index:06d}.tar"

    def _open(self) -> tarfile.TarFile:
        if self._tar is None:
            partial = self._shard_path(self._index).with_suffix(".tar.partial")
            self._tar = tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT)
            self._count = self._bytes = 0
        return self._tar

    def write(
        self,
        key: str,
        image: Image.Image | np.ndarray,
        meta: dict[str, Any],
        extra: dict[str, bytes] | None = None,
    ) -> None:
        """Add one sample; starts a new shard when the current one is full."""
        self.write_encoded(key, encode_png(image), meta, extra)

    def write_encoded(
        self, key: str, png: bytes, meta: dict[str, Any], extra: dict[str, bytes] | None = None
    ) -> None:
        """Add one sample whose PNG bytes are already encoded; ``extra``: more members of
        the sample by extension (``latents.npy``), which readers of images pass over."""
        check_key(key)
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in {self.out_dir}")
        self._keys.add(key)
        payload = _dump_json({**SOURCE_DEFAULTS, **meta})
        tar = self._open()
        _add_member(tar, f"{key}.png", png)
        _add_member(tar, f"{key}.json", payload)
        for extension, data in (extra or {}).items():
            _add_member(tar, f"{key}.{extension}", data)
        self._count += 1
        self._bytes += len(png) + len(payload) + sum(len(d) for d in (extra or {}).values())
        if self._count >= self.max_count or self._bytes >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        """Seal the current shard (rename ``.partial`` → ``.tar``), if it holds anything."""
        if self._tar is None:
            return
        partial = Path(self._tar.name)
        self._tar.close()
        self._tar = None
        final = self._shard_path(self._index)
        os.replace(partial, final)
        self.written.append(final)
        self._index += 1

    def record_failure(self, key: str, meta: dict[str, Any], reason: str) -> None:
        """Log a sample that could not be produced (e.g. a NaN image); it is not data."""
        with open(self.out_dir / FAILED, "a", encoding="utf-8") as handle:
            handle.write(_dump_json({"key": key, "reason": reason, **meta}).decode() + "\n")

    def close(self) -> list[Path]:
        """Seal the last shard; returns the shards this writer produced."""
        self.flush()
        return self.written

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        # On an exception the open shard stays ``.partial``: never sealed half-written.
        if exc_type is None:
            self.close()
        elif self._tar is not None:
            self._tar.close()
            self._tar = None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def scan_shard(path: Path) -> tuple[list[str], Counter[str], Counter[tuple[str, str]]]:
    """Keys, group counts and (group, source format) counts of one complete shard.

    Reads only the JSON members. Samples written before formats were recorded count as
    ``"unknown"``.
    """
    keys: dict[str, None] = {}  # ordered set: a key counts once, whatever its members
    groups: Counter[str] = Counter()
    formats: Counter[tuple[str, str]] = Counter()
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                keys[key] = None
                if ext == "json":
                    meta = upgrade(json.loads(tar.extractfile(member).read()))  # type: ignore[union-attr]
                    groups[group_label(meta)] += 1
                    formats[group_label(meta), meta.get("source_format") or "unknown"] += 1
    except (tarfile.TarError, OSError, json.JSONDecodeError) as error:
        raise QddError(f"{path} is corrupt ({error}): delete it and re-create the shards") from None
    return list(keys), groups, formats


def existing_keys(out_dir: str | Path) -> set[str]:
    """Keys already sealed in ``out_dir`` (to resume an interrupted run)."""
    keys: set[str] = set()
    for path in shard_files(Path(out_dir)):
        keys.update(scan_shard(path)[0])
    return keys


def formats_by_group(counts: Counter[tuple[str, str]]) -> dict[str, dict[str, int]]:
    """``{group: {source_format: count}}``, sorted: what format each group's pixels came from
    (a real set of JPEGs against PNG fakes is a confound a detector can learn)."""
    nested: dict[str, dict[str, int]] = {}
    for (group, source_format), count in sorted(counts.items()):
        nested.setdefault(group, {})[source_format] = count
    return nested


def write_manifest(out_dir: str | Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Describe every complete shard of ``out_dir`` in ``manifest.json`` (atomic, written last).

    ``extra``: further top-level entries, e.g. ``qdd-cli generate``'s per-group ``costs``.
    """
    folder = Path(out_dir)
    shards, groups, formats, seen = [], Counter(), Counter(), set()
    for path in shard_files(folder):
        keys, shard_groups, shard_formats = scan_shard(path)
        duplicates = seen.intersection(keys)
        if duplicates:
            raise QddError(
                f"{folder}: key {sorted(duplicates)[0]!r} appears in two shards: "
                "re-create the folder with --overwrite"
            )
        seen.update(keys)
        groups.update(shard_groups)
        formats.update(shard_formats)
        shards.append(
            {
                "name": path.name,
                "count": len(keys),
                "bytes": path.stat().st_size,
                "sha256": _sha256(path),
                "groups": dict(sorted(shard_groups.items())),
            }
        )
    failed = []
    if (folder / FAILED).exists():
        lines = (folder / FAILED).read_text(encoding="utf-8").splitlines()
        failed = [json.loads(line) for line in lines if line.strip()]
        failed = [f for f in failed if f["key"] not in seen]  # a later retry succeeded
    manifest = {
        "format": FORMAT,
        "qdd_version": qdd.__version__,
        "total": len(seen),
        "groups": dict(sorted(groups.items())),
        "formats": formats_by_group(formats),
        "shards": shards,
        "failed": [{"key": f["key"], "reason": f["reason"]} for f in failed],
        **(extra or {}),
    }
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MANIFEST)
    return manifest
