"""Tiny saved pipelines (built once per session) and a helper that runs ``qdd-cli generate``."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

TINY = ("sd15", "sdxl", "sd3", "flux-schnell")
SIZE = 64


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random-init tiny pipelines saved with save_pretrained, one folder per generator."""
    from qdd.generation.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("models")
    return {name: build_tiny_pipeline(name, root / name) for name in TINY}


@pytest.fixture
def generate(capsys: pytest.CaptureFixture[str]) -> Callable[..., Path]:
    """``qdd-cli generate ARGS`` at 64² with few steps; returns the folder it printed last."""
    from qdd.cli import main

    def run(*args: str, steps: int = 2, limit: int = 2) -> Path:
        capsys.readouterr()
        main(
            [
                "generate",
                "--steps",
                str(steps),
                "--limit",
                str(limit),
                "--height",
                str(SIZE),
                "--width",
                str(SIZE),
                "--trainer.accelerator",
                "cpu",
                *args,
            ]
        )
        return Path(capsys.readouterr().out.strip().splitlines()[-1])

    return run


@pytest.fixture
def read_samples() -> Callable[[Path], dict[str, tuple[bytes, dict]]]:
    return samples_of


def samples_of(folder: Path) -> dict[str, tuple[bytes, dict]]:
    """Every sample of a folder's complete shards: key -> (png bytes, metadata)."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return {k: (v["png"], json.loads(v["json"])) for k, v in samples.items()}
