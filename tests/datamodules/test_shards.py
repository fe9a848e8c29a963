"""Writer, reader and `qdd-cli shard`: round trip, bad inputs, refusing to clobber."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from qdd.cli import main
from qdd.datamodules.dataset import Sample, ShardDataset, Skipped
from qdd.datamodules.folder import find_images, unique_key
from qdd.datamodules.reader import index_folders, read_manifest, resolve_folders
from qdd.datamodules.schema import make_meta
from qdd.datamodules.writer import ShardWriter, existing_keys, write_manifest
from qdd.errors import QddError
from tests.conftest import random_image, write_fake_shards


def read_all(folder: Path) -> dict[str, tuple[np.ndarray, int, dict]]:
    entries, _ = index_folders(resolve_folders(folder))
    return {
        item.meta["key"]: (item.images[0].permute(1, 2, 0).numpy(), item.label, item.meta)
        for item in ShardDataset(entries)
        if isinstance(item, Sample)
    }


def datamodule_on(paths: Path, world_size: int = 1, rank: int = 0, **options) -> Any:
    """A `ShardDataModule` as the trainer of one DDP rank would see it (no model)."""
    from qdd.datamodules.shard import ShardDataModule

    datamodule = ShardDataModule(str(paths), **options)
    datamodule.trainer = SimpleNamespace(
        world_size=world_size,
        global_rank=rank,
        num_devices=world_size,
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
        lightning_module=None,
    )
    datamodule.setup("test")
    return datamodule


def test_shard_cli_round_trip(photo_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "shards"
    main(
        [
            "shard",
            "--src",
            str(photo_dir),
            "--out",
            str(out),
            "--label",
            "real",
            "--source",
            "mine",
            "--max-count",
            "2",
        ]
    )
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total"] == 4 and manifest["groups"] == {"real/mine": 4}
    assert [s["name"] for s in manifest["shards"]] == ["shard-000000.tar", "shard-000001.tar"]
    samples = read_all(out)
    taken: set[str] = set()
    for path in find_images(photo_dir):
        key = unique_key(path.relative_to(photo_dir), taken)
        pixels, label, meta = samples[key]
        expected = np.asarray(Image.open(path).convert("RGB"))
        np.testing.assert_array_equal(pixels, expected)
        assert label == 0 and meta["source"] == "mine" and meta["generator"] == ""
    assert "c_v2" in samples  # the dot in the file name is not in the key


def test_refuses_to_clobber_then_overwrites(photo_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "shards"
    args = ["shard", "--src", str(photo_dir), "--out", str(out), "--label", "real", "--source", "x"]
    main(args)
    before = (out / "manifest.json").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0]
    assert (out / "manifest.json").read_bytes() == before  # nothing lost
    main([*args, "--overwrite"])
    assert (out / "manifest.json").read_bytes() == before  # deterministic output


def test_undecodable_images_are_reported_and_skipped(photo_dir, tmp_path, capsys) -> None:
    (photo_dir / "broken.jpg").write_bytes(b"not an image at all")
    out = tmp_path / "shards"
    main(["shard", "--src", str(photo_dir), "--out", str(out), "--label", "real", "--source", "x"])
    err = capsys.readouterr().err
    assert f"skipped {photo_dir / 'broken.jpg'}: cannot decode" in err
    assert json.loads((out / "manifest.json").read_text())["total"] == 4


def test_shard_cli_errors_are_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    for src in [tmp_path / "empty", tmp_path / "missing"]:
        with pytest.raises(SystemExit):
            main(
                [
                    "shard",
                    "--src",
                    str(src),
                    "--out",
                    str(tmp_path / "o"),
                    "--label",
                    "real",
                    "--source",
                    "x",
                ]
            )
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("qdd-cli shard: error:")


def test_skimage_photographs_round_trip(tmp_path: Path) -> None:
    """Every pixel of scikit-image's bundled photographs survives shard → DataModule."""
    import skimage

    from qdd.datamodules.shard import ShardDataModule

    src = Path(skimage.__file__).parent / "data"
    out = tmp_path / "real-skimage"
    main(["shard", "--src", str(src), "--out", str(out), "--label", "real", "--source", "skimage"])
    datamodule = ShardDataModule(str(out), batch_size=1, num_workers=2)
    datamodule.setup("test")
    taken: set[str] = set()
    paths = {unique_key(p.relative_to(src), taken): p for p in find_images(src)}
    seen = 0
    for image, _label, meta in datamodule.test_dataloader():
        for i, key in enumerate(meta["key"]):
            expected = np.asarray(Image.open(paths[key]).convert("RGB"))
            np.testing.assert_array_equal(image[i].permute(1, 2, 0).numpy(), expected)
            seen += 1
    # PIL cannot read skimage's multipage_rgb.tif: it is reported and skipped, the rest land.
    assert seen == len(paths) - 1 > 20


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize(("num_workers", "batch_size"), [(0, 2), (2, 2), (3, 4)])
def test_each_sample_exactly_once(tmp_path: Path, world_size, num_workers, batch_size) -> None:
    """The DataModule's test loaders of all ranks together yield every key once."""
    keys = write_fake_shards(tmp_path / "s", [5, 1, 7], size=(8, 8))
    seen: list[str] = []
    for rank in range(world_size):
        datamodule = datamodule_on(
            tmp_path / "s", world_size, rank, num_workers=num_workers, batch_size=batch_size
        )
        assert datamodule.groups == {"sd3/fp4": 13} and datamodule.expected == 13
        loader = datamodule.test_dataloader()
        batches = list(loader)
        assert len(batches) == len(loader)  # Lightning stops at len(): it must be exact
        rank_keys = [k for _, _, meta in batches for k in meta["key"]]
        assert rank_keys
        seen += rank_keys
    assert sorted(seen) == sorted(keys)


def test_more_processes_than_samples_is_an_error(tmp_path: Path) -> None:
    write_fake_shards(tmp_path / "s", [2], size=(8, 8))
    with pytest.raises(QddError, match="2 samples for 3 processes"):
        datamodule_on(tmp_path / "s", world_size=3).test_dataloader()


def test_training_loader_reshuffles_each_epoch(tmp_path: Path) -> None:
    write_fake_shards(tmp_path / "s" / "fake", [5, 9], size=(8, 8))
    write_fake_shards(tmp_path / "s" / "real", [6], "x", label=0, size=(8, 8))
    datamodule = datamodule_on(tmp_path / "s" / "*", batch_size=3, num_workers=2, val_fraction=0.2)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    epochs = [[k for _, _, meta in loader for k in meta["key"]] for _ in range(2)]
    train_keys = [s.entry.key for s in datamodule.split["train"]]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(train_keys)  # each once per epoch
    assert epochs[0] != epochs[1]
    again = datamodule_on(tmp_path / "s" / "*", batch_size=3, num_workers=2, val_fraction=0.2)
    again.setup("fit")
    assert [k for _, _, meta in again.train_dataloader() for k in meta["key"]] == epochs[0]


def test_default_workers_follow_the_cores(monkeypatch) -> None:
    from qdd.datamodules import loaders as shard

    monkeypatch.setattr(shard, "usable_cores", lambda: 16)
    assert shard.default_num_workers("gpu") == 15
    assert shard.default_num_workers("gpu", processes_per_node=4) == 3
    assert shard.default_num_workers("cpu") == 2
    assert shard.default_num_workers("cpu", processes_per_node=2) == 1
    monkeypatch.setattr(shard, "usable_cores", lambda: 4)
    assert shard.default_num_workers("cpu") == 0 and shard.default_num_workers("gpu") == 3
    monkeypatch.setattr(shard, "usable_cores", lambda: 1)
    assert shard.default_num_workers("gpu") == shard.default_num_workers("cpu") == 0


def test_empty_and_unmanifested_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(QddError, match="no shards in"):
        read_manifest(tmp_path / "empty")
    write_fake_shards(tmp_path / "s", [2], size=(8, 8))
    (tmp_path / "s" / "manifest.json").unlink()
    with pytest.raises(QddError, match="no manifest.json"):
        read_manifest(tmp_path / "s")
    with pytest.raises(QddError, match="no shard folder matches"):
        resolve_folders(str(tmp_path / "nothing-*"))


def test_truncated_shard_is_an_error(tmp_path: Path) -> None:
    write_fake_shards(tmp_path / "s", [3], size=(8, 8))
    shard = tmp_path / "s" / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:700])
    with pytest.raises(QddError, match="truncated"):
        index_folders([tmp_path / "s"])


def _tar_with(folder: Path, members: dict[str, bytes]) -> None:
    folder.mkdir()
    with tarfile.open(folder / "shard-000000.tar", "w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    write_manifest(folder)


def test_corrupt_png_and_missing_json_are_named_skips(tmp_path: Path) -> None:
    good = io.BytesIO()
    random_image(0, (8, 8)).save(good, format="PNG")
    meta = json.dumps(make_meta(0, "x")).encode()
    _tar_with(
        tmp_path / "s",
        {
            "good.png": good.getvalue(),
            "good.json": meta,
            "bad.png": b"\x89PNG garbage",
            "bad.json": meta,
            "lonely.png": good.getvalue(),
        },
    )
    assert read_manifest(tmp_path / "s")["total"] == 3
    samples = read_all(tmp_path / "s")
    assert list(samples) == ["good"]
    entries, _ = index_folders([tmp_path / "s"])
    skipped = {item.key: item.error for item in ShardDataset(entries) if isinstance(item, Skipped)}
    assert skipped.keys() == {"bad", "lonely"}
    assert skipped["lonely"] == "no .json member" and "cannot decode" in skipped["bad"]


def test_resume_drops_partial_shard(tmp_path: Path) -> None:
    out = tmp_path / "s"
    meta = make_meta(1, "sd3", generator="sd3", precision="fp4")
    with pytest.raises(RuntimeError):
        with ShardWriter(out, prefix="r0", max_count=2) as writer:
            for i in range(3):
                writer.write(f"k{i}", random_image(i, (8, 8)), meta)
            raise RuntimeError("killed")
    assert existing_keys(out) == {"k0", "k1"}
    assert list(out.glob("*.partial"))
    with ShardWriter(out, prefix="r0", max_count=2, mode="append") as writer:
        writer.write("k2", random_image(2, (8, 8)), meta)
    assert not list(out.glob("*.partial"))
    assert write_manifest(out)["total"] == 3


def test_webdataset_reads_our_shards(tmp_path: Path) -> None:
    import webdataset as wds

    keys = write_fake_shards(tmp_path / "s", [3], size=(8, 8))
    dataset = wds.WebDataset(str(tmp_path / "s" / "shard-000000.tar"), shardshuffle=False)
    samples = list(dataset.decode("pil"))
    assert [s["__key__"] for s in samples] == keys
    assert samples[0]["json"]["precision"] == "fp4" and samples[0]["png"].size == (8, 8)


def test_svdq_samples_from_before_calibrated_smoothing_read_as_datafree(tmp_path: Path) -> None:
    """Before calibrated smoothing, ``svdq-int4`` meant the data-free construction (now
    ``svdq-int4-datafree``): such samples (no ``smoothing`` record) are read under today's
    name everywhere — manifest, readers, groups — never pooled with calibrated ones."""
    from qdd.datamodules.reader import index_folders, read_meta
    from qdd.datamodules.schema import make_meta
    from qdd.datamodules.writer import ShardWriter, write_manifest
    from qdd.identity import group_label

    with ShardWriter(tmp_path / "old") as writer:
        writer.write("p00000-s0", random_image(0), make_meta(1, "sd3", generator="sd3",
                     precision="svdq-int4", quant_backend="emulate"))  # fmt: skip
        writer.write("p00001-s1", random_image(1), make_meta(1, "sd3", generator="sd3",
                     precision="svdq-int4", quant_backend="emulate",
                     smoothing={"kind": "calibrated"}))  # fmt: skip
    write_manifest(tmp_path / "old")
    entries, groups = index_folders([tmp_path / "old"])
    assert groups == {"sd3/svdq-int4-datafree": 1, "sd3/svdq-int4": 1}
    metas = {e.key: read_meta(e) for e in entries}
    assert metas["p00000-s0"]["precision"] == "svdq-int4-datafree"
    assert metas["p00000-s0"]["precision_recorded"] == "svdq-int4"
    assert group_label(metas["p00001-s1"]) == "sd3/svdq-int4"
