"""WebDataset tars written elsewhere (``webdataset.ShardWriter``, no qdd manifest) enter qdd."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qdd.cli import main
from qdd.datamodules.reader import read_manifest
from tests.conftest import random_image, write_fake_shards
from tests.datamodules.test_shards import read_all


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.fixture
def foreign(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Two tars from `webdataset.ShardWriter`: JPEG + json, PNG + cls, WebP, a JPEG that does
    not decode, a sample without an image, a key with a folder and dots; returns the folder
    and the pixels each converted key must hold."""
    import webdataset as wds

    src = tmp_path / "laion"
    src.mkdir()
    images = {i: random_image(i, (24, 20)) for i in range(4)}
    samples = [
        {"__key__": "000000", "jpg": encoded(images[0], "JPEG", quality=85), "json": {"c": "a"}},
        {"__key__": "000001", "png": encoded(images[1], "PNG"), "cls": 3},
        {"__key__": "000002", "webp": encoded(images[2], "WEBP", lossless=True), "cls": 1},
        {"__key__": "000003", "jpg": b"\xff\xd8 not a jpeg", "json": {"c": "b"}},
        {"__key__": "000004", "json": {"c": "no image"}},
        {"__key__": "dir/img.v2", "png": encoded(images[3], "PNG"), "json": {}},
    ]
    with wds.ShardWriter(str(src / "part-%03d.tar"), maxcount=3, verbose=0) as writer:
        for sample in samples:
            writer.write(sample)
    jpeg = np.asarray(Image.open(io.BytesIO(samples[0]["jpg"])).convert("RGB"))
    expected = {
        "000000": jpeg,
        "000001": np.asarray(images[1]),
        "000002": np.asarray(images[2]),
        "dir_img_v2": np.asarray(images[3]),
    }
    return src, expected


def test_shard_converts_foreign_tars_with_provenance(foreign, tmp_path: Path, capsys) -> None:
    src, expected = foreign
    out = tmp_path / "real-laion"
    main(["shard", "--src", str(src), "--out", str(out), "--label", "real", "--source", "laion"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    manifest = read_manifest(out)
    assert manifest["total"] == 4 and manifest["groups"] == {"real/laion": 4}
    assert manifest["formats"] == {"real/laion": {"jpeg": 1, "png": 2, "webp": 1}}
    samples = read_all(out)
    assert set(samples) == set(expected)
    for key, pixels in expected.items():
        np.testing.assert_array_equal(samples[key][0], pixels)
        assert samples[key][1] == 0
    _, meta = read_meta(out, "000000")
    assert meta["source_format"] == "jpeg" and meta["jpeg_quality"] == 85
    assert (meta["source_tar"], meta["source_key"]) == ("part-000.tar", "000000")
    _, meta = read_meta(out, "dir_img_v2")
    assert meta["source_key"] == "dir/img" and meta["path"] == "part-001.tar/dir/img.v2.png"


def read_meta(folder: Path, key: str) -> tuple[str, dict]:
    import tarfile

    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            if f"{key}.json" in tar.getnames():
                return shard.name, json.loads(tar.extractfile(f"{key}.json").read())
    raise KeyError(key)


def test_undecodable_members_are_named(foreign, tmp_path: Path, capsys) -> None:
    src, _ = foreign
    main(["shard", "--src", str(src), "--out", str(tmp_path / "o"), "--label", "real",
          "--source", "laion"])  # fmt: skip
    err = capsys.readouterr().err
    assert "skipped part-001.tar/000003.jpg: cannot decode" in err
    assert "skipped part-001.tar/000004: no image member" in err
    assert "skipped 2 of 6 samples" in err


def test_test_on_foreign_tars_says_to_convert_them(foreign, tmp_path: Path, capsys) -> None:
    """Not a claim that a run was interrupted: one line naming the converting command."""
    src, _ = foreign
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--detector", "npr", "--random-weights", "--data", str(src)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"qdd-cli shard --src {src}" in err[0] and "interrupted" not in err[0]


def test_an_interrupted_qdd_run_keeps_its_message(tmp_path: Path) -> None:
    from qdd.errors import QddError

    write_fake_shards(tmp_path / "s", [2], size=(8, 8))
    (tmp_path / "s" / "manifest.json").unlink()
    with pytest.raises(QddError, match="the run that wrote it was interrupted"):
        read_manifest(tmp_path / "s")
