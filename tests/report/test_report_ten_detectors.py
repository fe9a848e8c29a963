"""Issue 23: the report takes ten detectors (six families) without crowding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qdd.report.families import OTHER, detector_styles, families, lineup
from qdd.report.heatmap import MAX_WIDTH, plot_heatmap
from qdd.report.overview import plot_overview
from qdd.report.runs import group_table, load_runs
from tests.report.conftest import write_run

TEN = ["npr", "clipd", "univfd", "corvi", "bfree", "commfor", "rigid", "rine", "spai",
       "aeroblade"]  # fmt: skip
PRECISIONS = ["fp32", "fp16", "fp8", "gguf-q8_0", "fp4", "nf4", "nvfp4", "mxfp4"]
GENERATORS = ["sd15", "sdxl", "sd3", "flux-schnell"]


def table_of(root: Path, detectors: list[str], precisions: list[str]) -> pd.DataFrame:
    """Group metrics of synthetic test runs (4 fakes a group, a short bootstrap: fast)."""
    grid = {g: precisions for g in GENERATORS}
    runs = [write_run(root / d, d, grid, n=4, seed=i) for i, d in enumerate(detectors)]
    return group_table(load_runs(runs), resamples=20)


@pytest.fixture(scope="module")
def ten(tmp_path_factory) -> pd.DataFrame:
    return table_of(tmp_path_factory.mktemp("ten"), TEN, PRECISIONS)


def test_lineup_goes_family_by_family() -> None:
    lined_up = lineup({d: d for d in [*TEN, "mine"]} | {"npr-retrained": "npr"})
    order = families()
    ranks = [order.index(f) for f in lined_up.values()]
    assert ranks == sorted(ranks)  # family by family, in the cards' order
    assert lined_up["npr-retrained"] == lined_up["npr"] == "end-to-end"
    assert lined_up["clipd"] == "CLIP features" and lined_up["aeroblade"] == "reconstruction"
    assert lined_up["rigid"] == "representation"
    assert list(lined_up)[-1] == "mine" and lined_up["mine"] == OTHER
    assert list(lined_up)[:3] == ["commfor", "corvi", "npr"]  # within a family, by name


def test_no_two_detectors_share_a_look_even_past_the_colours() -> None:
    many = {f"d{i:02d}": "npr" for i in range(30)} | {d: d for d in TEN}
    styles = detector_styles(lineup(many))
    assert len(set(styles.values())) == len(styles)


def test_overview_draws_ten_distinct_lines_and_a_ten_entry_legend_by_family(ten) -> None:
    lined_up = lineup({d: d for d in TEN})
    fig = plot_overview(ten, lined_up)
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == [f"{d} ({family})" for d, family in lined_up.items()]
    assert len(labels) == 10
    looks = [(h.get_color(), h.get_marker(), h.get_linestyle()) for h in legend.legend_handles]
    assert len(set(looks)) == 10  # no two detectors share colour, marker and line style
    assert len({(c, m) for c, m, _ in looks}) == 10  # colour + marker alone tell them apart
    by_family: dict[str, set[str]] = {}
    for (_, marker, _), family in zip(looks, lined_up.values(), strict=True):
        by_family.setdefault(family, set()).add(marker)
    assert all(len(markers) == 1 for markers in by_family.values())  # marker = family
    assert len({next(iter(m)) for m in by_family.values()}) == len(by_family)
    panels = [ax for ax in fig.axes if ax.get_lines()]
    assert len(panels) == 2 * len(GENERATORS)  # fake accuracy and AUROC per generator
    for ax in panels:
        lines = [line for line in ax.get_lines() if line.get_label() in lined_up]
        assert [line.get_label() for line in lines] == list(lined_up)
    for ax in panels[-2:]:  # the bottom row names the precisions, shared by every row
        assert [t.get_text() for t in ax.get_xticklabels()] == PRECISIONS
    assert fig.get_size_inches()[0] < 18  # two metrics across, generators down


def panel_inches(fig, ax) -> tuple[float, float]:
    """A panel's drawn size in inches, on the figure's final (constrained) layout."""
    box = ax.get_position()
    width, height = fig.get_size_inches()
    return box.width * width, box.height * height


def test_figures_grow_with_precisions_and_detectors_instead_of_crowding(ten, tmp_path) -> None:
    lined_up = lineup({d: d for d in TEN})
    few = table_of(tmp_path / "few", TEN[:2], PRECISIONS[:3])
    wide = plot_overview(ten, lined_up)
    narrow = plot_overview(few, lineup({d: d for d in TEN[:2]}))
    assert wide.get_size_inches()[0] > narrow.get_size_inches()[0]
    wide.draw_without_rendering()
    for ax in [ax for ax in wide.axes if ax.get_lines()]:  # room for every precision's label
        assert panel_inches(wide, ax)[0] / len(PRECISIONS) >= 0.3
    heat_ten = plot_heatmap(ten, "fake_acc", lined_up=lined_up)
    heat_two = plot_heatmap(ten[ten["detector"].isin(["npr", "clipd"])], "fake_acc",
                            lined_up=lined_up)  # fmt: skip
    assert heat_ten.get_size_inches()[0] <= MAX_WIDTH  # printable: no column per detector
    assert heat_ten.get_size_inches()[1] > 2.5 * heat_two.get_size_inches()[1]  # it grows
    titled = [ax for ax in heat_ten.axes if ax.get_title()]
    assert [ax.get_title().splitlines()[0] for ax in titled] == [
        f"{d} ({family})" for d, family in lined_up.items()
    ]
    heat_ten.draw_without_rendering()
    heat_two.draw_without_rendering()
    two = [ax for ax in heat_two.axes if ax.get_title()]
    reference = panel_inches(heat_two, two[0])
    for ax in titled:  # every panel as large as with two detectors: cells keep their room
        width, height = panel_inches(heat_ten, ax)
        assert width >= 0.95 * reference[0] and height >= 0.9 * reference[1]


def test_report_md_shows_ten_detectors_tables_only_as_wide_as_they_read(ten, tmp_path) -> None:
    from qdd.report.index import EMBED_ROWS, EMBED_WIDTH, shown_table
    from qdd.report.tables import metric_pivot, sorted_groups, write_table

    lined_up = lineup({d: d for d in TEN})
    csv, md = write_table(metric_pivot(ten, "fake_acc", True, lined_up), tmp_path, "fake_acc")
    full = md.read_text().splitlines()
    assert max(map(len, full)) > EMBED_WIDTH  # 8 precisions with intervals: too wide
    shown = shown_table("fake_acc", csv, md)
    assert shown[0].startswith("Values only")
    rows = shown[-1].strip().splitlines()
    assert max(map(len, rows)) <= EMBED_WIDTH and len(rows) == len(full)
    frame = pd.read_csv(csv)
    assert list(frame["family"]) == [lined_up[d] for d in frame["detector"]]
    first = frame.iloc[0]
    value = first["fp4"].split(" ")[0]  # "0.25 [0.05, 0.70] n=4" → "0.25"
    assert f"| {first['detector']} | {first['family']} | {first['generator']} |" in rows[2]
    assert f"| {value} |" in rows[2]
    # 320 rows of every metric: linked with their size, never poured into report.md
    csv, md = write_table(sorted_groups(ten, lined_up), tmp_path, "groups")
    (line, _) = shown_table("paired_shift", csv, md)
    assert line.startswith("320 rows × ") and len(ten) > EMBED_ROWS


def overlapping(fig, texts) -> list[tuple[str, str]]:
    """Pairs of drawn texts whose boxes overlap."""
    from matplotlib.text import Text

    renderer = fig.canvas.get_renderer()
    # the text's own box (an annotation's extent would include its arrow)
    boxes = [(t.get_text(), Text.get_window_extent(t, renderer)) for t in texts if t.get_text()]
    return [(a, b) for i, (a, box) in enumerate(boxes) for b, other in boxes[i + 1 :]
            if box.overlaps(other)]  # fmt: skip


def test_paired_shift_bars_name_a_dozen_precisions_without_overlap(tmp_path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from qdd.report.paired import plot_paired

    grid = {"sd3": [*PRECISIONS, "svdq-int4", "fp4-vaefp32", "fp32-vaefp4", "fp8-w8a8"]}
    run = write_run(tmp_path / "npr", "npr", grid, n=4)
    scores = load_runs([run])["npr"].main
    fig = plot_paired(scores, "npr")
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    bars = fig.axes[-1]
    labels = bars.get_xticklabels()
    assert len(labels) == len(grid["sd3"]) - 1  # every precision but fp32
    assert overlapping(fig, labels) == []


def test_tradeoff_labels_every_point_of_ten_precisions_and_four_generators() -> None:
    """4-bit formats all save 87.5 % of the bits: 24 points stack at one x. The panels
    grow with that stack, so every point gets a label that overlaps no other."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from qdd.report.palette import bits
    from qdd.report.tradeoff_figure import plot_tradeoff

    precisions = [*PRECISIONS, "svdq-int4", "gguf-q4_k"]
    rows = []
    for g, generator in enumerate(GENERATORS):
        for p, precision in enumerate(precisions):
            wobble = ((g * 7 + p * 3) % 10) / 100
            rows.append({"generator": generator, "precision": precision,
                         "denoiser_bytes": None, "bytes_vs_fp32": None,
                         "ssim": None if precision == "fp32" else 0.99 - 0.02 * p,
                         "npr_fake_acc": 1.0 if bits(precision) > 8 else 0.1 + wobble,
                         "npr_auroc": 1.0 if bits(precision) > 8 else 0.6 + wobble})  # fmt: skip
    fig = plot_tradeoff(pd.DataFrame(rows), "npr")
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    for ax in fig.axes[:2]:
        assert not ax.get_title().startswith("no room")  # every point labelled
        assert overlapping(fig, ax.texts) == []


def test_robustness_tells_a_precision_from_its_variants_and_keeps_a_dozen_beside_their_step(
    tmp_path,
) -> None:
    from qdd.report.robustness import plot_robustness, precision_table

    grid = {"sd3": [*PRECISIONS, "svdq-int4", "fp4-vaefp32", "fp32-vaefp4", "fp4@emulate"]}
    run = write_run(tmp_path / "npr", "npr", grid, n=4, perturbations=("none", "jpeg:75"))
    fig = plot_robustness(precision_table(load_runs([run]), resamples=20), "npr")
    lines = {line.get_label(): line for line in fig.axes[0].lines}
    looks = {(ln.get_color(), ln.get_linestyle(), ln.get_marker()) for ln in lines.values()}
    assert len(looks) == len(lines)  # fp4 and fp4-vaefp32 share a colour, not a look
    xs = np.array([ln.get_xdata() for name, ln in lines.items() if name != "real"])
    assert np.all(np.abs(xs - np.arange(2)) <= 0.25 + 1e-9)  # each beside its own step


def test_recipes_say_all_ten_instead_of_listing_them(tmp_path) -> None:
    from qdd.report.index import recipe_table

    grid = {"sd3": ["fp32", "fp4"]}
    runs = [write_run(tmp_path / d, d, grid, n=2, seed=i) for i, d in enumerate(TEN)]
    runs.append(write_run(tmp_path / "npr-flux", "npr", {"flux-schnell": ["fp4"]}, n=2))
    recipes = recipe_table(load_runs(runs)).set_index(["generator", "precision"])
    assert recipes.loc[("sd3", "fp4"), "detectors"] == "all 10"
    assert recipes.loc[("flux-schnell", "fp4"), "detectors"] == "npr"


def test_report_opens_with_the_overview_and_lists_detectors_by_family(tmp_path) -> None:
    from qdd.report.command import build_report

    grid = {"sd3": ["fp32", "fp4"]}
    names = ["spai", "npr", "clipd"]
    runs = [write_run(tmp_path / d, d, grid, n=3, seed=i) for i, d in enumerate(names)]
    text = build_report(runs, tmp_path / "report").read_text()
    figures = [line for line in text.splitlines() if line.startswith("![")]
    assert figures[0].startswith("![Every detector against precision")
    kdes = [f.split(":")[0].removeprefix("![") for f in figures if "logit distributions" in f]
    assert kdes == ["npr", "clipd", "spai"]  # end-to-end, CLIP features, spectral
