"""One split rule for fit and test; split settings in the checkpoint, checked at test (bug 3);
misspelt held-out generators (bug 4); a one-class validation split (bug 5)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer

from qdd.checkpoint import read_checkpoint
from qdd.datamodules.shard import ShardDataModule, Source
from qdd.datamodules.split import identities
from qdd.errors import QddError
from tests.conftest import write_fake_shards


class MeanColour(LightningModule):
    """The smallest detector: a linear layer on each image's mean colour."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layer(images.float().mean((2, 3)) / 255).squeeze(1)

    def training_step(self, batch, _index) -> torch.Tensor:
        images, labels, _ = batch
        return F.binary_cross_entropy_with_logits(self(images), labels.float())

    def validation_step(self, batch, _index) -> None:
        self(batch[0])

    def test_step(self, batch, _index) -> None:
        self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer(root: Path) -> Trainer:
    return Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("split")
    write_fake_shards(root / "real-x", [30], "x", None, label=0, size=(8, 8))
    write_fake_shards(root / "sd3-fp4", [30], "sd3", "fp4", size=(8, 8))
    return root


@pytest.fixture(scope="module")
def fitted(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Lightning fit on every folder (their train split): its checkpoint."""
    root = tmp_path_factory.mktemp("fit")
    fit = trainer(root)
    fit.fit(MeanColour(), datamodule=ShardDataModule(str(shards / "*"), batch_size=8))
    return Path(fit.checkpoint_callback.best_model_path)


def test_fit_checkpoint_stores_the_split_and_the_trained_units(shards, fitted) -> None:
    saved = torch.load(fitted, map_location="cpu", weights_only=True)
    state = saved["ShardDataModule"]  # Lightning's key: the data module's __qualname__
    assert (state["val_fraction"], state["test_fraction"]) == (0.1, 0.2)
    assert state["holdout_generators"] == []
    data = ShardDataModule(str(shards / "*"))
    data.setup("fit")
    units = {s.unit for s in data.split["train"]}
    assert state["n_train_units"] == len(units) == len(state["train_units"])
    assert torch.equal(state["train_units"], identities(data.split["train"]))
    assert torch.equal(read_checkpoint(fitted).trained_units(), state["train_units"])


def test_testing_on_the_training_data_is_refused_in_one_line(shards, fitted) -> None:
    """Bug 3: ``test --data shards/* --ckpt_path FIT`` tested on the fit's training images."""
    data = ShardDataModule(str(shards / "*"), checkpoint=str(fitted))
    with pytest.raises(QddError) as error:
        data.setup("test")
    message = str(error.value)
    assert "\n" not in message and str(fitted) in message
    assert "--data.split=test" in message and "allow_train_overlap" in message
    # the held-out split with the checkpoint's fractions: nothing trained on
    held_out = ShardDataModule(str(shards / "*"), split="test", checkpoint=str(fitted))
    held_out.setup("test")
    assert held_out.train_overlap == 0 and held_out.expected == len(held_out.entries) > 0
    # other fractions put training images in the test split: refused too
    wider = ShardDataModule(
        str(shards / "*"), split="test", test_fraction=0.5, checkpoint=str(fitted)
    )
    with pytest.raises(QddError, match="share a prompt"):
        wider.setup("test")


def test_overlap_on_purpose_is_counted(shards, fitted) -> None:
    data = ShardDataModule(str(shards / "*"), checkpoint=str(fitted), allow_train_overlap=True)
    data.setup("test")
    reference = ShardDataModule(str(shards / "*"))
    reference.setup("fit")
    assert data.train_overlap == len(reference.split["train"]) > 0
    assert data.describe()["train_overlap"] == data.train_overlap
    assert data.expected == 60  # split: all, every image


def test_ckpt_path_alone_is_checked_when_lightning_restores(shards, fitted, tmp_path) -> None:
    """``trainer.test(ckpt_path=...)`` hands the stored split to load_state_dict: checked
    even when ``checkpoint`` was not passed."""
    with pytest.raises(QddError, match="share a prompt"):
        trainer(tmp_path).test(
            MeanColour(), datamodule=ShardDataModule(str(shards / "*")), ckpt_path=fitted
        )
    with pytest.raises(QddError, match="test_fraction=0.2"):  # a resumed fit keeps its split
        trainer(tmp_path).fit(
            MeanColour(),
            datamodule=ShardDataModule(str(shards / "*"), test_fraction=0.3),
            ckpt_path=fitted,
        )


def test_fine_tuning_inherits_the_start_checkpoints_units(shards, fitted, tmp_path) -> None:
    """A fit started from a checkpoint has seen that checkpoint's training data as well."""
    write_fake_shards(tmp_path / "g-fp4", [40], "g", "fp4", size=(8, 8))  # 10 new keys
    data = ShardDataModule(
        [str(shards / "real-x"), str(tmp_path / "g-fp4")], checkpoint=str(fitted)
    )
    data.setup("fit")
    start = read_checkpoint(fitted).trained_units()
    stored = data.state_dict()["train_units"]
    assert set(start.tolist()) <= set(stored.tolist())
    assert len(stored) > len(start)


def test_misspelt_holdout_generator_is_one_line(shards) -> None:
    """Bug 4: ``holdout_generators: [SD3]`` held out nothing, silently."""
    for data in (
        ShardDataModule(str(shards / "*"), holdout_generators=["SD3"]),
        ShardDataModule(train=[Source(str(shards / "*"))], holdout_generators=["SD3"]),
    ):
        with pytest.raises(QddError) as error:
            data.setup("fit")
        message = str(error.value)
        assert "\n" not in message and "SD3" in message and "sd3" in message
    # a generator qdd knows but this data lacks is fine (the paper config names them all)
    ShardDataModule(str(shards / "*"), holdout_generators=["flux-dev"]).setup("fit")


def test_one_class_validation_split_fails_at_setup(shards) -> None:
    """Bug 5: a validation split of one class trained a whole epoch before failing."""
    data = ShardDataModule(str(shards / "sd3-fp4"))
    with pytest.raises(QddError) as error:
        data.setup("fit")
    message = str(error.value)
    assert "\n" not in message and "only fake" in message and "real" in message
    only_real_val = ShardDataModule(
        train=[Source(str(shards / "real-x")), Source(str(shards / "sd3-fp4"))],
        val=[str(shards / "real-x")],
    )
    with pytest.raises(QddError, match="only real"):
        only_real_val.setup("fit")


def test_paths_benchmark_every_image_and_test_globs_their_test_split(shards) -> None:
    everything = ShardDataModule(str(shards / "*"))
    everything.setup("test")
    held_out = ShardDataModule(test=[str(shards / "*")])
    held_out.setup("test")
    assert everything.expected == 60 and 0 < held_out.expected < 60
    fit = ShardDataModule(str(shards / "*"))
    fit.setup("fit")
    sides = {
        name: {s.unit for s in samples}
        for name, samples in [*fit.split.items(), ("test", held_out.split["test"])]
    }
    assert not sides["train"] & sides["test"] and not sides["val"] & sides["test"]
    assert not sides["train"] & sides["val"]
    assert len(fit.split["train"]) + len(fit.split["val"]) + held_out.expected == 60
    described = fit.describe()
    assert described["n_train"] == len(fit.split["train"]) and described["sources"] == []
    with pytest.raises(QddError, match="split"):
        ShardDataModule(str(shards / "*"), split="val")  # type: ignore[arg-type]
    with pytest.raises(QddError, match="--data.test"):
        ShardDataModule(str(shards / "*"), test=[str(shards / "*")])


def write_prompted(folder: Path, prompts: list[str], seed: int) -> None:
    """Fakes as `qdd-cli generate` writes them: prompt_id = the prompt's line number."""
    from qdd.datamodules.schema import make_meta
    from qdd.datamodules.writer import ShardWriter, write_manifest
    from tests.conftest import random_image

    with ShardWriter(folder) as writer:
        for prompt_id, prompt in enumerate(prompts):
            meta = make_meta(1, "g", generator="g", precision="fp32", prompt=prompt,
                             prompt_id=prompt_id, seed=seed + prompt_id)  # fmt: skip
            writer.write(
                f"p{prompt_id:05d}-s{seed + prompt_id}", random_image(prompt_id, (8, 8)), meta
            )
    write_manifest(folder)


def test_prompt_sets_that_reuse_ids_are_not_overlap(tmp_path: Path) -> None:
    """A demo's train and test prompt files both count from 0: other prompts, no overlap."""
    write_prompted(tmp_path / "train" / "g-fp32", [f"a photo of thing {i}" for i in range(20)], 0)
    write_fake_shards(tmp_path / "train" / "real-x", [20], "x", None, label=0, size=(8, 8))
    write_prompted(
        tmp_path / "test" / "g-fp32", [f"a drawing of item {i}" for i in range(20)], 1000
    )
    fit = ShardDataModule(str(tmp_path / "train" / "*"))
    fit.setup("fit")
    ckpt = tmp_path / "fit.ckpt"
    torch.save({"ShardDataModule": fit.state_dict()}, ckpt)  # what Lightning stores
    other = ShardDataModule(str(tmp_path / "test" / "*"), checkpoint=str(ckpt))
    other.setup("test")
    assert other.train_overlap == 0 and other.expected == 20
    with pytest.raises(QddError, match="share a prompt"):
        ShardDataModule(str(tmp_path / "train" / "g-fp32"), checkpoint=str(ckpt)).setup("test")
