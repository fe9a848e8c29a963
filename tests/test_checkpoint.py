"""A fit checkpoint as one input (issue 21, findings 3, 4 and 8): which value wins, and the
overlap rules of every stage that evaluates; unreadable validation images at setup."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from jsonargparse import Namespace

from qdd.checkpoint import read_checkpoint
from qdd.datamodules.shard import ShardDataModule
from qdd.errors import QddError
from tests.conftest import write_fake_shards

CLIPD_PRESET = {"backbone": "ViT-L-14", "backbone_weights": "commonpool_xl_s13b_b90k"}
TINY = {"backbone": "qdd-tiny-vit", "backbone_weights": None}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    write_fake_shards(root / "real-x", [40], "x", None, label=0, size=(8, 8))
    write_fake_shards(root / "g-fp4", [40], "g", "fp4", size=(8, 8))
    return root


@pytest.fixture(scope="module")
def start(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a fit with the default fractions stores (Lightning's key: the class name)."""
    fit = ShardDataModule(str(shards / "*"))
    fit.setup("fit")
    path = tmp_path_factory.mktemp("start") / "a.ckpt"
    torch.save({"ShardDataModule": fit.state_dict()}, path)
    return path


def test_fine_tune_validation_excludes_the_start_checkpoints_training_data(shards, start):
    """Finding 3: ``fit --weights A.ckpt --data.val_fraction=0.5`` validated on A's
    training images (75 of 94) and reported train_overlap null."""
    wider = ShardDataModule(str(shards / "*"), val_fraction=0.5, checkpoint=str(start))
    with pytest.raises(QddError) as error:
        wider.setup("fit")
    message = str(error.value)
    assert "\n" not in message and str(start) in message
    assert "validation images of this fit" in message and "--data.val_fraction=0.1" in message
    counted = ShardDataModule(
        str(shards / "*"), val_fraction=0.5, checkpoint=str(start), allow_train_overlap=True
    )
    counted.setup("fit")
    assert counted.train_overlap and counted.train_overlap > 0
    assert counted.describe()["train_overlap"] == counted.train_overlap
    same = ShardDataModule(str(shards / "*"), checkpoint=str(start))
    same.setup("fit")
    assert same.train_overlap == 0 and len(same.split["val"]) > 0  # checked: 0, not None


def test_validate_refusal_names_the_fix_for_validate(shards, start):
    """Finding 8: validate's refusal suggested --data.split=test, which validate ignores."""
    data = ShardDataModule(str(shards / "*"), val_fraction=0.5, checkpoint=str(start))
    with pytest.raises(QddError) as error:
        data.setup("validate")
    message = str(error.value)
    assert "--data.split" not in message and "--data.val_fraction=0.1" in message
    clean = ShardDataModule(str(shards / "*"), checkpoint=str(start))
    clean.setup("validate")
    assert clean.train_overlap == 0


def test_unreadable_validation_images_are_found_at_setup(tmp_path: Path, caplog):
    """Finding 8: a validation split whose real images do not decode passed the one-class
    check at setup; the fit failed after an epoch, naming val_fraction."""
    write_fake_shards(tmp_path / "real-x", [40], "x", None, label=0, size=(8, 8))
    write_fake_shards(tmp_path / "g-fp4", [40], "g", "fp4", size=(8, 8))
    data = ShardDataModule(str(tmp_path / "*"))
    data.setup("fit")
    real_val = [s for s in data.split["val"] if s.label == 0]
    assert len(real_val) > 1

    def corrupt(sample) -> None:  # break the PNG's signature, in place (sizes unchanged)
        with open(sample.entry.shard, "r+b") as handle:
            handle.seek(sample.entry.png[0])
            handle.write(b"NOTAPNG!")

    corrupt(real_val[0])  # one, beside readable images of both classes: named, not refused
    ShardDataModule(str(tmp_path / "*")).setup("fit")
    assert "1 unreadable" in caplog.text and real_val[0].entry.key in caplog.text
    for sample in real_val[1:]:
        corrupt(sample)
    with pytest.raises(QddError) as error:
        ShardDataModule(str(tmp_path / "*")).setup("fit")
    message = str(error.value)
    assert "\n" not in message and "only fake readable images" in message
    assert f"{len(real_val)} unreadable" in message and real_val[0].entry.key in message


def model_config(detector_args: dict, **rest) -> Namespace:
    values = {"detector": "clipd", "weights": None, "random_weights": False, "lr": None,
              "threshold": 0.0, "calibration": "balanced_acc"}  # fmt: skip
    return Namespace(**{**values, **rest}, detector_args=dict(detector_args))


@pytest.fixture()
def clipd_ckpt(tmp_path: Path) -> Path:
    """A clipd fit checkpoint's hyperparameters, as `DetectorModule` saves them."""
    path = tmp_path / "c.ckpt"
    hparams = {"detector": "clipd", "weights": None, "random_weights": True,
               "detector_args": TINY, "lr": 0.01, "threshold": 0.0,
               "calibration": "balanced_acc"}  # fmt: skip
    torch.save({"hyper_parameters": hparams, "state_dict": {}}, path)
    return path


@pytest.mark.parametrize("flag", ["--ckpt_path", "--weights"])
def test_the_checkpoints_architecture_is_never_replaced_by_a_preset(clipd_ckpt, flag):
    """Finding 4: ``--detector clipd --ckpt_path C.ckpt`` built the preset's ViT-L-14."""
    start = read_checkpoint(clipd_ckpt)
    model = model_config(CLIPD_PRESET)  # what --detector clipd's preset parses to
    start.resolve_model(model, {"detector": "clipd", "detector_args": CLIPD_PRESET}, flag, "test")
    assert model.detector_args == TINY
    if flag == "--ckpt_path":
        assert model.weights == str(clipd_ckpt) and model.lr == 0.01  # checkpoint > defaults
    mine = {"backbone": "ViT-B-16", "backbone_weights": "openai"}
    with pytest.raises(QddError) as error:
        start.resolve_model(
            model_config(mine), {"detector": "clipd", "detector_args": mine}, flag, "test"
        )
    message = str(error.value)
    assert "\n" not in message and "ViT-B-16" in message and "qdd-tiny-vit" in message


def test_your_flags_win_over_the_checkpoint_and_presets(clipd_ckpt):
    start = read_checkpoint(clipd_ckpt)
    model = model_config(CLIPD_PRESET, lr=0.5, threshold=1.5)
    given = {"detector_args": CLIPD_PRESET, "lr": 0.5, "threshold": 1.5}
    start.resolve_model(model, given, "--ckpt_path", "test")
    assert (model.lr, model.threshold, model.detector) == (0.5, 1.5, "clipd")
    with pytest.raises(QddError, match="holds a clipd detector, not npr"):
        start.resolve_model(model_config({}), {"detector": "npr"}, "--ckpt_path", "test")
    with pytest.raises(QddError, match="--ckpt_path .* does not exist"):
        read_checkpoint(clipd_ckpt.with_name("missing.ckpt"), "--ckpt_path")
    official = clipd_ckpt.with_name("official.ckpt")
    torch.save({"fc.weight": torch.zeros(1, 4)}, official)  # weights, no hyperparameters
    with pytest.raises(QddError, match="not a `qdd-cli fit` checkpoint"):
        read_checkpoint(official).resolve_model(model_config({}), {}, "--weights", "test")


def test_fine_tune_reports_train_overlap_in_metrics_json(tmp_path: Path, capsys):
    """Done-when of issue 21: a fine-tune from A.ckpt reports ``train_overlap: 0`` for its
    validation split, or refuses in one line."""
    import json

    from qdd.cli import main
    from qdd.detectors.tiny import tiny_detector_args

    write_fake_shards(tmp_path / "shards" / "real-x", [40], "x", None, label=0, size=(48, 48))
    write_fake_shards(tmp_path / "shards" / "g-fp4", [40], "g", "fp4", size=(48, 48))
    common = ["--detector", "npr", "--data", str(tmp_path / "shards" / "*"), "--data.batch_size=16",
              "--model.detector_args", json.dumps(tiny_detector_args("npr")),
              "--trainer.max_epochs=1", "--trainer.accelerator=cpu", "--data.num_workers=0",
              "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false"]  # fmt: skip
    main(["fit", *common, "--random-weights", "--out", str(tmp_path / "a")])
    start = json.loads((tmp_path / "a" / "metrics.json").read_text())["last_checkpoint"]
    main(["fit", *common, "--weights", start, "--out", str(tmp_path / "b")])
    tuned = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert tuned["train_overlap"] == 0 and tuned["data"]["checkpoint"] == start
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *common, "--weights", start, "--data.val_fraction=0.5",
              "--out", str(tmp_path / "c")])  # fmt: skip
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "validation images of this fit" in error and start in error
    assert not (tmp_path / "c" / "metrics.json").exists()


def test_a_runtime_argument_is_taken_whatever_the_checkpoint_stored() -> None:
    """SPAI's tile_batch batches its ViT passes (memory only): a checkpoint that did not
    store it takes any value; an argument that changes the logits is still refused."""
    from types import SimpleNamespace

    from qdd.checkpoint import FitCheckpoint

    stored = SimpleNamespace(weight_files={}, calibration_only=False, path="spai-fit.ckpt")
    saved = {"detector": "spai", "detector_args": {}}
    args = FitCheckpoint._detector_args(stored, saved, {"detector_args": {"tile_batch": 8}},
                                        {}, "--ckpt_path")  # fmt: skip
    assert args["tile_batch"] == 8
    with pytest.raises(QddError, match="minimum_tiles=4"):
        FitCheckpoint._detector_args(stored, saved, {"detector_args": {"minimum_tiles": 2}},
                                     {}, "--ckpt_path")  # fmt: skip
