"""Find shard folders, check them against their manifests, and index their samples.

Readers trust the manifest: a folder without one, a shard that is missing or truncated, or
a count that disagrees is an error the user must fix (re-create the shards), because
evaluation has to see every sample exactly once. Problems inside one sample (a PNG that
does not decode, a PNG without its JSON) are logged and that sample is skipped: one bad
image should not sink a 10 000-image evaluation, and the skip is visible in the log.

Shards are plain uncompressed tars, so a sample is read by seeking to its members'
offsets: any process can read any subset of samples, which is how DDP ranks and
DataLoader workers split the work without overlap.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from qdd.datamodules.schema import MANIFEST
from qdd.datamodules.writer import shard_files
from qdd.errors import QddError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    """Where one sample's two members lie inside a shard."""

    shard: str
    key: str
    png: tuple[int, int]  # (offset, size) of the PNG bytes
    meta: tuple[int, int]  # (offset, size) of the JSON bytes


def resolve_folders(data: str | Path | Sequence[str | Path]) -> list[Path]:
    """Shard folders from a folder, a glob, or a list of either (order kept, no repeats)."""
    items = [data] if isinstance(data, (str, Path)) else list(data)
    if not items:
        raise QddError("no data given: pass --data with a shard folder, a glob or a preset")
    folders: list[Path] = []
    for item in items:
        text = str(item)
        matches = sorted(glob.glob(text)) if glob.has_magic(text) else [text]
        if not matches:
            log.warning("no shard folder matches %r", text)
        for match in matches:
            path = Path(match)
            if not path.is_dir():
                raise QddError(f"{path} is not a folder: --data takes shard folders (or a glob)")
            if path not in folders:
                folders.append(path)
    if not folders:
        raise QddError(f"no shard folder matches {', '.join(map(str, items))}: check --data")
    return folders


def read_manifest(folder: Path) -> dict[str, Any]:
    """The folder's manifest, checked against the shards on disk."""
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        if shard_files(folder) or list(folder.glob("*.tar.partial")):
            raise QddError(
                f"{folder} has shards but no {MANIFEST} (the run that wrote it was interrupted): "
                "re-run it (generate resumes; shard needs --overwrite)"
            )
        raise QddError(
            f"no shards in {folder}: make them with `qdd-cli shard --src PHOTOS --out {folder}` "
            "or `qdd-cli generate`"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise QddError(
            f"{manifest_path} is not valid JSON ({error}): re-create the shards"
        ) from None
    if not manifest.get("shards"):
        raise QddError(f"{folder} holds no samples (empty manifest): check what was sharded")
    for shard in manifest["shards"]:
        path = folder / shard["name"]
        if not path.exists():
            raise QddError(f"{path} is listed in {MANIFEST} but missing: re-create the shards")
        size = path.stat().st_size
        if size != shard["bytes"]:
            raise QddError(
                f"{path} is truncated or changed ({size} of {shard['bytes']} bytes): "
                "re-create the shards"
            )
    return manifest


def index_shard(path: Path, expected: int) -> list[Entry]:
    """Entries of one shard, from its tar headers (no image is decoded)."""
    members: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                members.setdefault(key, {})[ext] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError) as error:
        raise QddError(f"{path} is corrupt ({error}): re-create the shards") from None
    if len(members) != expected:
        raise QddError(
            f"{path} holds {len(members)} samples but {MANIFEST} says {expected}: "
            "re-create the shards"
        )
    entries = []
    for key, parts in members.items():
        if "png" not in parts or "json" not in parts:
            missing = "png" if "png" not in parts else "json"
            log.warning("skipped %s in %s: no .%s member", key, path, missing)
            continue
        entries.append(Entry(str(path), key, parts["png"], parts["json"]))
    return entries


def index_folders(folders: Sequence[Path]) -> tuple[list[Entry], dict[str, int]]:
    """Every sample of every folder, in a stable order, and the sample count per group."""
    entries: list[Entry] = []
    groups: dict[str, int] = {}
    for folder in folders:
        manifest = read_manifest(folder)
        for group, count in manifest["groups"].items():
            groups[group] = groups.get(group, 0) + count
        for shard in manifest["shards"]:
            entries.extend(index_shard(folder / shard["name"], shard["count"]))
    return entries, groups


def _read(handle: io.BufferedReader, span: tuple[int, int]) -> bytes:
    handle.seek(span[0])
    return handle.read(span[1])


def read_entry(entry: Entry) -> tuple[Image.Image, dict[str, Any]] | None:
    """Decode one sample: (RGB image, metadata), or ``None`` (logged) if it is corrupt."""
    with open(entry.shard, "rb") as handle:
        png, raw = _read(handle, entry.png), _read(handle, entry.meta)
    try:
        meta = json.loads(raw)
        image = Image.open(io.BytesIO(png))
        image.load()
    except Exception as error:  # PIL raises many types for bad data
        log.warning("skipped %s in %s: %s", entry.key, entry.shard, error)
        return None
    return image.convert("RGB"), meta
