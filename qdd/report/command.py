"""``qdd-cli report RUN... --out DIR``: the study's figures and tables from finished runs.

Nothing is re-run: every number is recomputed from the runs' scores.parquet (merged runs
pool their scores). What the runs do not cover (a generator × precision a detector lacks,
a detector without FP32/quantized twins) is drawn around, printed as one line per gap,
and listed in report.md. ``--compare`` ranks runs instead (`qdd.report.compare`).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

HEATMAP_METRICS = ("fake_acc", "balanced_acc", "auroc")


def slug(text: str) -> str:
    """A file-name-safe form of a perturbation spec (``jpeg:75`` → ``jpeg-75``)."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def build_report(runs: list[Path], out: Path) -> Path:
    """Draw everything into ``out``; returns the path of the index, report.md.

    Raises `QddError` for a run folder that is missing, empty or not a finished test run,
    and for runs of one detector and weights that disagree on the threshold.
    """
    import pandas as pd

    from qdd.report.attribution import attribution_section, is_attribution_run
    from qdd.report.confounds import format_warnings
    from qdd.report.families import lineup
    from qdd.report.heatmap import has_low_fraction, plot_heatmap
    from qdd.report.index import write_index
    from qdd.report.kde import plot_kde
    from qdd.report.overview import plot_overview
    from qdd.report.paired import plot_paired, shift_table
    from qdd.report.robustness import plot_robustness, precision_table, spec_rank
    from qdd.report.runs import NONE, accuracy_warnings, group_table, load_runs, missing_groups
    from qdd.report.spectra import fingerprint_section, is_fingerprint_run, load_fingerprints
    from qdd.report.style import save
    from qdd.report.swap import plot_swap, swap_table
    from qdd.report.tables import metric_pivot, sorted_groups, write_table
    from qdd.report.tradeoff import is_quality_run

    quality_runs = [Path(r) for r in runs if is_quality_run(Path(r))]
    fingerprint_runs = [Path(r) for r in runs if is_fingerprint_run(Path(r))]
    attribution_runs = [Path(r) for r in runs if is_attribution_run(Path(r))]
    others = quality_runs + fingerprint_runs + attribution_runs
    test_runs = [Path(r) for r in runs if Path(r) not in others]
    results = load_runs(test_runs) if test_runs or not others else {}
    fingerprints = load_fingerprints(fingerprint_runs)  # refusals before anything is drawn
    lined_up = lineup({name: entry.runs[0]["detector"] for name, entry in results.items()})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, str] = {}
    notes: list[str] = []
    shifts = []
    table = group_table(results)
    if not table.empty:  # the study's question first: every detector against precision
        overview = plot_overview(table, lined_up)
        if overview is not None:
            save(overview, out, "overview")
            figures["overview"] = "Every detector against precision, family by family"
    for name in lined_up:
        entry = results[name]
        main = entry.main
        if main.empty:
            notes.append(f"{name} has no unperturbed (`{NONE}`) scores: no KDE or paired view")
            continue
        save(plot_kde(main, name, entry.threshold), out, f"kde_{name}")
        figures[f"kde_{name}"] = f"{name}: logit distributions per precision"
        paired = plot_paired(main, name, entry.threshold)
        if paired is None:
            notes.append(
                f"no paired view for {name}: no key has both an FP32 and a lower-"
                "precision image (test it on FP32 and FP4 shards of the same prompts)"
            )
        else:
            save(paired, out, f"paired_{name}")
            figures[f"paired_{name}"] = f"{name}: each lower precision vs its FP32 twin"
            shifts.append(shift_table(main, name, entry.threshold))
    tables: dict[str, tuple[Path, Path]] = {}
    verdicts = tradeoff(quality_runs, table, out, figures, tables, notes, lined_up)
    fingerprint_section(*fingerprints, out, figures, tables, notes)
    attribution_section(attribution_runs, out, figures, tables)
    if table.empty:
        if results:
            notes.append("no fake images in these runs: no heatmaps or metric tables")
    else:
        perturbations = sorted(table["perturbation"].unique(), key=spec_rank)
        for metric in HEATMAP_METRICS:
            if table.loc[table["perturbation"] == NONE, metric].isna().all():
                notes.append(f"no {metric} values in these runs: heatmap_{metric} not drawn")
                continue
            save(plot_heatmap(table, metric, lined_up=lined_up), out, f"heatmap_{metric}")
            figures[f"heatmap_{metric}"] = f"{metric} per generator × precision, per detector"
            tables[metric] = write_table(metric_pivot(table, metric, True, lined_up),
                                         out / "tables", metric)  # fmt: skip
        swap = swap_table(table)
        if not swap.empty:
            save(plot_swap(swap, lined_up=lined_up), out, "heatmap_swap")
            figures["heatmap_swap"] = "fake accuracy per denoiser × decoder (VAE) precision"
        if len(perturbations) > 1:
            # One figure per detector tested under perturbations (a grid of all of them
            # would grow a column per detector); the others would be empty panels.
            swept = table[table.groupby("detector")["perturbation"].transform("nunique") > 1]
            for name in [d for d in lined_up if d in set(swept["detector"])]:
                own = swept[swept["detector"] == name]
                specs = [p for p in perturbations if p in set(own["perturbation"])]
                for metric in HEATMAP_METRICS:
                    stem = f"perturbed_{metric}_{name}"
                    save(plot_heatmap(own, metric, specs, lined_up), out, stem)
                    figures[stem] = f"{name}: {metric} per generator × precision, per perturbation"
            robust = precision_table(results)
            for name in lined_up:
                figure = plot_robustness(robust, name)
                if figure is not None:
                    save(figure, out, f"robustness_{name}")
                    figures[f"robustness_{name}"] = f"{name}: metric vs perturbation strength"
            columns = ["detector", "perturbation", "precision", "n_fake", "n_real", "fake_acc",
                       "fake_acc_lo", "fake_acc_hi", "real_acc", "auroc", "auroc_lo",
                       "auroc_hi"]  # fmt: skip
            rank = {name: i for i, name in enumerate(lined_up)}
            robust = robust.assign(_r=robust["perturbation"].map(spec_rank),
                                   _d=robust["detector"].map(rank))  # fmt: skip
            robust = robust.sort_values(["_d", "_r", "precision"], kind="stable")
            tables["robustness"] = write_table(robust[columns], out / "tables", "robustness")
    if shifts:
        frame = pd.concat(shifts, ignore_index=True)
        tables["paired_shift"] = write_table(frame, out / "tables", "paired_shift")
    if not table.empty:
        tables["groups"] = write_table(sorted_groups(table, lined_up), out / "tables", "groups")
    missing = missing_groups(table)
    warnings = format_warnings(results) + accuracy_warnings(results)
    for line in missing:
        print(f"missing: {line}", file=sys.stderr)
    for note in notes:
        print(note, file=sys.stderr)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    marked = has_low_fraction(table)
    return write_index(out, results, figures, tables, missing, notes, warnings, marked,
                       tradeoff=verdicts)  # fmt: skip


def tradeoff(
    quality_runs: list[Path],
    table: object,
    out: Path,
    figures: dict[str, str],
    tables: dict[str, tuple[Path, Path]],
    notes: list[str],
    lined_up: dict[str, str],
) -> list[str] | None:
    """tables/tradeoff.csv|md and a tradeoff_<detector> figure from the quality runs and
    the detection metrics ``table``; returns report.md's verdict lines (None: no quality
    runs were given)."""
    if not quality_runs:
        return None
    from qdd.report.style import save
    from qdd.report.tables import write_table
    from qdd.report.tradeoff import KEEP_SSIM, detectors_in, load_quality, tradeoff_table
    from qdd.report.tradeoff_figure import plot_tradeoff
    from qdd.report.verdict import verdicts

    quality = load_quality(quality_runs)
    notes.extend(unverified_networks(quality_runs))
    frame = tradeoff_table(quality, table)
    measured = set(detectors_in(frame))
    detectors = [d for d in lined_up if d in measured] + sorted(measured - set(lined_up))
    own = [f"{d}_{m}" for d in detectors for m in ("auroc", "fake_acc")]
    shared = [c for c in frame.columns if c not in set(own)]
    frame = frame[shared + [c for c in own if c in frame.columns]]  # family by family
    tables["tradeoff"] = write_table(frame, out / "tables", "tradeoff")
    if not detectors:
        notes.append("no test runs beside the quality runs: the trade-off has no detector axis")
    for name in detectors:
        save(plot_tradeoff(frame, name, quality.reference), out, f"tradeoff_{name}")
        figures[f"tradeoff_{name}"] = (
            f"{name}: memory saved vs detection, colour = SSIM against {quality.reference}"
        )
    lines = verdicts(frame, quality.reference)
    ref = quality.reference
    return [f"Keeping quality means a mean SSIM ≥ {KEEP_SSIM:.2f} against the {ref} twin of "
            "the same prompt and seed; a precision without quality values is *not measured*, "
            f"not failing. Evading means a lower mean fake accuracy than the generator's own "
            f"{ref}, on the detectors that scored both; precisions are ranked on one common "
            "set of detectors, and values equal as printed are named as ties.",
            *lines]  # fmt: skip


def unverified_networks(quality_runs: list[Path]) -> list[str]:
    """One note per quality run whose LPIPS or FID network file is not the published one
    (`qdd.quality.networks`): its values are not comparable with published ones."""
    import json

    lines = []
    for run in quality_runs:
        metrics = json.loads((run / "metrics.json").read_text())
        for name in ("lpips", "fid"):
            record = metrics.get(name)
            if isinstance(record, dict) and record.get("verified") is False:
                lines.append(
                    f"{run}: {name.upper()} from {record.get('weights')} (sha256 "
                    f"{str(record.get('sha256'))[:16]}…), not the published file — verified: "
                    "false, not comparable with published values"
                )
    return lines


def build_parser() -> argparse.ArgumentParser:
    """``qdd-cli report``'s flags (the keys of `qdd.api.report`)."""
    parser = argparse.ArgumentParser(
        prog="qdd-cli report",
        description="Figures (KDE per detector, heatmaps, paired views against FP32, "
        "robustness curves) and tables from qdd-cli test run folders, without re-running "
        "anything; or, with --compare, one table ranking runs by a metric.",
    )
    parser.add_argument("runs", nargs="+", type=Path,
                        help="run folders of qdd-cli test and of qdd-cli quality")  # fmt: skip
    parser.add_argument("--out", type=Path,
                        help="report folder (default: report; with --compare: compare, so a "
                        "ranking never replaces the full report)")  # fmt: skip
    parser.add_argument("--compare", action="store_true",
                        help="rank the runs (one row each, best first) instead of merging them; "
                        "the first run is the reference of the difference heatmap")  # fmt: skip
    parser.add_argument("--metric", help="metric to rank by with --compare (default auroc)")
    parser.add_argument(
        "--group",
        help="test group to rank on with --compare: overall (default), a "
        "generator/precision such as sd3/fp4, a generator or a precision",
    )
    return parser


def parse_args(argv: list[str]) -> dict[str, object]:
    """``qdd-cli report``'s flags as `qdd.api.report`'s keys; the default ``--out`` is
    ``report``, or ``compare`` with ``--compare``: the folder is the report's own
    (`qdd.report.owned`), so a shared default would let a ranking remove the full report."""
    settings = vars(build_parser().parse_args(argv))
    if settings["out"] is None:
        settings["out"] = Path("compare" if settings["compare"] else "report")
    return settings


def run_report(
    runs: list[Path],
    out: Path,
    compare: bool = False,
    metric: str | None = None,
    group: str | None = None,
) -> Path:
    """The full report (returns report.md), or with ``compare`` the ranking (compare.md),
    in a folder the report owns (`qdd.report.owned`: published whole, one report at a time,
    no stale figure of an earlier one)."""
    from qdd.report.owned import write_report_folder

    if (metric or group) and not compare:
        from qdd.errors import QddError

        raise QddError("--metric and --group choose what --compare ranks by: add --compare, "
                       "or drop them for the full report")  # fmt: skip
    if compare:
        from qdd.report.compare import build_comparison

        return write_report_folder(out, lambda folder: build_comparison(
            runs, folder, metric or "auroc", group or "overall"))  # fmt: skip
    return write_report_folder(out, lambda folder: build_report(runs, folder))
