"""The trade-off verdict and figure read missing data as missing (issue 21, finding 7): a
generator without a quality run, a generator without recorded bytes, ties, detectors that
scored only some precisions, and crowded labels."""

from __future__ import annotations

import itertools

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text

from qdd.report.runs import group_table, load_runs
from qdd.report.tradeoff import load_quality, memory_saved, tradeoff_table
from qdd.report.tradeoff_figure import plot_tradeoff
from qdd.report.verdict import verdicts
from tests.report.test_tradeoff import write_quality_run

DETECTORS = ("a", "b", "c", "d", "e")


def trade_table(rows: list[dict], detectors: tuple[str, ...] = DETECTORS) -> pd.DataFrame:
    """A trade-off table as `tradeoff_table` lays it out; each row: generator, precision,
    bytes (None: not recorded), ssim (None: not measured), acc {detector: fake accuracy}."""
    base = {r["generator"]: r["bytes"] for r in rows if r["precision"] == "fp32"}
    out = []
    for r in rows:
        size, ref = r.get("bytes"), base.get(r["generator"])
        row = {"generator": r["generator"], "precision": r["precision"],
               "denoiser_bytes": size, "bytes_vs_fp32": size / ref if size and ref else None,
               "ssim": r.get("ssim")}  # fmt: skip
        for d in detectors:
            row[f"{d}_auroc"] = row[f"{d}_fake_acc"] = r.get("acc", {}).get(d)
        out.append(row)
    return pd.DataFrame(out)


def every(value: float) -> dict[str, float]:
    return dict.fromkeys(DETECTORS, value)


def test_a_generator_without_a_quality_run_is_not_measured_not_failing(tmp_path, make_run) -> None:
    grid = {"sd3": ["fp32", "fp16", "fp8", "fp4"], "sd15": ["fp32", "fp16", "fp8", "fp4"]}
    quality = write_quality_run(tmp_path / "quality")  # sd3 and flux-schnell only
    detection = group_table(load_runs([make_run("npr", "npr", grid)]))
    table = tradeoff_table(load_quality([quality]), detection)
    sd15 = table[table["generator"] == "sd15"]
    assert list(sd15["precision"]) == grid["sd15"]  # tested, so in the table
    assert sd15["ssim"].isna().all() and (sd15["n_pairs"] == 0).all()
    lines = {line.split("**")[1]: line for line in verdicts(table)}
    assert lines["sd15"].startswith(
        "**sd15**: quality not measured (no quality run paired its images with fp32 twins); "
        "of all its lower precisions, fp4 saves the most (88% of the nominal weight bits)"
    )
    assert "keeps" not in lines["sd15"] and "SSIM" not in lines["sd15"]
    assert (
        "denoiser bytes not recorded for sd15/fp32, sd15/fp16, sd15/fp8 and sd15/fp4"
        in (lines["sd15"])
    )
    # one precision without quality values is named, never counted as below the bar
    partial = trade_table([
        {"generator": "sd3", "precision": "fp32", "bytes": 100, "acc": every(0.8)},
        {"generator": "sd3", "precision": "fp8", "bytes": 50, "ssim": 0.95, "acc": every(0.7)},
        {"generator": "sd3", "precision": "fp4", "bytes": 26, "acc": every(0.6)},
    ])  # fmt: skip
    (line,) = verdicts(partial)
    assert line.startswith("**sd3**: of the precisions that keep SSIM ≥ 0.90 against fp32, fp8")
    assert line.endswith("; quality not measured for fp4")
    low = verdicts(partial.assign(ssim=partial["ssim"].where(partial["ssim"].isna(), 0.5)))
    assert low[0].startswith("**sd3**: no measured lower precision keeps SSIM ≥ 0.90")
    assert low[0].endswith("quality not measured for fp4")


def test_bytes_fall_back_to_nominal_per_generator_and_say_so() -> None:
    table = trade_table([
        {"generator": "sd3", "precision": "fp32", "bytes": 1000, "acc": every(0.9)},
        {"generator": "sd3", "precision": "fp4", "bytes": 260, "ssim": 0.95, "acc": every(0.5)},
        {"generator": "sd15", "precision": "fp32", "bytes": 400, "acc": every(0.9)},
        {"generator": "sd15", "precision": "fp8", "bytes": None, "ssim": 0.97,
         "acc": every(0.8)},
        {"generator": "sd15", "precision": "fp4", "bytes": 120, "ssim": 0.95, "acc": every(0.7)},
    ])  # fmt: skip
    saved, measured = memory_saved(table, "fp32")
    assert list(measured) == [True, True, False, False, False]
    assert saved.tolist() == [0.0, 0.74, 0.0, 0.75, 0.875]  # sd3 measured, sd15 nominal
    lines = {line.split("**")[1]: line for line in verdicts(table)}
    sd3, sd15 = lines["sd3"], lines["sd15"]
    assert "fp4 saves the most (74% of the denoiser memory, SSIM 0.950)" in sd3
    assert "nominal" not in sd3
    assert "fp4 saves the most (88% of the nominal weight bits, SSIM 0.950)" in sd15
    assert sd15.endswith("memory as nominal weight bits: denoiser bytes not recorded for sd15/fp8")
    fig = plot_tradeoff(table, "a")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "memory saved vs fp32 (%)"
    offsets = {c.get_label(): sorted(c.get_offsets()[:, 0]) for c in ax.collections}
    assert offsets == {"sd3": [0.0, 74.0], "sd15": [0.0, 75.0, 87.5]}
    legend = sorted(t.get_text() for t in fig.legends[0].get_texts())
    assert legend == ["sd15 (nominal bits)", "sd3"]
    assert "denoiser bytes not recorded for sd15" in fig.get_suptitle()


def test_ties_are_named_as_ties() -> None:
    rows = [{"generator": "sd3", "precision": "fp32", "bytes": 1000, "acc": every(0.95)}]
    rows += [
        {"generator": "sd3", "precision": p, "bytes": None, "ssim": 0.90, "acc": every(0.9)}
        for p in ("fp16", "fp8", "fp4", "nf4", "mxfp4", "nvfp4")
    ]
    (line,) = verdicts(trade_table(rows))
    assert "fp4, nf4, mxfp4 and nvfp4 tie on memory saved (88% of the nominal weight bits " in line
    assert "fp16, fp8, fp4, nf4, mxfp4 and nvfp4 tie as the most evasive (mean fake accuracy " \
        "0.90 each against fp32's 0.95 on all 5 detectors)" in line  # fmt: skip
    assert "saves the most" not in line and "evades the detectors most" not in line
    # a lower precision detected as often as fp32 does not evade it
    same = [{**r, "acc": every(0.95)} for r in rows]
    assert "none evades the detectors more than fp32 itself" in verdicts(trade_table(same))[0]


def test_a_tie_below_the_bar_is_named_as_a_tie() -> None:
    """fp8 and nf4 both at SSIM 0.850, neither keeps 0.90: main named fp8 alone as best."""
    (line,) = verdicts(trade_table([
        {"generator": "sd3", "precision": "fp32", "bytes": 100, "acc": every(0.8)},
        {"generator": "sd3", "precision": "fp8", "bytes": 50, "ssim": 0.85, "acc": every(0.7)},
        {"generator": "sd3", "precision": "nf4", "bytes": 26, "ssim": 0.8501, "acc": every(0.6)},
    ]))  # fmt: skip
    assert line == (
        "**sd3**: no lower precision keeps SSIM ≥ 0.90 against fp32 "
        "(best, tied: fp8 and nf4, SSIM 0.850)"
    )


def test_evasion_is_against_fp32_on_the_detectors_that_scored_both() -> None:
    table = trade_table([
        {"generator": "sd3", "precision": "fp32", "bytes": 1000, "acc": every(0.8)},
        # detected more often than fp32: it does not "evade", however low among the rest
        {"generator": "sd3", "precision": "fp4", "bytes": 260, "ssim": 0.95, "acc": every(1.0)},
        # scored by one detector of five: not ranked on it
        {"generator": "sd3", "precision": "nf4", "bytes": 250, "ssim": 0.93, "acc": {"a": 0.0}},
    ])  # fmt: skip
    (line,) = verdicts(table)
    assert "nf4 saves the most (75% of the denoiser memory, SSIM 0.930)" in line
    assert "evades the detectors most" not in line
    assert "none evades the detectors more than fp32 itself (mean fake accuracy on all 5 " \
        "detectors: fp32 0.80, lowest fp4 1.00)" in line  # fmt: skip
    assert "not compared, scored with fp32 by fewer or other detectors: nf4 (1 of 5)" in line
    # fp32 scored by three of the five: precisions are compared on those three only
    fewer = table.assign(d_fake_acc=[None, 0.1, None], e_fake_acc=[None, 0.1, None])
    fewer.loc[1, ["a_fake_acc", "b_fake_acc", "c_fake_acc"]] = 0.7
    (line,) = verdicts(fewer)
    assert "fp4 evades the detectors most (mean fake accuracy 0.70 against fp32's 0.80 on " \
        "the 3 of 5 detectors that scored both: a 0.70, b 0.70, c 0.70)" in line  # fmt: skip
    # two precisions scored by as many detectors, but not the same ones: one set is used
    crossed = trade_table([
        {"generator": "sd3", "precision": "fp32", "bytes": 100, "acc": every(0.8)},
        {"generator": "sd3", "precision": "fp4", "bytes": 26, "ssim": 0.95,
         "acc": {"a": 0.5, "b": 0.5}},
        {"generator": "sd3", "precision": "nf4", "bytes": 25, "ssim": 0.95,
         "acc": {"a": 0.1, "c": 0.1}},
    ])  # fmt: skip
    (line,) = verdicts(crossed)
    assert "fp4 evades the detectors most (mean fake accuracy 0.50 against fp32's 0.80 on " \
        "the 2 of 5 detectors that scored both: a 0.50, b 0.50)" in line  # fmt: skip
    assert line.endswith("not compared, scored with fp32 by fewer or other detectors: nf4 (2 of 5)")
    missing = table.assign(**{f"{d}_fake_acc": [None, 0.5, 0.5] for d in DETECTORS})
    assert "evasion not measured (no detector scored fp32)" in verdicts(missing)[0]


def overlaps(fig) -> list[tuple[str, str]]:
    """Pairs of precision labels (texts inside a panel) whose drawn text boxes intersect
    (an annotation's own extent would include its line to the point)."""
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    found = []
    for ax in fig.axes:
        boxes = [(t.get_text(), Text.get_window_extent(t, renderer)) for t in ax.texts]
        found += [(a, b) for (a, p), (b, q) in itertools.combinations(boxes, 2) if p.overlaps(q)]
    return found


def test_figure_labels_do_not_overlap() -> None:
    precisions = ["fp32", "fp16", "fp8", "fp8-w8a8", "fp4", "nf4", "mxfp4", "nvfp4",
                  "svdq-int4", "gguf-q4_0", "gguf-q8_0"]  # fmt: skip
    rows = []
    for i, (generator, precision) in enumerate(itertools.product(("sd3", "flux"), precisions)):
        accuracy = 0.9 - 0.01 * (i % 4)  # close enough for 7 pt labels to collide
        rows.append({"generator": generator, "precision": precision, "bytes": None,
                     "ssim": 0.95, "acc": {"a": accuracy}})  # fmt: skip
    table = trade_table(rows, detectors=("a",))
    fig = plot_tradeoff(table, "a")
    labelled = {n for ax in fig.axes[:1] for t in ax.texts for n in t.get_text().split(", ")}
    assert labelled == set(precisions)
    assert overlaps(fig) == []
    for ax in fig.axes[:2]:  # inside their panel
        frame = ax.get_window_extent()
        for text in ax.texts:
            box = Text.get_window_extent(text)
            assert frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
