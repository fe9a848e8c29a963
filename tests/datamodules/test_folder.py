"""`qdd-cli shard` internals: format provenance, PNGs copied as they are, parallel = serial."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qdd.cli import main
from qdd.datamodules.folder import estimate_jpeg_quality, ijg_table, shard_folder
from qdd.datamodules.schema import REAL, make_meta
from qdd.datamodules.writer import ShardWriter
from tests.conftest import random_image


def members(folder: Path) -> dict[str, bytes]:
    """Every tar member of every shard in ``folder``, by name."""
    found: dict[str, bytes] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                found[member.name] = tar.extractfile(member).read()  # type: ignore[union-attr]
    return found


def png_16bit_rgb(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit truecolour PNG (PIL cannot write one), chunk by chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("quality", [10, 50, 75, 95, 100])
def test_jpeg_quality_estimate_on_pil_jpegs(quality: int) -> None:
    buffer = io.BytesIO()
    random_image(0, (32, 32)).save(buffer, format="JPEG", quality=quality)
    with Image.open(buffer) as image:
        estimate = estimate_jpeg_quality(image.quantization[0])
    assert abs(estimate - quality) <= 2


def test_jpeg_quality_estimate_is_nearest_table() -> None:
    assert ijg_table(50)[:3] == [16, 11, 10]  # quality 50 is the standard table itself
    assert ijg_table(100) == [1] * 64
    nudged = [value + 1 for value in ijg_table(80)]  # a non-IJG encoder, close to 80
    assert abs(estimate_jpeg_quality(nudged) - 80) <= 2
    with pytest.raises(ValueError, match="64 entries"):
        estimate_jpeg_quality([1] * 63)


@pytest.fixture
def mixed_dir(tmp_path: Path) -> Path:
    """One file per storage path: plain PNG, PNGs that need converting, JPEG, WebP, broken."""
    root = tmp_path / "mixed"
    (root / "sub").mkdir(parents=True)
    random_image(0, (24, 16)).save(root / "plain.png")
    random_image(1).convert("L").save(root / "gray.png")
    random_image(2).convert("RGBA").save(root / "alpha.png")
    random_image(3).convert("P").save(root / "palette.png")
    png_16bit_rgb(root / "deep.png", np.arange(4 * 5 * 3, dtype=np.uint16).reshape(4, 5, 3) * 999)
    random_image(4, (33, 31)).save(root / "sub" / "photo.jpg", quality=75)
    random_image(5).save(root / "sub" / "lossless.webp", lossless=True)
    (root / "sub" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def test_provenance_and_plain_pngs_copied(mixed_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    manifest = shard_folder(mixed_dir, out, label=REAL, source="mix", workers=1)
    assert manifest["total"] == 7
    found = members(out)
    meta = {
        name[: -len(".json")]: json.loads(data) for name, data in found.items() if ".json" in name
    }
    assert {key: m["source_format"] for key, m in meta.items()} == {
        "alpha": "png",
        "deep": "png",
        "gray": "png",
        "palette": "png",
        "plain": "png",
        "sub_lossless": "webp",
        "sub_photo": "jpeg",
    }
    assert abs(meta["sub_photo"]["jpeg_quality"] - 75) <= 2
    assert all(m["jpeg_quality"] is None for key, m in meta.items() if key != "sub_photo")
    # The plain 8-bit RGB PNG is stored byte for byte; every other file is re-encoded.
    assert found["plain.png"] == (mixed_dir / "plain.png").read_bytes()
    for name in ["gray", "alpha", "palette", "deep"]:
        assert found[f"{name}.png"] != (mixed_dir / f"{name}.png").read_bytes()
        stored = Image.open(io.BytesIO(found[f"{name}.png"]))
        assert stored.mode == "RGB" and stored.info.get("transparency") is None
        expected = np.asarray(Image.open(mixed_dir / f"{name}.png").convert("RGB"))
        np.testing.assert_array_equal(np.asarray(stored), expected)
    assert meta["deep"]["width"] == 5 and meta["deep"]["height"] == 4


def test_workers_give_byte_identical_shards(mixed_dir: Path, tmp_path: Path, capsys) -> None:
    for i in range(12):  # enough files for several chunks per worker
        random_image(10 + i, (8 + i, 9)).save(mixed_dir / f"extra{i:02d}.png")
    runs = {}
    for workers in [1, 2, 3]:
        out = tmp_path / f"w{workers}"
        args = ["shard", "--src", str(mixed_dir), "--out", str(out), "--label", "real"]
        main([*args, "--source", "mix", "--max-count", "5", "--workers", str(workers)])
        err = capsys.readouterr().err
        broken = mixed_dir / "sub" / "broken.png"
        assert err.count("cannot decode") == 1 and f"skipped {broken}: cannot decode" in err
        assert "skipped 1 of 20 images that cannot be decoded" in err
        runs[workers] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert len([name for name in runs[1] if name.endswith(".tar")]) == 4
    assert runs[1] == runs[2] == runs[3]  # same shards, same manifest (sha256 included)


def test_workers_must_be_positive(photo_dir: Path, tmp_path: Path, capsys) -> None:
    args = ["shard", "--src", str(photo_dir), "--out", str(tmp_path / "o"), "--label", "real"]
    with pytest.raises(SystemExit):
        main([*args, "--source", "x", "--workers", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["qdd-cli shard: error: --workers 0 is not a worker count: pass 1 or more"]
    assert not (tmp_path / "o").exists()


def test_samples_written_from_pixels_say_png(tmp_path: Path) -> None:
    """What `qdd-cli generate` writes (pixels, no source file) is recorded as PNG."""
    meta = make_meta(1, "sd3", generator="sd3", precision="fp4")
    with ShardWriter(tmp_path / "s") as writer:
        writer.write("k0", random_image(0, (8, 8)), meta)
        writer.write("k1", random_image(1, (8, 8)), {**meta, "source_format": "jpeg"})
    found = members(tmp_path / "s")
    assert json.loads(found["k0.json"])["source_format"] == "png"
    assert json.loads(found["k0.json"])["jpeg_quality"] is None
    assert json.loads(found["k1.json"])["source_format"] == "jpeg"  # the caller's word wins
