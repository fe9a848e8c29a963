"""RINE against an independent implementation of the official forward (mever-team/rine)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from qdd.cli import main
from qdd.detectors import load_detector
from qdd.detectors.base import CLIP_MEAN, CLIP_STD
from qdd.detectors.clip_backbone import TINY_CONFIG
from qdd.errors import QddError
from tests.conftest import random_image, write_fake_shards

TINY = "qdd-tiny-vit"  # 2 blocks, width 32, 32-px input: the ViT-L/14 code path
FAST = [
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def clip_file(path: Path, seed: int = 3) -> Path:
    """A tiny open_clip file, as the UnivFD backbone format (a whole open_clip state dict)."""
    import open_clip

    if TINY not in open_clip.list_models():
        open_clip.add_model_config(TINY_CONFIG)
    torch.manual_seed(seed)
    torch.save(open_clip.create_model(TINY, pretrained=None).state_dict(), path)
    return path


def rine_head(nproj: int, proj_dim: int, blocks: int = 2, width: int = 32, seed: int = 0):
    """A released head's layout: alpha (1, blocks, d), proj1/proj2.{1,4,..}, head.{0,3,6}."""
    gen = torch.Generator().manual_seed(seed)

    def linear(prefix: str, n_in: int, n_out: int) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.weight": torch.randn(n_out, n_in, generator=gen) / n_in**0.5,
            f"{prefix}.bias": torch.randn(n_out, generator=gen) * 0.1,
        }

    state = {"alpha": torch.randn(1, blocks, proj_dim, generator=gen)}
    for i in range(nproj):
        state |= linear(f"proj1.{1 + 3 * i}", width if i == 0 else proj_dim, proj_dim)
        state |= linear(f"proj2.{1 + 3 * i}", proj_dim, proj_dim)
    for index, n_out in ((0, proj_dim), (3, proj_dim), (6, 1)):
        state |= linear(f"head.{index}", proj_dim, n_out)
    return state


def reference_logit(image: Image.Image, clip_state: dict, head: dict, nproj: int) -> float:
    """The official test transform and Model.forward, written out with the weights by name."""
    # CenterCrop(32) on PIL: zero padding when smaller, then CLIP normalisation.
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    h, w = pixels.shape[:2]
    canvas = np.zeros((max(h, 32), max(w, 32), 3), np.float32)
    top, left = (canvas.shape[0] - h) // 2, (canvas.shape[1] - w) // 2
    canvas[top : top + h, left : left + w] = pixels
    top, left = round((canvas.shape[0] - 32) / 2), round((canvas.shape[1] - 32) / 2)
    crop = canvas[top : top + 32, left : left + 32]
    x = (torch.from_numpy(crop).permute(2, 0, 1) - torch.tensor(CLIP_MEAN)[:, None, None]) / (
        torch.tensor(CLIP_STD)[:, None, None]
    )
    s = {k.removeprefix("visual."): v for k, v in clip_state.items() if k.startswith("visual.")}
    # OpenAI CLIP's VisionTransformer, LND layout, quick-GELU MLPs.
    patches = F.conv2d(x[None], s["conv1.weight"], stride=8).flatten(2).transpose(1, 2)[0]
    tokens = torch.cat([s["class_embedding"][None], patches]) + s["positional_embedding"]
    tokens = F.layer_norm(tokens, (32,), s["ln_pre.weight"], s["ln_pre.bias"])
    cls_at_mlp = []
    for b in range(2):
        p = f"transformer.resblocks.{b}."
        y = F.layer_norm(tokens, (32,), s[p + "ln_1.weight"], s[p + "ln_1.bias"])
        q, k, v = F.linear(y, s[p + "attn.in_proj_weight"], s[p + "attn.in_proj_bias"]).chunk(3, -1)
        heads = [t.view(-1, 2, 16).transpose(0, 1) for t in (q, k, v)]
        attn = torch.softmax(heads[0] @ heads[1].transpose(1, 2) / 4.0, -1) @ heads[2]
        tokens = tokens + F.linear(
            attn.transpose(0, 1).reshape(-1, 32),
            s[p + "attn.out_proj.weight"],
            s[p + "attn.out_proj.bias"],
        )
        y = F.layer_norm(tokens, (32,), s[p + "ln_2.weight"], s[p + "ln_2.bias"])
        cls_at_mlp.append(y[0])  # the hook on ln_2: its output, token 0
        hidden = F.linear(y, s[p + "mlp.c_fc.weight"], s[p + "mlp.c_fc.bias"])
        hidden = hidden * torch.sigmoid(1.702 * hidden)
        tokens = tokens + F.linear(hidden, s[p + "mlp.c_proj.weight"], s[p + "mlp.c_proj.bias"])
    g = torch.stack(cls_at_mlp)  # (blocks, width)

    def mlp(z: torch.Tensor, prefix: str, indices: list[int], last_relu: bool = True):
        for n, i in enumerate(indices):
            z = F.linear(z, head[f"{prefix}.{i}.weight"], head[f"{prefix}.{i}.bias"])
            z = torch.relu(z) if last_relu or n < len(indices) - 1 else z
        return z

    linears = [1 + 3 * i for i in range(nproj)]
    g = mlp(g, "proj1", linears)
    z = (torch.softmax(head["alpha"][0], dim=0) * g).sum(0)
    z = mlp(z, "proj2", linears)
    return float(mlp(z, "head", [0, 3, 6], last_relu=False))


IMAGES = [(48, 40), (32, 32), (20, 26), (70, 33), (40, 48), (31, 64)]


@pytest.mark.parametrize(
    ("nproj", "proj_dim", "wrap"), [(2, 8, "raw"), (1, 16, "model"), (4, 12, "state_dict")]
)
def test_rine_gives_the_official_logits(tmp_path: Path, nproj: int, proj_dim: int, wrap: str):
    backbone = clip_file(tmp_path / "open_clip_pytorch_model.bin")
    head = rine_head(nproj, proj_dim)
    payload = head if wrap == "raw" else {wrap: head}
    torch.save(payload, tmp_path / "model_1class_trainable.pth")
    detector = load_detector(
        "rine",
        tmp_path / "model_1class_trainable.pth",
        backbone=TINY,
        backbone_weights=str(backbone),
    ).eval()
    assert (detector.nproj, detector.proj_dim) == (nproj, proj_dim)  # read from the file
    images = [random_image(i, size) for i, size in enumerate(IMAGES)]
    batch = torch.stack([detector.eval_transform()(im) for im in images])
    with torch.no_grad():
        logits = detector(batch)
    clip_state = torch.load(backbone, weights_only=True)
    expected = torch.tensor([reference_logit(im, clip_state, head, nproj) for im in images])
    spread = expected.max() - expected.min()
    assert spread > 0
    assert (logits - expected).abs().max() <= 0.01 * spread
    digest = hashlib.sha256(backbone.read_bytes()).hexdigest()
    assert detector.weight_files[str(backbone)] == digest
    assert str(tmp_path / "model_1class_trainable.pth") in detector.weight_files


def test_rine_head_file_mismatches_fail_in_one_line(tmp_path: Path) -> None:
    backbone = str(clip_file(tmp_path / "clip.bin"))
    head = rine_head(2, 8)
    renamed = {k.replace("proj2.", "projection2."): v for k, v in head.items()}
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(
        QddError,
        match=r"renamed.pth does not fit detector rine \(missing keys "
        r"proj2.1.bias.*unexpected keys projection2",
    ):
        load_detector("rine", tmp_path / "renamed.pth", backbone=TINY, backbone_weights=backbone)
    layers = rine_head(2, 8, blocks=24)  # a ViT-L/14 head on a 2-block tower
    torch.save(layers, tmp_path / "vit-l.pth")
    with pytest.raises(
        QddError, match=r"vit-l.pth does not fit detector rine \(shape mismatch alpha"
    ):
        load_detector("rine", tmp_path / "vit-l.pth", backbone=TINY, backbone_weights=backbone)
    wide = rine_head(2, 8, width=64)  # proj1's input is not the tower's width
    torch.save(wide, tmp_path / "wide.pth")
    with pytest.raises(
        QddError,
        match=r"wide.pth does not fit detector rine \(shape mismatch "
        r"proj1.1.weight",
    ):
        load_detector("rine", tmp_path / "wide.pth", backbone=TINY, backbone_weights=backbone)


def test_rine_crops_without_resizing() -> None:
    detector = load_detector("rine", random_weights=True, backbone=TINY, backbone_weights=None)
    small = detector.eval_transform()(random_image(0, (20, 26)))
    assert small.shape == (3, 32, 32)
    zero = (torch.zeros(3) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(small[:, 0, 0], zero)  # padded with black, not resized
    assert detector.train_transform()(random_image(1, (20, 26))).shape == (3, 32, 32)


def test_cli_test_and_fit_rine_with_local_files(tmp_path: Path) -> None:
    write_fake_shards(tmp_path / "real", [3, 2], generator="photos", precision=None, label=0)
    write_fake_shards(tmp_path / "tiny-fp4", [3, 2], generator="tiny", precision="fp4")
    backbone = clip_file(tmp_path / "clip.bin")
    torch.save(rine_head(2, 8), tmp_path / "model_2class_trainable.pth")
    args = json.dumps({"backbone": TINY, "backbone_weights": str(backbone)})
    data = ["--data", str(tmp_path / "real"), "--data", str(tmp_path / "tiny-fp4")]
    out = tmp_path / "run"
    main(
        [
            "test",
            "--detector",
            "rine",
            "--weights",
            str(tmp_path / "model_2class_trainable.pth"),
            "--model.detector_args",
            args,
            *data,
            "--out",
            str(out),
            "--data.batch_size=4",
            *FAST,
        ]
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 10 and metrics["detector"] == "rine"
    assert set(metrics["weight_files"]) == {
        str(backbone),
        str(tmp_path / "model_2class_trainable.pth"),
    }
    scores = pd.read_parquet(out / "scores.parquet")
    assert len(scores) == 10 and scores["logit"].notna().all()

    fit = tmp_path / "fit"
    main(
        [
            "fit",
            "--detector",
            "rine",
            "--weights",
            str(tmp_path / "model_2class_trainable.pth"),
            "--model.detector_args",
            args,
            *data,
            "--out",
            str(fit),
            "--data.batch_size=4",
            "--trainer.max_epochs=1",
            *FAST,
        ]
    )
    ckpt = sorted((fit / "checkpoints").glob("*.ckpt"))[-1]
    state = torch.load(ckpt, weights_only=False, map_location="cpu")["state_dict"]
    assert not any(k.startswith("detector.backbone.") for k in state)  # the frozen tower stays out
    assert state["detector.alpha"].shape == (1, 2, 8)  # the file's sizes survive fitting
    again = tmp_path / "again"
    main(
        [
            "test",
            "--detector",
            "rine",
            "--weights",
            str(ckpt),
            "--model.detector_args",
            args,
            *data,
            "--out",
            str(again),
            "--data.batch_size=4",
            "--data.allow_train_overlap=true",
            *FAST,
        ]
    )
    assert json.loads((again / "metrics.json").read_text())["n"] == 10


@pytest.mark.slow
def test_real_size_rine_head_loads_onto_vit_l14(tmp_path: Path) -> None:
    """The released 1-class head's sizes (nproj 4, proj_dim 1024) on a random ViT-L/14."""
    torch.save(rine_head(4, 1024, blocks=24, width=1024), tmp_path / "model_1class_trainable.pth")
    detector = load_detector(
        "rine", tmp_path / "model_1class_trainable.pth", backbone_weights=None
    ).eval()
    assert (detector.nproj, detector.proj_dim, len(detector.mlp_inputs)) == (4, 1024, 24)
    x = detector.eval_transform()(random_image(0, (300, 260)))[None]
    assert x.shape == (1, 3, 224, 224)
    with torch.inference_mode():
        assert detector(x).shape == (1,)
