"""The plot functions, checked through the matplotlib objects they return."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex

from qdd.report.heatmap import plot_heatmap
from qdd.report.kde import plot_kde
from qdd.report.paired import pair_precision, paired_logits, plot_paired, shift_table
from qdd.report.palette import COLORS, bits, color, generator_style, order_precisions
from qdd.report.runs import group_table, load_runs


def scores_of(run) -> pd.DataFrame:
    return pd.read_parquet(run / "scores.parquet")


def labelled(ax) -> list:
    return [line for line in ax.lines if not line.get_label().startswith("_")]


def test_palette_orders_and_colours() -> None:
    assert order_precisions(["int4", "mxfp4", "fp8", "fp32", "bf16"]) == [
        "fp32", "fp8", "mxfp4", "bf16", "int4"
    ]  # fmt: skip
    assert len(set(COLORS.values())) == len(COLORS)  # one colour per precision (and real)
    assert color("fp4") == COLORS["fp4"] and color("int3") not in COLORS.values()
    assert [bits(p) for p in ("fp32", "nvfp4", "int8", "real")] == [32, 4, 8, None]
    styles = generator_style(["sd3", "sd15", "flux-schnell", "sdxl"])
    assert list(styles) == ["sd15", "sdxl", "sd3", "flux-schnell"]
    assert len({c for c, _ in styles.values()}) == 4
    assert generator_style(["sd3"])["sd3"] == styles["sd3"]  # fixed per generator


def test_kde_has_one_curve_per_precision_plus_real_and_the_threshold(make_run) -> None:
    grid = {"sd3": ["fp4", "fp32", "fp8", "fp16"], "flux-schnell": ["int4", "fp32"]}
    fig = plot_kde(scores_of(make_run("r", "npr", grid)), "npr", threshold=0.5)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["sd3", "flux-schnell"]
    assert len(fig.axes) == 2
    sd3, flux = panels
    assert [c.get_label() for c in labelled(sd3)] == ["fp32", "fp16", "fp8", "fp4", "real"]
    assert [c.get_label() for c in labelled(flux)] == ["fp32", "int4", "real"]
    for ax in panels:
        for curve in labelled(ax):
            expected = color("real" if curve.get_label() == "real" else curve.get_label())
            assert to_hex(curve.get_color()) == expected.lower()
            assert len(curve.get_xdata()) > 100 and np.all(np.asarray(curve.get_ydata()) >= 0)
        assert [tuple(ln.get_xdata()) for ln in ax.lines if ln.get_label() == "_threshold"] == [
            (0.5, 0.5)
        ]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["fp32", "fp16", "fp8", "fp4", "int4", "real", "threshold (0.5)"]


def test_kde_draws_single_and_constant_groups_as_markers(make_run) -> None:
    one = plot_kde(scores_of(make_run("one", "npr", {"sd3": ["fp32", "fp4"]}, n=1)), "npr")
    flat = plot_kde(scores_of(make_run("flat", "npr", {"sd3": ["fp4"]}, constant=True)), "npr")
    for fig in (one, flat):
        for line in labelled(fig.axes[0]):
            if line.get_label() == "real" and fig is flat:
                assert len(line.get_xdata()) > 2  # real logits vary: a true density
                continue
            x = line.get_xdata()
            assert len(x) == 2 and x[0] == x[1]  # a vertical marker where the values are
    fp4 = [ln for ln in flat.axes[0].lines if ln.get_label() == "fp4"][0]
    assert fp4.get_xdata()[0] == -0.5


def test_heatmap_has_a_panel_per_detector_on_one_scale(make_run) -> None:
    runs = [make_run("npr", "npr"), make_run("clipd", "clipd", {"sd3": ["fp4", "fp32"]})]
    table = group_table(load_runs(runs))
    fig = plot_heatmap(table, "fake_acc")
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["clipd", "npr"]
    assert len(fig.axes) == 3  # two panels and one shared colour bar
    for ax in panels:
        image = ax.images[0]
        assert image.get_clim() == (0, 1) and image.get_array().shape == (2, 4)
        assert [t.get_text() for t in ax.get_xticklabels()] == ["fp32", "fp16", "fp8", "fp4"]
        assert [t.get_text() for t in ax.get_yticklabels()] == ["sd3", "flux-schnell"]
        assert len(ax.texts) == 8
    texts = [t.get_text() for t in panels[0].texts]
    assert texts.count("–") == 6  # clipd has sd3 fp32 and fp4 only
    npr = table[table["detector"] == "npr"].set_index(["generator", "precision"])["fake_acc"]
    cells = np.array([t.get_text() for t in panels[1].texts]).reshape(2, 4)
    assert cells[1, 3] == f"{npr['flux-schnell', 'fp4']:.2f}"  # row: generator, column: precision


def test_paired_view_pairs_fp4_with_its_fp32_twin_by_key(make_run) -> None:
    scores = scores_of(make_run("r", "npr"))
    fig = plot_paired(scores, "npr")
    scatter, bars = fig.axes
    assert [c.get_label() for c in scatter.collections] == ["sd3", "flux-schnell"]
    sd3 = scores[scores["generator"] == "sd3"].set_index(["precision", "key"])["logit"]
    points = {tuple(p) for p in scatter.collections[0].get_offsets()}
    assert (sd3["fp32", "p00003-s3"], sd3["fp4", "p00003-s3"]) in points
    assert len(points) == 12
    assert any(tuple(ln.get_xdata()) == tuple(ln.get_ydata()) for ln in scatter.lines)  # y = x
    shifts = shift_table(scores, "npr").set_index("generator")
    assert [p.get_height() for p in bars.patches] == pytest.approx(
        shifts.loc[["sd3", "flux-schnell"], "mean_shift"].tolist()
    )
    assert all(p.get_height() < 0 for p in bars.patches)
    assert fig.get_suptitle().startswith("npr: FP4 vs FP32") and "no FP4" not in fig.get_suptitle()


def test_paired_view_falls_back_to_the_lowest_bits_and_says_so(make_run) -> None:
    scores = scores_of(make_run("n", "npr", {"sd3": ["fp32", "fp16", "fp8", "nf4"]}))
    assert pair_precision(scores) == "nf4"
    fig = plot_paired(scores, "npr")
    assert "NF4 vs FP32" in fig.get_suptitle() and "no FP4 images" in fig.get_suptitle()
    assert pair_precision(scores[scores["precision"] != "nf4"]) == "fp8"
    assert pair_precision(scores_of(make_run("x", "npr", {"sd3": ["fp4", "fp8"]}))) is None


def test_paired_view_without_pairs_is_skipped(make_run) -> None:
    assert plot_paired(scores_of(make_run("x", "npr", {"sd3": ["fp4"]})), "npr") is None
    scores = scores_of(make_run("k", "npr", {"sd3": ["fp32", "fp4"]}))
    fp4 = scores["precision"] == "fp4"
    scores.loc[fp4, "key"] = "other-" + scores.loc[fp4, "key"]  # no key has both twins
    assert paired_logits(scores, "fp4").empty and plot_paired(scores, "npr") is None
    assert shift_table(scores, "npr").empty
