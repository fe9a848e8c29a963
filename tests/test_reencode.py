"""``--data.reencode``: JPEG re-encoding that removes the JPEG-vs-PNG confound."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from qdd.datamodules.folder import shard_folder
from qdd.datamodules.schema import REAL
from qdd.errors import QddError
from qdd.perturb import parse
from qdd.reencode import MATCH, build_reencoder, check_spec
from tests.conftest import random_image, write_fake_shards

FAKE_PNG = {"label": 1, "source_format": "png"}


@pytest.mark.parametrize(("spec", "canonical"), [(" MATCH ", "match"), ("jpeg:75.0", "jpeg:75")])
def test_check_spec(spec: str, canonical: str) -> None:
    assert check_spec(spec) == canonical


@pytest.mark.parametrize("spec", ["png", "jpeg:0", "jpeg", "match:1", "blur:1", ""])
def test_bad_specs_are_one_line(spec: str) -> None:
    with pytest.raises(QddError, match="jpeg:Q .* or match") as error:
        check_spec(spec)
    assert "\n" not in str(error.value) and repr(spec) in str(error.value)


def test_jpeg_q_reencodes_both_classes() -> None:
    reencoder = build_reencoder("jpeg:60", [])
    image = random_image(0, (16, 16))
    for meta in [{"label": 0, "source_format": "jpeg"}, FAKE_PNG]:
        assert reencoder.quality("k", meta) == 60
        assert (
            reencoder.apply(image, "k", meta).tobytes()
            == parse("jpeg:60").apply(image, "k").tobytes()
        )


def test_match_draws_fake_qualities_from_the_reals() -> None:
    reals = [{"label": 0, "source_format": "jpeg", "jpeg_quality": q} for q in (70, 90, 90)]
    reals.append({"label": 0, "source_format": "png", "jpeg_quality": None})
    reencoder = build_reencoder("match", [*reals, FAKE_PNG])  # fakes do not enter the pool
    assert reencoder.qualities == (70, 90, 90, None)
    drawn = Counter(reencoder.quality(f"p{i:05d}", FAKE_PNG) for i in range(2000))
    assert set(drawn) == {70, 90, None}
    assert 0.45 < drawn[90] / 2000 < 0.55 and 0.2 < drawn[70] / 2000 < 0.3
    # per key: twins at other precisions share the key, hence the quality
    twin = {**FAKE_PNG, "precision": "fp4"}
    assert [reencoder.quality(f"p{i}", FAKE_PNG) for i in range(50)] == [
        reencoder.quality(f"p{i}", twin) for i in range(50)
    ]
    # reals and fakes that already were JPEGs are left as decoded
    image = random_image(0, (16, 16))
    assert reencoder.quality("p00001", reals[0]) is None
    assert reencoder.apply(image, "k", {"label": 1, "source_format": "jpeg"}) is image


def test_match_needs_recorded_reals() -> None:
    with pytest.raises(QddError, match="needs real samples"):
        build_reencoder("match", [FAKE_PNG])
    with pytest.raises(QddError, match="1 of 2 real samples do not record"):
        build_reencoder("match", [{"label": 0, "source_format": "png"}, {"label": 0}])


def test_datamodule_matches_fakes_to_sharded_jpegs(tmp_path: Path) -> None:
    """Shard real JPEGs, add PNG fakes: with match, fakes carry JPEG artefacts, reals do not."""
    from qdd.datamodules.dataset import Sample, ShardDataset
    from qdd.datamodules.shard import ShardDataModule

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(4):
        random_image(i, (24, 24)).save(photos / f"{i}.jpg", quality=80)
    shard_folder(photos, tmp_path / "real", label=REAL, source="cam", workers=1)
    write_fake_shards(tmp_path / "fake", [6], size=(24, 24))
    plain = ShardDataModule([str(tmp_path / "real"), str(tmp_path / "fake")], num_workers=0)
    plain.setup("test")
    datamodule = ShardDataModule(
        [str(tmp_path / "real"), str(tmp_path / "fake")], num_workers=0, reencode=MATCH
    )
    datamodule.setup("test")
    assert datamodule.reencoder is not None and set(datamodule.reencoder.qualities) == {80}
    stored = ShardDataset(plain.entries)
    matched = ShardDataset(datamodule.entries, reencode=datamodule.reencoder)
    for index in range(len(stored)):
        before, after = stored[index], matched[index]
        assert isinstance(before, Sample) and isinstance(after, Sample)
        same = np.array_equal(before.images[0].numpy(), after.images[0].numpy())
        assert same == (before.label == 0), before.meta["key"]
    with pytest.raises(QddError, match="not a re-encoding"):
        ShardDataModule(str(tmp_path / "real"), reencode="webp:50")


def test_metrics_record_the_reencoding(tmp_path: Path) -> None:
    from qdd.cli import main

    write_fake_shards(tmp_path / "fake", [3], size=(16, 16))
    write_fake_shards(tmp_path / "real", [3], "cam", label=0, size=(16, 16))
    out = tmp_path / "run"
    main(
        [
            "test",
            "--detector",
            "npr",
            "--random-weights",
            "--data",
            str(tmp_path / "fake"),
            "--data",
            str(tmp_path / "real"),
            "--data.reencode=jpeg:50",
            "--out",
            str(out),
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            "--trainer.logger=false",
        ]
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reencode"] == "jpeg:50" and metrics["n"] == 6
    assert metrics["formats"] == {"real/cam": {"png": 3}, "sd3/fp4": {"png": 3}}
