"""B-Free, Community Forensics and RIGID against independent implementations of the
official algorithms, loaded from tiny random files in the official layouts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms

from qdd.cli import main
from qdd.detectors import build_detector, load_detector
from qdd.detectors.tiny import TINY_VIT, tiny_detector_args
from qdd.errors import QddError
from tests.conftest import random_image, write_fake_shards
from tests.detectors.reference_vit import encode, patchify, randomise

HEADS = TINY_VIT["num_heads"]
IMAGENET = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
FAST = [
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.logger=false",
]


def photo(seed: int, size: tuple[int, int]) -> Image.Image:
    """Smooth noise upsampled (width, height): images a ViT gives varied logits."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(size[1] // 8, 2), max(size[0] // 8, 2), 3), np.uint8)
    return Image.fromarray(small).resize(size, Image.BICUBIC)


def assert_close_to_reference(ours: torch.Tensor, reference: torch.Tensor) -> None:
    spread = float(reference.max() - reference.min())
    assert spread > 0, "the reference logits do not vary: the check would be vacuous"
    assert float((ours - reference).abs().max()) <= 0.01 * spread, (ours, reference)


def timm_state(arch: str, seed: int, **kwargs) -> dict[str, torch.Tensor]:
    model = timm.create_model(arch, pretrained=False, **TINY_VIT, **kwargs)
    return randomise(model.state_dict(), seed)


# -- B-Free ------------------------------------------------------------------------------
def bfree_reference(image: Image.Image, state: dict[str, torch.Tensor]) -> float:
    """grip-unina/B-Free main_bfree + Wrapper5crops, written from their description."""
    x = IMAGENET(transforms.functional.to_tensor(image))[None]
    emb = patchify(x, state)
    grid = 36
    if emb.shape[-2] < grid or emb.shape[-1] < grid:
        reps = (max(math.ceil(grid / emb.shape[-2]), 1), max(math.ceil(grid / emb.shape[-1]), 1))
        emb = emb.repeat(1, 1, *reps)[..., :grid, :grid]
    h, w = emb.shape[-2:]
    top, left = max((h - grid) // 2, 0), max((w - grid) // 2, 0)
    corners = [(top, left), (0, 0), (h - grid, 0), (h - grid, w - grid), (0, w - grid)]
    logits = []
    for r, c in corners:
        patches = emb[..., r : r + grid, c : c + grid].flatten(2).transpose(1, 2)
        patches = patches + state["pos_embed"]  # no_embed_class: patches only
        tokens = torch.cat([state["cls_token"], state["reg_token"], patches], dim=1)
        cls = encode(tokens, state, HEADS)[:, 0]
        logits.append(float(cls @ state["head.weight"].T + state["head.bias"]))
    return sum(logits) / 5


def test_bfree_official_file_gives_the_reference_logits(tmp_path: Path) -> None:
    state = timm_state("vit_base_patch14_reg4_dinov2", 1, num_classes=1, img_size=504)
    assert state["pos_embed"].shape[1] == 36 * 36 and state["reg_token"].shape[1] == 4
    path = tmp_path / "model_epoch_best.pth"
    torch.save({"model": state}, path)  # the release's layout
    detector = load_detector("bfree", path, **tiny_detector_args("bfree")).eval()
    # below one window (tiled), one side short, both sides long (five distinct windows)
    images = [photo(0, (48, 40)), photo(1, (600, 300)), photo(2, (560, 546))]
    with torch.inference_mode():
        ours = torch.stack([detector(detector.eval_transform()(im)[None])[0] for im in images])
        reference = torch.tensor([bfree_reference(im, state) for im in images])
    assert_close_to_reference(ours, reference)
    assert detector.weight_files[str(path)] and len(detector.weight_files[str(path)]) == 64


def test_bfree_batches_equal_single_images() -> None:
    detector = build_detector("bfree", **tiny_detector_args("bfree")).eval()
    x = torch.randn(3, 3, 532, 560)
    with torch.inference_mode():
        batched = detector(x)
        single = torch.cat([detector(x[i : i + 1]) for i in range(3)])
        assert torch.allclose(batched, single, atol=1e-5)
        with pytest.raises(QddError, match=r"at least one patch \(14×14 px\), got 10×300"):
            detector(torch.randn(1, 3, 10, 300))


# -- Community Forensics -----------------------------------------------------------------
def commfor_reference(image: Image.Image, state: dict[str, torch.Tensor], size: int) -> float:
    """ViTClassifier.preprocess_input + timm ViT-S/16 forward, head Linear(384 → 1)."""
    resize = {384: 440, 224: 256}[size]
    x = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(size),
                            transforms.ToTensor(), IMAGENET])(image)[None]  # fmt: skip
    vit = {k.removeprefix("vit."): v for k, v in state.items()}
    patches = patchify(x, vit).flatten(2).transpose(1, 2)
    tokens = torch.cat([vit["cls_token"], patches], dim=1) + vit["pos_embed"]
    cls = encode(tokens, vit, HEADS)[:, 0]
    return float(cls @ vit["head.weight"].T + vit["head.bias"])


def commfor_state(size: int, seed: int) -> dict[str, torch.Tensor]:
    state = timm_state(f"vit_small_patch16_{size}", seed, num_classes=1)
    return {f"vit.{k}": v for k, v in state.items()}


@pytest.mark.parametrize(
    ("layout", "size"),
    [("safetensors", 384), ("safetensors", 224), ("training_checkpoint", 384), ("raw", 384)],
)
def test_commfor_official_files_give_the_reference_logits(
    tmp_path: Path, layout: str, size: int
) -> None:
    state = commfor_state(size, 2)
    if layout == "safetensors":  # OwensLab/commfor-model-*: flat vit.* keys
        path = tmp_path / "model.safetensors"
        save_file(state, str(path))
    elif layout == "training_checkpoint":  # model_v11_ViT_384_base_ckpt.pt, torch.compile'd
        path = tmp_path / "model_v11_ViT_384_base_ckpt.pt"
        compiled = {f"_orig_mod.{k}": v for k, v in state.items()}
        torch.save({"model": compiled, "optimizer": {"state": {}}, "epoch": 3, "itr": 7}, path)
    else:
        path = tmp_path / "commfor.pth"
        torch.save(state, path)
    detector = load_detector("commfor", path, **tiny_detector_args("commfor")).eval()
    assert detector.input_size == size  # read from the file, whatever was asked
    images = [photo(10, (500, 460)), photo(11, (300, 420)), photo(12, (64, 80))]
    with torch.inference_mode():
        ours = torch.stack([detector(detector.eval_transform()(im)[None])[0] for im in images])
    reference = torch.tensor([commfor_reference(im, state, size) for im in images])
    assert_close_to_reference(ours, reference)


# -- RIGID -------------------------------------------------------------------------------
def hub_state(seed: int) -> dict[str, torch.Tensor]:
    """A tiny dinov2_vitl14_pretrain.pth: hub keys at 518 px (37² patches) + mask_token."""
    state = timm_state("vit_large_patch14_dinov2", seed, num_classes=0, img_size=518)
    state["mask_token"] = torch.zeros(1, TINY_VIT["embed_dim"])
    assert state["pos_embed"].shape[1] == 37 * 37 + 1
    return state


def rigid_reference(image: Image.Image, state: dict[str, torch.Tensor], seed: int) -> float:
    """rigid_imgn.py's transform and score; DINOv2's hub pos-embed interpolation."""
    x = transforms.Compose([transforms.Resize(224, interpolation=Image.BICUBIC),
                            transforms.CenterCrop((224, 224)), transforms.ToTensor(),
                            IMAGENET])(image)[None]  # fmt: skip
    pos = state["pos_embed"]
    grid = pos[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic")
    pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 256, -1)], dim=1)

    def cls(images: torch.Tensor) -> torch.Tensor:
        patches = patchify(images, state).flatten(2).transpose(1, 2)
        tokens = torch.cat([state["cls_token"], patches], dim=1) + pos
        return encode(tokens, state, HEADS)[:, 0]

    noise = torch.randn((1, 3, 224, 224), generator=torch.Generator("cpu").manual_seed(seed))
    return -float(F.cosine_similarity(cls(x), cls(x + 0.05 * noise), dim=-1))


def rigid(path: Path, **args) -> torch.nn.Module:
    tiny = {**tiny_detector_args("rigid"), "backbone_weights": str(path), **args}
    return load_detector("rigid", **tiny).eval()


def test_rigid_gives_the_reference_scores_and_repeats(tmp_path: Path) -> None:
    state = hub_state(3)
    path = tmp_path / "dinov2_vitl14_pretrain.pth"
    torch.save(state, path)
    images = [photo(20, (300, 260)), photo(21, (224, 224)), photo(22, (90, 120))]
    runs = []
    for _ in range(2):  # a second run, a new detector: the same scores
        detector = rigid(path)
        with torch.inference_mode():
            batch = torch.stack([detector.eval_transform()(im) for im in images])
            runs.append(detector(batch))
    assert torch.equal(runs[0], runs[1])
    reference = torch.tensor([rigid_reference(im, state, 0) for im in images])
    assert_close_to_reference(runs[0], reference)
    with torch.inference_mode():  # each image its own ε from the seed: batch-independent
        alone = detector(batch[1:2])
        other_seed = rigid(path, noise_seed=1)(batch)
    assert torch.allclose(alone, runs[0][1:2], atol=1e-6)
    assert not torch.allclose(other_seed, runs[0])
    assert detector.weights_source == "training-free"
    assert detector.weight_files == {str(path): detector.weight_files[str(path)]}


def test_rigid_refuses_weights_and_fitting(tmp_path: Path) -> None:
    with pytest.raises(QddError, match="rigid is training-free: it takes no --weights"):
        load_detector("rigid", tmp_path / "x.pth", **tiny_detector_args("rigid"))
    detector = build_detector("rigid", **tiny_detector_args("rigid"))
    with pytest.raises(QddError, match="nothing to fit"):
        detector.configure_optimizer([])
    with pytest.raises(QddError, match=r"DINOv2 backbone /nope/dinov2.pth not found"):
        build_detector("rigid", backbone_weights="/nope/dinov2.pth")


# -- files that do not fit: one line naming the file and the key -------------------------
def test_bad_files_fail_in_one_line_naming_the_key(tmp_path: Path) -> None:
    state = timm_state("vit_base_patch14_reg4_dinov2", 1, num_classes=1, img_size=504)
    renamed = dict(state)
    renamed["blocks.0.attn.qkv.weights"] = renamed.pop("blocks.0.attn.qkv.weight")
    torch.save({"model": renamed}, tmp_path / "renamed.pth")
    with pytest.raises(QddError) as error:
        load_detector("bfree", tmp_path / "renamed.pth", **tiny_detector_args("bfree"))
    message = str(error.value)
    assert "renamed.pth" in message and "missing keys vit.blocks.0.attn.qkv.weight" in message
    assert "unexpected keys vit.blocks.0.attn.qkv.weights" in message and "\n" not in message

    shaped = commfor_state(384, 2)
    shaped["vit.head.weight"] = torch.zeros(2, TINY_VIT["embed_dim"])
    save_file(shaped, str(tmp_path / "model.safetensors"))
    with pytest.raises(QddError, match=r"model.safetensors does not fit .*vit.head.weight"):
        load_detector("commfor", tmp_path / "model.safetensors", **tiny_detector_args("commfor"))
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(QddError, match="junk.safetensors: it is not a readable safetensors"):
        load_detector("commfor", tmp_path / "junk.safetensors")

    hub = hub_state(3)
    hub["norm.weight"] = torch.ones(7)
    torch.save(hub, tmp_path / "dinov2.pth")
    with pytest.raises(QddError, match=r"dinov2.pth is not a DINOv2 .*norm.weight \(7,\)"):
        rigid(tmp_path / "dinov2.pth")
    del hub["mask_token"]
    hub["norm.weight"] = torch.ones(TINY_VIT["embed_dim"])
    torch.save(hub, tmp_path / "no-mask.pth")
    with pytest.raises(QddError, match="missing keys mask_token"):
        rigid(tmp_path / "no-mask.pth")


# -- qdd-cli test on shards, with local files --------------------------------------------
@pytest.fixture(scope="module")
def small_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vit-shards")
    write_fake_shards(root / "real", [3, 2], generator="photos", precision=None, label=0)
    write_fake_shards(root / "tiny-fp4", [3, 2], generator="tiny", precision="fp4")
    return root


@pytest.mark.parametrize("detector", ["bfree", "commfor", "rigid"])
def test_cli_test_runs_on_shards_with_local_files(
    detector: str, small_shards: Path, tmp_path: Path
) -> None:
    args = tiny_detector_args(detector)
    files: list[str] = []
    if detector == "rigid":
        torch.save(hub_state(4), tmp_path / "dinov2.pth")
        args["backbone_weights"] = str(tmp_path / "dinov2.pth")
    elif detector == "bfree":
        state = timm_state("vit_base_patch14_reg4_dinov2", 5, num_classes=1, img_size=504)
        torch.save({"model": state}, tmp_path / "bfree.pth")
        files = ["--weights", str(tmp_path / "bfree.pth")]
    else:
        save_file(commfor_state(224, 6), str(tmp_path / "model.safetensors"))
        files = ["--weights", str(tmp_path / "model.safetensors")]
    out = tmp_path / "run"
    main(["test", "--detector", detector, *files, "--model.detector_args", json.dumps(args),
          "--data", str(small_shards / "real"), "--data", str(small_shards / "tiny-fp4"),
          "--out", str(out), "--data.batch_size=2", *FAST])  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 10 and metrics["detector"] == detector
    digests = metrics["weight_files"]
    assert len(digests) == 1 and all(len(v) == 64 for v in digests.values())
    scores = pd.read_parquet(out / "scores.parquet")
    assert len(scores) == 10 and scores["logit"].notna().all()
    if detector == "rigid":
        assert (scores["logit"] <= 1).all() and (scores["logit"] >= -1).all()


def test_detectors_command_lists_every_card(capsys) -> None:
    from qdd.detectors import available, detector_class

    main(["detectors"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| detector | family |") and len(lines) == 2 + len(available())
    rows = {line.split(" | ")[0].strip("| "): line for line in lines[2:]}
    assert set(rows) == set(available())
    assert "| representation | calibrates a threshold only |" in rows["rigid"]
    assert "dinov2_vitl14_pretrain.pth" in rows["rigid"]
    assert "GRIP-UNINA non-profit" in rows["bfree"] and "five 504² windows" in rows["bfree"]
    assert detector_class("commfor").card.trainable and not detector_class("rigid").card.trainable


@pytest.mark.parametrize(
    "detector",
    ["commfor", pytest.param("bfree", marks=pytest.mark.slow)],  # 504² windows
)
def test_fit_from_the_official_file_and_reload_its_checkpoint(
    detector: str, tmp_path: Path
) -> None:
    """``qdd-cli fit`` on real + FP4 shards from an official file; ``--weights`` and
    ``--ckpt_path`` of the fit both reload it (commfor: a 224 file stays 224)."""
    root = tmp_path / "shards"
    write_fake_shards(root / "real", [4, 4], generator="photos", precision=None, label=0)
    write_fake_shards(root / "tiny-fp4", [4, 4], generator="tiny", precision="fp4")
    if detector == "commfor":
        official = tmp_path / "model.safetensors"
        save_file(commfor_state(224, 7), str(official))
    else:
        official = tmp_path / "model_epoch_best.pth"
        state = timm_state("vit_base_patch14_reg4_dinov2", 8, num_classes=1, img_size=504)
        torch.save({"model": state}, official)
    args = ["--model.detector_args", json.dumps(tiny_detector_args(detector))]
    data = ["--data", str(root / "real"), "--data", str(root / "tiny-fp4"),
            "--data.val_fraction=0.25", "--data.test_fraction=0.25"]  # fmt: skip
    fit = tmp_path / "fit"
    main(["fit", "--detector", detector, "--weights", str(official), *args, *data,
          "--out", str(fit), "--data.batch_size=4", "--trainer.max_steps=2", *FAST])  # fmt: skip
    summary = json.loads((fit / "metrics.json").read_text())
    assert summary["weight_files"] == {str(official): summary["weight_files"][str(official)]}
    ckpt = summary["last_checkpoint"] or summary["best_checkpoint"]
    runs = []
    for flag in (["--weights", ckpt], ["--ckpt_path", ckpt]):
        out = tmp_path / f"test{len(runs)}"
        main(["test", "--detector", detector, *flag, *args, *data, "--data.split=test",
              "--out", str(out), "--data.batch_size=1", *FAST])  # fmt: skip
        runs.append(pd.read_parquet(out / "scores.parquet").sort_values("key"))
    np.testing.assert_allclose(runs[0]["logit"], runs[1]["logit"], atol=1e-5)
    assert len(runs[0]) > 0


def test_real_sizes_match_the_released_files() -> None:
    """B-Free's file: 177 tensors, 86.5 M values; Community Forensics 384: 577 positions."""
    bfree = build_detector("bfree")
    state = bfree.state_dict()
    assert len(state) == 177 and sum(v.numel() for v in state.values()) == 86_526_721
    assert state["vit.pos_embed"].shape == (1, 36 * 36, 768) and bfree.grid == (36, 36)
    commfor = build_detector("commfor").state_dict()
    assert commfor["vit.pos_embed"].shape == (1, 577, 384)
    assert commfor["vit.head.weight"].shape == (1, 384)


@pytest.mark.slow
def test_real_rigid_backbone_takes_the_hub_layout(tmp_path: Path) -> None:
    """DINOv2 ViT-L/14 at 518 px (1370 positions) loads into the 224-px timm model."""
    hub = timm.create_model("vit_large_patch14_dinov2", pretrained=False, num_classes=0)
    state = hub.state_dict()
    state["mask_token"] = torch.zeros(1, 1024)
    assert state["pos_embed"].shape == (1, 1370, 1024)
    torch.save(state, tmp_path / "dinov2_vitl14_pretrain.pth")
    detector = build_detector(
        "rigid", backbone_weights=str(tmp_path / "dinov2_vitl14_pretrain.pth")
    )
    assert detector.backbone.pos_embed.shape == (1, 257, 1024)


def test_fit_on_a_training_free_detector_only_calibrates(small_shards: Path, tmp_path) -> None:
    """Issue 23: no training step; a threshold calibrated on all but the test split."""
    args = json.dumps(tiny_detector_args("rigid"))
    main(["fit", "--detector", "rigid", "--model.detector_args", args,
          "--data", str(small_shards / "real"), "--data", str(small_shards / "tiny-fp4"),
          "--out", str(tmp_path / "fit"), "--trainer.max_steps=1", *FAST])  # fmt: skip
    metrics = json.loads((tmp_path / "fit" / "metrics.json").read_text())
    assert metrics["steps"] == 0 and metrics["training_free"]
    assert metrics["calibrated_threshold"] is not None
    assert (tmp_path / "fit" / "checkpoints" / "last.ckpt").is_file()


def test_full_resolution_batches_of_mixed_sizes_score_each_image_once(tmp_path: Path) -> None:
    """B-Free reads full resolution: a batch holding a 40×48 photo and a 64×56 fake cannot be
    one tensor; each image is scored alone, exactly once (workers, a batch size that does not
    divide n), with the logit it gets on its own."""
    write_fake_shards(tmp_path / "real", [3, 1], generator="photos", precision=None, label=0,
                      size=(40, 48))  # fmt: skip
    write_fake_shards(tmp_path / "fake", [2, 1], generator="tiny", precision="fp4", size=(64, 56))
    state = timm_state("vit_base_patch14_reg4_dinov2", 5, num_classes=1, img_size=504)
    torch.save({"model": state}, tmp_path / "bfree.pth")
    args = json.dumps(tiny_detector_args("bfree"))
    out = tmp_path / "run"
    main(["test", "--detector", "bfree", "--weights", str(tmp_path / "bfree.pth"),
          "--model.detector_args", args, "--data", str(tmp_path / "real"),
          "--data", str(tmp_path / "fake"), "--out", str(out), "--data.batch_size=3",
          "--data.num_workers=2", *FAST])  # fmt: skip
    scores = pd.read_parquet(out / "scores.parquet")
    assert len(scores) == 7 and not scores.duplicated(["source", "key"]).any()
    detector = load_detector("bfree", tmp_path / "bfree.pth", **tiny_detector_args("bfree"))
    row = scores[(scores["source"] == "tiny") & (scores["key"] == "p00002-s2")].iloc[0]
    with torch.inference_mode():
        alone = detector.eval()(detector.eval_transform()(random_image(2, (64, 56)))[None])
    assert abs(float(alone[0]) - row["logit"]) < 1e-4
