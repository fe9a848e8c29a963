"""``qdd-cli generate`` end to end on tiny saved pipelines: every precision, offline, CPU."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qdd.datamodules.schema import FIELDS
from qdd.identity import group_label

PRECISIONS = ("fp32", "fp16", "fp8", "fp4", "nf4", "nvfp4", "mxfp4")
#: Weights and activations quantized, as SD3.5 and Flux are deployed (qdd.quant.deployed).
DEPLOYED = ("fp8-w8a8", "fp8-w8a8-row", "svdq-int4", "svdq-nvfp4", "svdq-int4-datafree",
            "svdq-nvfp4-datafree", "nvfp4-w4a4")  # fmt: skip


def test_precision_list_matches_qdd_quant() -> None:
    """Every registered precision is generated here, but GGUF (test_generate_gguf.py)."""
    from qdd.quant import registry

    plain = {name for name in registry.names() if registry.get(name).kind != "gguf"}
    assert set(PRECISIONS) | set(DEPLOYED) == plain


@pytest.mark.parametrize("precision", DEPLOYED)
@pytest.mark.parametrize("generator", ["sd3", "flux-schnell"])
def test_transformers_at_every_deployed_format(
    generator: str, precision: str, tiny_models: dict[str, Path], tmp_path: Path, generate,
    read_samples,
) -> None:  # fmt: skip
    calibrated = ["--calibration-count", "1"] if precision in ("svdq-int4", "svdq-nvfp4") else []
    out = generate(
        "--generator", generator, "--model-path", str(tiny_models[generator]),
        "--precision", precision, "--out", str(tmp_path / "out"), *calibrated, limit=1,
    )  # fmt: skip
    ((png, meta),) = read_samples(out).values()
    assert png.startswith(b"\x89PNG") and meta["precision"] == precision
    assert meta["quant_backend"] == "emulate" and meta["activations_quantized"] is True
    assert meta["weight_format"] and meta["activation_format"] != "bfloat16"
    assert 0.0 < meta["quant_fraction"] <= 1.0 and isinstance(meta["kept"], list)
    assert (meta["rank"] == 32) == precision.startswith("svdq")
    assert meta["cpu_capability"] and meta["cpu_model"]
    assert_provenance(meta, precision)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("generator", ["sd15", "sdxl", "sd3", "flux-schnell"])
def test_every_generator_at_every_precision(
    generator: str,
    precision: str,
    tiny_models: dict[str, Path],
    tmp_path: Path,
    generate,
    read_samples,
) -> None:
    out = generate(
        "--generator",
        generator,
        "--model-path",
        str(tiny_models[generator]),
        "--precision",
        precision,
        "--out",
        str(tmp_path / "out"),
    )
    assert out == tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    samples = read_samples(out)
    label = group_label(next(iter(samples.values()))[1])  # fp4 emulated: sd3/fp4@emulate
    assert label.startswith(f"{generator}/{precision}")
    assert manifest["total"] == 2 and manifest["groups"] == {label: 2}
    assert sorted(samples) == ["p00000-s0", "p00001-s1"]
    quantized = precision not in ("fp32", "fp16")
    for png, meta in samples.values():
        assert png.startswith(b"\x89PNG")
        assert set(FIELDS) <= set(meta)
        assert meta["source_format"] == "png" and meta["jpeg_quality"] is None
        assert (meta["generator"], meta["precision"], meta["label"]) == (generator, precision, 1)
        assert (meta["width"], meta["height"], meta["steps"]) == (64, 64, 2)
        assert meta["model_id"] == str(tiny_models[generator])
        half = "bfloat16" if generator in ("sd3", "flux-schnell") else "float16"
        assert meta["dtype"] == ("float32" if precision == "fp32" else half)
        if quantized:
            assert meta["quant_scope"] == "denoiser" and meta["quant_backend"] != "none"
            assert 0.2 < meta["quant_fraction"] <= 1.0
        else:
            assert meta["quant_backend"] == "none" and meta["quant_fraction"] == 0.0
        assert_provenance(meta, precision)


def assert_provenance(meta: dict, precision: str) -> None:
    """Device, library versions and the emulation semantics that ran (issue: provenance)."""
    import importlib.metadata

    import torch

    assert meta["device"] == "cpu" and meta["device_name"]
    assert meta["torch_version"] == torch.__version__
    assert meta["diffusers_version"] == importlib.metadata.version("diffusers")
    for library in ("bitsandbytes", "torchao"):
        assert meta[f"{library}_version"] == importlib.metadata.version(library)
    expected = {
        "fp4": "bitsandbytes-cuda/rcp-", "nf4": "bitsandbytes-cuda/rcp-",
        "fp8": "torchao-float8-rowwise", "nvfp4": "torchao-nvfp4", "mxfp4": "torchao-mx-rceil",
        "fp8-w8a8": "comfyui-fp8", "fp8-w8a8-row": "torchao-float8-dynamic",
        "svdq-int4": "svdquant-calibrated", "svdq-nvfp4": "svdquant-calibrated",
        "svdq-int4-datafree": "svdquant-data-free", "svdq-nvfp4-datafree": "svdquant-data-free",
        "nvfp4-w4a4": "modelopt-nvfp4",
    }  # fmt: skip
    if meta["quant_backend"] == "emulate":
        assert meta["emulation"].startswith(expected[precision])
    else:  # a real library ran (torchao fp8 on CPU), or nothing was quantized
        assert meta["emulation"] is None


def test_same_seed_gives_byte_identical_pngs_and_fp4_differs(
    tiny_models: dict[str, Path], tmp_path: Path, generate, read_samples
) -> None:
    common = ["--generator", "sd3", "--model-path", str(tiny_models["sd3"])]
    first = generate(*common, "--precision", "fp4", "--out", str(tmp_path / "a"))
    again = generate(*common, "--precision", "fp4", "--out", str(tmp_path / "b"))
    fp32 = generate(*common, "--precision", "fp32", "--out", str(tmp_path / "c"))
    a, b, c = read_samples(first), read_samples(again), read_samples(fp32)
    assert {k: v[0] for k, v in a.items()} == {k: v[0] for k, v in b.items()}
    assert sorted(a) == sorted(c)  # paired keys across precisions
    for key in a:
        assert a[key][0] != c[key][0], key
    # Every field but the measured costs (wall time, peak memory) is reproducible too; the
    # shards' bytes are not since issue 18 puts those measurements in every sample's JSON.
    assert {k: reproducible(v[1]) for k, v in a.items()} == {
        k: reproducible(v[1]) for k, v in b.items()
    }


def reproducible(meta: dict) -> dict:
    """A sample's metadata without the fields measured while generating."""
    from qdd.generation.costs import MEASURED

    return {k: v for k, v in meta.items() if k not in MEASURED}


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def test_bitsandbytes_on_cpu_runs_beside_the_emulation(
    tiny_models: dict[str, Path], tmp_path: Path, generate, read_samples, capsys
) -> None:
    """bitsandbytes' own CPU kernels: close to the emulation of its CUDA kernels, not equal
    (ties round differently). Where this machine's library gets the tiny model's layer shapes
    wrong (its AVX512 dequantize: the 32-wide layers' blocks cross rows), qdd says so in one
    line, and running that shape through the library confirms it."""
    pytest.importorskip("bitsandbytes")
    from qdd.quant.backends import bnb_cpu_error

    common = ["--generator", "sd3", "--model-path", str(tiny_models["sd3"]), "--precision", "fp4"]
    emulated = generate(*common, "--quant-backend", "emulate", "--out", str(tmp_path / "e"))
    try:
        real = generate(*common, "--quant-backend", "bitsandbytes", "--out", str(tmp_path / "b"))
    except SystemExit:
        error = capsys.readouterr().err.strip().splitlines()[-1]
        shape = re.search(r"on this machine for (\d+) × (\d+) weights", error)
        assert shape and error.endswith("--quant-backend emulate"), error
        rows, width = int(shape[1]), int(shape[2])
        assert width % 64 and bnb_cpu_error(rows, width, "fp4", torch.bfloat16)
        return
    e, b = read_samples(emulated), read_samples(real)
    assert {k: v[1]["quant_backend"] for k, v in b.items()} == dict.fromkeys(b, "bitsandbytes")
    assert {k: v[1]["quant_fraction"] for k, v in e.items()} == {
        k: v[1]["quant_fraction"] for k, v in b.items()
    }
    for key in e:  # a few 4-bit codes differ at ties: a small shift in a few pixels
        assert np.abs(pixels(e[key][0]) - pixels(b[key][0])).mean() < 2.0, key


def test_interrupted_run_resumes_without_duplicates(
    tiny_models: dict[str, Path], tmp_path: Path, generate, read_samples, monkeypatch
) -> None:
    from qdd.modules.generator import GeneratorModule

    args = [
        "--generator",
        "sd15",
        "--model-path",
        str(tiny_models["sd15"]),
        "--precision",
        "fp32",
        "--shard-size",
        "2",
    ]
    reference = read_samples(generate(*args, "--out", str(tmp_path / "ref"), limit=5))

    original = GeneratorModule.predict_step
    calls = []

    def crash_after_three(self, batch, batch_idx):  # noqa: ANN001, ANN202
        calls.append(batch_idx)
        if len(calls) > 3:
            raise RuntimeError("killed")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(GeneratorModule, "predict_step", crash_after_three)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed"):
        generate(*args, "--out", str(out), limit=5)
    assert len(list(out.glob("*.tar"))) == 1  # p0, p1 sealed; p2 left in a .partial shard
    assert len(list(out.glob("*.tar.partial"))) == 1
    assert not (out / "manifest.json").exists()

    monkeypatch.setattr(GeneratorModule, "predict_step", original)
    generate(*args, "--out", str(out), limit=5)
    assert not list(out.glob("*.tar.partial"))
    resumed = read_samples(out)  # read_samples would merge a duplicate: count keys per shard
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(s["count"] for s in manifest["shards"]) == manifest["total"] == 5
    assert {k: v[0] for k, v in resumed.items()} == {k: v[0] for k, v in reference.items()}

    generate(*args, "--out", str(out), limit=5)  # complete: nothing to do
    assert json.loads((out / "manifest.json").read_text())["total"] == 5


def test_nan_and_black_images_are_recorded_as_failures(
    tiny_models: dict[str, Path], tmp_path: Path, generate, read_samples, monkeypatch
) -> None:
    import numpy as np

    from qdd.modules.generator import GeneratorModule

    original = GeneratorModule.generate

    def broken(self, batch):  # noqa: ANN001, ANN202
        images, latents = original(self, batch)
        if batch[0].prompt_id == 1:
            images[0, 3, 3, 0] = np.nan
        if batch[0].prompt_id == 2:
            images[:] = 0.0
        return images, latents

    monkeypatch.setattr(GeneratorModule, "generate", broken)
    out = generate(
        "--generator",
        "sd15",
        "--model-path",
        str(tiny_models["sd15"]),
        "--precision",
        "fp16",
        "--out",
        str(tmp_path / "o"),
        limit=3,
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total"] == 1 and sorted(read_samples(out)) == ["p00000-s0"]
    reasons = {f["key"]: f["reason"] for f in manifest["failed"]}
    assert set(reasons) == {"p00001-s1", "p00002-s2"}
    assert "NaN" in reasons["p00001-s1"] and "black" in reasons["p00002-s2"]


def test_image_failure_checks() -> None:
    import numpy as np

    from qdd.generation.images import image_failure, to_uint8

    good = np.full((4, 4, 3), 0.5, dtype=np.float32)
    assert image_failure(good) is None
    assert image_failure(np.full_like(good, 0.001)) is not None  # rounds to black
    assert to_uint8(np.array([0.0, 0.5, 1.0, 0.499])).tolist() == [0, 128, 255, 127]


def test_ddp_splits_prompts_across_ranks_without_overlap(
    tiny_models: dict[str, Path], tmp_path: Path, generate, read_samples
) -> None:
    """Two DDP ranks on CPU, in a fresh process as users run it: forking a process whose
    OpenMP pool is already running (this pytest process) can deadlock."""
    import os
    import subprocess
    import sys

    args = ["--generator", "sd3", "--model-path", str(tiny_models["sd3"]), "--precision", "fp32",
            "--steps", "2", "--limit", "5", "--height", "64", "--width", "64"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same threads in both runs: same numerics

    def run(out: Path, *extra: str) -> Path:
        command = [sys.executable, "-m", "qdd", "generate", *args, "--out", str(out), *extra]
        subprocess.run(command, check=True, timeout=300, env=env)
        return out

    single = read_samples(run(tmp_path / "one"))
    out = run(tmp_path / "two", "--trainer.devices", "2", "--trainer.strategy", "ddp_fork")
    assert sorted(p.name.split("-")[0] for p in out.glob("*.tar")) == ["r0", "r1"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total"] == 5 == sum(s["count"] for s in manifest["shards"])
    two = read_samples(out)
    assert sorted(two) == sorted(single)
    for key, (png, meta) in two.items():
        assert reproducible(meta) == reproducible(single[key][1])
        # One process and two run the same batches with one thread each; allow one 8-bit
        # level where a sum's order still differs (seen once in five images on AVX512 CPUs).
        assert np.abs(pixels(png) - pixels(single[key][0])).max() <= 1, key


def test_rank_split_is_a_partition() -> None:
    from qdd.generation.data import PromptDataModule
    from qdd.generation.jobs import work_items

    items = work_items([str(i) for i in range(7)], 0)
    data = PromptDataModule(items)
    shares = [data.rank_items(rank, 3) for rank in range(3)]
    keys = [i.key for share in shares for i in share]
    assert sorted(keys) == sorted(i.key for i in items) and len(set(keys)) == 7


def test_plan_runs_a_grid(
    tiny_models: dict[str, Path], tmp_path: Path, generate, read_samples
) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "out: ignored\nprecisions: [fp32, fp8]\nseed: 10\ngenerators:\n"
        f"  - generator: sd15\n    model_path: {tiny_models['sd15']}\n"
        f"  - generator: flux-schnell\n    model_path: {tiny_models['flux-schnell']}\n"
        "    precisions: [fp4]\n"
    )
    out = generate("--plan", str(plan), "--out", str(tmp_path / "grid"), limit=1)
    assert out == tmp_path / "grid"
    folders = sorted(p.name for p in out.iterdir())
    assert folders == ["flux-schnell-fp4", "sd15-fp32", "sd15-fp8"]
    for folder in folders:
        assert list(read_samples(out / folder)) == ["p00000-s10"]


def test_packaged_paper_plan_is_six_generators_by_four_precisions() -> None:
    from qdd.generation.command import find_plan, jobs_from_plan

    jobs, _ = jobs_from_plan(find_plan("configs/study/paper.yaml"), {})
    assert len(jobs) == 24 and len({j.generator for j in jobs}) == 6
    assert {j.precision for j in jobs} == {"fp32", "fp16", "fp8", "fp4"}
    assert all(j.model_path is None for j in jobs)  # hub ids from the registry
    for name in ("formats", "smoke"):
        assert jobs_from_plan(find_plan(name), {})[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--generator", "sd9", "--precision", "fp4"], "unknown generator"),
        (["--generator", "sd3", "--precision", "fp5"], "unknown precision"),
        (["--generator", "sd3", "--precision", "fp4", "--model-path", "./no/such"], "not found"),
        (
            ["--generator", "sd3", "--precision", "fp4", "--model-path", "nobody/no-model"],
            "Hugging Face hub",
        ),
        (
            ["--generator", "sd3", "--precision", "fp4", "--trainer.precision", "16"],
            "trainer.precision",
        ),
        (["--plan", "no-such-plan"], "plan no-such-plan not found"),
    ],
)
def test_user_errors_are_one_line(
    args: list[str], message: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    from qdd.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", *args, "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2  # the QddError path: one line, no traceback
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_folder_of_another_recipe_is_refused(
    tiny_models: dict[str, Path], tmp_path: Path, generate, read_samples, capsys
) -> None:
    args = [
        "--generator",
        "sd15",
        "--model-path",
        str(tiny_models["sd15"]),
        "--precision",
        "fp32",
        "--out",
        str(tmp_path / "o"),
    ]
    generate(*args, limit=1)
    with pytest.raises(SystemExit):
        generate(*args, steps=3, limit=1)
    assert "different recipe (steps: 2 -> 3)" in capsys.readouterr().err
    out = generate(*args, "--overwrite", steps=3, limit=1)
    assert read_samples(out)["p00000-s0"][1]["steps"] == 3
