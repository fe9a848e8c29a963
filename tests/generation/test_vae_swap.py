"""The denoiser × decoder swap: stored latents, decoded again at another VAE precision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qdd.generation.vae import LATENTS_MEMBER


def members(folder: Path) -> dict[str, dict[str, bytes]]:
    import tarfile

    out: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


def pngs(folder: Path) -> dict[str, bytes]:
    return {key: parts["png"] for key, parts in members(folder).items()}


def decode(capsys, *args: str) -> Path:
    from qdd.cli import main

    capsys.readouterr()
    main(["decode", *args])
    return Path(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("generator", ["sd3", "flux-schnell", "sd15"])
def test_own_latents_decoded_by_its_own_vae_give_the_same_bytes(
    generator: str, tiny_models: dict[str, Path], tmp_path: Path, generate, read_samples, capsys
) -> None:
    """--save-latents changes no pixel; decoding those fp32 latents with the fp32 VAE gives
    the fp32 images byte for byte (the pipeline's own decode, repeated)."""
    common = ["--generator", generator, "--model-path", str(tiny_models[generator]),
              "--precision", "fp32", "--batch-size", "2"]  # fmt: skip
    plain = generate(*common, "--out", str(tmp_path / "plain"))
    kept = generate(*common, "--save-latents", "--out", str(tmp_path / "kept"))
    assert pngs(plain) == pngs(kept)
    stored = members(kept)
    assert all(LATENTS_MEMBER in parts for parts in stored.values())
    meta = read_samples(kept)
    first = next(iter(meta.values()))[1]
    shape = first["latents"]["shape"]  # (channels, h, w): Flux's tokens unpacked too
    assert len(shape) == 3 and shape[1] == shape[2] and first["latents"]["scaling_factor"] > 0
    assert first["denoiser_precision"] == "fp32" and first["vae_precision"] == "fp32"
    again = decode(capsys, "--src", str(kept), "--vae-precision", "fp32",
                   "--out", str(tmp_path / "again"))  # fmt: skip
    assert pngs(again) == pngs(plain)
    decoded = read_samples(again)
    for key, (_, m) in decoded.items():
        assert m["precision"] == "fp32-vaefp32" and m["denoiser_precision"] == "fp32"
        assert m["source_sample"]["key"] == key and "latents" not in m


def test_a_quantized_vae_moves_the_pixels_and_a_plain_one_does_not(
    tiny_models: dict[str, Path], tmp_path: Path, generate, read_samples, capsys
) -> None:
    """fp4 latents: decoded by the run's own (bf16) VAE they are the fp4 images; decoded by a
    VAE quantized to fp4 they differ; `generate --vae-precision fp4` is the same in one pass."""
    common = ["--generator", "sd3", "--model-path", str(tiny_models["sd3"]),
              "--precision", "fp4", "--quant-backend", "emulate"]  # fmt: skip
    fp4 = generate(*common, "--save-latents", "--out", str(tmp_path / "fp4"))
    same = decode(capsys, "--src", str(fp4), "--vae-precision", "bf16",
                  "--out", str(tmp_path / "bf16"))  # fmt: skip
    assert pngs(same) == pngs(fp4)
    moved = decode(capsys, "--src", str(fp4), "--vae-precision", "fp4",
                   "--out", str(tmp_path / "vae4"))  # fmt: skip
    assert pngs(moved).keys() == pngs(fp4).keys()
    assert all(pngs(moved)[k] != pngs(fp4)[k] for k in pngs(fp4))
    meta = next(iter(read_samples(moved).values()))[1]
    assert meta["precision"] == "fp4-vaefp4" and meta["vae_quant_fraction"] > 0
    one_pass = generate(*common, "--vae-precision", "fp4", "--out", str(tmp_path / "one"))
    assert pngs(one_pass) == pngs(moved)
    first = next(iter(read_samples(one_pass).values()))[1]
    assert first["precision"] == "fp4-vaefp4" and first["denoiser_precision"] == "fp4"
    pixels = [np.frombuffer(p, np.uint8) for p in pngs(moved).values()]
    assert len(pixels) == 2


def test_bad_decode_inputs_are_one_line(
    tiny_models: dict[str, Path], tmp_path: Path, generate, capsys
) -> None:
    from qdd.cli import main

    plain = generate("--generator", "sd15", "--model-path", str(tiny_models["sd15"]),
                     "--precision", "fp32", "--out", str(tmp_path / "plain"))  # fmt: skip
    for args, message in [
        (["--src", str(plain), "--vae-precision", "fp32", "--out", str(tmp_path / "o")],
         "holds no latents"),
        (["--src", str(plain), "--vae-precision", "int3", "--out", str(tmp_path / "o")],
         "unknown --vae-precision 'int3'"),
        (["--src", str(plain), "--vae-precision", "fp32", "--out", str(plain)],
         "--out is --src"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main(["decode", *args])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        main(["generate", "--generator", "sd15", "--model-path", str(tiny_models["sd15"]),
              "--precision", "fp32", "--vae-precision", "fp5",
              "--out", str(tmp_path / "g")])  # fmt: skip
    assert "unknown --vae-precision 'fp5'" in capsys.readouterr().err.strip().splitlines()[-1]


def test_another_models_vae_is_refused_in_one_line_before_anything_is_written(
    tiny_models: dict[str, Path], tmp_path: Path, generate, capsys
) -> None:
    """--model-path naming another model: other latent channels (flux's tiny VAE) or other
    scaling factors (sd15's) than the latents recorded end in one line, --out untouched."""
    from qdd.cli import main

    kept = generate("--generator", "sd3", "--model-path", str(tiny_models["sd3"]),
                    "--precision", "fp32", "--save-latents",
                    "--out", str(tmp_path / "kept"))  # fmt: skip
    for other, message in [("flux-schnell", "latent channels"), ("sd15", "scales latents")]:
        out = tmp_path / other
        with pytest.raises(SystemExit) as exit_info:
            main(["decode", "--src", str(kept), "--vae-precision", "fp32", "--out", str(out),
                  "--model-path", str(tiny_models[other])])  # fmt: skip
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
        assert not out.exists()


def test_latents_of_a_run_with_vae_precision_decode_again_and_decoded_folders_do_not(
    tiny_models: dict[str, Path], tmp_path: Path, generate, read_samples, capsys
) -> None:
    """`generate --vae-precision fp16 --save-latents` is a source of latents like any other
    (its recipe names a vae precision, it was not decoded from anything); a decoded folder
    is refused, naming the folder its latents came from."""
    from qdd.cli import main

    src = generate("--generator", "sd3", "--model-path", str(tiny_models["sd3"]),
                   "--precision", "fp32", "--vae-precision", "fp16", "--save-latents",
                   "--out", str(tmp_path / "src"))  # fmt: skip
    again = decode(capsys, "--src", str(src), "--vae-precision", "fp32",
                   "--out", str(tmp_path / "again"))  # fmt: skip
    metas = [m for _, m in read_samples(again).values()]
    assert metas and all(m["precision"] == "fp32-vaefp32" for m in metas)
    with pytest.raises(SystemExit):
        main(["decode", "--src", str(again), "--vae-precision", "fp4",
              "--out", str(tmp_path / "twice")])  # fmt: skip
    assert f"decoded from {src}" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "twice").exists()


def test_a_vae_file_with_a_renamed_key_is_refused_in_one_line(
    tiny_models: dict[str, Path], tmp_path: Path, generate, capsys
) -> None:
    """diffusers fills a renamed key with random weights and only warns: decode would write
    images from a partly random decoder. It must stop in one line, --out untouched."""
    import shutil

    from safetensors.torch import load_file, save_file

    from qdd.cli import main

    kept = generate("--generator", "sd3", "--model-path", str(tiny_models["sd3"]),
                    "--precision", "fp32", "--save-latents",
                    "--out", str(tmp_path / "kept"))  # fmt: skip
    model = shutil.copytree(tiny_models["sd3"], tmp_path / "renamed")
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["decoder.conv_in.weights"] = state.pop("decoder.conv_in.weight")
    save_file(state, str(weights))
    with pytest.raises(SystemExit):
        main(["decode", "--src", str(kept), "--vae-precision", "fp32",
              "--out", str(tmp_path / "out"), "--model-path", str(model)])  # fmt: skip
    assert "missing keys decoder.conv_in.weight" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "out").exists()
