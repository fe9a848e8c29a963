"""Measure the GPU's approximate reciprocal for every float32 mantissa (needs an NVIDIA GPU).

bitsandbytes' CUDA kernels scale each 4-bit block by ``1.0f / absmax`` compiled with
``--use_fast_math``: the SFU's ``rcp.approx.ftz.f32``, which is not always the nearest float
(qdd/quant/cuda_rcp.py). This script evaluates that instruction on ``1.m`` for all 2^23
mantissas ``m`` through Triton's inline PTX, writes the mantissas where it is not the
correctly rounded reciprocal to ``qdd/quant/data/cuda_rcp_flips.npy`` (which qdd then uses
instead of the partial table), and checks the result two ways:

1. every mantissa that the recorded fixtures showed to flip (MEASURED_FLIPS) is in it;
2. the emulation with the full table equals bitsandbytes' own CUDA ``quantize_4bit`` →
   ``dequantize_4bit`` bit for bit on random and tie-heavy weights in bf16, fp16 and fp32.

    python scripts/measure_cuda_rcp.py            # writes the table, prints the checks
    python scripts/measure_cuda_rcp.py --check    # only check an existing table
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from qdd.quant import cuda_rcp


def approx_reciprocal(x: torch.Tensor) -> torch.Tensor:
    """``rcp.approx.ftz.f32`` of each element of a CUDA float32 tensor."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        value = tl.load(x_ptr + offsets, mask=mask, other=1.0)
        result = tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=r,r", [value], dtype=tl.float32, is_pure=True, pack=1
        )
        tl.store(out_ptr + offsets, result, mask=mask)

    out = torch.empty_like(x)
    kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    return out


def measure() -> np.ndarray:
    mantissas = torch.arange(1 << 23, dtype=torch.int32, device="cuda")
    x = (mantissas | 0x3F800000).view(torch.float32)  # 1.m, exponent 0
    gpu = approx_reciprocal(x)
    nearest = (1.0 / x.double()).float()  # correctly rounded on the host's rules
    return mantissas[gpu != nearest].cpu().numpy()


def check_against_bitsandbytes(n: int = 1 << 22) -> bool:
    import bitsandbytes.functional as F

    from qdd.quant import fake_quantize

    ok = True
    g = torch.Generator("cuda").manual_seed(0)
    for dtype, bits in ((torch.bfloat16, torch.int16), (torch.float16, torch.int16),
                        (torch.float32, torch.int32)):  # fmt: skip
        w = (torch.randn(n, device="cuda", generator=g) * 0.02).to(dtype)
        ties = (torch.randint(-12, 13, (n,), device="cuda", generator=g) / 12).to(dtype)
        for weight in (w, ties * w.abs().reshape(-1, 64).amax(1).repeat_interleave(64)):
            weight = weight.reshape(-1, 1024)
            for precision in ("fp4", "nf4"):
                packed, state = F.quantize_4bit(weight, blocksize=64, quant_type=precision)
                real = F.dequantize_4bit(packed, state).view(bits)
                ours = fake_quantize(weight, precision).to(dtype).view(bits)
                differ = int((real != ours).sum())
                print(f"  {precision} {str(dtype):15} {differ} of {weight.numel()} differ")
                ok &= differ == 0
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only check an existing table")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("measure_cuda_rcp.py needs an NVIDIA GPU")
    major, minor = torch.cuda.get_device_capability()
    gpu = f"{torch.cuda.get_device_name()} (compute capability {major}.{minor})"
    print("GPU:", gpu, "torch", torch.__version__)
    if not args.check:
        flips = measure()
        cuda_rcp.FULL_TABLE.parent.mkdir(exist_ok=True)
        np.save(cuda_rcp.FULL_TABLE, flips.astype(np.int32))
        # Which GPU the table was measured on (rcp.approx may differ between architectures).
        cuda_rcp.FULL_TABLE.with_suffix(".txt").write_text(
            f"{gpu}; torch {torch.__version__}\n", encoding="utf-8"
        )
        cuda_rcp.flip_mantissas.cache_clear()
        print(f"{len(flips)} of {1 << 23} mantissas round the other way -> {cuda_rcp.FULL_TABLE}")
    table = set(np.load(cuda_rcp.FULL_TABLE).tolist())
    missing = set(cuda_rcp.MEASURED_FLIPS) - table
    print("recorded flips absent from the table:", sorted(missing) or "none")
    ok = check_against_bitsandbytes() and not missing
    print("OK: emulation equals bitsandbytes' CUDA kernels" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
