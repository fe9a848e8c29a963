"""``qdd-cli report RUN... --out DIR``: the study's figures and tables from finished runs.

Nothing is re-run: every figure is drawn from the runs' scores.parquet and metrics.json.
What the runs do not cover (a generator × precision a detector lacks, a detector without
FP32/quantized twins) is drawn around, printed as one line per gap, and listed in report.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HEATMAP_METRICS = ("fake_acc", "auroc")


def build_report(runs: list[Path], out: Path) -> Path:
    """Draw everything into ``out``; returns the path of the index, report.md.

    Raises `QddError` for a run folder that is missing, empty or not a finished test run.
    """
    import pandas as pd

    from qdd.report.heatmap import plot_heatmap
    from qdd.report.index import write_index
    from qdd.report.kde import plot_kde
    from qdd.report.paired import plot_paired, shift_table
    from qdd.report.runs import group_table, load_runs, missing_groups
    from qdd.report.style import save
    from qdd.report.tables import metric_pivot, sorted_groups, write_table

    results = load_runs([Path(r) for r in runs])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, str] = {}
    notes: list[str] = []
    shifts = []
    for name, entry in sorted(results.items()):
        save(plot_kde(entry.scores, name, entry.threshold), out, f"kde_{name}")
        figures[f"kde_{name}"] = f"{name}: logit distributions per precision"
        paired = plot_paired(entry.scores, name, entry.threshold)
        if paired is None:
            notes.append(f"no paired view for {name}: no key has both an FP32 and a quantized "
                         "image (test it on FP32 and FP4 shards of the same prompts)")  # fmt: skip
        else:
            save(paired, out, f"paired_{name}")
            figures[f"paired_{name}"] = f"{name}: quantized vs FP32 twin, image by image"
            shifts.append(shift_table(entry.scores, name, entry.threshold))
    table = group_table(results)
    tables: dict[str, tuple[Path, Path]] = {}
    if table.empty:
        notes.append("no fake groups in these runs' metrics.json: no heatmaps or metric tables")
    else:
        for metric in HEATMAP_METRICS:
            if metric not in table.columns or table[metric].isna().all():
                notes.append(f"no {metric} values in these runs: heatmap_{metric} not drawn")
                continue
            save(plot_heatmap(table, metric), out, f"heatmap_{metric}")
            figures[f"heatmap_{metric}"] = f"{metric} per generator × precision, per detector"
            tables[metric] = write_table(metric_pivot(table, metric), out / "tables", metric)
    if shifts:
        frame = pd.concat(shifts, ignore_index=True)
        tables["paired_shift"] = write_table(frame, out / "tables", "paired_shift")
    if not table.empty:
        tables["groups"] = write_table(sorted_groups(table), out / "tables", "groups")
    missing = missing_groups(results)
    for line in missing:
        print(f"missing: {line}", file=sys.stderr)
    for note in notes:
        print(note, file=sys.stderr)
    return write_index(out, results, figures, tables, missing, notes)


def main(argv: list[str]) -> None:
    """Parse ``RUN... --out DIR`` and build the report; prints report.md's path last."""
    parser = argparse.ArgumentParser(
        prog="qdd-cli report",
        description="Figures (KDE per detector, heatmaps, paired FP4-vs-FP32 view) and tables "
        "from qdd-cli test run folders, without re-running anything.",
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run folders of qdd-cli test")
    parser.add_argument("--out", type=Path, default=Path("report"), help="report folder")
    args = parser.parse_args(argv)
    print(build_report(args.runs, args.out))
