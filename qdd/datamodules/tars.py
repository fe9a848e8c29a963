"""WebDataset shards written elsewhere → qdd shards (``qdd-cli shard --src DIR_OF_TARS``).

A photo collection is often already held as WebDataset tars (``webdataset.ShardWriter``:
``<key>.jpg`` + ``<key>.json`` or ``.cls``, no qdd manifest). Such tars lack what qdd's
readers rely on — a label per sample, lossless PNG pixels, a manifest that makes
evaluation exactly-once — so they are converted, not read in place: the user says what they
are (``--label``, ``--source``), and every image member becomes one qdd sample, its pixels
stored losslessly as they decode, its provenance recorded (``source_format``,
``jpeg_quality``, ``source_tar``, ``source_key``, ``path`` = tar/member). The webdataset
library reads the tars: it groups members into samples by key (up to the first dot of the
member's file name) the way their writer meant.

Keys are the member names without the image suffix, sanitized to letters, digits, ``_`` and
``-`` and made unique (``dir/img.4.jpg`` → ``dir_img_4``). A member that does not decode,
or a sample without an image member, is skipped and named on stderr, as for folders.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from qdd.datamodules.folder import (
    IMAGE_SUFFIXES,
    Prepared,
    claim_key,
    default_workers,
    find_images,
    prepare_bytes,
    shard_folder,
)
from qdd.datamodules.schema import MANIFEST, make_meta, sanitize_key
from qdd.datamodules.writer import ShardWriter, write_manifest
from qdd.errors import QddError

log = logging.getLogger(__name__)

#: Image members are decoded in chunks of this many (bounded memory, any tar size).
CHUNK = 256


@dataclass(frozen=True)
class Member:
    """One image member of a foreign tar, with its bytes."""

    tar: str  # relative to --src
    key: str  # the WebDataset key
    name: str  # the member's extension(s) after the key, e.g. "jpg" or "4.jpg"
    data: bytes

    @property
    def path(self) -> str:
        return f"{self.tar}/{self.key}.{self.name}"


def foreign_tars(src: Path) -> list[Path]:
    """The ``.tar`` files under ``src`` in a stable (sorted) order."""
    return sorted(p for p in src.rglob("*.tar") if p.is_file())


def _members(src: Path, tars: list[Path]) -> Iterator[Member | str]:
    """Image members of every tar in order; a sample without one yields its path (skipped)."""
    import webdataset as wds  # ~4 s to import: only when tars are converted

    for tar in tars:
        relative = str(tar.relative_to(src))
        try:
            for sample in wds.tarfile_samples([{"url": str(tar)}]):
                key = sample["__key__"]
                images = [
                    Member(relative, key, ext, value)
                    for ext, value in sorted(sample.items())
                    if not ext.startswith("__") and f".{ext.rsplit('.', 1)[-1]}" in IMAGE_SUFFIXES
                ]
                yield from images or [f"{relative}/{key}"]
        except (tarfile.TarError, OSError, ValueError) as error:
            raise QddError(
                f"{tar} is not a readable tar ({error}): check --src or drop that file"
            ) from None


def _prepare(member: Member) -> Prepared:
    return prepare_bytes(member.data, f".{member.name.rsplit('.', 1)[-1]}")


def _prepared(members: list[Member], pool: multiprocessing.pool.Pool | None) -> list[Prepared]:
    return pool.map(_prepare, members) if pool is not None else list(map(_prepare, members))


def unique_member_key(member: Member, taken: set[str]) -> str:
    """A valid key from the member's name without its image suffix, made unique."""
    base = sanitize_key(f"{member.key}.{member.name.rsplit('.', 1)[0]}" if "." in member.name
                        else member.key)  # fmt: skip
    return claim_key(base, taken)


def shard_tars(
    src: Path,
    out: Path,
    *,
    label: int,
    source: str,
    generator: str | None = None,
    max_count: int = 1000,
    overwrite: bool = False,
    workers: int = 1,
) -> dict:
    """Convert the WebDataset tars under ``src`` into qdd shards in ``out``; the manifest."""
    if (src / MANIFEST).exists():
        raise QddError(f"{src} already holds qdd shards ({MANIFEST}): use it as --data {src}")
    tars = foreign_tars(src)
    skipped = total = 0
    taken: set[str] = set()
    mode = "overwrite" if overwrite else "new"
    pool = multiprocessing.get_context().Pool(workers) if workers > 1 else None
    try:
        with ShardWriter(out, prefix="shard", max_count=max_count, mode=mode) as writer:
            progress = tqdm(desc=f"shard {source}", unit="img", file=sys.stderr)
            items = _members(src, tars)
            while chunk := list(itertools.islice(items, CHUNK)):
                members = [m for m in chunk if isinstance(m, Member)]
                for missing in (m for m in chunk if isinstance(m, str)):
                    tqdm.write(f"skipped {missing}: no image member", sys.stderr)
                skipped += len(chunk) - len(members)
                total += len(chunk)
                for member, prepared in zip(members, _prepared(members, pool), strict=True):
                    progress.update()
                    if prepared.error is not None:
                        tqdm.write(
                            f"skipped {member.path}: cannot decode ({prepared.error})", sys.stderr
                        )
                        skipped += 1
                        continue
                    meta = make_meta(
                        label,
                        source,
                        generator=generator,
                        path=member.path,
                        source_tar=member.tar,
                        source_key=member.key,
                        width=prepared.width,
                        height=prepared.height,
                        source_format=prepared.source_format,
                        jpeg_quality=prepared.jpeg_quality,
                    )
                    writer.write_encoded(unique_member_key(member, taken), prepared.png, meta)
            progress.close()
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    if skipped == total:
        raise QddError(
            f"none of the {total} samples in the {len(tars)} tar(s) under {src} has an image "
            "that decodes: check --src"
        )
    manifest = write_manifest(out)
    if skipped:
        print(f"skipped {skipped} of {total} samples that cannot be decoded", file=sys.stderr)
    log.info(
        "converted %d samples of %d tar(s) in %s to %s", manifest["total"], len(tars), src, out
    )
    return manifest


def shard_source(src: str | Path, out: str | Path, **options: Any) -> dict:
    """``qdd-cli shard --src``: a folder of images (`shard_folder`), or a folder holding only
    WebDataset tars written elsewhere (`shard_tars`); returns the manifest."""
    src = Path(src)
    if src.is_dir() and not find_images(src) and foreign_tars(src):
        workers = options.pop("workers", None) or default_workers()
        return shard_tars(src, Path(out), workers=workers, **options)
    return shard_folder(src, out, **options)
