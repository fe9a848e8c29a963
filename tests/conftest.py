"""Shared fixtures: tiny images and tiny shard folders, no network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")


def run_qdd(args: list[str], cwd: Path, timeout: int = 600) -> None:
    """``python -m qdd ARGS`` in a fresh process, as a user (and DDP's launcher) runs it:
    offline W&B, one OpenMP thread per rank, this checkout first on the path."""
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "qdd", *args]
    subprocess.run(command, check=True, env=env, cwd=cwd, timeout=timeout)


def zero_images(shard: Path, keys: list[str]) -> None:
    """Overwrite the PNGs of ``keys`` in ``shard`` with zeros, in place: the tar and its
    manifest stay valid, the images no longer decode."""
    import tarfile

    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        for key in keys:
            member = tar.getmember(f"{key}.png")
            data[member.offset_data : member.offset_data + member.size] = b"\0" * member.size
    shard.write_bytes(bytes(data))


def random_image(seed: int, size: tuple[int, int] = (40, 48)) -> Image.Image:
    """A deterministic RGB noise image (width, height)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def photo_dir(tmp_path: Path) -> Path:
    """A small folder tree of images in several formats and modes."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    random_image(0).save(root / "a.png")
    random_image(1, (33, 31)).save(root / "sub" / "b.jpg", quality=90)
    random_image(2).convert("L").save(root / "sub" / "gray.png")
    random_image(3).convert("RGBA").save(root / "c.v2.webp", lossless=True)
    return root


def write_fake_shards(
    folder: Path,
    counts: list[int],
    generator: str = "sd3",
    precision: str = "fp4",
    label: int = 1,
    size: tuple[int, int] = (32, 32),
) -> list[str]:
    """Shards with the given number of samples each; returns the keys written."""
    from qdd.datamodules.schema import make_meta
    from qdd.datamodules.writer import ShardWriter, write_manifest

    keys = []
    with ShardWriter(folder, mode="new", max_count=10**6) as writer:
        n = 0
        for count in counts:
            for _ in range(count):
                key = f"p{n:05d}-s{n}"
                meta = make_meta(label, generator, generator=generator, precision=precision)
                writer.write(key, random_image(n, size), meta)
                keys.append(key)
                n += 1
            writer.flush()
    write_manifest(folder)
    return keys


@pytest.fixture(scope="session")
def mix_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards made by the project's own commands, for the training tests.

    ``real-skimage`` (``qdd-cli shard`` of scikit-image photo tiles) and ``sd15-fp32``,
    ``sd15-fp4``, ``sd3-fp32``, ``sd3-fp4`` (``qdd-cli generate`` with tiny random-init
    pipelines, 24 prompts each, paired by prompt_id and seed across precisions).
    """
    from qdd.cli import main
    from qdd.demo import photo_tiles
    from qdd.generation.prompts import default_prompts
    from qdd.generation.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("mix")
    train_tiles, _ = photo_tiles(root / "photos")
    shards = root / "shards"
    main(
        [
            "shard",
            *("--src", str(train_tiles), "--out", str(shards / "real-skimage")),
            *("--label", "real", "--source", "skimage"),
        ]
    )
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(default_prompts()[:24]) + "\n")
    for generator in ("sd15", "sd3"):
        model = build_tiny_pipeline(generator, root / "models" / generator)
        for precision in ("fp32", "fp4"):
            main(
                [
                    "generate",
                    *("--generator", generator, "--model-path", str(model)),
                    *("--precision", precision, "--prompts", str(prompts)),
                    *("--steps", "2", "--height", "64", "--width", "64"),
                    *("--out", str(shards / f"{generator}-{precision}")),
                    *("--trainer.accelerator", "cpu", "--trainer.enable_progress_bar=false"),
                ]
            )
    return shards
