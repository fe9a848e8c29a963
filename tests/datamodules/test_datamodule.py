"""`ShardDataModule` on shards made by `qdd-cli shard` and `qdd-cli generate`: weighted
sources, the split rule, what a checkpoint stores and a test checks."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from scipy.stats import chisquare

from qdd.datamodules.sampling import DrawDataset, WeightedDrawSampler
from qdd.datamodules.shard import ShardDataModule, Source
from qdd.errors import QddError


def blank(image) -> torch.Tensor:
    """Skip preprocessing: these tests look at which samples are drawn, not at pixels."""
    return torch.zeros(1)


def kind(meta: dict, i: int) -> str:
    return "real" if not meta["generator"][i] else meta["precision"][i]


BLANK = {"train": blank, "eval": blank}


def mix(shards: Path, weights: dict[str, float], **kwargs) -> ShardDataModule:
    paths = {"real": "real-skimage", "fp32": "sd15-fp32", "fp4": "sd15-fp4"}
    sources = [Source(str(shards / paths[n]), w, n) for n, w in weights.items()]
    return ShardDataModule(train=sources, transforms=BLANK, **kwargs)


def drawn(data: ShardDataModule) -> Counter:
    data.setup("fit")
    counts: Counter = Counter()
    for _, _, meta in data.train_dataloader():
        counts.update(kind(meta, i) for i in range(len(meta["key"])))
    return counts


@pytest.mark.parametrize(
    ("balance", "expected"),
    [
        (True, {"real": 0.5, "fp32": 0.125, "fp4": 0.375}),
        (False, {"real": 1 / 3, "fp32": 1 / 6, "fp4": 1 / 2}),
    ],
)
def test_batches_follow_the_mixing_weights(mix_shards: Path, balance: bool, expected) -> None:
    """Chi-square goodness of fit of 3000 drawn samples; p > 0.001 (a 0.1 % false alarm).

    The same counts must reject the other mode's shares (p < 1e-6): the test has power.
    """
    data = mix(
        mix_shards,
        {"real": 2.0, "fp32": 1.0, "fp4": 3.0},
        class_balance=balance,
        samples_per_epoch=3000,
        batch_size=100,
    )
    counts = drawn(data)
    assert sum(counts.values()) == 3000
    names = list(expected)
    observed = [counts[n] for n in names]
    assert chisquare(observed, [3000 * expected[n] for n in names]).pvalue > 1e-3
    other = (
        {"real": 1 / 3, "fp32": 1 / 6, "fp4": 1 / 2}
        if balance
        else {"real": 0.5, "fp32": 0.125, "fp4": 0.375}
    )
    assert chisquare(observed, [3000 * other[n] for n in names]).pvalue < 1e-6
    shares = {s["name"]: s["share"] for s in data.describe()["sources"]}
    assert shares == pytest.approx(expected, abs=1e-5)
    assert data.describe()["class_balance"] is balance


def test_source_weights_override_by_name_and_zero_weight_drops_a_source(mix_shards) -> None:
    data = mix(mix_shards, {"real": 1.0, "fp32": 1.0, "fp4": 1.0}, source_weights={"fp4": 0.0})
    counts = drawn(data)
    assert counts["fp4"] == 0 and counts["fp32"] > 0
    with pytest.raises(QddError, match="fp16"):
        mix(mix_shards, {"real": 1.0, "fp32": 1.0}, source_weights={"fp16": 1.0})


def test_no_prompt_in_two_splits_and_twins_stay_together(mix_shards: Path) -> None:
    data = ShardDataModule(
        train=[Source(str(mix_shards / "*"), 1.0)],
        test=[str(mix_shards / "*")],
        val_fraction=0.25,
        test_fraction=0.25,
    )
    data.setup("fit")
    data.setup("test")
    units = {split: {s.unit for s in data.split[split]} for split in ("train", "val", "test")}
    assert all(units.values())
    assert not units["train"] & units["test"]
    assert not units["train"] & units["val"]
    assert not units["val"] & units["test"]
    prompts = {u for u in units["test"] if u.startswith("prompt:")}
    assert prompts, "some generated prompts must be in the test split"
    # every FP4 image's FP32 twin (same prompt_id, same key) is in the same split
    for split in ("train", "test"):
        keys = Counter((s.generator, s.entry.key) for s in data.split[split] if s.generator)
        assert set(keys.values()) == {2}
    # the test split does not depend on what is trained on
    other = ShardDataModule(
        train=[Source(str(mix_shards / "real-skimage"), 1.0), Source(str(mix_shards / "sd3-fp4"))],
        test=[str(mix_shards / "*")],
        val_fraction=0.25,
        test_fraction=0.25,
    )
    other.setup("test")
    assert [s.entry for s in other.split["test"]] == [s.entry for s in data.split["test"]]


def test_held_out_generator_is_never_trained_or_validated_on(mix_shards: Path) -> None:
    data = ShardDataModule(
        train=[Source(str(mix_shards / "*"), 1.0)],
        test=[str(mix_shards / "*")],
        holdout_generators=["sd3"],
        transforms=BLANK,
        samples_per_epoch=500,
        batch_size=50,
    )
    data.setup("fit")
    assert {s.generator for s in data.split["train"]} == {None, "sd15"}
    assert {s.generator for s in data.split["val"]} <= {None, "sd15"}
    for _, _, meta in data.train_dataloader():
        assert "sd3" not in meta["generator"]
    data.setup("test")
    assert "sd3" in {s.generator for s in data.split["test"]}
    with pytest.raises(QddError, match="no training samples"):
        ShardDataModule(
            train=[Source(str(mix_shards / "sd3-fp4"))], holdout_generators=["sd3"]
        ).setup("fit")


def test_ddp_ranks_cut_the_same_global_batches_as_one_process() -> None:
    """Two ranks with batch 4 see exactly the batches of one process with batch 8, and
    each draw keeps its augmentation seed."""
    dataset = DrawDataset(list(range(40)))  # stand-ins: the sampler only indexes them
    p = torch.linspace(1, 2, 40)
    p /= p.sum()
    one = list(WeightedDrawSampler(dataset, p, 37, 8, seed=3))
    ranks = [WeightedDrawSampler(dataset, p, 37, 4, rank=r, world_size=2, seed=3) for r in (0, 1)]
    cut = [list(r) for r in ranks]
    assert len(one) == 40 and len(cut[0]) == len(cut[1]) == len(ranks[0]) == 20
    for b in range(5):
        assert one[8 * b : 8 * b + 8] == cut[0][4 * b : 4 * b + 4] + cut[1][4 * b : 4 * b + 4]
    ranks[0].set_epoch(1)
    assert list(ranks[0]) != cut[0]  # reshuffled each epoch


def test_user_errors_are_one_line(mix_shards: Path) -> None:
    real = str(mix_shards / "real-skimage")
    with pytest.raises(QddError, match="share the name"):
        ShardDataModule(train=[Source(real), Source(real)])
    with pytest.raises(QddError, match="both classes"):
        ShardDataModule(train=[Source(real)]).setup("fit")
    with pytest.raises(QddError, match="no test sources"):
        ShardDataModule(train=[Source(real)]).setup("test")
    with pytest.raises(QddError, match="val_fraction"):
        ShardDataModule(train=[Source(real)], val_fraction=0.5, test_fraction=0.5)
