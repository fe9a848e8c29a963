"""The plot functions, checked through the matplotlib objects they return."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex
from matplotlib.container import BarContainer

from qdd.report.heatmap import plot_heatmap
from qdd.report.kde import plot_kde
from qdd.report.paired import lower_precisions, paired_logits, plot_paired, shift_table
from qdd.report.palette import bits, color, colors, generator_style, order_precisions
from qdd.report.robustness import kinds, plot_robustness, precision_table
from qdd.report.runs import group_table, load_runs
from tests.report.conftest import reference_metrics


def scores_of(run) -> pd.DataFrame:
    return pd.read_parquet(run / "scores.parquet")


def labelled(ax) -> list:
    return [line for line in ax.lines if not line.get_label().startswith("_")]


def test_palette_orders_and_colours() -> None:
    assert order_precisions(["int4", "mxfp4", "fp8", "fp32", "bf16"]) == [
        "fp32", "fp8", "mxfp4", "bf16", "int4"
    ]  # fmt: skip
    palette = colors()
    assert len(set(palette.values())) == len(palette)  # one colour per precision (and real)
    assert color("fp4") == palette["fp4"] and color("int3") not in palette.values()
    assert [bits(p) for p in ("fp32", "nvfp4", "int8", "real")] == [32, 4, 8, None]
    styles = generator_style(["sd3", "sd15", "flux-schnell", "sdxl"])
    assert list(styles) == ["sd15", "sdxl", "sd3", "flux-schnell"]
    assert len({c for c, _ in styles.values()}) == 4
    assert generator_style(["sd3"])["sd3"] == styles["sd3"]  # fixed per generator


def ridge_labels(ax) -> list[str]:
    return [t.get_text().split()[0] for t in ax.get_yticklabels()][::-1]


def test_kde_ridges_one_per_precision_on_one_scale_with_fp32_outlines(make_run) -> None:
    grid = {"sd3": ["fp4", "fp32", "fp8", "fp16"], "flux-schnell": ["int4", "fp32"]}
    fig = plot_kde(scores_of(make_run("r", "npr", grid)), "npr", threshold=0.5)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["sd3", "flux-schnell"]
    assert len(fig.axes) == 2
    sd3, flux = panels
    assert [c.get_label() for c in labelled(sd3)] == ["fp32", "fp16", "fp8", "fp4", "real"]
    assert [c.get_label() for c in labelled(flux)] == ["fp32", "int4", "real"]
    # one FP32 outline over every other precision's ridge (not over the real images)
    outlines = [ln for ln in sd3.lines if ln.get_label() == "_fp32 reference"]
    assert len(outlines) == 3
    assert all(to_hex(ln.get_color()) == color("fp32").lower() for ln in outlines)
    assert len([ln for ln in flux.lines if ln.get_label() == "_fp32 reference"]) == 1
    # ridges stacked without overlap: fp32 on top, real at the bottom, n on every row
    assert [t.get_text() for t in sd3.get_yticklabels()] == [
        "fp32  n=12", "fp16  n=12", "fp8  n=12", "fp4  n=12", "real  n=12"
    ]  # fmt: skip
    bases = [min(curve.get_ydata()) for curve in labelled(sd3)]
    assert bases == sorted(bases, reverse=True) and len(set(np.round(bases, 9))) == 5
    assert sd3.get_ylim() == flux.get_ylim()  # one density scale for every panel
    for ax in panels:
        for curve in labelled(ax):
            expected = color("real" if curve.get_label() == "real" else curve.get_label())
            assert to_hex(curve.get_color()) == expected.lower()
            assert len(curve.get_xdata()) > 100
        assert [tuple(ln.get_xdata()) for ln in ax.lines if ln.get_label() == "_threshold"] == [
            (0.5, 0.5)
        ]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["fp32", "fp16", "fp8", "fp4", "int4", "real", "fp32 (reference)",
                      "threshold (0.5)"]  # fmt: skip


def test_kde_draws_single_and_constant_groups_as_ticks(make_run) -> None:
    one = plot_kde(scores_of(make_run("one", "npr", {"sd3": ["fp32", "fp4"]}, n=1)), "npr")
    flat = plot_kde(scores_of(make_run("flat", "npr", {"sd3": ["fp4"]}, constant=True)), "npr")
    for fig in (one, flat):
        for line in labelled(fig.axes[0]):
            if line.get_label() == "real" and fig is flat:
                assert len(line.get_xdata()) > 2  # real logits vary: a true density
                continue
            x = line.get_xdata()
            assert len(x) == 2 and x[0] == x[1]  # a vertical tick where the values are
    fp4 = [ln for ln in flat.axes[0].lines if ln.get_label() == "fp4"][0]
    assert fp4.get_xdata()[0] == -0.5


def cell_values(ax) -> list[str]:
    return [t.get_text() for t in ax.texts if t.get_gid() != "low_fraction"]


def test_heatmap_cells_carry_value_interval_and_n_checked_against_sklearn(make_run) -> None:
    runs = [make_run("npr", "npr"), make_run("clipd", "clipd", {"sd3": ["fp4", "fp32"]})]
    table = group_table(load_runs(runs))
    fig = plot_heatmap(table, "fake_acc")
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title().splitlines()[0] for ax in panels] == ["clipd", "npr"]
    assert len(fig.axes) == 3  # two panels and one shared colour bar
    for ax in panels:
        image = ax.images[0]
        assert image.get_clim() == (0, 1) and image.get_array().shape == (2, 4)
        assert [t.get_text() for t in ax.get_xticklabels()] == ["fp32", "fp16", "fp8", "fp4"]
        assert [t.get_text() for t in ax.get_yticklabels()] == ["sd3", "flux-schnell"]
        assert len(cell_values(ax)) == 8
    assert cell_values(panels[0]).count("–") == 6  # clipd has sd3 fp32 and fp4 only
    assert "–: not measured" in fig.get_suptitle()
    # the npr cell flux-schnell/fp4, recomputed from the run's scores
    scores = scores_of(runs[0])
    real = scores.loc[scores["label"] == 0, "logit"].to_numpy()
    fake = scores.loc[scores["group"] == "flux-schnell/fp4", "logit"].to_numpy()
    expected = reference_metrics(real, fake)["fake_acc"]
    cells = np.array(cell_values(panels[1])).reshape(2, 4)
    value, interval, n = cells[1, 3].splitlines()
    assert value == f"{expected:.2f}" and n == "n=12"
    lo, hi = (float(v) for v in interval.strip("[]").split(", "))
    assert lo <= expected <= hi
    real_acc = reference_metrics(real, fake)["real_acc"]
    assert f"real acc {real_acc:.2f}" in panels[1].get_title()


def test_heatmap_titles_say_only_what_is_true(make_run) -> None:
    table = group_table(load_runs([make_run("npr", "npr")]))
    title = plot_heatmap(table, "fake_acc").get_suptitle()
    assert "not measured" not in title  # nothing is missing
    assert "▼" not in title  # sd3 and flux are ~100 % quantized: nothing marked
    sd15 = group_table(load_runs([make_run("sd15", "npr", {"sd15": ["fp32", "fp8", "fp4"]})]))
    fig = plot_heatmap(sd15, "fake_acc")
    assert "▼: under 50% of the scoped parameters" in fig.get_suptitle()
    marks = [t for t in fig.axes[0].texts if t.get_gid() == "low_fraction"]
    assert len(marks) == 2  # fp8 and fp4 of SD1.5 (31 %); never fp32


def test_auroc_heatmap_separates_the_top_decile_and_shows_three_decimals(make_run) -> None:
    table = group_table(load_runs([make_run("npr", "npr")]))
    fig = plot_heatmap(table, "auroc")
    image = fig.axes[0].images[0]
    norm = image.norm
    assert (norm.vmin, norm.vmax) == (0.5, 1.0) and norm(0.9) == pytest.approx(0.5)
    assert norm(0.95) - norm(0.9) > 0.2  # a 0.05 step near the top spans a quarter of the bar
    bar = fig.axes[-1]
    assert "0.9–1.0 is the upper half" in bar.get_ylabel()
    texts = cell_values(fig.axes[0])
    assert all(len(t.splitlines()[0].split(".")[1]) == 3 for t in texts)


def test_paired_view_has_a_panel_per_lower_precision_paired_by_key(make_run) -> None:
    scores = scores_of(make_run("r", "npr"))
    fig = plot_paired(scores, "npr")
    *scatters, bar_ax = fig.axes  # the bar panel is added last
    assert [ax.get_title() for ax in scatters] == [
        "FP16 vs FP32 (24 pairs)", "FP8 vs FP32 (24 pairs)", "FP4 vs FP32 (24 pairs)"
    ]  # fmt: skip
    for ax in scatters:
        assert [c.get_label() for c in ax.collections] == ["sd3", "flux-schnell"]
        assert any(tuple(ln.get_xdata()) == tuple(ln.get_ydata()) for ln in ax.lines)  # y = x
    sd3 = scores[scores["generator"] == "sd3"].set_index(["precision", "key"])["logit"]
    points = {tuple(p) for p in scatters[2].collections[0].get_offsets()}
    assert (sd3["fp32", "p00003-s3"], sd3["fp4", "p00003-s3"]) in points
    assert len(points) == 12
    styles = generator_style(["sd3", "flux-schnell"])
    shifts = shift_table(scores, "npr").set_index(["precision", "generator"])
    assert len(shifts) == 3 * 2
    heights = {}
    for container in (c for c in bar_ax.containers if isinstance(c, BarContainer)):
        generator = container.get_label()
        for patch in container.patches:
            assert to_hex(patch.get_facecolor()) == styles[generator][0].lower()
        heights[generator] = [p.get_height() for p in container.patches]
    for generator in ("sd3", "flux-schnell"):
        expected = shifts.xs(generator, level="generator").loc[["fp16", "fp8", "fp4"]]
        assert heights[generator] == pytest.approx(expected["mean_shift"].tolist())


def test_paired_view_marks_flips_in_both_directions(make_run) -> None:
    scores = scores_of(make_run("r", "npr", {"sd3": ["fp32", "fp4"]}))
    fp32 = scores["precision"] == "fp32"
    scores.loc[fp32 & scores["key"].isin(["p00000-s0", "p00001-s1"]), "logit"] = -5.0
    fig = plot_paired(scores, "npr")
    table = shift_table(scores, "npr").iloc[0]
    to_real, to_fake = int(table["flipped_to_real"]), int(table["flipped_to_fake"])
    # fp4 logits are ~-0.5: nearly every FP32 fake flips to real; the two -5 ones did not
    assert to_real >= 5 and table["pairs"] == 12
    logits = scores.set_index(["precision", "key"])["logit"]
    keys = scores.loc[scores["precision"] == "fp4", "key"]
    expected_up = sum(logits["fp32", k] <= 0 < logits["fp4", k] for k in keys)
    assert to_fake == expected_up
    bar_ax = fig.axes[-1]
    notes = [t.get_text() for t in bar_ax.texts]
    expected_note = "\n".join(
        t for t, n in ((f"↓{to_real}", to_real), (f"↑{to_fake}", to_fake)) if n
    )
    assert notes == [expected_note]
    assert "turned real" in bar_ax.get_title()


def test_paired_view_without_pairs_is_skipped(make_run) -> None:
    assert plot_paired(scores_of(make_run("x", "npr", {"sd3": ["fp4"]})), "npr") is None
    scores = scores_of(make_run("k", "npr", {"sd3": ["fp32", "fp4"]}))
    fp4 = scores["precision"] == "fp4"
    scores.loc[fp4, "key"] = "other-" + scores.loc[fp4, "key"]  # no key has both twins
    assert paired_logits(scores, "fp4").empty and plot_paired(scores, "npr") is None
    assert shift_table(scores, "npr").empty
    assert lower_precisions(scores_of(make_run("y", "npr", {"sd3": ["fp4", "fp8"]}))) == []


def test_robustness_curves_per_kind_and_precision(make_run) -> None:
    specs = ("none", "jpeg:95", "jpeg:50", "jpeg:75", "blur:1.0")
    run = make_run("p", "npr", {"sd3": ["fp32", "fp4"]}, perturbations=specs)
    results = load_runs([run])
    assert kinds(list(specs)) == {"blur": ["blur:1.0"], "jpeg": ["jpeg:95", "jpeg:75", "jpeg:50"]}
    table = precision_table(results, resamples=50)
    fig = plot_robustness(table, "npr")
    jpeg = fig.axes[1]
    assert [ax.get_title() for ax in fig.axes[:2]] == ["blur", "jpeg"] and len(fig.axes) == 4
    assert [ln.get_label() for ln in jpeg.lines] == ["fp32", "fp4", "real"]
    assert [t.get_text() for t in jpeg.get_xticklabels()] == ["none", "95", "75", "50"]
    scores = scores_of(run)
    fp4 = jpeg.lines[1].get_ydata()
    for x, spec in enumerate(["none", "jpeg:95", "jpeg:75", "jpeg:50"]):
        part = scores[scores["perturbation"] == spec]
        real = part.loc[part["label"] == 0, "logit"].to_numpy()
        fake = part.loc[part["precision"] == "fp4", "logit"].to_numpy()
        assert fp4[x] == pytest.approx(reference_metrics(real, fake)["fake_acc"])
    auroc = fig.axes[3]
    assert [ln.get_label() for ln in auroc.lines] == ["fp32", "fp4"]
    # equal curves stay visible: each precision's markers sit beside, not on, the other's
    xs = [ln.get_xdata() for ln in jpeg.lines]
    assert np.all(xs[0] < xs[1]) and np.allclose(xs[2], range(4))
    assert np.allclose((xs[0] + xs[1]) / 2, range(4))  # centred on their step
    assert plot_robustness(precision_table(load_runs([make_run("q", "npr")])), "npr") is None
