"""``qdd-cli demo``: the whole study in miniature, offline, on CPU, in minutes.

Every step runs through the same code a real study uses, only smaller:

1. real class: scikit-image's bundled photographs, cut into tiles, ``qdd-cli shard``;
2. tiny random-init generators of each architecture family (SD1.5, SDXL, SD3, Flux) built
   from configs, saved, and run by ``qdd-cli generate`` at every weight-only precision (and
   SD3/Flux at one deployed W4A4 format, svdq-int4), paired by seed; ``qdd-cli quality``
   compares each image with its fp32 twin (PSNR, SSIM) — the cost side of the trade-off;
   SD3's fp32 and fp4 latents decoded again by a VAE at the other precision (``qdd-cli
   decode``: the denoiser × decoder swap), and ``qdd-cli fingerprint`` draws every group's
   residual spectrum against its fp32 twin group (why a detector fails);
3. each detector, with a tiny backbone, fitted briefly on real vs FP32 fakes (as the
   published detectors were trained on full-precision fakes) — ``qdd-cli fit``;
4. each detector tested on held-out prompts at every precision — ``qdd-cli test``;
   then the recommendation in miniature: NPR fine-tuned from that checkpoint for a few more
   epochs on a weighted mix with FP4 fakes (`ShardDataModule` sources: real ½, FP32 ¼, FP4 ¼),
   tested like the others, beside the NPR trained without them; and a precision
   attribution (``qdd-cli fit --task attribution --attribute family``): NPR trained to
   tell SD3's 16-bit images from their 4-bit twins, tested on held-out prompts at fp16 and
   every 4-bit weight-only format (its confusion matrix in the report; on these tiny
   models it does not tell them apart: README, "Precision attribution");
5. ``qdd-cli report`` over the test runs, the attribution run, the quality and fingerprint
   runs (with the trade-off table).

The numbers come from tiny random-init models: they show the pipeline, not the paper.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from qdd import api
from qdd.api import RunResult
from qdd.demo_folder import clear_earlier_demo, record_demo_files
from qdd.errors import QddError
from qdd.logs import configure_logging, is_verbose, warnings_only

GENERATORS = ("sd15", "sdxl", "sd3", "flux-schnell")
DETECTORS = ("npr", "clipd", "univfd", "corvi")
#: A JPEG sweep for one detector, so the report can draw a robustness curve.
PERTURB = {"npr": ("jpeg:95", "jpeg:75", "jpeg:50")}
TILE = 64
#: One deployed format (weights and activations in 4 bit, SVDQuant's 16-bit low-rank branch)
#: for the transformers, the architectures it is deployed for; each costs one folder.
DEPLOYED = {"sd3": ("svdq-int4",), "flux-schnell": ("svdq-int4",)}
#: The denoiser × decoder swap on one generator: its fp32 and fp4 test folders keep their
#: latents, decoded again with the VAE at the other precision (`qdd-cli decode`).
SWAP = ("sd3", ("fp32", "fp4"))
#: Every generator at every unquantized and weight-only level, in palette order.
PRECISIONS = ("fp32", "fp16", "fp8", "fp4", "nf4", "nvfp4", "mxfp4")
#: At most this many tiles of one photograph (half for training, half for test).
TILES_PER_PHOTO = 16
#: The sub-folders a demo writes (--overwrite replaces the files it listed there).
PARTS = ("photos", "prompts", "models", "shards", "runs", "report")
TRAIN_PROMPTS = 24
TEST_PROMPTS = 10
STEPS = 2
#: Images per pipeline call: one call per test folder. Fixed, so runs stay byte-identical
#: (the batch size is part of every recipe); batching is what makes half-precision
#: compute on CPU affordable here.
GENERATE_BATCH = 12
#: (epochs, learning rate) of the brief fit: tiny models from scratch need a higher rate
#: than the published recipes, which start from pretrained trunks or strong features.
FIT = {"npr": (6, 1e-3), "clipd": (30, 1e-2), "univfd": (30, 1e-2), "corvi": (3, 1e-3)}
#: The fine-tune of the recommendation: (epochs, learning rate), and how many training
#: prompts also get an FP4 image (their FP32 twins are in the training set already).
FINE_TUNE = (2, 1e-3)
FP4_TRAIN_PROMPTS = 12
#: Precision attribution on one generator: its 16-bit and 4-bit training twins (the
#: FP4_TRAIN_PROMPTS prompts that have an FP4 image), classes by family; tested on its
#: held-out prompts at the 16-bit level and at every 4-bit weight-only format.
ATTRIBUTION = ("sd3", "fp16", "fp4")
ATTRIBUTION_TESTS = ("fp16", "fp4", "nf4", "nvfp4", "mxfp4")
#: (detector, epochs, learning rate, draws per epoch): NPR sees the full-resolution
#: residual, where the tiny SD3's 4-bit trace lives (a change of a pattern periodic at its 8-pixel
#: patch grid); the tiny CLIP towers see a 32-pixel resize of the image, where it is gone.
#: The draws give BatchNorm's running statistics steps to settle: with the 18 training
#: images once per epoch (3 steps) evaluation gave every image the same probability.
ATTRIBUTION_FIT = ("npr", 6, 1e-3, 48)


_STARTED = time.perf_counter()


def step(message: str) -> None:
    """One progress line: the clock, the seconds since the demo started, the step."""
    elapsed = time.perf_counter() - _STARTED
    print(
        f"[demo {time.strftime('%H:%M:%S')} +{elapsed:.0f}s] {message}", file=sys.stderr, flush=True
    )


def photo_tiles(out: Path, tile: int = TILE) -> tuple[Path, Path]:
    """Cut scikit-image's colour photographs into tiles: half for training, half for test."""
    import skimage

    from qdd.datamodules.folder import find_images

    src = Path(skimage.__file__).parent / "data"
    train, test = out / "train", out / "test"
    for folder in (train, test):
        folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for path in find_images(src):
        try:
            image = Image.open(path)
            image.load()
        except Exception:
            continue  # e.g. multipage_rgb.tif, which PIL cannot read
        if image.mode not in ("RGB", "RGBA") or min(image.size) < 2 * tile:
            continue  # grey-scale scans and charts are not photographs of the world
        rgb = np.asarray(image.convert("RGB"))
        corners = [
            (y, x)
            for y in range(0, rgb.shape[0] - tile + 1, 2 * tile)
            for x in range(0, rgb.shape[1] - tile + 1, 2 * tile)
        ]
        # evenly spread over the photo, and no photo (the 1411² retina) dominates the class
        chosen = np.linspace(0, len(corners) - 1, min(len(corners), TILES_PER_PHOTO))
        for y, x in (corners[int(i)] for i in chosen.round()):
            target = train if n % 2 == 0 else test
            Image.fromarray(rgb[y : y + tile, x : x + tile]).save(
                target / f"{path.stem}_{y}_{x}.png"
            )
            n += 1
    return train, test


def main(argv: list[str]) -> None:
    """``qdd-cli demo [--out DIR] [--overwrite]``: prints the report's index last."""
    parser = argparse.ArgumentParser(
        prog="qdd-cli demo",
        description="The whole study in miniature: tiny generators, every precision, four "
        "detectors, the report. Offline, CPU, deterministic.",
    )
    parser.add_argument("--out", default="demo", help="folder for everything (default: demo)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo")
    args = parser.parse_args(argv)
    print(run_demo(Path(args.out), args.overwrite).run_dir / "report" / "report.md")


def run_demo(out: Path, overwrite: bool = False) -> RunResult:
    """Every step of the study through `qdd.api`; ``run_dir`` is ``out``, metrics: the
    report's index and the test runs. With ``overwrite``, an earlier demo's files go first
    (`qdd.demo_folder`: only those); quiet but for warnings and its step lines."""
    if out.exists() and not out.is_dir():
        raise QddError(f"--out {out} is a file: pass a folder for the demo")
    if out.is_symlink() and not out.exists():
        raise QddError(f"--out {out} is a link to {os.readlink(out)}, which does not exist: "
                       "create that folder, or pass another --out")  # fmt: skip
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise QddError(f"{out} is not empty: pass --overwrite or choose another --out")
        clear_earlier_demo(out, PARTS)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with warnings_only(quiet=not is_verbose()):
            return run_steps(out)
    finally:  # failed too: the next --overwrite then knows what this demo wrote
        record_demo_files(out, PARTS)


def run_steps(out: Path) -> RunResult:
    """The demo's steps, into ``out`` whose parts are empty (`run_demo`)."""
    from qdd.threads import usable_cores, use_threads

    if not is_verbose():
        os.environ.setdefault("WANDB_SILENT", "true")  # offline runs still logged, quietly
    threads = use_threads()
    from qdd.datamodules.folder import shard_folder
    from qdd.datamodules.schema import REAL
    from qdd.generation.prompts import default_prompts
    from qdd.generation.tiny import build_tiny_pipeline

    global _STARTED
    started = _STARTED = time.perf_counter()
    shards = out / "shards"
    step(f"{threads} torch thread(s) on the {usable_cores()} core(s) this process may use")
    step("1/5 real photographs → shards (scikit-image's bundled photos, 64² tiles)")
    train_photos, test_photos = photo_tiles(out / "photos")
    shard_folder(
        train_photos,
        shards / "train" / "real-skimage",
        label=REAL,
        source="skimage",
        overwrite=True,
    )
    shard_folder(
        test_photos, shards / "test" / "real-skimage", label=REAL, source="skimage", overwrite=True
    )

    prompts = default_prompts()
    (out / "prompts").mkdir(parents=True, exist_ok=True)
    prompt_files = {}
    for split, chosen in (
        ("train", prompts[:TRAIN_PROMPTS]),
        ("test", prompts[TRAIN_PROMPTS : TRAIN_PROMPTS + TEST_PROMPTS]),
    ):
        prompt_files[split] = out / "prompts" / f"{split}.txt"
        prompt_files[split].write_text("\n".join(chosen) + "\n")

    step(f"2/5 tiny generators {', '.join(GENERATORS)} at {', '.join(PRECISIONS)}")
    swapped = {(SWAP[0], p) for p in SWAP[1]}
    for generator in GENERATORS:
        model = build_tiny_pipeline(generator, out / "models" / generator)
        plan = [("train", "fp32"), ("train", "fp4")] + [("test", p) for p in PRECISIONS]
        plan += [("test", p) for p in DEPLOYED.get(generator, ())]
        for split, precision in plan:
            # FP4 training twins of the first prompts only: the fine-tune needs few
            fp4_twins = precision == "fp4" and split == "train"
            call(
                api.generate,
                generator=generator,
                model_path=str(model),
                precision=precision,
                prompts=str(prompt_files[split]),
                steps=STEPS,
                height=TILE,
                width=TILE,
                seed=0 if split == "train" else 1000,
                batch_size=GENERATE_BATCH,
                out=str(shards / split / f"{generator}-{precision}"),
                limit=FP4_TRAIN_PROMPTS if fp4_twins else None,
                save_latents=split == "test" and (generator, precision) in swapped,
            )
    generator, (fp32, fp4) = SWAP
    step(f"   the denoiser × decoder swap: {generator} {fp32} latents decoded by an {fp4} VAE "
         f"and {fp4} latents by an {fp32} one")  # fmt: skip
    for denoiser, vae in ((fp32, fp4), (fp4, fp32)):
        call(
            api.decode,
            src=str(shards / "test" / f"{generator}-{denoiser}"),
            vae_precision=vae,
            out=str(shards / "test" / f"{generator}-{denoiser}-vae{vae}"),
        )

    step("   image quality of every test image against its fp32 twin (PSNR, SSIM)")
    quality = call(
        api.quality,
        data=[str(shards / "test" / f"{generator}-*") for generator in GENERATORS],
        reference="fp32",
        out=out / "runs" / "quality",
    )
    step("   spectral fingerprints of every test group against its fp32 twin group")
    fingerprint = call(
        api.fingerprint,
        data=[str(shards / "test" / "*")],
        crop=TILE,
        out=out / "runs" / "fingerprint",
    )
    test_runs = []
    for detector in DETECTORS:
        step(f"3/5 fit {detector} on real vs FP32 fakes")
        fitted = call(
            api.fit,
            detector=detector,
            random_weights=True,
            model={"detector_args": tiny_detector_args(detector), "lr": FIT[detector][1]},
            data={"paths": [str(shards / "train" / "real-*"), str(shards / "train" / "*-fp32")],
                  "batch_size": 16},
            out=out / "runs" / f"fit-{detector}",
            trainer={"max_epochs": FIT[detector][0], "accelerator": "cpu",
                     "enable_model_summary": False},
        )  # fmt: skip
        ckpt = fitted.checkpoints.get("last") or fitted.checkpoints["best"]
        step(f"4/5 test {detector} on every precision")
        test_dir = out / "runs" / f"test-{detector}"
        score_test_shards(detector, ckpt, shards, test_dir, PERTURB.get(detector, ()))
        test_runs.append(test_dir)
        if detector == "npr":
            test_runs += fine_tune_with_fp4(out, ckpt)
    test_runs.append(attribute_precisions(out))

    step("5/5 report")
    from qdd.report.runs import mark_demo_run

    for run in test_runs:  # report.md then carries the "tiny random models" caveat
        mark_demo_run(run)
    call(api.report, runs=[*test_runs, quality.run_dir, fingerprint.run_dir], out=out / "report")
    minutes = (time.perf_counter() - started) / 60
    step(f"done in {minutes:.1f} min — tiny random-init models: the pipeline, not the paper")
    return RunResult(out, {"report": str(out / "report" / "report.md"),
                           "test_runs": [str(r) for r in test_runs]})  # fmt: skip


def call(function: Callable[..., RunResult], **config: Any) -> RunResult:
    """One `qdd.api` step, with the logging set-up a ``qdd-cli`` command starts with (the
    libraries the last step imported may have added warning filters of their own), showing
    only warnings and errors unless verbose: the demo's step lines say where it is."""
    verbose = is_verbose()
    configure_logging(verbose)
    with warnings_only(quiet=not verbose):
        return function(config)


def fine_tune_with_fp4(out: Path, start: Path) -> list[Path]:
    """NPR fine-tuned from ``start`` on real + FP32 + FP4 (class-balanced), then tested."""
    shards = out / "shards"
    sources = [
        {"path": str(shards / "train" / "real-*"), "weight": 1.0, "name": "real"},
        {"path": str(shards / "train" / "*-fp32"), "weight": 1.0, "name": "fp32"},
        {"path": str(shards / "train" / "*-fp4"), "weight": 1.0, "name": "fp4"},
    ]
    step("4/5 fine-tune npr with FP4 fakes mixed in (real 1/2, fp32 1/4, fp4 1/4), test it")
    tuned = call(
        api.fit,
        detector="npr",
        weights=start,
        model={"detector_args": tiny_detector_args("npr"), "lr": FINE_TUNE[1]},
        data={"train": sources, "test_fraction": 0, "val_fraction": 0.2, "batch_size": 16},
        out=out / "runs" / "fit-npr-fp4mix",
        trainer={"max_epochs": FINE_TUNE[0], "accelerator": "cpu", "enable_model_summary": False},
    )
    test_dir = out / "runs" / "test-npr-fp4mix"
    score_test_shards("npr", tuned.checkpoints["last"], shards, test_dir)
    return [test_dir]


def attribute_precisions(out: Path) -> Path:
    """A precision-attribution fit on one generator's 16-bit vs 4-bit training twins
    (each source half the draws), tested on its held-out prompts; returns the test run."""
    generator, sixteen, four = ATTRIBUTION
    detector, epochs, lr, draws = ATTRIBUTION_FIT
    shards = out / "shards"
    step(f"4/5 precision attribution: {detector} trained on {generator}'s 16-bit ({sixteen}) vs "
         f"4-bit ({four}) images, tested on {', '.join(ATTRIBUTION_TESTS)}")  # fmt: skip
    call(
        api.generate,
        generator=generator,
        model_path=str(out / "models" / generator),
        precision=sixteen,
        prompts=str(out / "prompts" / "train.txt"),
        steps=STEPS,
        height=TILE,
        width=TILE,
        seed=0,
        batch_size=GENERATE_BATCH,
        out=str(shards / "train" / f"{generator}-{sixteen}"),
        limit=FP4_TRAIN_PROMPTS,  # the twins of the FP4 training images
    )
    sources = [{"path": str(shards / "train" / f"{generator}-{p}"), "weight": 1.0, "name": p}
               for p in (sixteen, four)]  # fmt: skip
    fitted = call(
        api.fit,
        detector=detector,
        task="attribution",
        random_weights=True,
        model={"detector_args": tiny_detector_args(detector), "lr": lr, "attribute": "family"},
        data={"train": sources, "samples_per_epoch": draws,
              "test_fraction": 0, "val_fraction": 0.2, "batch_size": 8},
        out=out / "runs" / f"fit-attribution-{detector}",
        trainer={"max_epochs": epochs, "accelerator": "cpu", "enable_model_summary": False},
    )  # fmt: skip
    test_dir = out / "runs" / f"attribution-{detector}"
    call(
        api.test,
        detector=detector,
        ckpt_path=fitted.checkpoints["last"],
        model={"detector_args": tiny_detector_args(detector)},
        data={"paths": [str(shards / "test" / f"{generator}-{p}") for p in ATTRIBUTION_TESTS],
              "batch_size": 32},
        out=test_dir,
        trainer={"accelerator": "cpu"},
    )  # fmt: skip
    return test_dir


def score_test_shards(
    detector: str, ckpt: Path, shards: Path, out: Path, perturb: tuple[str, ...] = ()
) -> RunResult:
    """``qdd-cli test`` of a fitted checkpoint on every test shard (and perturbation)."""
    return call(
        api.test,
        detector=detector,
        ckpt_path=ckpt,
        model={"detector_args": tiny_detector_args(detector)},
        data={"paths": str(shards / "test" / "*"), "batch_size": 32},
        out=out,
        trainer={"accelerator": "cpu"},
        perturb=list(perturb),
    )


def tiny_detector_args(detector: str) -> dict[str, Any]:
    """Small backbones of the same code path as the published ones."""
    from qdd.detectors.tiny import tiny_detector_args as args_for

    return args_for(detector)
