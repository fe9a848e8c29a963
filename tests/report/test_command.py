"""`qdd-cli report` end to end: the files, the gaps, the errors, reproducibility."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from qdd.cli import main
from qdd.errors import QddError
from qdd.report.command import build_report
from qdd.report.runs import group_table, load_runs, mark_demo_run

PARTIAL = {"sd3": ["fp32", "fp4"], "flux-schnell": ["fp32", "fp16", "fp8", "fp4"]}


def test_report_command_writes_every_file_and_names_gaps(make_run, tmp_path, capsys) -> None:
    runs = [
        make_run("npr", "npr"),
        make_run("clipd", "clipd", PARTIAL, seed=1),
        make_run("corvi", "corvi", {"sd3": ["fp8", "fp4"]}, seed=2),  # no fp32: no pairs
    ]
    out = tmp_path / "report"
    main(["report", *map(str, runs), "--out", str(out)])
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == str(out / "report.md")
    gaps = [line for line in captured.err.splitlines() if line.startswith("missing: ")]
    assert "missing: sd3/fp16 for clipd" in gaps and "missing: sd3/fp8 for clipd" in gaps
    assert "missing: flux-schnell/fp32 for corvi" in gaps
    assert not any(line.endswith("for npr") for line in gaps)
    assert len(gaps) == 2 + 6  # the 2 × 4 grid minus what each detector has
    assert "no paired view for corvi" in captured.err

    stems = ["kde_npr", "kde_clipd", "kde_corvi", "paired_npr", "paired_clipd",
             "heatmap_fake_acc", "heatmap_balanced_acc", "heatmap_auroc"]  # fmt: skip
    for stem in stems:
        with Image.open(out / f"{stem}.png") as image:
            image.verify()
        with Image.open(out / f"{stem}.png") as image:
            assert image.size[0] >= 800 and image.mode == "RGBA"
        assert ET.parse(out / f"{stem}.svg").getroot().tag.endswith("svg")
    assert not (out / "paired_corvi.png").exists()
    for stem in ["fake_acc", "balanced_acc", "auroc", "groups", "paired_shift"]:
        assert (out / "tables" / f"{stem}.csv").is_file()
        assert (out / "tables" / f"{stem}.md").read_text().startswith("| ")

    index = (out / "report.md").read_text()
    for stem in stems:
        assert f"]({stem}.png)" in index and f"({stem}.svg)" in index
    assert "paired_corvi" not in index and "no paired view for corvi" in index
    for gap in gaps:
        assert f"- {gap}" in index
    assert "checkpoints/x.pth" in index and "emulate" in index and "denoiser" in index
    assert "(tables/groups.csv)" in index and "shards/npr" in index

    groups = pd.read_csv(out / "tables" / "groups.csv")
    assert len(groups) == 8 + 6 + 2
    assert groups[groups["detector"] == "npr"]["precision"].tolist()[:4] == [
        "fp32", "fp16", "fp8", "fp4"
    ]  # fmt: skip
    fake_acc = pd.read_csv(out / "tables" / "fake_acc.csv")
    assert list(fake_acc.columns) == ["detector", "family", "generator", "fp32", "fp16", "fp8",
                                      "fp4"]  # fmt: skip
    assert fake_acc["family"].tolist()[0] == "end-to-end"  # npr's family before clipd's
    cell = fake_acc.set_index(["detector", "generator"]).loc[("npr", "sd3"), "fp4"]
    row = groups.set_index(["detector", "generator", "precision"]).loc[("npr", "sd3", "fp4")]
    assert cell == (f"{row['fake_acc']:.2f} [{row['fake_acc_lo']:.2f}, "
                    f"{row['fake_acc_hi']:.2f}] n=12")  # fmt: skip
    shift = pd.read_csv(out / "tables" / "paired_shift.csv")
    assert set(shift["detector"]) == {"npr", "clipd"} and set(shift["precision"]) == {
        "fp16", "fp8", "fp4"
    }  # fmt: skip
    fp4 = shift[shift["precision"] == "fp4"]
    assert (fp4["mean_shift"] < -2).all() and (fp4["shift_hi"] < 0).all()
    assert (
        (shift["shift_lo"] < shift["mean_shift"]) & (shift["mean_shift"] < shift["shift_hi"])
    ).all()
    # 12 pairs shifted down by ~3 logits: the signed-rank p is at most 2 / 2^11
    assert (fp4["p_shift"] <= 2 / 2**11).all()
    assert (shift["pairs"] == 12).all()
    table = (out / "tables" / "paired_shift.md").read_text()
    first = f"| {fp4['p_shift'].iloc[0]:.2g} |"
    assert "| p_shift |" in table and first in table and first != "| 0.000 |"
    assert "3 test runs of 3 detectors" in index and "Demo:" not in index
    assert "unperturbed" not in index and "▼" not in index  # neither applies here
    assert "## Warnings" not in index  # no format recorded: nothing to warn about


def test_the_same_runs_give_byte_identical_files(make_run, tmp_path) -> None:
    runs = [make_run("npr", "npr", {"sd3": ["fp32", "fp4"]})]
    first, second = build_report(runs, tmp_path / "a"), build_report(runs, tmp_path / "b")
    files = sorted(p.relative_to(first.parent) for p in first.parent.rglob("*") if p.is_file())
    assert len(files) == 1 + 2 * 6 + 2 * 5  # index, 6 figures (png, svg), 5 tables (csv, md)
    for name in files:
        assert (first.parent / name).read_bytes() == (second.parent / name).read_bytes(), name
    with Image.open(first.parent / "kde_npr.png") as image:
        assert set(image.info) <= {"dpi"}  # no software or date stamps
    svg = (first.parent / "kde_npr.svg").read_text()
    assert "<dc:date>" not in svg and "Matplotlib v" not in svg


def test_runs_of_one_detector_merge_and_different_weights_stay_apart(make_run) -> None:
    a = make_run("a", "npr", {"sd3": ["fp32", "fp4"]})
    b = make_run("b", "npr", {"flux-schnell": ["fp32"]}, seed=0)  # same real images
    merged = load_runs([a, b])
    assert list(merged) == ["npr"]
    scores = merged["npr"].scores
    assert (scores["label"] == 0).sum() == 12  # the shared real images count once
    groups = group_table(merged)
    assert set(groups["generator"] + "/" + groups["precision"]) == {
        "sd3/fp32", "sd3/fp4", "flux-schnell/fp32"
    }  # fmt: skip
    assert (groups["n_real"] == 12).all()
    retrained = make_run("c", "npr", {"sd3": ["fp4"]}, weights="runs/fit-npr/checkpoints/last.ckpt")
    apart = load_runs([a, retrained])
    assert sorted(apart) == ["npr-fit-npr", "npr-x"]
    assert set(apart["npr-fit-npr"].scores["detector"]) == {"npr-fit-npr"}


def _rewrite(run, change) -> None:
    """Edit a run's scores.parquet in place (``change`` takes and returns the frame)."""
    path = run / "scores.parquet"
    change(pd.read_parquet(path)).to_parquet(path, index=False)


@pytest.mark.parametrize("swap", [False, True], ids=["a-b", "b-a"])
def test_one_image_with_two_logits_in_two_runs_is_refused_in_either_order(
    make_run, tmp_path, capsys, swap
) -> None:
    """Bug 2: two seeds of one model (one detector name, one weights string) on the same
    images. Pooling kept the first run's copy of each image, so the numbers followed the
    order of the arguments; now neither order reports, and the error names both runs."""
    grid = {"sd3": ["fp32", "fp4"]}
    a = make_run("seed0", "npr", grid, seed=0)
    b = make_run("seed1", "npr", grid, seed=1, shift=-3.0)
    runs = [b, a] if swap else [a, b]
    with pytest.raises(QddError, match="score the same 36 image.* with different logits") as info:
        load_runs(runs)
    message = str(info.value)
    assert str(a) in message and str(b) in message and "\n" not in message
    assert "separate qdd-cli report calls" in message and "--compare" in message
    with pytest.raises(SystemExit) as exit_info:
        main(["report", *map(str, runs), "--out", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "r" / "report.md").exists()
    # --compare keeps them apart: one row each, whatever the order
    main(["report", "--compare", *map(str, runs), "--metric", "fake_acc", "--out",
          str(tmp_path / "cmp")])  # fmt: skip
    ranked = pd.read_csv(tmp_path / "cmp" / "compare.csv")
    assert ranked["run"].tolist() == ["seed0", "seed1"]  # seed1's fakes shifted down


def test_runs_of_shards_at_two_step_counts_are_refused_naming_the_images(make_run) -> None:
    """Two test runs of one detector on shards generated at 20 and at 4 steps: the same
    keys and recipes, different images (their twin ids differ). Refused, as before, but
    the reason says the images differ, not that two models ran under one name."""
    from qdd.identity import twin_id

    def at_steps(steps: int):
        def change(scores: pd.DataFrame) -> pd.DataFrame:
            meta = [{"label": int(r.label), "generator": r.generator, "model_id": r.model_id,
                     "prompt": r.key, "seed": 1, "steps": steps, "guidance": 7.0,
                     "width": 64, "height": 64} for r in scores.itertuples()]  # fmt: skip
            return scores.assign(twin=[twin_id(m) for m in meta])

        return change

    grid = {"sd3": ["fp32", "fp4"]}
    a, b = make_run("steps20", "npr", grid, seed=0), make_run("steps4", "npr", grid, seed=1)
    _rewrite(a, at_steps(20))
    _rewrite(b, at_steps(4))
    with pytest.raises(QddError) as info:
        load_runs([a, b])
    message = str(info.value)
    assert "tested different images under one key and recipe (24 image(s)" in message
    assert "step count" in message and "two models" not in message and "\n" not in message
    assert str(a) in message and str(b) in message
    # the same images (one twin id) with two logits are still two models under one name
    _rewrite(b, at_steps(20))
    with pytest.raises(QddError, match="two models under one name"):
        load_runs([a, b])


def test_the_same_images_with_the_same_logits_pool_once_in_any_order(make_run) -> None:
    grid = {"sd3": ["fp32", "fp4"]}
    a = make_run("a", "npr", grid)
    alone = group_table(load_runs([a]))
    twice = group_table(load_runs([a, a]))  # one run given twice: nothing counted twice
    pd.testing.assert_frame_equal(twice, alone)
    # another run of the same weights: the same real images, scored again in other batches
    # (float noise far below the tolerance), and a generator of its own
    b = make_run("b", "npr", {"flux-schnell": ["fp32"]})
    _rewrite(b, lambda s: s.assign(logit=s["logit"] + 1e-6 * (s["label"] == 0)))
    ab, ba = group_table(load_runs([a, b])), group_table(load_runs([b, a]))
    pd.testing.assert_frame_equal(ab, ba)  # intervals too: the pooled rows are in image order
    assert (ab["n_real"] == 12).all() and len(ab) == 3


def test_an_image_scored_twice_within_one_run_counts_once_or_is_refused(make_run, capsys) -> None:
    grid = {"sd3": ["fp32", "fp4"]}
    run = make_run("dup", "npr", grid)
    alone = group_table(load_runs([run]))
    _rewrite(run, lambda s: pd.concat([s, s[s["label"] == 0]], ignore_index=True))
    capsys.readouterr()
    loaded = load_runs([run])
    assert "scores 12 image(s) more than once with the same logit; each counted once" in (
        capsys.readouterr().err
    )
    assert (loaded["npr"].scores["label"] == 0).sum() == 12  # not 24
    pd.testing.assert_frame_equal(group_table(loaded), alone)
    # two different images under one key and recipe: which one is the image? refused
    _rewrite(run, lambda s: s.assign(logit=s["logit"] + np.r_[np.zeros(len(s) - 1), 1.0]))
    with pytest.raises(QddError, match="scores real/coco key photo11 twice with different logits"):
        load_runs([run])


def test_bad_run_folders_are_one_line_errors(make_run, tmp_path, capsys) -> None:
    with pytest.raises(QddError, match="does not exist: check the path"):
        load_runs([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(QddError, match="is empty: make it with `qdd-cli test"):
        load_runs([tmp_path / "empty"])
    run = make_run("noscores", "npr")
    (run / "scores.parquet").unlink()
    with pytest.raises(QddError, match="has no scores.parquet: .*qdd-cli test"):
        load_runs([run])
    run = make_run("corrupt", "npr")
    (run / "scores.parquet").write_bytes(b"not parquet")
    with pytest.raises(QddError, match="cannot read run .*: re-run qdd-cli test"):
        load_runs([run])
    run = make_run("old", "npr")
    pd.read_parquet(run / "scores.parquet").drop(columns="logit").to_parquet(run / "scores.parquet")
    with pytest.raises(QddError, match="lacks column.*logit"):
        load_runs([run])
    run = make_run("nometrics", "npr")
    (run / "metrics.json").unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(run), "--out", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no metrics.json" in err


def test_fakes_without_precision_are_named_by_their_group(make_run) -> None:
    run = make_run("mj", "npr", {"sd3": ["fp32"]})
    scores = pd.read_parquet(run / "scores.parquet")
    fakes = scores["label"] == 1
    scores.loc[fakes, ["generator", "precision"]] = None  # a `qdd-cli shard --label fake` set
    scores.loc[fakes, "group"] = "midjourney/unknown"
    scores.to_parquet(run / "scores.parquet")
    loaded = load_runs([run])["npr"].scores
    assert set(loaded.loc[loaded["label"] == 1, "precision"]) == {"unknown"}
    assert set(loaded.loc[loaded["label"] == 0, "precision"].dropna()) == set()


def test_many_shard_folders_are_summarised_in_the_runs_table() -> None:
    from qdd.report.index import data_summary

    assert data_summary(["a/x", "a/y"]) == "a/x, a/y"
    assert data_summary([f"s/test/g{i}" for i in range(29)]) == "29 folders under s/test"
    assert data_summary([]) == "–"


def test_report_counts_runs_of_one_detector_and_flags_demo_runs(make_run, tmp_path) -> None:
    # three runs of one model on three generators (the same real images, the same logits);
    # was three seeds scoring the same images, which pooling now refuses (bug 2)
    generators = ("sd3", "sdxl", "flux-schnell")
    runs = [make_run(f"r{i}", "npr", {g: ["fp32", "fp4"]}) for i, g in enumerate(generators)]
    index = build_report(runs, tmp_path / "plain").read_text()
    assert "3 test runs of 1 detector;" in index and "Demo:" not in index
    for run in runs:
        mark_demo_run(run)
    index = build_report(runs, tmp_path / "demo").read_text()
    assert "**Demo:**" in index and "tiny random-init" in index
    retrained = make_run("fit", "npr", {"sd3": ["fp4"]}, weights="runs/fit-npr/last.ckpt")
    index = build_report([runs[0], retrained], tmp_path / "two").read_text()
    assert "2 test runs of 1 detector (2 detector × weights combinations)" in index
    assert "Demo:" not in index  # one run was not made by the demo


def test_format_warning_appears_only_when_real_and_fake_formats_differ(make_run, tmp_path) -> None:
    grid = {"sd3": ["fp32", "fp4"]}
    mixed = make_run("jpeg", "npr", grid, real_format="jpeg")  # fakes: generated PNGs
    index = build_report([mixed], tmp_path / "a").read_text()
    assert "## Warnings" in index
    assert "format confound (npr): real images are jpeg 100% but fakes are png 100%" in index
    same = make_run("png", "npr", grid, real_format="png", fake_format="PNG")
    assert "format confound" not in build_report([same], tmp_path / "b").read_text()
    both_jpeg = make_run("both", "npr", grid, real_format="jpg", fake_format="jpeg")
    assert "format confound" not in build_report([both_jpeg], tmp_path / "c").read_text()
    unknown = make_run("old", "npr", grid)  # shards made before formats were recorded
    assert "format confound" not in build_report([unknown], tmp_path / "d").read_text()
    matched = make_run("matched", "npr", grid, real_format="jpeg", extra={"reencode": "match"})
    assert "format confound" not in build_report([matched], tmp_path / "e").read_text()
    pooled = build_report([mixed, matched], tmp_path / "f").read_text()  # one run was not
    assert "format confound (npr)" in pooled


def test_perturbations_reach_heatmaps_curves_and_tables(make_run, tmp_path) -> None:
    specs = ("none", "jpeg:90", "jpeg:50")
    run = make_run("p", "npr", {"sd3": ["fp32", "fp4"]}, perturbations=specs)
    index = build_report([run], tmp_path / "r").read_text()
    out = tmp_path / "r"
    for stem in ("perturbed_fake_acc_npr", "perturbed_auroc_npr", "robustness_npr"):
        assert (out / f"{stem}.png").is_file() and f"]({stem}.png)" in index
    groups = pd.read_csv(out / "tables" / "groups.csv")
    # none first, then weakest first: JPEG quality 90 before 50
    assert groups["perturbation"].tolist() == ["none"] * 2 + ["jpeg:90"] * 2 + ["jpeg:50"] * 2
    assert "use the unperturbed pass (`none`)" in index
    robust = pd.read_csv(out / "tables" / "robustness.csv")
    assert len(robust) == 3 * 2
    # the main views use the unperturbed pass only
    assert pd.read_csv(out / "tables" / "paired_shift.csv")["pairs"].tolist() == [12]
    fig_panels = pd.read_csv(out / "tables" / "fake_acc.csv")
    assert len(fig_panels) == 1  # npr × sd3, unperturbed


def test_perturbed_heatmaps_hold_only_detectors_tested_under_perturbations(
    make_run, tmp_path, monkeypatch
) -> None:
    import qdd.report.style as style

    drawn = {}
    monkeypatch.setattr(style, "save", lambda fig, out, stem: drawn.setdefault(stem, fig))
    specs = ("none", "jpeg:90", "jpeg:50")
    swept = make_run("p", "npr", {"sd3": ["fp32", "fp4"]}, perturbations=specs)
    plain = make_run("c", "clipd", {"sd3": ["fp32", "fp4"]}, seed=1)
    build_report([swept, plain], tmp_path / "r")
    assert not any(stem.endswith("_clipd") for stem in drawn if stem.startswith("perturbed"))
    for metric in ("fake_acc", "auroc"):
        figure = drawn[f"perturbed_{metric}_npr"]
        panels = [ax.get_title() for ax in figure.axes if ax.get_title()]
        assert [t.splitlines()[0] for t in panels] == [
            "npr · none (end-to-end)", "npr · jpeg:90 (end-to-end)", "npr · jpeg:50 (end-to-end)"
        ]  # fmt: skip
        main_panels = [ax for ax in drawn[f"heatmap_{metric}"].axes if ax.get_title()]
        # family by family: npr (end-to-end) before clipd (CLIP features)
        assert [ax.get_title().splitlines()[0] for ax in main_panels] == [
            "npr (end-to-end)", "clipd (CLIP features)"
        ]  # fmt: skip


def test_quantized_fraction_and_scope_are_listed_per_group(make_run, tmp_path) -> None:
    run = make_run("q", "npr", {"sd15": ["fp32", "fp4"], "sd3": ["fp4"]})
    index = build_report([run], tmp_path / "r").read_text()
    assert "| sd15 | fp4 | emulate | denoiser | 0.310 |" in index and "marked ▼" in index
    assert "| sd3 | fp4 | emulate | denoiser | 0.999 |" in index
    groups = pd.read_csv(tmp_path / "r" / "tables" / "groups.csv")
    assert (
        groups.set_index(["generator", "precision"]).loc[("sd15", "fp4"), "quant_fraction"] == 0.31
    )


def test_compare_ranks_runs_best_first_with_calibrated_accuracy(make_run, tmp_path, capsys) -> None:
    grid = {"sd3": ["fp32", "fp4"]}
    official = make_run("official", "npr", grid, weights="checkpoints/npr.pth")
    tuned = make_run("tuned", "npr", grid, weights="runs/fit/last.ckpt", shift=4.0,
                     extra={"calibrated_threshold": 1.5})  # fmt: skip
    out = tmp_path / "cmp"
    main(["report", "--compare", str(official), str(tuned), "--metric", "fake_acc",
          "--group", "sd3/fp4", "--out", str(out)])  # fmt: skip
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out / "compare.md")
    table = pd.read_csv(out / "compare.csv")
    assert table["run"].tolist() == ["tuned", "official"] and table["rank"].tolist() == [1, 2]
    scores = pd.read_parquet(tuned / "scores.parquet")
    real = scores.loc[scores["label"] == 0, "logit"].to_numpy()
    fake = scores.loc[scores["group"] == "sd3/fp4", "logit"].to_numpy()
    tuned_row = table.iloc[0]
    assert tuned_row["fake_acc"] == pytest.approx((fake > 0).mean())
    assert tuned_row["acc_calibrated"] == pytest.approx(
        ((real <= 1.5).sum() + (fake > 1.5).sum()) / (len(real) + len(fake))
    )
    assert tuned_row["calibrated_threshold"] == 1.5 and pd.isna(
        table.iloc[1]["calibrated_threshold"]
    )
    assert tuned_row["n_fake"] == 12 and tuned_row["fake_acc_lo"] < tuned_row["fake_acc"]
    md = (out / "compare.md").read_text()
    assert md.index("| 1 | tuned") < md.index("| 2 | official") and "compare_fake_acc.png" in md
    assert (out / "compare_fake_acc.png").is_file()
    from qdd.cli import report_command as report_main
    from qdd.report.compare import build_comparison

    with pytest.raises(QddError, match="--metric and --group choose what --compare ranks by"):
        report_main([str(official), "--metric", "auroc", "--out", str(out)])
    with pytest.raises(QddError, match="unknown --metric 'f1'"):
        build_comparison([official], out, "f1", "overall")
    with pytest.raises(QddError, match="no run has fake images in group 'sdxl/fp4'"):
        build_comparison([official], out, "auroc", "sdxl/fp4")
    with pytest.raises(QddError, match="no run carries a calibrated_threshold"):
        build_comparison([official], out, "acc_calibrated", "overall")


def test_compare_figure_shows_the_reference_and_differences(make_run) -> None:
    from qdd.report.compare import load_each, plot_compare

    grid = {"sd3": ["fp32", "fp4"], "sdxl": ["fp32"]}
    runs = [make_run("a", "npr", grid), make_run("b", "npr", grid, shift=-1.0, seed=1)]
    results = load_each(runs)
    table = group_table(results)
    fig = plot_compare(table, "fake_acc", ["a", "b"])
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["a (reference)", "b − a"]
    rows = table.set_index(["detector", "generator", "precision"])["fake_acc"]
    diff = rows["b", "sd3", "fp4"] - rows["a", "sd3", "fp4"]
    cells = np.array([t.get_text() for t in panels[1].texts]).reshape(2, 2)
    assert cells[1, 1] == f"{diff:+.2f}".replace("-", "\N{MINUS SIGN}")
    assert cells[0, 1] == "–"  # sdxl/fp4 measured by neither


def test_a_detector_named_like_another_ones_weights_variant_is_never_pooled_with_it(
    make_run, capsys
) -> None:
    """npr with weights tuned.ckpt is reported as npr-tuned; a detector registered as
    npr-tuned (a user's, on other images) must not be pooled with it under that name."""
    tuned = make_run("tuned", "npr", weights="checkpoints/tuned.ckpt", seed=1)
    official = make_run("official", "npr", weights="checkpoints/official.pth", seed=2)
    other = make_run("other", "npr-tuned", {"sd15": ["fp32", "fp4"]}, seed=3)
    scores = pd.read_parquet(other / "scores.parquet")
    scores.assign(key="own-" + scores["key"]).to_parquet(other / "scores.parquet", index=False)
    with pytest.raises(SystemExit):
        main(["report", str(tuned), str(official), str(other), "--out", str(other.parent / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "would both be named npr-tuned" in err[0], err
    assert "separate qdd-cli report calls" in err[0]
