"""The trade-off table, figure and verdicts (issue 18), from quality runs beside test runs."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex

from qdd.cli import main
from qdd.report.runs import group_table, load_runs
from qdd.report.tradeoff import is_quality_run, load_quality, tradeoff_table
from qdd.report.tradeoff_figure import plot_tradeoff
from qdd.report.verdict import verdicts

#: Mean SSIM and denoiser bytes per generator/precision of the synthetic quality run.
SSIM = {
    "sd3": {"fp16": 0.99, "fp8": 0.95, "fp4": 0.93, "nf4": 0.80},
    "flux-schnell": {"fp16": 0.97, "fp8": 0.85, "fp4": 0.70},
}
BYTES = {"fp32": 4000, "fp16": 2000, "fp8": 1000, "fp4": 520, "nf4": 500}
GRID = {
    "sd3": ["fp32", "fp16", "fp8", "fp4", "nf4"],
    "flux-schnell": ["fp32", "fp16", "fp8", "fp4"],
}


def write_quality_run(folder: Path, n: int = 6, costs: bool = True, fid: bool = False) -> Path:
    """quality.parquet + metrics.json as `qdd-cli quality` writes them (n images a group)."""
    rng = np.random.default_rng(0)
    rows = []
    for generator, by_precision in SSIM.items():
        for precision, ssim in by_precision.items():
            noise = rng.normal(0, 0.005, n)
            for i in range(n):
                rows.append(
                    {
                        "generator": generator,
                        "precision": precision,
                        "prompt_id": i,
                        "seed": i,
                        "key": f"p{i:05d}-s{i}",
                        "psnr": 20 + 20 * ssim + noise[i],
                        "ssim": ssim + noise[i] - noise.mean(),
                    }
                )
    folder.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(folder / "quality.parquet", index=False)
    groups = {
        f"{g}/{p}": {
            "generator": g,
            "precision": p,
            "n": n,
            **({"fid": 10 * (1 - s), "kid": 0.1 * (1 - s), "kid_std": 0.0} if fid else {}),
        }
        for g, by in SSIM.items()
        for p, s in by.items()
    }
    cost = {
        f"{g}/{p}": {
            "denoiser_bytes": BYTES[p] if costs else None,
            "seconds_per_image": 1.0 + BYTES[p] / 4000 if costs else None,
            "peak_memory_bytes": 10 * BYTES[p] if costs else None,
            "n_recorded": n if costs else 0,
        }
        for g, precisions in GRID.items()
        for p in precisions
    }
    metrics = {
        "kind": "quality",
        "reference": "fp32",
        "data": ["shards/x"],
        "n": len(rows),
        "expected": len(rows),
        "n_unpaired": 0,
        "groups": groups,
        "costs": cost,
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


@pytest.fixture
def quality_run(tmp_path: Path) -> Path:
    return write_quality_run(tmp_path / "runs" / "quality", fid=True)


@pytest.fixture
def detection(make_run) -> pd.DataFrame:
    runs = [make_run("npr", "npr", GRID), make_run("clipd", "clipd", GRID, seed=1)]
    return group_table(load_runs(runs))


def test_table_joins_costs_quality_and_each_detector(quality_run, detection) -> None:
    quality = load_quality([quality_run])
    table = tradeoff_table(quality, detection)
    assert list(zip(table["generator"], table["precision"], strict=True)) == [
        ("sd3", p) for p in GRID["sd3"]
    ] + [("flux-schnell", p) for p in GRID["flux-schnell"]]
    assert list(table.columns[:7]) == [
        "generator",
        "precision",
        "denoiser_bytes",
        "bytes_vs_fp32",
        "seconds_per_image",
        "peak_memory_bytes",
        "n_pairs",
    ]
    scores = pd.read_parquet(quality_run / "quality.parquet")
    for row in table.itertuples():
        assert row.denoiser_bytes == BYTES[row.precision]
        assert row.bytes_vs_fp32 == pytest.approx(BYTES[row.precision] / 4000)
        assert row.peak_memory_bytes == 10 * BYTES[row.precision]
        part = scores[
            (scores["generator"] == row.generator) & (scores["precision"] == row.precision)
        ]
        if row.precision == "fp32":  # the reference: nothing to compare it with
            assert row.n_pairs == 0 and np.isnan(row.ssim) and np.isnan(row.fid)
            continue
        assert row.n_pairs == len(part) == 6
        assert row.ssim == pytest.approx(part["ssim"].mean())
        assert row.ssim_lo < row.ssim < row.ssim_hi
        assert row.psnr == pytest.approx(part["psnr"].mean())
        assert row.fid == pytest.approx(10 * (1 - SSIM[row.generator][row.precision]))
        for detector in ("npr", "clipd"):
            match = detection[
                (detection["detector"] == detector)
                & (detection["generator"] == row.generator)
                & (detection["precision"] == row.precision)
            ]
            assert getattr(row, f"{detector}_fake_acc") == match["fake_acc"].iloc[0]
            assert getattr(row, f"{detector}_auroc") == match["auroc"].iloc[0]
    assert "lpips" not in table.columns  # not run: no empty column


def test_figure_shows_memory_saved_against_detection_coloured_by_ssim(
    quality_run, detection
) -> None:
    table = tradeoff_table(load_quality([quality_run]), detection)
    fig = plot_tradeoff(table, "npr")
    panels = [ax for ax in fig.axes if ax.get_xlabel()]
    assert [ax.get_ylabel().splitlines()[0] for ax in panels] == ["fake accuracy", "AUROC"]
    assert all(ax.get_xlabel() == "denoiser memory saved vs fp32 (%)" for ax in panels)
    colorbar = [ax for ax in fig.axes if ax not in panels]
    assert len(colorbar) == 1 and colorbar[0].get_ylabel() == "SSIM vs fp32 twin"
    cmap, (vmin, vmax) = mpl.colormaps["viridis"], colorbar[0].get_ylim()
    for ax, metric in zip(panels, ("fake_acc", "auroc"), strict=True):
        points = {c.get_label(): c for c in ax.collections}
        assert list(points) == ["sd3", "flux-schnell"]
        assert points["sd3"].get_paths()[0] != points["flux-schnell"].get_paths()[0]  # shapes
        for generator, collection in points.items():
            rows = table[table["generator"] == generator].iloc[::-1]  # by memory saved
            saved = 100 * (1 - rows["denoiser_bytes"] / 4000)
            offsets = collection.get_offsets()
            order = np.argsort(saved.to_numpy(), kind="stable")
            assert np.allclose(offsets[:, 0], saved.to_numpy()[order])
            assert np.allclose(offsets[:, 1], rows[f"npr_{metric}"].to_numpy()[order])
            ssim = rows["ssim"].fillna(1.0).to_numpy()[order]  # fp32 is its own twin
            expected = [to_hex(cmap((s - vmin) / (vmax - vmin))) for s in ssim]
            assert [to_hex(c) for c in collection.get_facecolors()] == expected
        # coincident points (both generators' fp32 detected alike) share one label
        names = [n for t in ax.texts for n in t.get_text().split(", ")]
        assert sorted(set(names)) == sorted(set(GRID["sd3"] + GRID["flux-schnell"]))
    legend = fig.legends[0]
    assert legend.get_title().get_text() == "generator"
    assert [t.get_text() for t in legend.get_texts()] == ["sd3", "flux-schnell"]
    assert "nominal" not in fig.get_suptitle()


def test_figure_falls_back_to_nominal_bits_without_recorded_bytes(tmp_path, detection) -> None:
    run = write_quality_run(tmp_path / "old", costs=False)
    table = tradeoff_table(load_quality([run]), detection)
    assert table["denoiser_bytes"].isna().all()
    fig = plot_tradeoff(table, "clipd")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "nominal weight bits saved vs fp32 (%)"
    assert "denoiser bytes not recorded" in fig.get_suptitle()
    offsets = {c.get_label(): c.get_offsets() for c in ax.collections}
    assert sorted(offsets["sd3"][:, 0]) == [0.0, 50.0, 75.0, 87.5, 87.5]


def test_verdicts_name_what_saves_and_evades_while_keeping_quality(quality_run, detection):
    table = tradeoff_table(load_quality([quality_run]), detection)
    sd3, flux = verdicts(table)
    # nf4 saves more but loses quality (SSIM 0.80): fp4 is the answer for sd3
    fp4 = table[(table["generator"] == "sd3") & (table["precision"] == "fp4")].iloc[0]
    fp32 = table[(table["generator"] == "sd3") & (table["precision"] == "fp32")].iloc[0]
    accuracy = (fp4["npr_fake_acc"] + fp4["clipd_fake_acc"]) / 2
    base = (fp32["npr_fake_acc"] + fp32["clipd_fake_acc"]) / 2
    assert sd3 == (
        "**sd3**: of the precisions that keep SSIM ≥ 0.90 against fp32, fp4 "
        "saves the most (87% of the denoiser memory, SSIM 0.930) and evades "
        f"the detectors most (mean fake accuracy {accuracy:.2f} against fp32's {base:.2f} "
        f"on both detectors: clipd {fp4['clipd_fake_acc']:.2f}, npr {fp4['npr_fake_acc']:.2f})"
    )
    # flux: only fp16 keeps quality
    assert flux.startswith(
        "**flux-schnell**: of the precisions that keep SSIM ≥ 0.90 against "
        "fp32, fp16 saves the most (50% of the denoiser memory"
    )
    strict = verdicts(table, keep=0.995)
    assert strict[0].startswith("**sd3**: no lower precision keeps SSIM ≥ 0.99")
    assert "(best: fp16, SSIM 0.990)" in strict[0]


def test_report_command_writes_the_tradeoff(make_run, quality_run, tmp_path, capsys) -> None:
    runs = [make_run("npr", "npr", GRID), make_run("clipd", "clipd", GRID, seed=1)]
    assert is_quality_run(quality_run) and not is_quality_run(runs[0])
    out = tmp_path / "report"
    main(["report", *map(str, runs), str(quality_run), "--out", str(out)])
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out / "report.md")
    frame = pd.read_csv(out / "tables" / "tradeoff.csv")
    assert len(frame) == 9 and {"npr_fake_acc", "clipd_auroc", "fid", "kid"} <= set(frame)
    for stem in ("tradeoff_npr", "tradeoff_clipd"):
        assert (out / f"{stem}.png").stat().st_size > 0 and (out / f"{stem}.svg").exists()
    index = (out / "report.md").read_text()
    assert "## Trade-off" in index and "Keeping quality means a mean SSIM ≥ 0.90" in index
    assert "- **sd3**: of the precisions that keep SSIM" in index
    assert "![npr: memory saved vs detection" in index
    # 25 columns are too wide for report.md: it shows memory, SSIM and fake accuracy, and
    # links the whole table (the bytes are in it)
    # detectors family by family: npr (end-to-end) before clipd (CLIP features)
    assert "| generator | precision | memory_saved | ssim | npr | clipd |" in index
    assert list(frame.columns)[-4:] == ["npr_auroc", "npr_fake_acc", "clipd_auroc",
                                        "clipd_fake_acc"]  # fmt: skip
    row = frame.set_index(["generator", "precision"]).loc[("sd3", "fp4")]
    assert (f"| sd3 | fp4 | {row['memory_saved']:.3f} | {row['ssim']:.3f} | "
            f"{row['npr_fake_acc']:.3f} | {row['clipd_fake_acc']:.3f} |") in index  # fmt: skip
    assert row["denoiser_bytes"] == 520 and "(tables/tradeoff.md)" in index
    assert (out / "heatmap_fake_acc.png").exists()  # the test runs' report is unchanged


def test_quality_runs_alone_give_the_table_without_detectors(quality_run, tmp_path) -> None:
    from qdd.report.command import build_report

    index = build_report([quality_run], tmp_path / "report").read_text()
    frame = pd.read_csv(tmp_path / "report" / "tables" / "tradeoff.csv")
    assert not [c for c in frame.columns if c.endswith("_fake_acc")]
    assert "no test runs beside the quality runs" in index
    assert not list((tmp_path / "report").glob("tradeoff_*.png"))


def test_two_quality_runs_of_different_images_under_one_key_are_refused(tmp_path) -> None:
    """Two quality runs of sd3/fp4 (model A, then a fine-tune B: quality.parquet records no
    model): main kept the first run's rows by key and dropped the other's, without a word. The
    same run given twice is still the same images, counted once."""
    from qdd.errors import QddError

    first = write_quality_run(tmp_path / "a")
    other = write_quality_run(tmp_path / "b")
    scores = pd.read_parquet(other / "quality.parquet")
    scores.loc[scores["precision"] == "fp4", "ssim"] -= 0.2  # other images of the same keys
    scores.to_parquet(other / "quality.parquet", index=False)
    with pytest.raises(QddError) as error:
        load_quality([first, other])
    message = str(error.value)
    assert "\n" not in message and str(first) in message and str(other) in message
    assert "/fp4 p00000-s0, with different values" in message
    again = load_quality([first, first])
    assert len(again.scores) == len(load_quality([first]).scores)
    assert "_run" not in again.scores.columns
