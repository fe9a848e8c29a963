"""Detectors against their published architecture and weight layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qdd.detectors import available, build_detector, detector_class, load_detector, read_state
from qdd.detectors.npr import npr_residual
from qdd.detectors.tiny import tiny_detector_args
from qdd.errors import QddError
from tests.conftest import random_image, write_fake_shards


def tiny(name: str):
    return build_detector(name, **tiny_detector_args(name)).eval()


def test_registry_accepts_every_spelling() -> None:
    assert available() == [
        "aeroblade", "bfree", "clipd", "commfor", "corvi", "npr", "rigid", "rine", "spai", "univfd"
    ]
    for spelling in ("npr", "NPR", "NPRDetector", "npr_detector"):
        assert detector_class(spelling).name == "npr"
    assert detector_class("clip-d").name == detector_class("ClipD").name == "clipd"
    choices = "choose from aeroblade, bfree, clipd, commfor, corvi, npr, rigid, rine, spai, univfd"
    with pytest.raises(QddError, match=choices):
        detector_class("dire")


def test_npr_has_the_official_layout() -> None:
    state = build_detector("npr").state_dict()
    assert (
        sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k)
        == 1_437_761
    )
    assert {k.split(".")[0] for k in state} == {"conv1", "bn1", "layer1", "layer2", "fc1"}
    assert state["conv1.weight"].shape == (64, 3, 3, 3)
    assert state["fc1.weight"].shape == (1, 512)
    assert len({k.split(".")[1] for k in state if k.startswith("layer2.")}) == 4


def test_npr_residual_is_zero_on_2x2_blocks_and_crops_odd_sizes() -> None:
    blocks = torch.randn(1, 3, 4, 5).repeat_interleave(2, -2).repeat_interleave(2, -1)
    assert torch.equal(npr_residual(blocks), torch.zeros_like(blocks))
    assert npr_residual(torch.randn(2, 3, 9, 7)).shape == (2, 3, 8, 6)


def _official_npr_file(tmp_path: Path, wrap: str) -> Path:
    torch.manual_seed(1)
    state = build_detector("npr").state_dict()
    for key, value in state.items():
        if value.is_floating_point():  # positive running_var keeps BN finite
            fill = torch.rand_like if "running_var" in key else torch.randn_like
            state[key] = fill(value) * 0.1 + (0.5 if "running_var" in key else 0.0)
    payload = {
        "raw": state,
        "model": {"model": state},
        "state_dict": {"state_dict": state, "epoch": 3},
        "module": {"model": {f"module.{k}": v for k, v in state.items()}},
    }[wrap]
    path = tmp_path / f"npr-{wrap}.pth"
    torch.save(payload, path)
    return path


def test_npr_weights_raw_and_wrapped_give_identical_logits(tmp_path: Path) -> None:
    images = torch.randn(2, 3, 64, 64)
    logits = []
    for wrap in ("raw", "model", "state_dict", "module"):
        detector = load_detector("npr", _official_npr_file(tmp_path, wrap)).eval()
        with torch.inference_mode():
            logits.append(detector(images))
    for other in logits[1:]:
        assert torch.equal(logits[0], other)
    assert not torch.equal(logits[0], tiny("npr")(images).detach())


def test_wrong_checkpoint_names_file_and_keys(tmp_path: Path) -> None:
    corvi_file = tmp_path / "corvi.pth"
    torch.save({"model": tiny("corvi").state_dict()}, corvi_file)
    with pytest.raises(QddError) as error:
        load_detector("npr", corvi_file)
    message = str(error.value)
    assert "corvi.pth" in message and "missing keys fc1.bias" in message and "\n" not in message
    shapes = tmp_path / "bad-shape.pth"
    state = build_detector("npr").state_dict()
    state["fc1.weight"] = torch.zeros(1, 256)
    torch.save(state, shapes)
    with pytest.raises(QddError, match=r"shape mismatch fc1.weight \(1, 256\)≠\(1, 512\)"):
        load_detector("npr", shapes)
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(QddError, match="cannot read weights .*junk.pth"):
        read_state(tmp_path / "junk.pth")


def test_missing_official_weights_refuse_unless_random_is_asked(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("QDD_CHECKPOINTS", str(tmp_path))
    with pytest.raises(QddError, match=r"no weights for detector npr: .*NPR.pth not found"):
        load_detector("npr")
    assert load_detector("npr", random_weights=True).weights_source == "random"
    torch.save(build_detector("npr").state_dict(), tmp_path / "NPR.pth")
    assert load_detector("npr").official_path() == tmp_path / "NPR.pth"
    # weights that exist are used, and recorded as such, even when random ones are allowed
    assert load_detector("npr", random_weights=True).weights_source == str(tmp_path / "NPR.pth")


def test_univfd_bare_head_maps_to_fc(tmp_path: Path) -> None:
    head = torch.nn.Linear(16, 1)  # the tiny tower projects to 16, as ViT-L/14 does to 768
    torch.save(head.state_dict(), tmp_path / "fc_weights.pth")
    detector = load_detector("univfd", tmp_path / "fc_weights.pth", **tiny_detector_args("univfd"))
    assert torch.equal(detector.fc.weight, head.weight)


@pytest.mark.parametrize("name", ["clipd", "univfd"])
def test_clip_detectors_freeze_backbone_and_keep_it_out_of_the_head(name: str) -> None:
    detector = tiny(name)
    assert set(detector.head_state_dict()) == {"fc.weight", "fc.bias"}
    assert not any(p.requires_grad for p in detector.backbone.parameters())
    again = tiny(name)  # a random tower is seeded: a saved head meets the same features
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(detector.backbone(x), again.backbone(x))


def test_clipd_feature_is_the_normalised_pre_projection_token() -> None:
    detector = tiny("clipd")
    assert detector.backbone.proj is None and detector.fc.in_features == 32
    features = detector.features(torch.randn(3, 3, 32, 32))
    assert torch.allclose(features.norm(dim=-1), torch.ones(3))


def test_transforms_follow_each_paper() -> None:
    image = random_image(0, (80, 60))
    assert tuple(build_detector("npr").eval_transform()(image).shape) == (3, 256, 256)
    assert tuple(build_detector("npr", resize=None).eval_transform()(image).shape) == (3, 60, 80)
    assert tuple(tiny("corvi").eval_transform()(image).shape) == (3, 60, 80)  # full size
    assert tuple(tiny("clipd").eval_transform()(image).shape) == (3, 32, 32)
    assert tuple(tiny("univfd").eval_transform()(image).shape) == (3, 32, 32)
    for name in available():
        if name != "aeroblade":  # needs autoencoder folders: tests/detectors/test_aeroblade.py
            assert tiny(name).train_transform()(image).shape[0] == 3


def test_backbone_errors_are_one_line() -> None:
    with pytest.raises(QddError, match="unknown CLIP backbone 'ViT-Q-99'"):
        build_detector("clipd", backbone="ViT-Q-99", backbone_weights=None)
    with pytest.raises(QddError, match=r"cannot load CLIP backbone qdd-tiny-vit weights 'openai'"):
        build_detector("clipd", backbone="qdd-tiny-vit", backbone_weights="openai")
    with pytest.raises(QddError, match="do not exist"):
        build_detector("univfd", backbone="qdd-tiny-vit", backbone_weights="/nope/clip.bin")


def test_clip_backbone_loads_a_local_open_clip_file(tmp_path: Path) -> None:
    import open_clip

    from qdd.detectors.clip_backbone import TINY_CONFIG

    if TINY_CONFIG.stem not in open_clip.list_models():  # also when run alone
        open_clip.add_model_config(TINY_CONFIG)
    torch.manual_seed(3)
    clip = open_clip.create_model("qdd-tiny-vit", pretrained=None)
    torch.save(clip.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    detector = build_detector(
        "clipd",
        backbone="qdd-tiny-vit",
        backbone_weights=str(tmp_path / "open_clip_pytorch_model.bin"),
    )
    assert torch.equal(detector.backbone.conv1.weight, clip.visual.conv1.weight)
    import hashlib

    file = tmp_path / "open_clip_pytorch_model.bin"
    assert detector.weight_files == {str(file): hashlib.sha256(file.read_bytes()).hexdigest()}


def _clip_file(path: Path, edit) -> Path:
    """A tiny open_clip file (whole CLIP state dict), edited by ``edit``."""
    import open_clip

    from qdd.detectors.clip_backbone import TINY_CONFIG

    if TINY_CONFIG.stem not in open_clip.list_models():
        open_clip.add_model_config(TINY_CONFIG)
    torch.manual_seed(3)
    state = open_clip.create_model("qdd-tiny-vit", pretrained=None).state_dict()
    edit(state)
    torch.save(state, path)
    return path


def _rename(state: dict) -> None:
    state["visual.ln_post.gain"] = state.pop("visual.ln_post.weight")


def _reshape(state: dict) -> None:
    state["visual.proj"] = torch.zeros(32, 8)


@pytest.mark.parametrize("name", ["clipd", "univfd", "rine"])
def test_clip_backbone_file_mismatches_name_the_keys(name: str, tmp_path: Path, capsys) -> None:
    """A renamed or mis-shaped key of the backbone file is named, in one line, with the fix;
    through the CLI too (exit 2, one line on stderr)."""
    args = {"backbone": "qdd-tiny-vit"}
    renamed = _clip_file(tmp_path / "renamed.bin", _rename)
    with pytest.raises(QddError) as error:
        build_detector(name, **args, backbone_weights=str(renamed))
    message = str(error.value)
    assert "\n" not in message and str(renamed) in message and "backbone_weights" in message
    assert "missing keys visual.ln_post.weight" in message
    assert "unexpected keys visual.ln_post.gain" in message
    reshaped = _clip_file(tmp_path / "reshaped.bin", _reshape)
    with pytest.raises(QddError, match=r"shape mismatch visual\.proj \(32, 8\)≠\(32, 16\)"):
        build_detector(name, **args, backbone_weights=str(reshaped))
    from qdd.cli import main

    shards = tmp_path / "shards"
    write_fake_shards(shards / "real", [2], generator="photos", precision=None, label=0)
    detector_args = json.dumps({**tiny_detector_args(name), "backbone_weights": str(renamed)})
    with pytest.raises(SystemExit) as stop:
        main(["test", "--detector", name, "--random-weights", "--model.detector_args",
              detector_args, "--data", str(shards / "real"), "--out", str(tmp_path / "run"),
              "--trainer.accelerator=cpu", "--trainer.logger=false"])  # fmt: skip
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "missing keys visual.ln_post.weight" in lines[-1], lines
    assert not any("Traceback" in line for line in lines)


def test_clip_backbone_file_that_is_no_tensor_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "junk.bin").write_text("not a checkpoint")
    with pytest.raises(QddError, match=r"cannot read CLIP backbone weights .*junk\.bin: it is"):
        build_detector(
            "univfd", backbone="qdd-tiny-vit", backbone_weights=str(tmp_path / "junk.bin")
        )


@pytest.mark.slow
@pytest.mark.parametrize(("name", "width"), [("clipd", 1024), ("univfd", 768)])
def test_real_vit_l14_feature_sizes(name: str, width: int) -> None:
    """The real ViT-L/14 code path (random tower: no download here)."""
    detector = build_detector(name, backbone_weights=None).eval()
    assert detector.fc.weight.shape == (1, width)
    image = random_image(0, (300, 260))
    x = detector.eval_transform()(image)[None]
    assert x.shape == (1, 3, 224, 224)
    with torch.inference_mode():
        assert detector(x).shape == (1,)
    towers = sum(p.numel() for p in detector.backbone.parameters())
    assert 300e6 < towers < 310e6  # ViT-L/14 image tower


@pytest.mark.slow
def test_real_hub_tag_offline_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(QddError, match="backbone_weights FILE"):
        build_detector("clipd")
