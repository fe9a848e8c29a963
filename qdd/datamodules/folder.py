"""Turn a folder tree of image files (real photos, or fakes from elsewhere) into shards.

Decoding (and, where needed, PNG encoding) runs in a pool of worker processes; the parent
assigns keys and writes the tar in the sorted order of the files, so the shards are
byte-identical whatever the worker count. Each sample records where its pixels came from
(``source_format``, and ``jpeg_quality`` estimated for JPEGs), because real photos are
usually JPEGs and fakes PNGs, and a detector can learn the format instead of the fake.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import sys
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from qdd.datamodules.schema import make_meta, sanitize_key
from qdd.datamodules.writer import ShardWriter, encode_png, write_manifest
from qdd.errors import QddError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}
)

#: The IJG (libjpeg) standard luminance quantisation table (JPEG spec, Annex K.1), row-major.
IJG_LUMINANCE = (
    (16, 11, 10, 16, 24, 40, 51, 61)
    + (12, 12, 14, 19, 26, 58, 60, 55)
    + (14, 13, 16, 24, 40, 57, 69, 56)
    + (14, 17, 22, 29, 51, 87, 80, 62)
    + (18, 22, 37, 56, 68, 109, 103, 77)
    + (24, 35, 55, 64, 81, 104, 113, 92)
    + (49, 64, 78, 87, 103, 121, 120, 101)
    + (72, 92, 95, 98, 112, 100, 103, 99)
)

#: PIL format names recorded under another name: MPO is a camera JPEG with extra frames.
FORMAT_ALIASES = {"mpo": "jpeg"}


def ijg_table(quality: int) -> list[int]:
    """The luminance table libjpeg writes at ``quality`` (baseline: entries 1–255)."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return [min(255, max(1, (value * scale + 50) // 100)) for value in IJG_LUMINANCE]


_IJG_TABLES = {quality: ijg_table(quality) for quality in range(1, 101)}


def estimate_jpeg_quality(luminance: Sequence[int]) -> int:
    """The IJG quality (1–100) whose scaled luminance table is closest to ``luminance``.

    ``luminance`` is the file's first quantisation table in row-major order (as PIL's
    ``image.quantization[0]`` gives it). Files from libjpeg/PIL come out exact; other
    encoders (cameras, Photoshop) use their own tables and get the nearest IJG quality.
    Ties go to the higher quality.
    """
    table = list(luminance)
    if len(table) != 64:
        raise ValueError(f"a JPEG quantisation table has 64 entries, got {len(table)}")
    return min(
        range(100, 0, -1),
        key=lambda q: sum(abs(a - b) for a, b in zip(table, _IJG_TABLES[q], strict=True)),
    )


def find_images(src: Path) -> list[Path]:
    """Image files under ``src`` by suffix, in a stable (sorted) order."""
    return sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def unique_key(relative: Path, taken: set[str]) -> str:
    """A valid key from a relative path (``a/b.c.jpg`` → ``a_b_c``), made unique."""
    return claim_key(sanitize_key(str(relative.with_suffix(""))), taken)


def claim_key(base: str, taken: set[str]) -> str:
    """``base``, or ``base-2``, ``base-3`` … when taken; the key returned is taken from now."""
    key, n = base, 1
    while key in taken:
        n += 1
        key = f"{base}-{n}"
    taken.add(key)
    return key


@dataclass(frozen=True)
class Prepared:
    """One source file made ready for a shard (in a worker), or why it could not be."""

    png: bytes = b""
    width: int = 0
    height: int = 0
    source_format: str | None = None
    jpeg_quality: int | None = None
    copied: bool = False  # the source PNG's own bytes, not re-encoded
    error: str | None = None
    crc: int | None = None  # set when a copied PNG travels from a worker without its bytes


def _is_plain_png(data: bytes, image: Image.Image) -> bool:
    """An 8-bit RGB PNG, one frame, no transparency: its bytes decode to what we would store."""
    return (
        image.format == "PNG"
        and image.mode == "RGB"
        and data[12:16] == b"IHDR"
        and data[24] == 8  # bit depth
        and data[25] == 2  # colour type: truecolour, no alpha
        and "transparency" not in image.info
        and not getattr(image, "is_animated", False)
    )


def prepare(path: Path) -> Prepared:
    """Decode one file and produce the PNG bytes to store (copied when no conversion is needed)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        return Prepared(error=type(error).__name__)
    return prepare_bytes(data, path.suffix)


def prepare_bytes(data: bytes, suffix: str = "") -> Prepared:
    """`prepare` of a file's bytes (``suffix`` names the format when PIL does not)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            source_format = (image.format or suffix.lstrip(".")).lower()
            source_format = FORMAT_ALIASES.get(source_format, source_format)
            quality = None
            if source_format == "jpeg" and getattr(image, "quantization", None):
                quality = estimate_jpeg_quality(image.quantization[0])
            copied = _is_plain_png(data, image)
            png = data if copied else encode_png(image.convert("RGB"))
            return Prepared(png, image.width, image.height, source_format, quality, copied)
    except Exception as error:  # PIL raises many types for bad files
        return Prepared(error=type(error).__name__)


def _prepare_in_worker(path: Path) -> Prepared:
    """`prepare`, but a copied PNG travels back as its CRC, not its bytes.

    Sending ~1 MB through the pool's pipe costs more CPU than the parent reading the file
    again from the page cache; the CRC proves it read the bytes the worker decoded.
    """
    prepared = prepare(path)
    if prepared.copied:
        return replace(prepared, png=b"", crc=zlib.crc32(prepared.png))
    return prepared


def _with_bytes(path: Path, prepared: Prepared) -> Prepared:
    """A worker's result with the bytes of a copied PNG read back (checked by CRC)."""
    if prepared.crc is None:
        return prepared
    try:
        data = path.read_bytes()
    except OSError as error:
        return Prepared(error=type(error).__name__)
    if zlib.crc32(data) != prepared.crc:
        return Prepared(error="file changed while sharding")
    return replace(prepared, png=data, crc=None)


def default_workers() -> int:
    """All the cores this process may run on (its CPU affinity, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def prepared_in_order(paths: Sequence[Path], workers: int) -> Iterator[Prepared]:
    """`prepare` over ``paths`` on ``workers`` processes, results in the order of ``paths``."""
    if workers <= 1 or len(paths) <= 1:
        yield from map(prepare, paths)
        return
    with multiprocessing.get_context().Pool(min(workers, len(paths))) as pool:
        results = pool.imap(_prepare_in_worker, paths, chunksize=2)
        for path, prepared in zip(paths, results, strict=True):
            yield _with_bytes(path, prepared)


def shard_folder(
    src: str | Path,
    out: str | Path,
    *,
    label: int,
    source: str,
    generator: str | None = None,
    max_count: int = 1000,
    overwrite: bool = False,
    workers: int | None = None,
) -> dict:
    """Write every decodable image under ``src`` into shards in ``out``; returns the manifest.

    (`qdd.datamodules.tars.shard_source` also takes WebDataset tars written elsewhere.)
    Images that cannot be decoded are reported
    on stderr by path, one line each, skipped and counted. ``workers`` processes decode
    (default: every core this process may use); the shards do not depend on their number.
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise QddError(f"--src {src} is not a folder: point it at a folder of images")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise QddError(f"--workers {workers} is not a worker count: pass 1 or more")
    paths = find_images(src)
    if not paths:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise QddError(
            f"no images in {src} (looked for {suffixes}, and WebDataset .tar shards): check --src"
        )
    taken: set[str] = set()
    skipped = copied = 0
    mode = "overwrite" if overwrite else "new"
    with ShardWriter(out, prefix="shard", max_count=max_count, mode=mode) as writer:
        results = prepared_in_order(paths, workers)
        progress = tqdm(
            results, total=len(paths), desc=f"shard {source}", unit="img", file=sys.stderr
        )
        for path, prepared in zip(paths, progress, strict=True):
            if prepared.error is not None:
                tqdm.write(f"skipped {path}: cannot decode ({prepared.error})", sys.stderr)
                skipped += 1
                continue
            relative = path.relative_to(src)
            meta = make_meta(
                label,
                source,
                generator=generator,
                path=str(relative),
                width=prepared.width,
                height=prepared.height,
                source_format=prepared.source_format,
                jpeg_quality=prepared.jpeg_quality,
            )
            writer.write_encoded(unique_key(relative, taken), prepared.png, meta)
            copied += prepared.copied
    if skipped == len(paths):
        raise QddError(f"none of the {len(paths)} images in {src} could be decoded: check --src")
    manifest = write_manifest(out)
    if skipped:
        print(f"skipped {skipped} of {len(paths)} images that cannot be decoded", file=sys.stderr)
    log.info(
        "wrote %d samples (%d PNGs stored as they were, %d skipped) to %s",
        manifest["total"],
        copied,
        skipped,
        out,
    )
    return manifest
