"""AEROBLADE against the official algorithm (jonasricker/aeroblade), written out here with
diffusers' autoencoders one image at a time, PNG files and the `lpips` package."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision.transforms.functional import to_pil_image, to_tensor

from qdd.cli import main
from qdd.detectors import build_detector, load_detector
from qdd.errors import QddError
from tests.conftest import random_image, write_fake_shards

FAST = [
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
#: Four resolution levels (an 8-px cell, as SD's and Kandinsky's), a few channels.
LEVELS = {"block_out_channels": (4, 4, 8, 8), "layers_per_block": 1, "norm_num_groups": 2}


def kl_folder(path: Path, seed: int) -> Path:
    """A tiny AutoencoderKL saved as diffusers saves SD's ``vae/`` (config + safetensors)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    down, up = ("DownEncoderBlock2D",) * 4, ("UpDecoderBlock2D",) * 4
    model = AutoencoderKL(down_block_types=down, up_block_types=up, latent_channels=4, **LEVELS)
    model.save_pretrained(path)
    return path


def vq_folder(path: Path, seed: int) -> Path:
    """A tiny VQModel shaped like Kandinsky 2.1's movq (spatial norm, saved as diffusers does)."""
    from diffusers import VQModel

    torch.manual_seed(seed)
    down = ("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",)
    up = ("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3
    levels = {**LEVELS, "block_out_channels": (32,) * 4, "norm_num_groups": 8}  # SpatialNorm: 32
    model = VQModel(
        down_block_types=down,
        up_block_types=up,
        latent_channels=4,
        num_vq_embeddings=16,
        vq_embed_dim=4,
        norm_type="spatial",
        **levels,
    )
    model.save_pretrained(path)
    return path


def vgg_file(path: Path, seed: int = 0, extra: bool = False) -> Path:
    """torchvision VGG16 keys up to relu2_2 (all layer 2 needs), He-initialised."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for index, (n_in, n_out) in {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128)}.items():
        std = (2 / (9 * n_in)) ** 0.5
        state[f"features.{index}.weight"] = torch.randn(n_out, n_in, 3, 3, generator=gen) * std
        state[f"features.{index}.bias"] = torch.randn(n_out, generator=gen) * 0.01
    if extra:  # the whole torchvision file has more: ignored
        state["classifier.6.weight"] = torch.randn(10, 4, generator=gen)
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("aeroblade")
    return {
        "kl": kl_folder(root / "sd-vae", 1),
        "vq": vq_folder(root / "kandinsky" / "movq", 2),  # found through its pipeline folder
        "kl2": kl_folder(root / "sd2-vae", 3),
        "vgg": vgg_file(root / "vgg16.pth"),
    }


@functools.cache
def official_autoencoder(folder: Path) -> torch.nn.Module:
    from diffusers import AutoencoderKL, VQModel

    config = json.loads((folder / "config.json").read_text())
    model_class = VQModel if config["_class_name"] == "VQModel" else AutoencoderKL
    return model_class.from_pretrained(folder, torch_dtype=torch.float16).eval()


@functools.cache
def official_lpips(vgg: Path) -> torch.nn.Module:
    """The `lpips` package's LPIPS-vgg v0.1 (its own linear weights), VGG from ``vgg``."""
    import lpips

    metric = lpips.LPIPS(net="vgg", version="0.1", pnet_rand=True, verbose=False).eval()
    state = torch.load(vgg, weights_only=True)
    for index, slice_ in (
        (0, metric.net.slice1),
        (2, metric.net.slice1),
        (5, metric.net.slice2),
        (7, metric.net.slice2),
    ):
        getattr(slice_, str(index)).weight.data.copy_(state[f"features.{index}.weight"])
        getattr(slice_, str(index)).bias.data.copy_(state[f"features.{index}.bias"])
    return metric


def reference_distance(image: Image.Image, folder: Path, vgg: Path, tmp: Path) -> float:
    """compute_reconstructions (batch 1, seed 1, float16, saved PNG) + _PatchedLPIPS layer 2."""
    from diffusers import VQModel

    ae = official_autoencoder(folder)
    width, height = image.size
    image = image.crop((0, 0, width - width % 8, height - height % 8))  # qdd's documented choice
    original = to_tensor(image)[None]
    with torch.no_grad():
        x = original.to(torch.float16) * 2.0 - 1.0
        encoded = ae.encode(x)
        if isinstance(ae, VQModel):
            rec = ae.decode(encoded.latents, force_not_quantize=True, return_dict=False)[0]
        else:
            generator = torch.Generator().manual_seed(1)
            rec = ae.decode(encoded.latent_dist.sample(generator), return_dict=False)[0]
        rec = (rec / 2 + 0.5).clamp(0, 1)
    to_pil_image(rec[0]).save(tmp / "rec.png")
    reconstruction = to_tensor(Image.open(tmp / "rec.png").convert("RGB"))[None]

    with torch.no_grad():
        _, layers = official_lpips(vgg)(original, reconstruction, retPerLayer=True, normalize=True)
    return float(layers[1].mean())  # lpips_vgg_2: the second VGG layer, averaged over space


def images() -> list[Image.Image]:
    """Noise, blurred noise, a flat and a smooth image: distances far apart."""
    ramp = np.linspace(0, 255, 40 * 45 * 3).reshape(45, 40, 3).astype(np.uint8)
    return [
        random_image(0, (32, 32)),
        random_image(1, (32, 32)),
        random_image(2, (45, 37)).filter(ImageFilter.GaussianBlur(2)),
        Image.new("RGB", (32, 32), (120, 60, 200)),
        Image.fromarray(ramp),
    ]


def test_aeroblade_gives_the_official_distances(files: dict[str, Path], tmp_path: Path) -> None:
    detector = load_detector(
        "aeroblade",
        vae=[str(files["kl"]), str(files["vq"].parent)],
        lpips_weights=str(files["vgg"]),
    ).eval()
    assert detector.cell == 8
    expected_per_ae = torch.tensor(
        [
            [reference_distance(im, files[k], files["vgg"], tmp_path) for im in images()]
            for k in ("kl", "vq")
        ]
    )
    logits = torch.stack([detector(detector.eval_transform()(im)[None])[0] for im in images()])
    expected = -expected_per_ae.min(dim=0).values
    spread = expected.max() - expected.min()
    assert spread > 0 and (expected_per_ae[0] != expected_per_ae[1]).all()
    assert (logits - expected).abs().max() <= 0.01 * spread
    # a batch of same-sized images: each image's own seed, so the same scores
    same = [im for im in images() if im.size == (32, 32)]
    batch = torch.stack([detector.eval_transform()(im) for im in same])
    alone = torch.stack([detector(x[None])[0] for x in batch])
    assert (detector(batch) - alone).abs().max() <= 0.01 * spread


def test_aeroblade_repeats_exactly(files: dict[str, Path]) -> None:
    args = {"vae": [str(files["kl"]), str(files["kl2"])], "lpips_weights": str(files["vgg"])}
    batch = torch.stack([to_tensor(random_image(i, (32, 32))) for i in range(3)])
    first = load_detector("aeroblade", **args).eval()(batch)
    second = load_detector("aeroblade", **args).eval()(batch)
    assert torch.equal(first, second)
    assert torch.equal(first, load_detector("aeroblade", **args).eval()(batch))


def test_aeroblade_records_its_files(files: dict[str, Path]) -> None:
    detector = load_detector("aeroblade", vae=[str(files["kl"])], lpips_weights=str(files["vgg"]))
    weights = files["kl"] / "diffusion_pytorch_model.safetensors"
    assert detector.weight_files == {
        str(weights): hashlib.sha256(weights.read_bytes()).hexdigest(),
        str(files["vgg"]): hashlib.sha256(files["vgg"].read_bytes()).hexdigest(),
    }
    assert detector.weights_source == "training-free"
    assert next(detector.autoencoders.parameters()).dtype == torch.float16
    twice = [
        str(files["kl"]),
        f"{files['kl']}/",
        str(files["kl"].parent / ".." / files["kl"].parent.name / "sd-vae"),
    ]
    assert (
        len(build_detector("aeroblade", vae=twice, lpips_weights=str(files["vgg"])).autoencoders)
        == 1
    )


def test_aeroblade_file_errors_are_one_line(files: dict[str, Path], tmp_path: Path) -> None:
    vae, vgg = [str(files["kl"])], str(files["vgg"])
    with pytest.raises(QddError, match="aeroblade needs autoencoders: pass --model.detector_args"):
        build_detector("aeroblade", lpips_weights=vgg)
    with pytest.raises(QddError, match=f"aeroblade: {tmp_path} is not a diffusers AutoencoderKL"):
        build_detector("aeroblade", vae=[str(tmp_path)], lpips_weights=vgg)
    with pytest.raises(QddError, match="autoencoder folder /nope/vae not found"):
        build_detector("aeroblade", vae=["/nope/vae"], lpips_weights=vgg)
    with pytest.raises(QddError, match="VGG16 file /nope/vgg.pth not found"):
        build_detector("aeroblade", vae=vae, lpips_weights="/nope/vgg.pth")
    state = torch.load(files["vgg"], weights_only=True)
    torch.save(
        {k.replace("features.5", "features.6"): v for k, v in state.items()},
        tmp_path / "renamed.pth",
    )
    with pytest.raises(
        QddError,
        match=r"renamed.pth is not torchvision's VGG16 for aeroblade's "
        r"LPIPS \(missing keys features.5.bias",
    ):
        build_detector("aeroblade", vae=vae, lpips_weights=str(tmp_path / "renamed.pth"))
    state["features.7.weight"] = state["features.7.weight"][:64]
    torch.save(state, tmp_path / "narrow.pth")
    with pytest.raises(QddError, match=r"narrow.pth .*\(shape mismatch features.7.weight"):
        build_detector("aeroblade", vae=vae, lpips_weights=str(tmp_path / "narrow.pth"))
    with pytest.raises(QddError, match="aeroblade is training-free: it takes no --weights"):
        load_detector("aeroblade", tmp_path / "x.pth", vae=vae, lpips_weights=vgg)
    with pytest.raises(QddError, match="autoencoder_dtype 'half': one of float16"):
        build_detector("aeroblade", vae=vae, lpips_weights=vgg, autoencoder_dtype="half")
    extra = vgg_file(tmp_path / "whole.pth", extra=True)  # the whole file's other keys: ignored
    assert build_detector("aeroblade", vae=vae, lpips_weights=str(extra)) is not None
    with pytest.raises(QddError, match="a 5×40 image is smaller than the autoencoders' 8-px"):
        build_detector("aeroblade", vae=vae, lpips_weights=vgg).eval_transform()(
            random_image(0, (5, 40))
        )


def test_lpips_linear_weights_are_the_lpips_packages() -> None:
    """torchmetrics ships LPIPS v0.1's linear layers; they are the `lpips` package's."""
    import lpips

    from qdd.detectors.lpips_layer import LIN_KEY, lpips_linear_file

    ours = torch.load(lpips_linear_file(), weights_only=True, map_location="cpu")[LIN_KEY]
    package = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    assert torch.equal(ours, torch.load(package, weights_only=True, map_location="cpu")[LIN_KEY])


@pytest.mark.slow  # ~9 s; tests/test_ten_detectors.py scores AEROBLADE through qdd-cli test too
def test_cli_test_runs_aeroblade_on_shards_twice_alike(files: dict[str, Path], tmp_path: Path):
    write_fake_shards(tmp_path / "real", [3, 2], generator="photos", precision=None, label=0)
    write_fake_shards(tmp_path / "tiny-fp4", [3, 2], generator="tiny", precision="fp4")
    args = json.dumps(
        {"vae": [str(files["kl"]), str(files["vq"].parent)], "lpips_weights": str(files["vgg"])}
    )
    runs = []
    for batch_size in (1, 2):
        out = tmp_path / f"run{batch_size}"
        main(
            [
                "test",
                "--detector",
                "aeroblade",
                "--model.detector_args",
                args,
                "--data",
                str(tmp_path / "real"),
                "--data",
                str(tmp_path / "tiny-fp4"),
                "--out",
                str(out),
                f"--data.batch_size={batch_size}",
                *FAST,
            ]
        )
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["n"] == 10 and metrics["detector"] == "aeroblade"
        assert len(metrics["weight_files"]) == 3  # two autoencoders and the VGG file
        runs.append(pd.read_parquet(out / "scores.parquet").sort_values("key"))
    assert runs[0]["logit"].notna().all() and (runs[0]["logit"] <= 0).all()
    np.testing.assert_allclose(runs[0]["logit"], runs[1]["logit"], rtol=1e-3)

    # issue 23: fit calibrates a threshold (no training); test reads it from the checkpoint
    main(["fit", "--detector", "aeroblade", "--model.detector_args", args,
          "--data", str(tmp_path / "real"), "--data", str(tmp_path / "tiny-fp4"),
          "--out", str(tmp_path / "fit"), *FAST])  # fmt: skip
    fitted = json.loads((tmp_path / "fit" / "metrics.json").read_text())
    assert fitted["steps"] == 0 and len(fitted["weight_files"]) == 3
    main(["test", "--ckpt_path", str(tmp_path / "fit" / "checkpoints" / "last.ckpt"),
          "--data", str(tmp_path / "real"), "--data", str(tmp_path / "tiny-fp4"),
          "--data.allow_train_overlap=true", "--out", str(tmp_path / "calibrated"),
          *FAST])  # fmt: skip
    tested = json.loads((tmp_path / "calibrated" / "metrics.json").read_text())
    threshold = fitted["calibrated_threshold"]
    assert tested["calibrated_threshold"] == threshold and tested["train_overlap"] > 0
    logits, labels = runs[0]["logit"].to_numpy(), runs[0]["label"].to_numpy()
    calibrated = ((logits > threshold) == labels).mean()
    assert tested["overall"]["acc_calibrated"] == pytest.approx(calibrated)
    assert metrics["accuracy_note"] and metrics["overall"]["acc"] is None  # uncalibrated


def test_aeroblade_card_and_device_normalisation(files: dict[str, Path]) -> None:
    """Pixels in [0, 1]: the loader's uint8 batch divided by 255 on the device is the same."""
    from qdd.detectors import detector_class
    from qdd.modules.detector import split_normalization

    card = detector_class("aeroblade").card
    assert not card.trainable and card.family == "reconstruction"
    assert card.input_policy() == "no resize, bottom/right to multiples of 8, pixels in [0, 1]"
    detector = build_detector("aeroblade", vae=[str(files["kl"])], lpips_weights=str(files["vgg"]))
    transform = detector.eval_transform()
    host, (mean, std) = split_normalization(transform)
    image = random_image(3, (45, 37))
    pixels = host(image)
    assert pixels.dtype == torch.uint8 and tuple(pixels.shape) == (3, 32, 40)
    on_device = (pixels[None].float().div(255) - mean) / std
    assert torch.equal(on_device[0], transform(image))


def test_an_autoencoder_file_with_a_renamed_key_is_refused(
    files: dict[str, Path], tmp_path: Path
) -> None:
    """diffusers fills a renamed key with random weights and only warns; aeroblade would then
    score with a random decoder layer. It must fail in one line naming the key."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(files["kl"], tmp_path / "renamed-vae")
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["decoder.conv_in.weights"] = state.pop("decoder.conv_in.weight")
    save_file(state, str(weights))
    with pytest.raises(QddError) as error:
        build_detector("aeroblade", vae=[str(folder)], lpips_weights=str(files["vgg"]))
    message = str(error.value)
    assert "renamed-vae" in message and "missing keys decoder.conv_in.weight" in message
    assert "unexpected keys decoder.conv_in.weights" in message and "\n" not in message
