"""Detector test throughput: where `qdd-cli test` stands against its ceilings, in one run.

Any registered detector (``--detector``, default NPR) at its real size. Five loops over
the same PNG images (marginal images/s: a run on N images minus a run on
N/4, so start-up — imports, Lightning set-up, worker start — cancels):

- forward only: the detector alone on batches decoded and preprocessed beforehand (on the
  device, channels-last, as qdd runs it);
- loader alone: `ShardDataModule`'s test loader, batches copied to the device and
  normalised, no model;
- `qdd-cli test` end to end (shards → scores.parquet + metrics.json);
- the official-style loop (NPR only): torchvision ImageFolder + PIL ``Resize((256, 256))`` +
  ToTensor + Normalize + DataLoader, NCHW model, ``.sigmoid().tolist()`` per batch, as
  NPR's own evaluation code does;
- the decode ceiling: one core's PNG decode + resize time per image, times the workers.

Ratios printed: end to end / forward only, end to end / official loop, end to end / decode
ceiling. Weights are random, backbones included (throughput does not depend on them); nothing is
downloaded. Full-resolution detectors (corvi, bfree) batch here because the bench images
share one size.

Run: ``python scripts/bench_eval.py --device cpu|cuda [--detector npr] [--images 256]
[--size 512] [--batch-size 32] [--num-workers N]`` (workers default to qdd's own default).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

os.environ.setdefault("WANDB_MODE", "disabled")

#: Detector arguments that avoid every download: random, seeded backbones.
RANDOM_BACKBONE: dict[str, dict[str, Any]] = {
    "clipd": {"backbone_weights": None},
    "univfd": {"backbone_weights": None},
    "rigid": {"backbone_weights": None},
}


def random_aeroblade_files(root: Path) -> dict[str, Any]:
    """AEROBLADE's files with random weights at their real sizes: an SD-shaped AutoencoderKL
    (diffusers' SD 1.x ``vae/`` config) and torchvision VGG16's layers up to relu2_2."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        sample_size=512,
    ).save_pretrained(root / "vae")  # fmt: skip
    state = {}
    for index, (n_in, n_out) in {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128)}.items():
        state[f"features.{index}.weight"] = torch.randn(n_out, n_in, 3, 3) * (2 / (9 * n_in)) ** 0.5
        state[f"features.{index}.bias"] = torch.zeros(n_out)
    torch.save(state, root / "vgg16.pth")
    return {"vae": [str(root / "vae")], "lpips_weights": str(root / "vgg16.pth")}


def make_images(root: Path, n: int, size: int) -> Path:
    """``n`` photo-like PNGs of ``size``², half real and half fake, ImageFolder layout."""
    rng = np.random.default_rng(0)
    folder = root / "all"
    for name in ("0_real", "1_fake"):
        (folder / name).mkdir(parents=True)
    for i in range(n):
        base = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((size, size), Image.BICUBIC)
        image.save(folder / ("0_real" if i % 2 == 0 else "1_fake") / f"img{i:05d}.png")
    return folder


def subset(folder: Path, root: Path, n: int) -> tuple[Path, Path]:
    """The first ``n`` images as an ImageFolder (hard links) and as qdd shards."""
    from qdd.datamodules.folder import shard_folder
    from qdd.datamodules.schema import FAKE, REAL

    images = root / f"imagefolder{n}"
    for name in ("0_real", "1_fake"):
        (images / name).mkdir(parents=True)
    for path in sorted(folder.glob("*/*.png"), key=lambda p: p.name)[:n]:
        os.link(path, images / path.parent.name / path.name)
    shards = root / f"shards{n}"
    shard_folder(images / "0_real", shards / "real", label=REAL, source="bench")
    shard_folder(images / "1_fake", shards / "fake", label=FAKE, source="bench", generator="bench")
    return images, shards


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def eval_loader(shards: Path, detector: torch.nn.Module, batch_size: int, workers: int) -> Any:
    """qdd's test loader (uint8 batches) and the normalisation it leaves to the device."""
    from qdd.datamodules.shard import ShardDataModule
    from qdd.modules.detector import split_normalization

    host, (mean, std) = split_normalization(detector.eval_transform())
    datamodule = ShardDataModule(
        str(shards / "*"), batch_size=batch_size, num_workers=workers, transforms={"eval": host}
    )
    datamodule.setup("test")
    loader = datamodule.test_dataloader()
    return loader, mean, std


def forward_only(shards: Path, detector, batch_size: int, device: torch.device) -> float:
    loader, mean, std = eval_loader(shards, detector, batch_size, 0)
    mean, std = mean.to(device), std.to(device)
    batches = [images.to(device).float().div(255).sub_(mean).div_(std) for images, _, _ in loader]
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for images in batches:
            detector(images)
    sync(device)
    return time.perf_counter() - start


def loader_alone(shards: Path, detector, batch_size: int, workers: int, device) -> float:
    start = time.perf_counter()
    loader, mean, std = eval_loader(shards, detector, batch_size, workers)
    loader.pin_memory = device.type == "cuda"
    mean, std = mean.to(device), std.to(device)
    for images, _, _ in loader:
        images.to(device, non_blocking=True).float().div(255).sub_(mean).div_(std)
    sync(device)
    return time.perf_counter() - start


def end_to_end(
    detector: str, shards: Path, batch_size: int, workers: int, device, out: Path,
    detector_args: dict[str, Any],
) -> float:
    """`qdd-cli test --detector D --random-weights`, in this process."""
    from qdd.cli import main

    extra = json.dumps(detector_args)
    args = [
        "test", "--detector", detector, "--random-weights", "--model.detector_args", extra,
        "--data", str(shards / "*"),
        "--out", str(out), f"--data.batch_size={batch_size}", f"--data.num_workers={workers}",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
        "--trainer.devices=1",
    ]  # fmt: skip
    start = time.perf_counter()
    main(args)
    return time.perf_counter() - start


def official(folder: Path, detector, batch_size: int, workers: int, device) -> float:
    """NPR's published test loop: ImageFolder + Resize((256,256)) + DataLoader."""
    from torchvision import datasets, transforms

    transform = transforms.Compose(
        [
            transforms.Resize((256, 256)),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )
    start = time.perf_counter()
    loader = torch.utils.data.DataLoader(
        datasets.ImageFolder(str(folder), transform),
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    scores, labels = [], []
    with torch.inference_mode():
        for images, label in loader:
            scores.extend(detector(images.to(device)).sigmoid().flatten().tolist())
            labels.extend(label.tolist())
    return time.perf_counter() - start


def decode_seconds(folder: Path, detector, n: int = 32) -> float:
    """One core: seconds per image to read, decode and preprocess (qdd's host part)."""
    from qdd.modules.detector import split_normalization

    host, _ = split_normalization(detector.eval_transform())
    paths = sorted(folder.glob("*/*.png"))[:n]
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            host(image.convert("RGB"))
    return (time.perf_counter() - start) / len(paths)


def marginal_rates(
    runs: dict[str, Callable[[int], float]], small: int, big: int, repeats: int
) -> dict[str, float]:
    """Images/s of each loop between a run on ``small`` and one on ``big`` images.

    The loops take turns (round-robin, best of ``repeats`` each), so a machine whose load
    drifts during the benchmark slows every loop alike and the ratios stay fair.
    """
    times: dict[tuple[str, int], float] = {}
    for _ in range(repeats):
        for n in (small, big):
            for name, run in runs.items():
                seconds = run(n)
                times[name, n] = min(times.get((name, n), seconds), seconds)
    return {name: (big - small) / max(times[name, big] - times[name, small], 1e-9) for name in runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--detector", default="npr", help="a registered detector name")
    parser.add_argument("--images", type=int, default=256, help="the big run (small: 1/4)")
    parser.add_argument("--size", type=int, default=512, help="side of the source images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, help="default: qdd's own default")
    parser.add_argument("--repeats", type=int, default=1, help="best of N timings each")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    device = torch.device(args.device)

    from qdd.datamodules.shard import default_num_workers, usable_cores
    from qdd.detectors import load_detector

    workers = args.num_workers
    if workers is None:
        workers = default_num_workers("cpu" if device.type == "cpu" else "gpu")
    from qdd.detectors import detector_class
    from qdd.errors import QddError

    try:
        name = detector_class(args.detector).name
    except QddError as error:
        raise SystemExit(f"bench_eval.py: {error}") from None
    extra = RANDOM_BACKBONE.get(name, {})
    if name == "aeroblade":
        extra = random_aeroblade_files(Path(tempfile.mkdtemp(prefix="bench-aeroblade-")))
    nchw = load_detector(name, random_weights=True, **extra).eval().to(device)
    nhwc = load_detector(name, random_weights=True, **extra).eval()
    nhwc.load_state_dict(nchw.state_dict())
    nhwc.to(device, memory_format=torch.channels_last)
    small, big = args.images // 4, args.images
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = make_images(root, big, args.size)
        data = {n: subset(folder, root, n) for n in (small, big)}
        bs = args.batch_size
        runs = {
            "forward": lambda n: forward_only(data[n][1], nhwc, bs, device),
            "loader": lambda n: loader_alone(data[n][1], nhwc, bs, workers, device),
            "qdd": lambda n: end_to_end(
                name, data[n][1], bs, workers, device, root / f"run{n}", extra
            ),
        }
        if name == "npr":  # the official loop written here is NPR's
            runs["official"] = lambda n: official(data[n][0], nchw, bs, workers, device)
        end_to_end(name, data[small][1], bs, workers, device, root / "warm-up", extra)  # imports
        rates.update(marginal_rates(runs, small, big, args.repeats))
        per_image = decode_seconds(folder, nhwc)
    rates["ceiling"] = max(workers, 1) / per_image

    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
    print(
        f"\n{name} test throughput on {args.device} ({name or platform.machine()}, "
        f"{usable_cores()} usable cores, torch threads {torch.get_num_threads()}): "
        f"marginal images/s between {small} and {big} PNGs of {args.size}², "
        f"batch {args.batch_size}, {workers} DataLoader worker(s)"
    )
    print("| loop | images/s |\n|---|---|")
    labels = {
        "forward": "forward only (pre-decoded batches, channels-last)",
        "loader": "ShardDataModule test loader alone, no model",
        "qdd": "`qdd-cli test` end to end",
        "official": "official-style loop (ImageFolder + Resize((256,256)) + DataLoader)",
        "ceiling": f"decode ceiling ({per_image * 1e3:.1f} ms/image on one core × "
        f"{max(workers, 1)})",
    }
    for key, label in labels.items():
        if key in rates:
            print(f"| {label} | {rates[key]:.3g} |")
    print(f"\nend to end / forward only   = {rates['qdd'] / rates['forward']:.3f}")
    if "official" in rates:
        print(f"end to end / official loop  = {rates['qdd'] / rates['official']:.3f}")
    print(f"end to end / decode ceiling = {rates['qdd'] / rates['ceiling']:.3f}")


if __name__ == "__main__":
    main()
