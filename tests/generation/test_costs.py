"""Costs of generation (issue 18): denoiser bytes, seconds per image, peak memory, offload,
and ``--dry-run``, on a tiny saved SD3 pipeline on the CPU."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest
import torch

from qdd.errors import QddError
from qdd.generation.costs import sample_costs, timed_call
from qdd.identity import group_label
from tests.generation.conftest import SIZE, samples_of

COST_FIELDS = ("denoiser_bytes", "seconds_per_image", "peak_memory_bytes", "offload")


@pytest.fixture(scope="module")
def sd3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qdd.generation.tiny import build_tiny_pipeline

    return build_tiny_pipeline("sd3", tmp_path_factory.mktemp("model") / "sd3")


def generate_args(model: Path, out: Path, *extra: str, limit: int = 2) -> list[str]:
    return [
        "generate", "--generator", "sd3", "--model-path", str(model), "--out", str(out),
        "--steps", "2", "--limit", str(limit), "--height", str(SIZE), "--width", str(SIZE),
        "--trainer.accelerator", "cpu", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(sd3: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``qdd-cli generate`` of the tiny SD3 at fp32 and fp4 (emulated on this CPU)."""
    from qdd.cli import main

    root = tmp_path_factory.mktemp("runs")
    for precision in ("fp32", "fp4"):
        main(generate_args(sd3, root / precision, "--precision", precision))
    return {precision: root / precision for precision in ("fp32", "fp4")}


def test_costs_in_every_sample_and_the_manifest(runs: dict[str, Path], sd3: Path) -> None:
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(sd3, subfolder="transformer")
    # parameters and the persistent position-embedding buffer, all float32
    fp32_bytes = 4 * sum(t.numel() for t in transformer.state_dict().values())
    assert all(t.dtype == torch.float32 for t in transformer.state_dict().values())
    recorded = {}
    for precision, folder in runs.items():
        metas = [meta for _, meta in samples_of(folder).values()]
        assert len(metas) == 2
        for meta in metas:
            assert set(COST_FIELDS) <= set(meta)
            assert meta["seconds_per_image"] > 0 and meta["offload"] == "none"
            assert meta["peak_memory_bytes"] is None  # CPU: no accelerator peak to report
        (size,) = {meta["denoiser_bytes"] for meta in metas}
        recorded[precision] = size
        manifest = json.loads((folder / "manifest.json").read_text())
        costs = manifest["costs"][group_label(metas[0])]  # sd3/fp4@emulate: the emulation
        assert costs["n"] == 2 and costs["denoiser_bytes"] == size
        seconds = [meta["seconds_per_image"] for meta in metas]
        assert costs["seconds_per_image"] == pytest.approx(statistics.median(seconds))
        assert costs["seconds_per_image_mean"] == pytest.approx(statistics.fmean(seconds))
        assert costs["peak_memory_bytes"] is None and "no accelerator" in costs["peak_memory_note"]
        assert costs["offload"] == ["none"] and costs["device_names"]
    assert recorded["fp32"] == fp32_bytes  # unquantized: everything stored at 4 bytes
    assert recorded["fp4"] < 0.4 * fp32_bytes


def test_dry_run_weighs_without_weights(
    runs: dict[str, Path], sd3: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A plan's table from the configs alone (the weight files are gone), nothing written;
    its denoiser sizes are the ones the real runs recorded."""
    from qdd.cli import main
    from qdd.generation.dryrun import _size, shard_bytes_estimate

    configs_only = tmp_path / "configs-only"
    shutil.copytree(sd3, configs_only, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    assert not list(configs_only.rglob("*.safetensors"))
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        f"out: {tmp_path / 'grid'}\nlimit: 3\nheight: {SIZE}\nwidth: {SIZE}\n"
        f"generators:\n  - generator: sd3\n    model_path: {configs_only}\n"
        "    precisions: [fp32, fp4, fp8]\n"
    )
    capsys.readouterr()
    main(["generate", "--plan", str(plan), "--dry-run"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert not (tmp_path / "grid").exists()
    header, rows, total = lines[0].split(), [line.split() for line in lines[1:-1]], lines[-1]
    assert header[:4] == ["generator", "precision", "images", "to"]
    by_precision = {row[1]: row for row in rows}
    assert sorted(by_precision) == ["fp32", "fp4", "fp8"]
    disk = _size(shard_bytes_estimate(3, SIZE, SIZE)).split()
    for precision in ("fp32", "fp4"):
        recorded = samples_of(runs[precision]).popitem()[1][1]["denoiser_bytes"]
        row = by_precision[precision]
        assert row[2:4] == ["3", "3"] and row[4] == f"{SIZE}x{SIZE}"
        assert row[5:7] == disk
        assert row[7:9] == _size(recorded).split()
    assert float(by_precision["fp4"][9]) < 0.4 and float(by_precision["fp8"][9]) < 0.6
    assert total.startswith("3 job(s), 9 images (9 to make)")


def test_dry_run_counts_what_a_folder_still_lacks(
    runs: dict[str, Path], sd3: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from qdd.cli import main

    capsys.readouterr()
    main(generate_args(sd3, runs["fp4"], "--precision", "fp4", "--dry-run", limit=5))
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[1:4] == ["fp4", "5", "3"]  # 2 of the 5 made already


def test_dry_run_without_the_denoiser_config_is_one_line(tmp_path: Path, sd3: Path) -> None:
    from qdd.cli import generate_command as main

    broken = tmp_path / "no-config"
    shutil.copytree(sd3, broken)
    (broken / "transformer" / "config.json").unlink()
    with pytest.raises(QddError, match="--dry-run needs the config"):
        main(generate_args(broken, tmp_path / "out", "--precision", "fp4", "--dry-run")[1:])


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offload_refused_on_cpu(offload: str, sd3: Path, tmp_path: Path) -> None:
    from qdd.cli import generate_command as main

    args = generate_args(sd3, tmp_path / "out", "--precision", "fp32", "--offload", offload)
    with pytest.raises(QddError, match=f"--offload {offload} .* on the CPU") as error:
        main(args[1:])
    assert "\n" not in str(error.value)
    assert not list((tmp_path / "out").glob("*.tar"))


def test_offload_none_is_recorded(runs: dict[str, Path]) -> None:
    assert {meta["offload"] for _, meta in samples_of(runs["fp4"]).values()} == {"none"}


def test_timed_call_on_cpu() -> None:
    result, seconds, peak = timed_call(torch.device("cpu"), lambda: sum(range(1000)))
    assert result == 499500 and seconds > 0 and peak is None
    costs = sample_costs(1000, 3.0, 4, None, "none")
    assert costs == {
        "denoiser_bytes": 1000,
        "seconds_per_image": 0.75,
        "peak_memory_bytes": None,
        "offload": "none",
    }


@pytest.mark.gpu
def test_peak_memory_on_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    device = torch.device("cuda")
    _, _, peak = timed_call(device, lambda: torch.ones(1 << 20, device=device).sum().item())
    assert peak is not None and peak >= 4 << 20
