"""The joins (issue 21, finding 5): twins by identity, groups by backend.

A twin is the same generator, model, prompt, seed, steps, guidance and size at another
precision; the shard key only says where to look. Two backends of one precision are two
groups everywhere (quality, test metrics, manifests).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from qdd.cli import main
from qdd.datamodules.schema import make_meta
from qdd.datamodules.writer import ShardWriter, write_manifest
from qdd.errors import QddError
from qdd.identity import group_label, precision_label, twin_key, twin_mismatches
from qdd.metrics import batch_groups
from qdd.quality import run_quality

CPU = {"accelerator": "cpu"}
RED_CAT = {"model_id": "org/model-a", "prompt": "a red cat", "steps": 20, "guidance": 7.0}
BLUE_TRUCK = {"model_id": "org/model-b", "prompt": "a blue truck", "steps": 4, "guidance": 0.0}


def fake(precision: str, backend: str | None = None, **fields) -> dict:
    return make_meta(
        1,
        "sd3",
        generator="sd3",
        precision=precision,
        quant_backend=backend,
        seed=fields.pop("seed", 0),
        width=16,
        height=16,
        **fields,
    )


def write_folder(folder: Path, metas: dict[str, dict], noise: float = 0.0) -> Path:
    """One shard folder: each key's image is the same base picture plus ``noise``."""
    with ShardWriter(folder, mode="new") as writer:
        for i, (key, meta) in enumerate(metas.items()):
            base = np.random.default_rng(i).integers(0, 256, (16, 16, 3)).astype(float)
            base += np.random.default_rng([i, 7]).normal(0, noise, base.shape) if noise else 0
            image = Image.fromarray(np.clip(np.round(base), 0, 255).astype(np.uint8))
            writer.write(key, image, meta)
    write_manifest(folder)
    return folder


def test_twin_key_is_the_recipe_not_the_precision() -> None:
    a = fake("fp32", None, seed=3, **RED_CAT)
    b = fake("fp4", "bitsandbytes", seed=3, **{**RED_CAT, "guidance": 7})  # 7 == 7.0
    assert twin_key(a) == twin_key(b) and twin_mismatches(a, b) == []
    c = fake("fp4", "emulate", seed=3, **BLUE_TRUCK)
    differs = twin_mismatches(c, a)
    assert [d.split()[0] for d in differs] == ["model_id", "prompt", "steps", "guidance"]
    assert twin_key(c) != twin_key(a) and twin_key(fake("fp4", seed=4, **RED_CAT)) != twin_key(a)


def test_group_label_keeps_two_backends_of_one_precision_apart() -> None:
    assert group_label(fake("fp4", "bitsandbytes")) == "sd3/fp4"
    assert group_label(fake("fp4", "emulate")) == "sd3/fp4@emulate"
    assert group_label(fake("fp8", "torchao")) == "sd3/fp8"
    assert group_label(fake("fp32", "none")) == "sd3/fp32"
    assert group_label(fake("fp4", None)) == "sd3/fp4"  # older shards recorded no backend
    assert group_label(fake("svdq-int4", "emulate")) == "sd3/svdq-int4"  # no library runs it
    assert group_label(fake("gguf-q4_0", "gguf")) == "sd3/gguf-q4_0"
    assert group_label(make_meta(0, "coco")) == "real/coco"
    assert precision_label("nf4", "emulate") == "nf4@emulate"
    # a test batch carries None as "": the same labels as the samples' own
    batch = {
        "label": [1, 1, 0],
        "source": ["sd3", "sd3", "coco"],
        "generator": ["sd3", "sd3", ""],
        "precision": ["fp4", "fp4", ""],
        "quant_backend": ["bitsandbytes", "emulate", ""],
    }
    assert batch_groups(batch) == ["sd3/fp4", "sd3/fp4@emulate", "real/coco"]


def test_quality_refuses_folders_of_different_recipes_naming_them(tmp_path: Path) -> None:
    """fp32 of "a red cat" (20 steps, model A) against fp4 of "a blue truck" (4 steps, model
    B): the keys agree, nothing else does. Today's main paired all three (SSIM ≈ 0)."""
    keys = [f"p{i:05d}-s{i}" for i in range(3)]
    write_folder(
        tmp_path / "fp32", {k: fake("fp32", seed=i, **RED_CAT) for i, k in enumerate(keys)}
    )
    write_folder(
        tmp_path / "fp4", {k: fake("fp4", seed=i, **BLUE_TRUCK) for i, k in enumerate(keys)}
    )
    with pytest.raises(QddError) as error:
        run_quality(
            [str(tmp_path / "fp32"), str(tmp_path / "fp4")], out=tmp_path / "q", trainer=CPU
        )
    message = str(error.value)
    assert "\n" not in message and "no image in --data has a fp32 twin" in message
    assert "3 share a key" in message and "'a blue truck'≠'a red cat'" in message
    assert "steps 4≠20" in message and not (tmp_path / "q").exists()


def test_quality_counts_and_names_mismatched_twins(tmp_path: Path, caplog) -> None:
    keys = [f"p{i:05d}-s{i}" for i in range(3)]
    write_folder(
        tmp_path / "fp32", {k: fake("fp32", seed=i, **RED_CAT) for i, k in enumerate(keys)}
    )
    fp4 = {k: fake("fp4", seed=i, **RED_CAT) for i, k in enumerate(keys)}
    fp4[keys[2]] = fake("fp4", seed=2, **{**RED_CAT, "steps": 4})  # one of another recipe
    write_folder(tmp_path / "fp4", fp4, noise=5.0)
    with caplog.at_level(logging.WARNING, logger="qdd"):
        result = run_quality([str(tmp_path / "*")], out=tmp_path / "q", trainer=CPU)
    assert result.metrics["n"] == 2 and result.metrics["n_unpaired"] == 1
    (unpaired,) = result.metrics["unpaired"]
    assert unpaired["key"] == keys[2] and unpaired["differs"] == ["steps 4≠20"]
    lines = [r.getMessage() for r in caplog.records if "twin" in r.getMessage()]
    assert len(lines) == 1 and "1 image(s) have no fp32 twin" in lines[0]
    assert "steps 4≠20" in lines[0] and "\n" not in lines[0]


def test_two_backends_of_one_precision_are_two_groups(tmp_path: Path) -> None:
    """Today's main merged them into sd3/fp4 (n_repeated_keys 3, nothing said)."""
    keys = [f"p{i:05d}-s{i}" for i in range(3)]
    write_folder(
        tmp_path / "fp32", {k: fake("fp32", seed=i, **RED_CAT) for i, k in enumerate(keys)}
    )
    write_folder(
        tmp_path / "fp4-bnb",
        {k: fake("fp4", "bitsandbytes", seed=i, **RED_CAT) for i, k in enumerate(keys)},
        noise=4.0,
    )
    write_folder(
        tmp_path / "fp4-emu",
        {k: fake("fp4", "emulate", seed=i, **RED_CAT) for i, k in enumerate(keys)},
        noise=8.0,
    )
    folders = [str(tmp_path / name) for name in ("fp32", "fp4-bnb", "fp4-emu")]
    # --data repeated: occurrences add up (argparse's last-wins dropped the first ones)
    argv = ["quality", "--data", folders[0], "--data", *folders[1:], "--out", str(tmp_path / "q")]
    argv += ["--trainer.accelerator", "cpu"]
    main(argv)
    metrics = json.loads((tmp_path / "q" / "metrics.json").read_text())
    assert metrics["n_repeated_keys"] == 0 and metrics["n"] == 6
    assert {g: e["n"] for g, e in metrics["groups"].items()} == {
        "sd3/fp4": 3,
        "sd3/fp4@emulate": 3,
    }
    scores = pd.read_parquet(tmp_path / "q" / "quality.parquet")
    assert set(zip(scores["precision"], scores["quant_backend"], strict=True)) == {
        ("fp4", "bitsandbytes"),
        ("fp4@emulate", "emulate"),
    }
    # the emulation's images carry twice the noise: the groups' values are their own
    assert metrics["groups"]["sd3/fp4"]["psnr"] > metrics["groups"]["sd3/fp4@emulate"]["psnr"]


def test_two_models_in_one_group_are_refused_not_dropped(tmp_path: Path) -> None:
    """fp32 and fp4 of model A and of a fine-tune B, both named sd3: main kept A's images
    and dropped B's as "repeated keys" (n 3 of 6, nothing in the log). A folder named twice
    is still the same images, counted once."""
    keys = [f"p{i:05d}-s{i}" for i in range(2)]
    tuned = {**RED_CAT, "model_id": "org/finetune-b"}
    for name, recipe in (("a", RED_CAT), ("b", tuned)):
        for precision in ("fp32", "fp4"):
            metas = {k: fake(precision, seed=i, **recipe) for i, k in enumerate(keys)}
            write_folder(tmp_path / f"{name}-{precision}", metas, noise=3.0)
    with pytest.raises(QddError) as error:
        run_quality([str(tmp_path / "*")], out=tmp_path / "q", trainer=CPU)
    message = str(error.value)
    assert "\n" not in message and "in --data twice with different recipes" in message
    assert "model_id 'org/finetune-b'≠'org/model-a'" in message
    assert not (tmp_path / "q").exists()
    twice = [str(tmp_path / "a-fp32"), str(tmp_path / "a-fp4"), str(tmp_path / "a-fp4")]
    result = run_quality(twice, out=tmp_path / "q", trainer=CPU)
    assert result.metrics["n"] == 2


def test_report_pairs_a_tests_logits_by_twin_not_by_key(tmp_path: Path) -> None:
    """One test run of sd3 fp32 at 20 steps, fp4 at 4 steps and fp4@emulate at 20 steps,
    keys alike: main's paired view paired fp4 with fp32 by key (scores.parquet held no
    recipe); now scores.parquet carries each image's twin id and only true twins pair."""
    from qdd import api
    from qdd.report.paired import paired_logits
    from qdd.report.runs import _named_fakes

    keys = [f"p{i:05d}-s{i}" for i in range(3)]
    for name, precision, backend, steps in (("fp32", "fp32", "none", 20),
                                            ("fp4", "fp4", "bitsandbytes", 4),
                                            ("emu", "fp4", "emulate", 20)):  # fmt: skip
        recipe = {**RED_CAT, "steps": steps}
        metas = {k: fake(precision, backend, seed=i, **recipe) for i, k in enumerate(keys)}
        write_folder(tmp_path / name, metas, noise=3.0)
    write_folder(tmp_path / "real", {f"r{i}": make_meta(0, "coco", width=16, height=16)
                                     for i in range(3)})  # fmt: skip
    tested = api.test(
        {"detector": "npr", "random_weights": True, "data": str(tmp_path / "*"),
         "model": {"detector_args": {"resize": 32, "crop": 28}}},
        out=tmp_path / "test", trainer={**CPU, "logger": False, "enable_progress_bar": False},
    )  # fmt: skip
    scores = _named_fakes(pd.read_parquet(tested.scores))  # precisions as labels
    assert scores.loc[scores["label"] == 0, "twin"].isna().all()
    assert paired_logits(scores, "fp4").empty  # 4 steps against 20: no twins
    assert len(paired_logits(scores, "fp4@emulate")) == 3
    older = scores.drop(columns="twin")  # scores.parquet of before: by key, as it was
    assert len(paired_logits(older, "fp4")) == 3
