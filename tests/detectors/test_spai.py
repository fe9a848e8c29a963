"""SPAI: the released checkpoint layout, read safely, gives the official algorithm's logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qdd.detectors import build_detector, load_detector
from qdd.detectors.spai import reflect101_indices
from qdd.detectors.tiny import TINY_SPAI, tiny_detector_args
from qdd.errors import QddError
from tests.conftest import random_image, write_fake_shards
from tests.detectors.reference_spai import circular_mask, pad_if_needed, spai_logit


def official_config():
    """A yacs CfgNode like the one pickled in spai.pth (a few of its real fields)."""
    yacs_config = pytest.importorskip("yacs.config")  # in [dev]: a real CfgNode pickle
    cfg = yacs_config.CfgNode(new_allowed=True)
    cfg.MODEL = yacs_config.CfgNode(new_allowed=True)
    cfg.MODEL.VIT = yacs_config.CfgNode({"EMBED_DIM": 768, "INTERMEDIATE_LAYERS": list(range(12))})
    cfg.MODEL.PATCH_VIT = yacs_config.CfgNode({"MINIMUM_PATCHES": 1})
    cfg.DATA = yacs_config.CfgNode({"IMG_SIZE": 224})
    cfg.freeze()
    return cfg


def random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The tiny model's official keys with random, non-trivial values."""
    torch.manual_seed(seed)
    state = build_detector("spai", net_args=TINY_SPAI).state_dict()
    for key, value in state.items():
        if value.is_floating_point():
            layer_norm_gain = value.ndim == 1 and key.endswith(".weight")
            state[key] = float(layer_norm_gain) + 0.2 * torch.randn_like(value)
    return state


def save_official(path: Path, state: dict[str, torch.Tensor], config=None) -> Path:
    """The released file's layout: a training checkpoint with a pickled yacs config."""
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 3)
    torch.save(
        {
            "model": state,
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(),
            "epoch": 34,
            "config": official_config() if config is None else config,
        },
        path,
    )
    return path


def test_full_size_model_has_the_released_keys() -> None:
    state = build_detector("spai").state_dict()
    assert len(state) == 324  # as in spai.pth's 'model'
    assert state["mfvit.frequencies_mask"].dtype == torch.int64
    assert torch.equal(state["mfvit.frequencies_mask"], circular_mask(224, 16))
    shapes = {
        "mfvit.vit.pos_embed": (1, 197, 768),
        "mfvit.vit.head.weight": (2, 768 * 12),
        "mfvit.vit.blocks.11.attn.q_bias": (768,),
        "mfvit.features_processor.patch_projector.projectors.11.projector.4.weight": (1024, 1024),
        "mfvit.features_processor.original_features_processor.alpha": (1, 12, 1024),
        "mfvit.features_processor.original_features_processor.proj1.projector.1.weight": (
            1024,
            2048,
        ),
        "to_kv.weight": (3072, 1096),
        "patch_aggregator": (12, 1, 128),
        "to_out.0.weight": (1096, 1536),
        "cls_head.head.3.weight": (3288, 3288),
        "cls_head.head.6.weight": (1, 3288),
    }
    assert {k: tuple(state[k].shape) for k in shapes} == shapes


def test_reflect101_matches_numpy_for_any_pad() -> None:
    for size in (1, 2, 3, 7, 50):
        for target in (size, 224):
            expected = (
                np.pad(
                    np.arange(size),
                    (((target - size) // 2, target - size - (target - size) // 2)),
                    mode="reflect",
                )
                if size > 1
                else np.zeros(target, int)
            )  # noqa: E501
            assert np.array_equal(reflect101_indices(size, target), expected), (size, target)


@pytest.mark.parametrize("wrapped", [True, False])
def test_official_file_gives_the_reference_logits(tmp_path: Path, wrapped: bool) -> None:
    state = random_state()
    path = tmp_path / "spai.pth"
    if wrapped:
        save_official(path, state)
    else:
        torch.save(state, path)  # a bare state dict (what qdd-cli fit's --weights may get)
    detector = load_detector("spai", path, **tiny_detector_args("spai")).eval()
    sizes = [(150, 100), (470, 300), (700, 460), (224, 224)]  # (width, height)
    transform = detector.eval_transform()
    ours, reference = [], []
    with torch.no_grad():
        for i, size in enumerate(sizes):
            image = random_image(10 + i, size)
            ours.append(float(detector(transform(image)[None])[0]))
            reference.append(spai_logit(np.asarray(image), state, 2, TINY_SPAI["attn_heads"]))
    ours, reference = np.array(ours), np.array(reference)
    spread = reference.max() - reference.min()
    assert spread > 1e-3, reference  # the images give different logits: the check can fail
    assert np.abs(ours - reference).max() <= 0.01 * spread, (ours, reference)


def test_padding_is_centred_reflect101(tmp_path: Path) -> None:
    image = random_image(3, (150, 100))
    detector = build_detector("spai", **tiny_detector_args("spai"))
    pixels = (detector.eval_transform()(image) * 255).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(pixels, pad_if_needed(np.asarray(image), 224))


def test_renamed_or_misshaped_keys_fail_in_one_line(tmp_path: Path) -> None:
    state = random_state()
    renamed = dict(state)
    renamed["to_kv.weights"] = renamed.pop("to_kv.weight")
    path = save_official(tmp_path / "renamed.pth", renamed)
    with pytest.raises(
        QddError, match=r"missing keys to_kv\.weight; unexpected keys to_kv\.weights"
    ) as error:  # noqa: E501
        load_detector("spai", path, **tiny_detector_args("spai"))
    assert "\n" not in str(error.value)
    misshaped = dict(state)
    misshaped["norm.weight"] = torch.ones(3)
    path = save_official(tmp_path / "misshaped.pth", misshaped)
    with pytest.raises(QddError, match=r"shape mismatch norm\.weight \(3,\)") as error:
        load_detector("spai", path, **tiny_detector_args("spai"))
    assert "\n" not in str(error.value)


def write_marker(path: Path) -> None:
    path.write_text("ran")


class _Payload:
    """A pickle that would run code on load (it writes a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (write_marker, (self.marker,))


def test_a_pickled_foreign_class_is_refused_unrun(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = save_official(tmp_path / "spai.pth", random_state(), config=_Payload(marker))
    with pytest.raises(QddError, match=r"refused global [\w.]*write_marker;") as error:
        load_detector("spai", path, **tiny_detector_args("spai"))
    assert "\n" not in str(error.value) and not marker.exists()


def test_cli_test_on_tiny_shards(tmp_path: Path) -> None:
    from qdd.cli import main

    write_fake_shards(tmp_path / "fake", [3], size=(240, 232))
    write_fake_shards(tmp_path / "real", [3], generator="real", label=0, size=(100, 90))
    weights = save_official(tmp_path / "spai.pth", random_state())
    out = tmp_path / "run"
    main(
        [
            "test",
            *("--detector", "spai", "--weights", str(weights)),
            *("--model.detector_args", json.dumps(tiny_detector_args("spai"))),
            *("--data", str(tmp_path / "fake"), "--data", str(tmp_path / "real")),
            *("--out", str(out), "--trainer.accelerator=cpu"),
            "--trainer.enable_progress_bar=false",
        ]
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["detector"] == "spai" and metrics["n"] == 6
    assert metrics["weights"] == str(weights)


@pytest.mark.slow
def test_fit_trains_the_head_keeps_the_backbone_and_reloads(tmp_path: Path) -> None:
    from qdd.cli import main

    write_fake_shards(tmp_path / "fake", [6], size=(240, 232))
    write_fake_shards(tmp_path / "real", [6], generator="real", label=0, size=(230, 250))
    state = random_state()
    weights = save_official(tmp_path / "spai.pth", state)
    common = [
        *("--detector", "spai", "--model.detector_args", json.dumps(tiny_detector_args("spai"))),
        *("--data", str(tmp_path / "fake"), "--data", str(tmp_path / "real")),
        *("--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false"),
    ]
    fit = tmp_path / "fit"
    # Mixed sizes: the preset's batch size 1 keeps every image at its native resolution.
    main(["fit", *common, "--weights", str(weights), "--out", str(fit), "--trainer.max_epochs=1"])
    ckpt = fit / "checkpoints" / "last.ckpt"
    trained = torch.load(ckpt, weights_only=True)["state_dict"]
    trained = {k.removeprefix("detector."): v for k, v in trained.items()}
    assert torch.equal(trained["mfvit.vit.blocks.0.attn.qkv.weight"],
                       state["mfvit.vit.blocks.0.attn.qkv.weight"])  # fmt: skip
    assert not torch.equal(trained["cls_head.head.6.weight"], state["cls_head.head.6.weight"])
    test = tmp_path / "test"
    main(["test", *common, "--weights", str(ckpt), "--out", str(test),
          "--data.allow_train_overlap=true"])  # fmt: skip
    metrics = json.loads((test / "metrics.json").read_text())
    assert metrics["n"] == 12 and metrics["weights"] == str(ckpt)


def test_unknown_architecture_argument_is_one_line() -> None:
    with pytest.raises(
        QddError, match=r"bad arguments for detector 'spai': unknown net_args \['dims'\]"
    ):
        build_detector("spai", net_args={"dims": 8})


def test_tiles_follow_the_official_rule() -> None:
    detector = build_detector("spai", **tiny_detector_args("spai")).eval()
    # (height, width) → tiles: 2×3 grid (remainders dropped); 1×2 < 4 → five-crop; 4×1 = 4
    for shape, count in (((460, 700), 6), ((300, 470), 5), ((1000, 224), 4), ((224, 224), 1)):
        assert detector.tiles(torch.rand(1, 3, *shape)).shape[1] == count, shape
    x = torch.rand(2, 3, 300, 470)
    assert torch.equal(detector.tiles(x)[1, 4], x[1, :, 38:262, 123:347])  # the centre crop
    # A 224² image: one tile stands for its five identical crops (attention weights sum to 1).
    with torch.no_grad():
        one = detector.mfvit(torch.rand(1, 3, 224, 224))
        assert torch.allclose(
            detector.aggregate(one[None]), detector.aggregate(one.repeat(5, 1)[None]), atol=1e-6
        )
