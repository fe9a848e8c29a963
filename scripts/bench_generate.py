"""Benchmark ``qdd-cli generate`` against the same diffusers pipeline called in a plain loop.

For each generator and precision, two fresh processes make the same N images:

- ``direct``: ``from_pretrained`` + the same precision recipe, then ``pipeline(...)`` per
  batch in a Python loop, each image encoded to PNG — what a user would write by hand;
- ``qdd``: ``qdd.generation.command.run_job`` — the whole ``qdd-cli generate`` run: Trainer,
  predict loop, shard writing, manifest.

Reported: images/s of the generation loop (first to last image; qdd-cli's includes the
predict loop, PNG encoding and shard writing) and end to end (from after the imports,
loading the model included), the ratios qdd/direct (target ≥ 0.95), and each process's
peak memory (RSS on CPU; allocated CUDA memory on a GPU). Best of ``--repeats``.

Then the costs ``qdd-cli generate`` records (issue 18), for the trade-off table: the
denoiser's deployed bytes (`qdd.quant.size`) and its ratio to fp32, the median seconds per
image of the pipeline calls, and the accelerator's peak memory during them
(``max_memory_allocated``; none on a CPU) — from the direct loop, measured the same way
(`qdd.generation.costs.timed_call`), and from qdd-cli's manifest.

    python scripts/bench_generate.py                       # tiny sd15 + sd3, CPU
    python scripts/bench_generate.py --generators sd3 --model-path sd3=DIR --n 64
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_GENERATORS = ("sd15", "sd3")
DEFAULT_PRECISIONS = ("fp32", "fp16", "fp8", "fp4")


def peak_memory_mb(device: str) -> float:
    """Peak allocated CUDA memory, or this process's peak RSS (Linux: KiB)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mib(n: int | None) -> str:
    """Bytes in MiB, or "n/a" where none was measured (a CPU has no accelerator peak)."""
    return "n/a" if n is None else f"{n / 2**20:.0f}"


def worker(args: argparse.Namespace) -> dict:
    """One measurement in this process: imports first, then the timed run."""
    import torch

    from qdd.generation.command import make_trainer, run_job
    from qdd.generation.costs import timed_call
    from qdd.generation.jobs import Job, work_items
    from qdd.generation.loading import apply_precision, compute_dtype_name, load_pipeline
    from qdd.generation.prompts import default_prompts
    from qdd.generation.registry import get_generator
    from qdd.quant import resolve_backend

    spec = get_generator(args.generator)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    import diffusers

    getattr(diffusers, spec.pipeline_class)  # diffusers imports lazily: start-up, not timed
    items = work_items(default_prompts(), 0, args.n)
    size = {"height": args.size, "width": args.size}
    loop: dict[str, float] = {}
    costs: dict = {}
    started = time.perf_counter()
    if args.mode == "direct":
        dtype = compute_dtype_name(spec, args.precision)
        pipeline = load_pipeline(spec, args.model_path, dtype, torch.device(device))
        backend = resolve_backend(args.precision, "auto", device)
        summary = apply_precision(pipeline, spec, args.precision, backend, "denoiser", device)
        per_image, peaks = [], []
        loop["start"] = time.perf_counter()
        for start in range(0, len(items), args.batch_size):
            batch = items[start : start + args.batch_size]
            images, seconds, peak = timed_call(
                torch.device(device),
                lambda batch=batch: (
                    pipeline(
                        prompt=[item.prompt for item in batch],
                        generator=[torch.Generator("cpu").manual_seed(item.seed) for item in batch],
                        num_inference_steps=args.steps,
                        guidance_scale=spec.guidance,
                        **size,
                        **spec.call_kwargs,
                    ).images
                ),
            )
            per_image.append(seconds / len(batch))
            peaks.append(peak)
            for image in images:
                image.save(io.BytesIO(), format="PNG", compress_level=1)
        loop["end"] = time.perf_counter()
        costs = {
            "denoiser_bytes": summary.denoiser_bytes,
            "seconds_per_image": statistics.median(per_image),
            "peak_memory_bytes": None if None in peaks else max(peaks),
        }
    else:
        import lightning as L

        class LoopTimer(L.Callback):
            def on_predict_start(self, *_: object) -> None:
                loop["start"] = time.perf_counter()

            def on_predict_end(self, *_: object) -> None:
                loop["end"] = time.perf_counter()

        job = Job(
            generator=spec.name,
            precision=args.precision,
            out=args.out,
            model_path=args.model_path,
            limit=args.n,
            steps=args.steps,
            batch_size=args.batch_size,
            **size,
        )
        trainer_kwargs = {
            "accelerator": device,
            "enable_progress_bar": False,
            "callbacks": [LoopTimer()],
        }
        make_trainer(trainer_kwargs)  # Lightning's first-use cost is start-up, not generation
        out = run_job(job, trainer_kwargs)
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        (group,) = manifest["costs"].values()
        costs = {k: group[k] for k in ("denoiser_bytes", "seconds_per_image", "peak_memory_bytes")}
    seconds = time.perf_counter() - started
    loop_s = loop["end"] - loop["start"]
    return {
        "seconds": seconds,
        "images_per_s": args.n / seconds,
        "loop_images_per_s": args.n / loop_s,
        "peak_mb": peak_memory_mb(device),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
        **costs,
    }


def measure(
    mode: str, generator: str, precision: str, model_path: str, args: argparse.Namespace, out: Path
) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        mode,
        "--generators",
        generator,
        "--precisions",
        precision,
        "--model-path",
        f"{generator}={model_path}",
        "--n",
        str(args.n),
        "--steps",
        str(args.steps),
        "--size",
        str(args.size),
        "--batch-size",
        str(args.batch_size),
        "--out",
        str(out),
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} {generator} {precision} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["startup_s"] = time.perf_counter() - started - result["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generators", nargs="+", default=list(DEFAULT_GENERATORS))
    parser.add_argument("--precisions", nargs="+", default=list(DEFAULT_PRECISIONS))
    parser.add_argument(
        "--model-path",
        nargs="*",
        default=[],
        help="GENERATOR=PATH (default: a tiny random-init pipeline)",
    )
    parser.add_argument("--n", type=int, default=32, help="images per measurement")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="best of R runs per cell")
    parser.add_argument("--worker", choices=["direct", "qdd"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    paths = dict(item.split("=", 1) for item in args.model_path)

    if args.worker:
        args.mode, args.generator, args.precision = (
            args.worker,
            args.generators[0],
            args.precisions[0],
        )
        args.model_path = paths[args.generator]
        print(json.dumps(worker(args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for generator in args.generators:
            if generator not in paths:
                from qdd.generation.tiny import build_tiny_pipeline

                paths[generator] = str(build_tiny_pipeline(generator, Path(tmp) / generator))
            for precision in args.precisions:
                best: dict[str, dict] = {}
                for repeat in range(args.repeats):
                    for mode in ("direct", "qdd"):
                        out = Path(tmp) / f"out-{generator}-{precision}-{repeat}"
                        result = measure(mode, generator, precision, paths[generator], args, out)
                        if mode not in best or result["seconds"] < best[mode]["seconds"]:
                            best[mode] = result
                direct, qdd = best["direct"], best["qdd"]
                rows.append((generator, precision, direct, qdd))
                print(
                    f"{generator} {precision}: loop img/s direct "
                    f"{direct['loop_images_per_s']:.2f}, qdd {qdd['loop_images_per_s']:.2f}; "
                    f"end to end {direct['images_per_s']:.2f}, {qdd['images_per_s']:.2f}",
                    file=sys.stderr,
                )
    device = rows[0][2]["device"]
    memory = "peak CUDA MiB" if device == "cuda" else "peak RSS MiB"
    print(
        f"\n{args.n} images, {args.steps} steps, {args.size}², batch {args.batch_size}, "
        f"{device}, best of {args.repeats}\n"
    )
    print(
        "| generator | precision | loop img/s direct / qdd-cli | loop ratio | end-to-end img/s "
        f"direct / qdd-cli | end-to-end ratio | {memory} direct / qdd-cli |"
    )
    print("|---|---|---|---|---|---|---|")
    for generator, precision, direct, qdd in rows:
        loop_ratio = qdd["loop_images_per_s"] / direct["loop_images_per_s"]
        ratio = qdd["images_per_s"] / direct["images_per_s"]
        print(
            f"| {generator} | {precision} | {direct['loop_images_per_s']:.2f} / "
            f"{qdd['loop_images_per_s']:.2f} | {loop_ratio:.3f} | {direct['images_per_s']:.2f} / "
            f"{qdd['images_per_s']:.2f} | {ratio:.3f} | {direct['peak_mb']:.0f} / "
            f"{qdd['peak_mb']:.0f} |"
        )
    print(f"\nCosts per image ({rows[0][3]['device_name'] or device}; direct loop / qdd-cli):\n")
    print(
        "| generator | precision | denoiser bytes | vs fp32 | s/image direct / qdd-cli | "
        "peak accelerator MiB direct / qdd-cli |"
    )
    print("|---|---|---|---|---|---|")
    fp32 = {g: q["denoiser_bytes"] for g, p, _, q in rows if p == "fp32"}
    for generator, precision, direct, qdd in rows:
        ratio = f"{qdd['denoiser_bytes'] / fp32[generator]:.3f}" if generator in fp32 else "-"
        print(
            f"| {generator} | {precision} | {qdd['denoiser_bytes']:,} | {ratio} | "
            f"{direct['seconds_per_image']:.3f} / {qdd['seconds_per_image']:.3f} | "
            f"{mib(direct['peak_memory_bytes'])} / {mib(qdd['peak_memory_bytes'])} |"
        )


if __name__ == "__main__":
    main()
