"""Benchmark ``qdd-cli shard``: one worker against N, on the same photo-like images.

Three source sets of ``--n`` images of ``--size``² made from scikit-image's bundled
photographs (crops and flips, so no two files are alike), one per storage path:

- ``png-rgb``: 8-bit RGB PNGs, stored as they are (bytes copied, decode only to check);
- ``png-rgba``: RGBA PNGs, converted to RGB and re-encoded;
- ``jpeg``: JPEGs at quality 90 (a typical real-photo set), decoded and encoded as PNG.

For each set, ``shard_folder`` runs with ``workers=1`` and ``workers=N`` (default: every
core this process may use), alternating, best of ``--repeats``; the two outputs are checked
byte for byte. Printed: images/s, speed-up, and the target ≥ 0.7 × N (issue 8).

    python scripts/bench_shard.py                 # 200 images of 512², all cores
    python scripts/bench_shard.py --n 400 --workers 16
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

SETS = ("png-rgb", "png-rgba", "jpeg")


def photos() -> list[Image.Image]:
    """scikit-image's colour photographs (bundled, no network)."""
    from skimage import data

    names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina"]
    return [Image.fromarray(getattr(data, name)()).convert("RGB") for name in names]


def make_sources(root: Path, n: int, size: int) -> dict[str, Path]:
    """``n`` distinct ``size``² images per set, written under ``root``."""
    bases = photos()
    rng = np.random.default_rng(0)
    folders = {name: root / name for name in SETS}
    for folder in folders.values():
        folder.mkdir(parents=True)
    for i in range(n):
        base = bases[i % len(bases)]
        side = int(min(base.size) * rng.uniform(0.6, 1.0))
        left = int(rng.integers(0, base.width - side + 1))
        top = int(rng.integers(0, base.height - side + 1))
        image = base.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)
        if i % 2:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image.save(folders["png-rgb"] / f"{i:05d}.png")
        image.convert("RGBA").save(folders["png-rgba"] / f"{i:05d}.png")
        image.save(folders["jpeg"] / f"{i:05d}.jpg", quality=90)
    return folders


def run(src: Path, out: Path, workers: int) -> tuple[float, float]:
    """Wall and CPU seconds (this process and its workers) of one ``shard_folder`` run."""
    from qdd.datamodules.folder import shard_folder
    from qdd.datamodules.schema import REAL

    before, started = os.times(), time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # no progress bars in the table
        shard_folder(src, out, label=REAL, source="bench", overwrite=True, workers=workers)
    wall, after = time.perf_counter() - started, os.times()
    cpu = sum(after[i] - before[i] for i in range(4))  # user, system, children's user, system
    return wall, cpu


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def main() -> None:
    from qdd.datamodules.folder import default_workers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="images per set")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sources = make_sources(root / "src", args.n, args.size)
        print(
            f"{args.n} images of {args.size}², workers 1 vs {args.workers}, best of {args.repeats}"
        )
        target = 0.7 * args.workers
        print(
            f"| source | 1 worker | {args.workers} workers | speed-up (≥ {target:.2f}×) "
            f"| CPU ms/img, 1 → {args.workers} workers |"
        )
        print("|---|---|---|---|---|")
        for name in args.sets:
            runs: dict[int, list[tuple[float, float]]] = {1: [], args.workers: []}
            for _ in range(args.repeats):
                for workers, results in runs.items():
                    results.append(run(sources[name], root / f"out-{workers}", workers))
            if folder_bytes(root / "out-1") != folder_bytes(root / f"out-{args.workers}"):
                raise SystemExit(f"{name}: shards differ between 1 and {args.workers} workers")
            one, many = (args.n / min(wall for wall, _ in runs[w]) for w in runs)
            cpu_one, cpu_many = (1000 * min(cpu for _, cpu in runs[w]) / args.n for w in runs)
            print(
                f"| {name} | {one:.1f} img/s | {many:.1f} img/s | {many / one:.2f}× "
                f"| {cpu_one:.1f} → {cpu_many:.1f} |",
                flush=True,
            )
        print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
