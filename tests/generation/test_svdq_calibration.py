"""Calibrated SVDQuant in ``qdd-cli generate``: gathered once per folder, cached, recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qdd.generation.calibration import CACHE, load_cache, save_cache


def calibrate_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the calibration runs (each appends its number of prompts)."""
    import qdd.modules.generator as generator_module

    calls: list[int] = []
    real = generator_module.calibrate_pipeline

    def counted(pipeline, layers, prompts, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        calls.append(len(prompts))
        return real(pipeline, layers, prompts, *args, **kwargs)

    monkeypatch.setattr(generator_module, "calibrate_pipeline", counted)
    return calls


@pytest.mark.parametrize("generator", ["sd3", "flux-schnell"])
def test_svdq_int4_calibrates_and_every_sample_records_smoothing(
    generator: str, tiny_models: dict[str, Path], tmp_path: Path, generate, read_samples,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    calls = calibrate_calls(monkeypatch)
    out = generate(
        "--generator", generator, "--model-path", str(tiny_models[generator]),
        "--precision", "svdq-int4", "--calibration-count", "3", "--out", str(tmp_path / "o"),
    )  # fmt: skip
    recipe = json.loads((out / "recipe.json").read_text())
    samples = read_samples(out)
    assert len(samples) == 2 and calls == [3]
    for _, meta in samples.values():
        smoothing = meta["smoothing"]
        assert smoothing["kind"] == "calibrated" and smoothing["calibration_prompts"] == 3
        assert smoothing["calibration_digest"] == recipe["calibration_digest"]
        alpha = smoothing["alpha"]
        assert 0 <= alpha["min"] <= alpha["median"] <= alpha["max"] <= 1
        assert meta["emulation"].startswith("svdquant-calibrated")
    cached = load_cache(out, recipe["calibration_digest"])
    assert cached and all(name.startswith("transformer.") for name in cached)
    assert any(t.abs().max() > 0 for t in cached.values())
    kept = set(samples["p00000-s0"][1]["kept"])
    assert not kept & set(cached)  # exactly the quantized layers were calibrated


def test_a_resumed_run_reuses_the_calibration(
    tiny_models: dict[str, Path], tmp_path: Path, generate, read_samples,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    calls = calibrate_calls(monkeypatch)
    common = ["--generator", "flux-schnell", "--model-path", str(tiny_models["flux-schnell"]),
              "--precision", "svdq-int4", "--calibration-count", "2",
              "--out", str(tmp_path / "o")]  # fmt: skip
    out = generate(*common, limit=1)
    stamp = (out / CACHE).stat().st_mtime_ns
    generate(*common, limit=2)  # the second image: same calibration, not gathered again
    assert calls == [2] and (out / CACHE).stat().st_mtime_ns == stamp
    digests = {meta["smoothing"]["calibration_digest"] for _, meta in read_samples(out).values()}
    assert len(digests) == 1
    with pytest.raises(SystemExit):  # another calibration: another recipe, refused
        generate(*common[:-4], "--calibration-count", "1", "--out", str(out))
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "different recipe (calibration_digest:" in error and error.endswith("another --out")


def test_a_stale_cache_is_not_reused(
    tiny_models: dict[str, Path], tmp_path: Path, generate, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "o"
    out.mkdir()
    save_cache(out, "another-recipe", {"transformer.x": torch.ones(4)}, 1)
    assert load_cache(out, "another-recipe") is not None and load_cache(out, "this") is None
    calls = calibrate_calls(monkeypatch)
    generate(
        "--generator", "flux-schnell", "--model-path", str(tiny_models["flux-schnell"]),
        "--precision", "svdq-int4", "--calibration-count", "1", "--out", str(out), limit=1,
    )  # fmt: skip
    digest = json.loads((out / "recipe.json").read_text())["calibration_digest"]
    cached = load_cache(out, digest)
    assert calls == [1] and cached is not None and "transformer.x" not in cached


def test_calibration_prompts_file_and_data_free(
    tiny_models: dict[str, Path], tmp_path: Path, generate, read_samples
) -> None:
    prompts = tmp_path / "calibration.txt"
    prompts.write_text("a red cube\na blue sphere\n")
    common = ["--generator", "flux-schnell", "--model-path", str(tiny_models["flux-schnell"])]
    out = generate(*common, "--precision", "svdq-nvfp4", "--calibration-prompts", str(prompts),
                   "--out", str(tmp_path / "file"), limit=1)  # fmt: skip
    ((_, meta),) = read_samples(out).values()
    assert meta["smoothing"]["calibration_prompts"] == 2
    free = generate(*common, "--precision", "svdq-nvfp4-datafree", "--out", str(tmp_path / "free"),
                    limit=1)  # fmt: skip
    ((_, meta),) = read_samples(free).values()
    assert meta["smoothing"] == {"kind": "data-free"} and not (free / CACHE).exists()


@pytest.mark.parametrize(
    ("precision", "count", "message"),
    [
        ("fp4", "2", "--calibration-count calibrates svdq-int4/svdq-nvfp4, not fp4: leave it out"),
        ("svdq-int4", "0", "--calibration-count must be at least 1, got 0"),
    ],
)
def test_calibration_flags_are_checked_in_one_line(
    precision: str, count: str, message: str, tiny_models: dict[str, Path], tmp_path: Path,
    generate, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    with pytest.raises(SystemExit):
        generate(
            "--generator", "sd3", "--model-path", str(tiny_models["sd3"]), "--precision",
            precision, "--calibration-count", count, "--out", str(tmp_path / "o"),
        )  # fmt: skip
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)


def test_a_missing_calibration_file_is_named_in_one_line(
    tiny_models: dict[str, Path], tmp_path: Path, generate, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "none.txt"
    with pytest.raises(SystemExit):
        generate(
            "--generator", "sd3", "--model-path", str(tiny_models["sd3"]), "--precision",
            "svdq-int4", "--calibration-prompts", str(missing), "--out", str(tmp_path / "o"),
        )  # fmt: skip
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"calibration prompt file {missing} not found: pass --calibration-prompts" in error
    assert not (tmp_path / "o").exists()  # refused before anything was written
