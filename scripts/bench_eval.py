"""NPR test throughput, end to end (shards → metrics), against two references.

(a) the detector's forward pass alone on pre-decoded tensors of the same batches
    (the ceiling: target ratio ≥ 0.9);
(b) the official NPR evaluation loop, re-created from its published description:
    torchvision ImageFolder over 0_real/1_fake PNG files + PIL Resize((256, 256)) +
    ToTensor + ImageNet Normalize + DataLoader, same images, same weights, same batch size
    (target ≥ 1.0×, stretch 1.2×).

Run: ``python scripts/bench_eval.py [--images 256] [--size 512] [--batch-size 32]``.
Weights are random (throughput does not depend on them); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

os.environ.setdefault("WANDB_MODE", "disabled")


def make_images(root: Path, n: int, size: int) -> tuple[Path, Path]:
    """PNG photos-like images in ImageFolder layout and the same images as shards."""
    from qdd.datamodules.folder import shard_folder
    from qdd.datamodules.schema import FAKE, REAL

    rng = np.random.default_rng(0)
    folder = root / "imagefolder"
    for name in ("0_real", "1_fake"):
        (folder / name).mkdir(parents=True)
    for i in range(n):
        base = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((size, size), Image.BICUBIC)
        image.save(folder / ("0_real" if i % 2 == 0 else "1_fake") / f"img{i:05d}.png")
    shards = root / "shards"
    shard_folder(folder / "0_real", shards / "real", label=REAL, source="bench")
    shard_folder(folder / "1_fake", shards / "fake", label=FAKE, source="bench", generator="bench")
    return folder, shards


def official_loop(folder: Path, detector: torch.nn.Module, batch_size: int, workers: int) -> float:
    """The published NPR test loop: ImageFolder + Resize((256,256)) + DataLoader."""
    from torchvision import datasets, transforms

    transform = transforms.Compose(
        [
            transforms.Resize((256, 256)),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )
    loader = torch.utils.data.DataLoader(
        datasets.ImageFolder(str(folder), transform), batch_size=batch_size, num_workers=workers
    )
    start = time.perf_counter()
    labels, scores = [], []
    with torch.inference_mode():
        for images, label in loader:
            scores.append(detector(images).sigmoid())
            labels.append(label)
    torch.cat(scores), torch.cat(labels)
    return time.perf_counter() - start


def qdd_loop(shards: Path, batch_size: int, workers: int, out: Path) -> float:
    """`qdd-cli test --detector npr --random-weights` through Lightning, shards → metrics."""
    from qdd.cli import main

    args = [
        "test", "--detector", "npr", "--random-weights", "--data", str(shards / "*"),
        "--out", str(out), f"--data.batch_size={batch_size}", f"--data.num_workers={workers}",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        "--trainer.accelerator=cpu",
    ]  # fmt: skip
    start = time.perf_counter()
    main(args)
    return time.perf_counter() - start


def forward_only(shards: Path, detector: torch.nn.Module, batch_size: int) -> float:
    """The detector alone on the same batches, decoded and preprocessed beforehand."""
    from qdd.datamodules.dataset import ShardDataset
    from qdd.datamodules.reader import index_folders, resolve_folders

    entries, _ = index_folders(resolve_folders(str(shards / "*")))
    dataset = ShardDataset(entries, detector.eval_transform())
    batches = list(torch.utils.data.DataLoader(dataset, batch_size=batch_size))
    start = time.perf_counter()
    with torch.inference_mode():
        for images, _, _ in batches:
            detector(images)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=512, help="side of the source images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="best of N timings each")
    args = parser.parse_args()
    logging.disable(logging.WARNING)

    from qdd.detectors import load_detector

    official = load_detector("npr", random_weights=True).eval()
    # qdd runs detectors channels-last; forward-only uses the same model so that (a) measures
    # only the pipeline's overhead, while the official loop keeps the published NCHW model.
    detector = load_detector("npr", random_weights=True).eval()
    detector.load_state_dict(official.state_dict())
    detector.to(memory_format=torch.channels_last)
    with tempfile.TemporaryDirectory() as tmp:
        folder, shards = make_images(Path(tmp), args.images, args.size)
        timings = {"forward": [], "qdd": [], "official": []}
        for repeat in range(args.repeats):
            timings["forward"].append(forward_only(shards, detector, args.batch_size))
            out = Path(tmp) / f"run{repeat}"
            timings["qdd"].append(qdd_loop(shards, args.batch_size, args.num_workers, out))
            timings["official"].append(
                official_loop(folder, official, args.batch_size, args.num_workers)
            )
    best = {name: min(values) for name, values in timings.items()}
    rate = {name: args.images / seconds for name, seconds in best.items()}
    print(
        f"\nNPR test throughput, {args.images} images of {args.size}², batch {args.batch_size}, "
        f"{args.num_workers} worker(s), torch threads {torch.get_num_threads()}"
    )
    print("| loop | images/s |\n|---|---|")
    for name, label in [
        ("forward", "forward only (pre-decoded tensors)"),
        ("qdd", "qdd-cli test (shards → metrics)"),
        ("official", "official NPR loop (ImageFolder + Resize)"),
    ]:
        print(f"| {label} | {rate[name]:.1f} |")
    print(f"\n(a) qdd / forward-only = {rate['qdd'] / rate['forward']:.3f}  (target ≥ 0.9)")
    print(
        f"(b) qdd / official     = {rate['qdd'] / rate['official']:.3f}  (target ≥ 1.0, "
        "stretch 1.2)"
    )


if __name__ == "__main__":
    main()
