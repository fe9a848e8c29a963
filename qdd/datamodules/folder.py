"""Turn a folder tree of image files (real photos, or fakes from elsewhere) into shards."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from qdd.datamodules.schema import make_meta, sanitize_key
from qdd.datamodules.writer import ShardWriter, write_manifest
from qdd.errors import QddError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}
)


def find_images(src: Path) -> list[Path]:
    """Image files under ``src`` by suffix, in a stable (sorted) order."""
    return sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def unique_key(relative: Path, taken: set[str]) -> str:
    """A valid key from a relative path (``a/b.c.jpg`` → ``a_b_c``), made unique."""
    base = sanitize_key(str(relative.with_suffix("")))
    key, n = base, 1
    while key in taken:
        n += 1
        key = f"{base}-{n}"
    taken.add(key)
    return key


def shard_folder(
    src: str | Path,
    out: str | Path,
    *,
    label: int,
    source: str,
    generator: str | None = None,
    max_count: int = 1000,
    overwrite: bool = False,
) -> dict:
    """Write every decodable image under ``src`` into shards in ``out``; returns the manifest.

    Images that cannot be decoded are reported on stderr by path, one line each, and skipped.
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise QddError(f"--src {src} is not a folder: point it at a folder of images")
    paths = find_images(src)
    if not paths:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise QddError(f"no images in {src} (looked for {suffixes}): check --src")
    taken: set[str] = set()
    skipped = 0
    mode = "overwrite" if overwrite else "new"
    with ShardWriter(out, prefix="shard", max_count=max_count, mode=mode) as writer:
        for path in tqdm(paths, desc=f"shard {source}", unit="img", file=sys.stderr):
            try:
                with Image.open(path) as image:
                    image.load()
                    rgb = image.convert("RGB")
            except Exception as error:  # PIL raises many types for bad files
                tqdm.write(f"skipped {path}: cannot decode ({type(error).__name__})", sys.stderr)
                skipped += 1
                continue
            relative = path.relative_to(src)
            meta = make_meta(
                label,
                source,
                generator=generator,
                path=str(relative),
                width=rgb.width,
                height=rgb.height,
            )
            writer.write(unique_key(relative, taken), rgb, meta)
    if skipped == len(paths):
        raise QddError(f"none of the {len(paths)} images in {src} could be decoded: check --src")
    manifest = write_manifest(out)
    log.info("wrote %d samples (%d skipped) to %s", manifest["total"], skipped, out)
    return manifest
