"""The quantized share the report shows, from real generate → test → report runs.

Tiny SD1.5 and SD3 pipelines generate at FP4; `qdd-cli test` scores them; the report's
quantized fraction per cell must equal an independent count of the saved denoisers' Linear
weights over all their parameters (only nn.Linear layers are quantized, as in bitsandbytes).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from qdd.cli import main
from qdd.report.command import build_report
from qdd.report.heatmap import plot_heatmap
from qdd.report.runs import group_table, load_runs
from qdd.report.stats import METRICS
from tests.conftest import random_image

DENOISER = {
    "sd15": ("unet", "UNet2DConditionModel"),
    "sd3": ("transformer", "SD3Transformer2DModel"),
}


def linear_share(model_dir: Path, generator: str) -> float:
    """Linear weight elements / all parameters of the saved denoiser, counted here."""
    import diffusers
    import torch

    folder, cls = DENOISER[generator]
    denoiser = getattr(diffusers, cls).from_pretrained(model_dir / folder)
    linear = sum(m.weight.numel() for m in denoiser.modules() if isinstance(m, torch.nn.Linear))
    return linear / sum(p.numel() for p in denoiser.parameters())


def real_shards(folder: Path, n: int = 4) -> Path:
    from qdd.datamodules.schema import make_meta
    from qdd.datamodules.writer import ShardWriter, write_manifest

    with ShardWriter(folder, max_count=100) as writer:
        for i in range(n):
            writer.write(f"photo{i}", random_image(i, (64, 64)), make_meta(0, "noise"))
    write_manifest(folder)
    return folder


@pytest.mark.slow
def test_report_quantized_fraction_matches_a_count_of_linear_parameters(tmp_path, capsys) -> None:
    from qdd.generation.tiny import build_tiny_pipeline

    shards = tmp_path / "shards"
    expected = {}
    for generator in ("sd15", "sd3"):
        model = build_tiny_pipeline(generator, tmp_path / "models" / generator)
        expected[generator] = linear_share(model, generator)
        print(f"{generator}: {expected[generator]:.4f} of the denoiser in Linear weights")
        for precision in ("fp32", "fp4"):
            main(["generate", "--generator", generator, "--model-path", str(model),
                  "--precision", precision, "--quant-backend", "emulate", "--steps", "1",
                  "--limit", "2", "--height", "64", "--width", "64",
                  "--trainer.accelerator", "cpu",
                  "--out", str(shards / f"{generator}-{precision}")])  # fmt: skip
    real_shards(shards / "real-noise")
    run = tmp_path / "run"
    main(["test", "--detector", "npr", "--random-weights", "--data", str(shards / "*"),
          "--out", str(run), "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
          "--trainer.enable_model_summary=false"])  # fmt: skip
    capsys.readouterr()
    scores = pd.read_parquet(run / "scores.parquet")
    assert {"quant_fraction", "source_format"} <= set(scores.columns)
    index = build_report([run], tmp_path / "report").read_text()
    groups = pd.read_csv(tmp_path / "report" / "tables" / "groups.csv")
    cells = groups.set_index(["generator", "precision"])
    for generator, share in expected.items():
        assert cells.loc[(generator, "fp4@emulate"), "quant_fraction"] == pytest.approx(
            share, rel=1e-6
        )
        assert cells.loc[(generator, "fp4@emulate"), "quant_scope"] == "denoiser"
        assert cells.loc[(generator, "fp32"), "quant_fraction"] == 0
        assert f"| {generator} | fp4@emulate | emulate | denoiser | {share:.3f} |" in index
    assert expected["sd15"] < 0.5 < expected["sd3"]  # the tiny models keep the real contrast
    # the report's numpy metrics equal the torchmetrics ones qdd-cli test wrote
    written = json.loads((run / "metrics.json").read_text())["groups"]
    for group, values in written.items():
        generator, _, precision = group.rpartition("/")
        for name in METRICS:
            ours = cells.loc[(generator, precision), name]
            if values[name] is None:
                assert pd.isna(ours), (group, name)
            else:
                assert ours == pytest.approx(values[name], abs=1e-6), (group, name)
    # the ▼ mark: SD1.5's FP4 cell (under half quantized), not SD3's, not FP32
    heatmap = plot_heatmap(group_table(load_runs([run])), "fake_acc")
    marks = [t for t in heatmap.axes[0].texts if t.get_gid() == "low_fraction"]
    assert len(marks) == 1
    assert [round(v) for v in marks[0].get_position()] == [1, 0]  # column fp4, row sd15
