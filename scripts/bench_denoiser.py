"""Memory and speed of full-size denoisers at every precision and backend (random weights).

Builds an SD3-medium-shaped (2 B) and a Flux-dev-shaped (12 B) transformer from their
published configs with random bf16 weights on the GPU — no download — quantizes them with
qdd's own `quantize_module_`, and times one denoising step at 1024² (CFG batch 2 for SD3,
batch 1 with guidance embedding for Flux):

    python scripts/bench_denoiser.py                          # both shapes, every backend
    python scripts/bench_denoiser.py --shapes sd3-medium --precisions bf16 fp4
    python scripts/bench_denoiser.py --shapes tiny --device cpu  # a smoke test anywhere

Reported per row: quantized parameter share, weight memory (allocated after quantization),
peak memory of the step, median step time over ``--repeats`` (after a warm-up), and how
long quantizing took. Emulated precisions keep bf16 weights (same memory as bf16): they
exist for bit-exact images, not for savings. Prints a Markdown table; ``--json`` also
writes the rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

#: Published transformer configs (diffusers' config.json of each model), and the step
#: inputs at 1024²: latent 128² (SD3: 16 channels, patch 2; Flux: 4096 packed tokens of 64).
SHAPES: dict[str, dict[str, Any]] = {
    "sd3-medium": {
        "class": "SD3Transformer2DModel",
        "config": dict(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
            attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
            caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192,
        ),
        "batch": 2, "text_tokens": 333, "pooled": 2048,
    },
    "flux-dev": {
        "class": "FluxTransformer2DModel",
        "config": dict(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
            attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
            pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
        ),
        "batch": 1, "text_tokens": 512, "pooled": 768,
    },
    "tiny": {  # the test suite's tiny SD3 shape at 64²: runs on a CPU in seconds
        "class": "SD3Transformer2DModel",
        "config": dict(
            sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
            attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64,
            caption_projection_dim=64, pooled_projection_dim=64, pos_embed_max_size=32,
        ),
        "batch": 2, "text_tokens": 16, "pooled": 64, "latent": 8,
    },
}  # fmt: skip

#: (precision, backend) rows; bf16 is the unquantized baseline.
ROWS = (
    ("bf16", "none"), ("fp8", "torchao"), ("fp8", "emulate"), ("fp4", "bitsandbytes"),
    ("fp4", "emulate"), ("nf4", "bitsandbytes"), ("nf4", "emulate"), ("nvfp4", "torchao"),
    ("nvfp4", "emulate"), ("mxfp4", "emulate"),
)  # fmt: skip


def build(shape: str, device: str) -> torch.nn.Module:
    """The transformer with random bf16 weights, built directly on ``device``."""
    import diffusers

    spec = SHAPES[shape]
    with torch.device(device):
        model = getattr(diffusers, spec["class"])(**spec["config"])
    return model.to(torch.bfloat16).eval().requires_grad_(False)


def step_inputs(shape: str, device: str) -> dict[str, torch.Tensor]:
    spec = SHAPES[shape]
    g = torch.Generator(device).manual_seed(0)
    batch, tokens, side = spec["batch"], spec["text_tokens"], spec.get("latent", 128)
    config = spec["config"]

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(size, generator=g, device=device, dtype=torch.bfloat16)

    common = {
        "encoder_hidden_states": randn(batch, tokens, config["joint_attention_dim"]),
        "pooled_projections": randn(batch, spec["pooled"]),
        "timestep": torch.full((batch,), 500.0, device=device, dtype=torch.bfloat16),
    }
    if spec["class"] == "FluxTransformer2DModel":
        image_tokens = (side // 2) ** 2
        return {
            **common,
            "hidden_states": randn(batch, image_tokens, config["in_channels"]),
            "timestep": common["timestep"] / 1000,
            "guidance": torch.full((batch,), 3.5, device=device, dtype=torch.bfloat16),
            "img_ids": torch.zeros(image_tokens, 3, device=device),
            "txt_ids": torch.zeros(tokens, 3, device=device),
        }
    return {**common, "hidden_states": randn(batch, config["in_channels"], side, side)}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def allocated_gib(device: str) -> float | None:
    """GPU memory in use (None on CPU, where the allocator does not count)."""
    return torch.cuda.memory_allocated() / 2**30 if device.startswith("cuda") else None


def measure(shape: str, precision: str, backend: str, device: str, repeats: int) -> dict:
    from qdd.quant import quantize_module_

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build(shape, device)
    start = time.perf_counter()
    report = quantize_module_(model, "fp32" if precision == "bf16" else precision,
                              backend, torch.bfloat16)  # fmt: skip
    synchronize(device)
    quantize_s = time.perf_counter() - start
    weights = allocated_gib(device)
    inputs = step_inputs(shape, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            synchronize(device)
            start = time.perf_counter()
            model(**inputs, return_dict=False)
            synchronize(device)
            if i:  # the first step warms up kernels and allocators
                times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    del model
    return {
        "shape": shape, "precision": precision, "backend": report.backend,
        "quantized_share": round(report.fraction, 4), "weights_gib": weights and round(weights, 2),
        "peak_gib": peak and round(peak, 2), "step_ms": round(1000 * statistics.median(times), 1),
        "quantize_s": round(quantize_s, 1),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["sd3-medium", "flux-dev"], choices=SHAPES)
    parser.add_argument("--precisions", nargs="+", help="only these precisions (bf16, fp8, …)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []"
    from qdd.errors import QddError
    from qdd.quant import resolve_backend

    rows = []
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device: {name}, torch {torch.__version__}")
    print("| denoiser | precision / backend | quantized | weights GiB | peak GiB | step ms |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes:
        for precision, backend in ROWS:
            if args.precisions and precision not in args.precisions:
                continue
            try:  # real kernels only where they run (nvfp4 needs sm100, …)
                if (
                    backend != "none"
                    and resolve_backend(precision, backend, args.device) != backend
                ):
                    continue
                row = measure(shape, precision, backend, args.device, args.repeats)
            except QddError as error:
                print(f"| {shape} | {precision} {backend} | skipped: {error} |")
                continue
            rows.append(row)
            print(
                f"| {shape} | {precision} {row['backend']} | {row['quantized_share']:.3f} | "
                f"{row['weights_gib'] or '–'} | {row['peak_gib'] or '–'} | {row['step_ms']} |",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": name, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
