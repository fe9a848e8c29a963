"""Find shard folders, check them against their manifests, and index their samples.

Readers trust the manifest: a folder without one, a shard that is missing or truncated, or
a count that disagrees is an error the user must fix (re-create the shards), because
evaluation has to see every sample exactly once. Problems inside one sample (a PNG that
does not decode, a PNG without its JSON) skip that sample only: one bad image should not
sink a 10 000-image evaluation. Such a sample still gets an `Entry` (with the missing
member as ``None``), so the data path reports it by key (``n_skipped`` in metrics.json)
instead of it vanishing at indexing time.

Shards are plain uncompressed tars, so a sample is read at its members' byte offsets
(``os.pread``): any process can read any subset of samples, which is how DDP ranks and
DataLoader workers split the work without overlap.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from qdd.datamodules.schema import MANIFEST, upgrade
from qdd.datamodules.writer import FAILED, shard_files
from qdd.errors import QddError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    """Where one sample's two members lie inside a shard."""

    shard: str
    key: str
    png: tuple[int, int] | None  # (offset, size) of the PNG bytes; None if absent
    meta: tuple[int, int] | None  # (offset, size) of the JSON bytes; None if absent


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
        if (
            list(folder.glob("*.tar.partial"))
            or (folder / FAILED).exists()
            or (shard_files(folder) and written_by_qdd(shard_files(folder)[0]))
        ):
            raise QddError(
                f"{folder} has shards but no {MANIFEST} (the run that wrote it was interrupted): "
                "re-run it (generate resumes; shard needs --overwrite)"
            )
        if shard_files(folder):
            raise QddError(
                f"{folder} holds .tar files without a qdd {MANIFEST} (WebDataset shards from "
                f"elsewhere?): convert them with `qdd-cli shard --src {folder} --out NEW_FOLDER "
                "--label real|fake --source NAME`"
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


def written_by_qdd(shard: Path) -> bool:
    """Whether a tar's first JSON member is a qdd sample's (records ``qdd_version``); a tar
    that cannot be read counts as qdd's (a run killed mid-write)."""
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".json"):
                    meta = upgrade(json.loads(tar.extractfile(member).read()))  # type: ignore[union-attr]
                    return isinstance(meta, dict) and "qdd_version" in meta
    except (tarfile.TarError, OSError, ValueError):
        return True
    return False


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
    return [
        Entry(str(path), key, parts.get("png"), parts.get("json")) for key, parts in members.items()
    ]


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


def _read(fd: int, span: tuple[int, int]) -> bytes:
    data = os.pread(fd, span[1], span[0])
    if len(data) != span[1]:
        raise ValueError(f"short read ({len(data)} of {span[1]} bytes)")
    return data


def read_sample(entry: Entry) -> tuple[Image.Image, dict[str, Any]]:
    """Decode one sample: (RGB image, metadata); ``ValueError`` says why it cannot be read."""
    for member, span in (("png", entry.png), ("json", entry.meta)):
        if span is None:
            raise ValueError(f"no .{member} member")
    fd = os.open(entry.shard, os.O_RDONLY)
    try:
        png, raw = _read(fd, entry.png), _read(fd, entry.meta)
    finally:
        os.close(fd)
    try:
        meta = upgrade(json.loads(raw))
        image = Image.open(io.BytesIO(png))
        image.load()
    except Exception as error:  # PIL raises many types for bad data
        raise ValueError(f"cannot decode: {error}") from None
    return (image if image.mode == "RGB" else image.convert("RGB")), meta


def read_meta(entry: Entry) -> dict[str, Any]:
    """One sample's JSON alone (no image decoded); ``ValueError`` if it cannot be read."""
    if entry.meta is None:
        raise ValueError("no .json member")
    fd = os.open(entry.shard, os.O_RDONLY)
    try:
        raw = _read(fd, entry.meta)
    finally:
        os.close(fd)
    try:
        return upgrade(json.loads(raw))
    except json.JSONDecodeError as error:
        raise ValueError(f"bad JSON: {error}") from None


def read_entry(entry: Entry) -> tuple[Image.Image, dict[str, Any]] | None:
    """`read_sample`, or ``None`` (logged) if the sample cannot be read."""
    try:
        return read_sample(entry)
    except ValueError as error:
        log.warning("skipped %s in %s: %s", entry.key, entry.shard, error)
        return None


def image_problem(entry: Entry) -> str | None:
    """Why a sample's image cannot be read (None: it can), found without decoding it: the
    PNG member is present, opens, and its chunks and checksums are intact (PIL's verify)."""
    if entry.png is None:
        return "no .png member"
    fd = os.open(entry.shard, os.O_RDONLY)
    try:
        png = _read(fd, entry.png)
    except ValueError as error:
        return str(error)
    finally:
        os.close(fd)
    try:
        with Image.open(io.BytesIO(png)) as image:
            image.verify()
    except Exception as error:  # PIL raises many types for bad data
        return f"cannot decode: {error}"
    return None


def unreadable(samples: Sequence[Any]) -> dict[tuple[str, str], str]:
    """The samples (anything with an ``entry``) whose image cannot be read, as
    ``{(shard, key): why}`` (`image_problem`; twins share a key, not a shard)."""
    found = {}
    for sample in samples:
        why = image_problem(sample.entry)
        if why is not None:
            found[sample.entry.shard, sample.entry.key] = why
    return found


def describe_problems(problems: dict[tuple[str, str], str], limit: int = 3) -> str:
    """``N unreadable: KEY in SHARD (why), …`` in one line."""
    named = [f"{key} in {shard} ({why})" for (shard, key), why in list(problems.items())[:limit]]
    more = f", … (+{len(problems) - limit})" if len(problems) > limit else ""
    return f"{len(problems)} unreadable: {', '.join(named)}{more}"
