"""GGUF denoisers end to end: qdd's own files, a user's file, and diffusers' loader by hand."""

from __future__ import annotations

import io
from importlib.metadata import version
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from PIL import Image

from qdd.quant.gguf import WRITABLE, file_sha256, read_tensor_types, type_counts

Q = gguf.GGMLQuantizationType
SIZE = 64


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("precision", sorted(WRITABLE))
@pytest.mark.parametrize("generator", ["sd3", "flux-schnell"])
def test_every_gguf_precision_generates_and_quantize_writes_the_same_file(
    generator: str,
    precision: str,
    tiny_models: dict[str, Path],
    tmp_path: Path,
    generate,
    read_samples,
    capsys,
) -> None:
    from qdd.cli import main

    model = str(tiny_models[generator])
    out = generate(
        "--generator", generator, "--model-path", model, "--precision", precision,
        "--out", str(tmp_path / "out"),
    )  # fmt: skip
    samples = read_samples(out)
    assert sorted(samples) == ["p00000-s0", "p00001-s1"]
    written = out / "denoiser.gguf"
    kind = precision.removeprefix("gguf-").upper()
    types = type_counts(read_tensor_types(written))
    assert set(types) == {"F32", kind}
    for _, meta in samples.values():
        assert (meta["precision"], meta["quant_backend"], meta["quant_scope"]) == (
            precision, "gguf", "denoiser",
        )  # fmt: skip
        assert meta["dtype"] == "bfloat16" and meta["activation_format"] == "bfloat16"
        assert meta["weight_format"] == precision and meta["activations_quantized"] is False
        assert meta["gguf_tensor_types"] == types and meta["group_size"] == 32
        assert meta["gguf_sha256"] == file_sha256(written) and meta["gguf_file"] == written.name
        assert meta["gguf_version"] == version("gguf")
        assert meta["gguf_keep"] and meta["denoiser_file"] is None
        assert 0.2 < meta["quant_fraction"] < 1.0
    # the deployable file: byte for byte the one the images were made with
    capsys.readouterr()
    artifact = tmp_path / "artifact.gguf"
    main(["quantize", "--generator", generator, "--model-path", model,
          "--precision", precision, "--out", str(artifact)])  # fmt: skip
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(artifact)
    assert file_sha256(artifact) == file_sha256(written)


def write_q8_0_elsewhere(model: Path, path: Path) -> dict[str, int]:
    """A Q8_0 file made with gguf-py alone, as another tool would: every 2-D weight of more
    than 1,024 values whose rows divide into blocks of 32 is Q8_0, the rest F32."""
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(
        model, subfolder="transformer", dtype=torch.bfloat16
    )
    writer = gguf.GGUFWriter(str(path), "sd3")
    for name, tensor in transformer.state_dict().items():
        values = tensor.float().numpy()
        if values.ndim == 2 and values.size > 1024 and values.shape[1] % 32 == 0:
            writer.add_tensor(name, gguf.quants.quantize(values, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return type_counts(read_tensor_types(path))


def diffusers_by_hand(model: Path, file: Path, prompt: str, seed: int) -> np.ndarray:
    """What diffusers' own GGUF loader makes of ``file`` (the documented recipe, no qdd)."""
    from diffusers import GGUFQuantizationConfig, SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = SD3Transformer2DModel.from_single_file(
        str(file),
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16),
        config=str(model),
        subfolder="transformer",
        torch_dtype=torch.bfloat16,
    )
    pipeline = StableDiffusion3Pipeline.from_pretrained(
        model, transformer=transformer, dtype=torch.bfloat16
    )
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(
        prompt=[prompt],
        generator=[torch.Generator("cpu").manual_seed(seed)],
        num_inference_steps=2,
        guidance_scale=7.0,
        height=SIZE,
        width=SIZE,
        max_sequence_length=256,
        output_type="pil",
    ).images[0]
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_user_file_gives_the_pixels_of_diffusers_own_loader(
    tiny_models: dict[str, Path], tmp_path: Path, generate, read_samples
) -> None:
    model = tiny_models["sd3"]
    file = tmp_path / "elsewhere-Q8_0.gguf"
    types = write_q8_0_elsewhere(model, file)
    out = generate(
        "--generator", "sd3", "--model-path", str(model), "--denoiser-file", str(file),
        "--out", str(tmp_path / "out"), limit=1,
    )  # fmt: skip
    ((png, meta),) = read_samples(out).values()
    assert meta["precision"] == "gguf-q8_0" and meta["gguf_tensor_types"] == types
    assert meta["denoiser_file"] == str(file) and meta["gguf_keep"] is None
    assert meta["gguf_sha256"] == file_sha256(file)
    assert not (out / "denoiser.gguf").exists()  # the user's file is used as it is
    expected = diffusers_by_hand(model, file, meta["prompt"], meta["seed"])
    assert np.array_equal(pixels(png), expected)


def test_q8_0_is_nearer_fp32_than_q4_0(
    tiny_models: dict[str, Path], tmp_path: Path, generate, read_samples
) -> None:
    """In pixels. The tiny model's bf16 compute alone moves its images ~1.3/255 from fp32
    (as much as Q4_0 adds at 2 steps), so 6 steps: measured 0.92/0.90 (Q8_0) against
    1.06/1.01 (Q4_0) mean absolute difference per pixel."""
    common = ["--generator", "sd3", "--model-path", str(tiny_models["sd3"])]
    images = {
        precision: read_samples(
            generate(*common, "--precision", precision, "--out", str(tmp_path / precision),
                     steps=6)
        )
        for precision in ("fp32", "gguf-q8_0", "gguf-q4_0")
    }  # fmt: skip
    for key, (fp32, _) in images["fp32"].items():
        q8, q4 = (
            np.abs(pixels(images[p][key][0]) - pixels(fp32)).mean()
            for p in ("gguf-q8_0", "gguf-q4_0")
        )
        assert 0 < q8 < q4, key


@pytest.mark.parametrize("generator", ["sd3", "flux-schnell"])
def test_q8_0_denoiser_errs_far_less_than_q4_0(
    generator: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """The quantization error alone: qdd's files loaded by diffusers with float32 compute
    against the float32 denoiser (the bf16 weights qdd quantizes), on fixed inputs."""
    import diffusers

    from qdd.generation.quantize import write_denoiser
    from qdd.generation.registry import get_generator
    from qdd.quant.gguf import DENOISER_CLASS, load_denoiser

    spec = get_generator(generator)
    model = str(tiny_models[generator])
    reference = (
        getattr(diffusers, DENOISER_CLASS[spec.family])
        .from_pretrained(model, subfolder="transformer", dtype=torch.bfloat16)
        .float()
    )
    generator_rng = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator_rng)

    if spec.family == "sd3":
        inputs = {
            "hidden_states": randn(1, 4, 16, 16),
            "encoder_hidden_states": randn(1, 8, 64),
            "pooled_projections": randn(1, 64),
            "timestep": torch.tensor([500.0]),
        }
    else:
        inputs = {
            "hidden_states": randn(1, 64, 32),
            "encoder_hidden_states": randn(1, 8, 64),
            "pooled_projections": randn(1, 32),
            "timestep": torch.tensor([0.5]),
            "img_ids": torch.zeros(64, 3),
            "txt_ids": torch.zeros(8, 3),
        }
    errors = {}
    with torch.no_grad():
        expected = reference(**inputs).sample
        for precision in ("gguf-q8_0", "gguf-q4_0"):
            file = write_denoiser(generator, model, precision, tmp_path / f"{precision}.gguf")
            denoiser = load_denoiser(
                spec.family, generator, model, "transformer", file.path, torch.float32
            )
            errors[precision] = (denoiser(**inputs).sample - expected).abs().mean().item()
    assert 0 < 4 * errors["gguf-q8_0"] < errors["gguf-q4_0"], errors


def write_q4_k_file(model: Path, path: Path) -> None:
    """A Q4_K file (random but valid blocks) for the layers whose rows hold 256·n values."""
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(model, subfolder="transformer")
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "sd3")
    for name, tensor in transformer.state_dict().items():
        values = tensor.float().numpy()
        if values.ndim == 2 and values.shape[1] % 256 == 0:
            blocks = values.size // 256
            scales = np.full((blocks, 2), 0.001, np.float16).view(np.uint8)
            rest = rng.integers(0, 256, (blocks, 140), dtype=np.uint8)
            data = np.concatenate([scales, rest], axis=1).reshape(values.shape[0], -1)
            writer.add_tensor(name, data, raw_dtype=Q.Q4_K)
        else:
            writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_q4_k_user_file_generates_under_its_label(
    tiny_models: dict[str, Path], tmp_path: Path, generate, read_samples
) -> None:
    file = tmp_path / "model-Q4_K.gguf"
    write_q4_k_file(tiny_models["sd3"], file)
    out = generate(
        "--generator", "sd3", "--model-path", str(tiny_models["sd3"]),
        "--denoiser-file", str(file), "--precision", "gguf-q4_k",
        "--out", str(tmp_path / "out"), limit=1,
    )  # fmt: skip
    ((_, meta),) = read_samples(out).values()
    assert meta["precision"] == "gguf-q4_k" and meta["group_size"] == 256
    assert meta["gguf_tensor_types"]["Q4_K"] == 2


def test_a_plan_takes_a_denoiser_file(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from qdd.generation.command import jobs_from_plan

    file = tmp_path / "model-Q8_0.gguf"
    write_q8_0_elsewhere(tiny_models["sd3"], file)
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        f"out: {tmp_path / 'grid'}\ngenerators:\n"
        f"  - generator: sd3\n    model_path: {tiny_models['sd3']}\n"
        f"    denoiser_file: {file}\n"
        f"  - generator: sd3\n    model_path: {tiny_models['sd3']}\n"
        "    precisions: [fp32, gguf-q4_0]\n"
    )
    jobs, _ = jobs_from_plan(plan, {})
    assert [(Path(j.out).name, j.denoiser_file) for j in jobs] == [
        ("sd3-gguf-q8_0", str(file)), ("sd3-fp32", None), ("sd3-gguf-q4_0", None),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--generator", "sd15", "--precision", "gguf-q8_0"], "SD3 and Flux transformers only"),
        (["--generator", "sdxl", "--precision", "gguf-q4_0"], "SD3 and Flux transformers only"),
        (["--generator", "sd3", "--precision", "gguf-q4_k"], "--denoiser-file FILE.gguf"),
        (["--generator", "sd3", "--precision", "gguf-q8_0", "--quant-backend", "emulate"],
         "leave out --quant-backend"),
        (["--generator", "sd3", "--denoiser-file", "no/such.gguf"], "not found"),
    ],
)  # fmt: skip
def test_gguf_user_errors_are_one_line(
    args: list[str], message: str, tiny_models: dict[str, Path], tmp_path: Path, capsys
) -> None:
    from qdd.cli import main

    generator = args[1]
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", *args, "--model-path", str(tiny_models[generator]),
              "--out", str(tmp_path / "o")])  # fmt: skip
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_file_of_another_precision_is_refused(
    tiny_models: dict[str, Path], tmp_path: Path, capsys
) -> None:
    from qdd.cli import main

    file = tmp_path / "m.gguf"
    write_q8_0_elsewhere(tiny_models["sd3"], file)
    for command, message in (
        (["generate", "--generator", "sd3", "--denoiser-file", str(file), "--precision",
          "gguf-q4_0", "--out", str(tmp_path / "o")], "is a gguf-q8_0 file, not gguf-q4_0"),
        (["quantize", "--generator", "sd3", "--precision", "fp4", "--out", str(file)],
         "writes GGUF files only, not fp4"),
        (["quantize", "--generator", "sd15", "--precision", "gguf-q8_0", "--out", str(file)],
         "SD3 and Flux transformers only"),
    ):  # fmt: skip
        with pytest.raises(SystemExit):
            main(command)
        assert message in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("architecture", ["flux", "sd3"])  # the key says flux; sd3 lies
def test_a_file_of_another_architecture_is_refused_before_anything_is_written(
    architecture: str, tiny_models: dict[str, Path], tmp_path: Path, capsys
) -> None:
    """A Flux GGUF given to an SD3 generator: one line, before recipe.json or any folder
    (diffusers' converter would fail with an IndexError after the recipe was written). The
    tensor names decide, whatever general.architecture says."""
    from diffusers import FluxTransformer2DModel

    from qdd.cli import main

    flux = FluxTransformer2DModel.from_pretrained(
        tiny_models["flux-schnell"], subfolder="transformer"
    )
    file = tmp_path / "flux.gguf"
    writer = gguf.GGUFWriter(str(file), architecture)
    for name, tensor in flux.state_dict().items():
        writer.add_tensor(name, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--generator", "sd3", "--model-path", str(tiny_models["sd3"]),
              "--denoiser-file", str(file), "--out", str(out)])  # fmt: skip
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{file} holds a flux denoiser, not sd3's (sd3)" in line, line
    assert not out.exists()


def write_sd3_file(model: Path, file: Path) -> None:
    """The tiny SD3 transformer as a GGUF file (diffusers' tensor names, f32)."""
    from diffusers import SD3Transformer2DModel

    sd3 = SD3Transformer2DModel.from_pretrained(model, subfolder="transformer")
    writer = gguf.GGUFWriter(str(file), "sd3")
    for name, tensor in sd3.state_dict().items():
        writer.add_tensor(name, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("how", ["plan-level generator", "--denoiser-file with --plan"])
def test_a_plan_refuses_an_sd3_file_for_flux_before_anything_is_written(
    how: str, tiny_models: dict[str, Path], tmp_path: Path, capsys
) -> None:
    """An SD3 file reaching a Flux job through a plan is refused as on the command line (it
    used to pass unchecked and end in diffusers' IndexError after recipe.json was written)."""
    from qdd.cli import main

    file = tmp_path / "sd3.gguf"
    write_sd3_file(tiny_models["sd3"], file)
    flux = tiny_models["flux-schnell"]
    plan = tmp_path / "plan.yaml"
    args = ["generate", "--plan", str(plan), "--trainer.accelerator", "cpu", "--limit", "1"]
    if how == "plan-level generator":
        plan.write_text(f"out: {tmp_path / 'grid'}\ngenerator: flux-schnell\nmodel_path: {flux}\n"
                        f"denoiser_file: {file}\ngenerators:\n  - {{steps: 1}}\n")  # fmt: skip
    else:
        plan.write_text(f"out: {tmp_path / 'grid'}\ngenerators:\n  - generator: flux-schnell\n"
                        f"    model_path: {flux}\n    precisions: [gguf-f32]\n")  # fmt: skip
        args += ["--denoiser-file", str(file)]
    with pytest.raises(SystemExit):
        main(args)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{file} holds a sd3 denoiser, not flux-schnell's (flux)" in line, line
    assert not (tmp_path / "grid").exists()


def test_a_file_of_no_denoiser_is_refused_before_anything_is_written(
    tiny_models: dict[str, Path], tmp_path: Path, capsys
) -> None:
    """A GGUF file neither family's (an LLM's) used to pass the architecture check and end in
    diffusers' IndexError after recipe.json was written."""
    from qdd.cli import main

    file = tmp_path / "llm.gguf"
    writer = gguf.GGUFWriter(str(file), "llama")
    for name in ("token_embd.weight", "blk.0.attn_q.weight"):
        writer.add_tensor(name, np.ones((64, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = tmp_path / "o"
    with pytest.raises(SystemExit):
        main(["generate", "--generator", "sd3", "--model-path", str(tiny_models["sd3"]),
              "--denoiser-file", str(file), "--out", str(out)])  # fmt: skip
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{file} holds no SD3 or Flux denoiser" in line and "sd3" in line, line
    assert not out.exists()
