"""All ten detectors through `qdd-cli test` on the demo's shards, exactly once (issue 23).

The shards are made as `qdd-cli demo` makes them, only fewer: 64×64 tiles of
scikit-image's photographs (`qdd.demo.photo_tiles`, `qdd-cli shard`) and a tiny random
SD1.5 pipeline generated at fp32, fp16 and fp8 (`qdd-cli generate`). Every detector reads tiny
weight files saved in its official layout, from local paths only; CLIP towers are built at
224 px so UnivFD's and RINE's zero-padding of a 64-px tile runs as on the real ViT-L/14.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from qdd.cli import main
from qdd.detectors import available, build_detector
from qdd.detectors.tiny import tiny_detector_args
from qdd.identity import group_label
from tests.conftest import run_qdd, write_fake_shards
from tests.detectors.test_aeroblade import kl_folder, vgg_file
from tests.detectors.test_rine import rine_head
from tests.detectors.test_spai import random_state, save_official
from tests.detectors.test_vit_detectors import commfor_state, hub_state, timm_state

FAST = [
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.logger=false",
]
#: The tiny CLIP tower of `qdd.detectors.tiny`, at ViT-L/14's input size and patch.
CLIP_224 = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16,
                   "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                 "layers": 1},
}  # fmt: skip
CLIP_224_NAME = "qdd-test-vit-224"
REAL_TILES = 7
PROMPTS = 4
#: Three levels, the cheap ones on a CPU (fp4's emulation costs ~5 s an image here).
PRECISIONS = ("fp32", "fp16", "fp8")


# -- the demo's shards, smaller -----------------------------------------------------------
@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``real-skimage`` (7 photo tiles) and ``sd15-<precision>`` (4 prompts each, paired by
    seed), 64×64, written by the project's own commands as the demo does."""
    from qdd.demo import TILE, photo_tiles
    from qdd.generation.prompts import default_prompts
    from qdd.generation.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("demo-like")
    _, test_tiles = photo_tiles(root / "photos")
    chosen = root / "tiles"
    chosen.mkdir()
    tiles = sorted(test_tiles.iterdir())
    for path in tiles[:: len(tiles) // REAL_TILES][:REAL_TILES]:  # several photographs
        path.rename(chosen / path.name)
    shards = root / "shards"
    main(["shard", "--src", str(chosen), "--out", str(shards / "real-skimage"),
          "--label", "real", "--source", "skimage"])  # fmt: skip
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(default_prompts()[:PROMPTS]) + "\n")
    model = build_tiny_pipeline("sd15", root / "models" / "sd15")
    for precision in PRECISIONS:
        main(["generate", "--generator", "sd15", "--model-path", str(model),
              "--precision", precision, "--prompts", str(prompts), "--steps", "2",
              "--height", str(TILE), "--width", str(TILE), "--seed", "1000",
              "--out", str(shards / f"sd15-{precision}"),
              "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar=false"])  # fmt: skip
    return shards


def inputs_of(shards: Path) -> list[tuple[str, str]]:
    """(group, key) of every image in the tars, read with `tarfile` (not qdd's reader)."""
    found = []
    for tar_path in sorted(shards.glob("*/*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.load(tar.extractfile(member))
                    found.append((group_label(meta), member.name.removesuffix(".json")))
    return found


# -- each detector's files, tiny, in the official layout -----------------------------------
def clip_224_file(path: Path, seed: int) -> Path:
    """A whole open_clip state dict of the 224-px tiny tower (the UnivFD/RINE backbone file)."""
    import open_clip

    if CLIP_224_NAME not in open_clip.list_models():
        config = path.with_name(f"{CLIP_224_NAME}.json")
        config.write_text(json.dumps(CLIP_224))
        open_clip.add_model_config(config)
    torch.manual_seed(seed)
    torch.save(open_clip.create_model(CLIP_224_NAME, pretrained=None).state_dict(), path)
    return path


def head_file(path: Path, name: str, args: dict[str, Any], seed: int, wrap: str | None) -> Path:
    """The detector's trainable part, random (seeded), as its official file stores it."""
    torch.manual_seed(seed)
    state = build_detector(name, **args).head_state_dict()
    if name == "univfd":  # fc_weights.pth: a bare Linear
        state = {k.removeprefix("fc."): v for k, v in state.items()}
    torch.save({wrap: state} if wrap else state, path)
    return path


def local_files(name: str, root: Path, clip_tower: str = CLIP_224_NAME) -> list[str]:
    """``--weights`` and ``--model.detector_args`` of a tiny ``name`` from files in ``root``
    (``clip_tower``: the open_clip config of the CLIP detectors' tiny backbone)."""
    root.mkdir(parents=True, exist_ok=True)
    args = {} if name == "aeroblade" else tiny_detector_args(name)  # tiny by its files
    weights: Path | None = None
    if name in ("clipd", "univfd", "rine"):
        args["backbone"] = clip_tower
        if clip_tower == CLIP_224_NAME:
            args["backbone_weights"] = str(clip_224_file(root / "clip.pt", 3))
        else:
            from tests.detectors.test_rine import clip_file

            args["backbone_weights"] = str(clip_file(root / "clip.pt", 3))
    if name == "npr":
        weights = head_file(root / "NPR.pth", name, args, 1, None)
    elif name == "corvi":
        weights = head_file(root / "corvi.pth", name, args, 2, "model")
    elif name == "clipd":
        weights = head_file(root / "clipd.pth", name, args, 3, None)
    elif name == "univfd":
        weights = head_file(root / "fc_weights.pth", name, args, 4, None)
    elif name == "rine":
        weights = root / "model_1class_trainable.pth"
        torch.save(rine_head(args["nproj"], args["proj_dim"]), weights)
    elif name == "bfree":
        weights = root / "model_epoch_best.pth"
        state = timm_state("vit_base_patch14_reg4_dinov2", 5, num_classes=1, img_size=504)
        torch.save({"model": state}, weights)
    elif name == "commfor":
        weights = root / "model.safetensors"
        save_file(commfor_state(384, 6), str(weights))
    elif name == "spai":
        weights = save_official(root / "spai.pth", random_state(7))
    elif name == "rigid":
        torch.save(hub_state(8), root / "dinov2_vitl14_pretrain.pth")
        args["backbone_weights"] = str(root / "dinov2_vitl14_pretrain.pth")
    elif name == "aeroblade":
        args = {"vae": [str(kl_folder(root / "sd-vae", 9))],
                "lpips_weights": str(vgg_file(root / "vgg16.pth"))}  # fmt: skip
    else:  # a new detector must be added here, and so to this test
        raise AssertionError(f"no tiny official files for detector {name}")
    flags = ["--model.detector_args", json.dumps(args)]
    return flags if weights is None else ["--weights", str(weights), *flags]


def check_every_image_once(out: Path, shards: Path, name: str) -> pd.DataFrame:
    """scores.parquet holds each input once, and as many rows as the tars hold images."""
    expected = inputs_of(shards)
    assert len(expected) == len(set(expected)) == REAL_TILES + len(PRECISIONS) * PROMPTS
    scores = pd.read_parquet(out / "scores.parquet")
    metrics = json.loads((out / "metrics.json").read_text())
    scored = list(zip(scores["group"], scores["key"], strict=True))
    assert sorted(scored) == sorted(expected), name  # no duplicate, none missing
    assert metrics["n"] == metrics["expected"] == len(expected) and metrics["n_skipped"] == 0
    assert metrics["detector"] == name and scores["logit"].notna().all()
    assert scores["logit"].nunique() > 1, "every image got the same logit"
    return scores


@pytest.mark.parametrize("name", available())
def test_every_detector_scores_every_demo_image_once(
    name: str, demo_shards: Path, tmp_path: Path
) -> None:
    """Workers 0 and 2, batch sizes 4 and 3 (neither divides 19): the same rows and logits."""
    files = local_files(name, tmp_path / "files")
    runs = []
    for workers, batch_size in ((0, 4), (2, 3)):
        out = tmp_path / f"run-{workers}"
        main(["test", "--detector", name, *files, "--data", str(demo_shards / "*"),
              "--out", str(out), f"--data.batch_size={batch_size}",
              f"--data.num_workers={workers}", *FAST])  # fmt: skip
        scores = check_every_image_once(out, demo_shards, name)
        runs.append(scores.set_index(["group", "key"])["logit"].sort_index())
    assert torch.allclose(
        torch.tensor(runs[0].to_numpy()), torch.tensor(runs[1].to_numpy()), atol=1e-4
    ), "the batch or the workers changed an image's logit"


def ddp_run(name: str, shards: Path, tmp_path: Path, clip_tower: str) -> None:
    """`python -m qdd test` on 2 CPU processes (gloo) with 2 workers each, batch 3."""
    files = local_files(name, tmp_path / "files", clip_tower)
    out = tmp_path / "ddp"
    run_qdd(["test", "--detector", name, *files, "--data", str(shards / "*"),
             "--out", str(out), "--data.batch_size=3", "--data.num_workers=2",
             "--trainer.strategy=ddp", "--trainer.devices=2", *FAST], cwd=tmp_path)  # fmt: skip
    check_every_image_once(out, shards, name)
    written = sorted(p.name for p in out.iterdir())
    assert written == ["config.yaml", "metrics.json", "scores.parquet"]  # no per-rank files


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(available()))
def test_ddp_ranks_score_every_demo_image_once(
    name: str, demo_shards: Path, tmp_path: Path
) -> None:
    """Each of the ten under 2 DDP ranks (15–90 s each on a 2-core host; a fresh process
    cannot see the 224-px test tower: the packaged tiny one). The default suite runs NPR
    under DDP in tests/test_exactly_once.py."""
    ddp_run(name, demo_shards, tmp_path, "qdd-tiny-vit")


@pytest.mark.parametrize("name", ["bfree", "aeroblade"])
def test_an_image_under_one_cell_stops_the_run_in_one_line_naming_it(
    name: str, tmp_path: Path, capsys
) -> None:
    """B-Free needs one 14-px patch, AEROBLADE one 8-px cell: a 6×6 image stops the run with
    one line naming the image and its shard, also when a DataLoader worker meets it."""
    shards = tmp_path / "shards"
    write_fake_shards(shards / "real", [3], generator="photos", precision=None, label=0)
    keys = write_fake_shards(shards / "tiny-fp4", [2], generator="tiny", size=(6, 6))
    files = local_files(name, tmp_path / "files")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        main(["test", "--detector", name, *files, "--data", str(shards / "*"), "--out", str(out),
              "--data.num_workers=2", "--data.batch_size=2", *FAST])  # fmt: skip
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    error = lines[-1]
    assert error.startswith(f"qdd-cli test: error: {keys[0]} in ") or error.startswith(
        f"qdd-cli test: error: {keys[1]} in "
    ), lines
    assert "tiny-fp4" in error and "6×6" in error and "drop such images" in error
    assert not any("Traceback" in line for line in lines), lines
    assert (out / "config.yaml").is_file()  # what was written is kept
