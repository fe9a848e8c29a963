"""``qdd-cli report RUN... --out DIR``: the study's figures and tables from finished runs.

Nothing is re-run: every figure is drawn from the runs' scores.parquet and metrics.json.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from qdd.errors import QddError

log = logging.getLogger(__name__)

HEATMAP_METRICS = ("fake_acc", "auroc")


def build_report(runs: list[Path], out: Path) -> Path:
    """Draw everything into ``out``; returns the path of the index, report.md."""
    from qdd.report.heatmap import plot_heatmap
    from qdd.report.index import write_index
    from qdd.report.kde import plot_kde
    from qdd.report.paired import pair_precision, paired_logits, plot_paired
    from qdd.report.runs import group_table, load_runs, missing_groups
    from qdd.report.style import save
    from qdd.report.tables import metric_pivot, sorted_groups, write_table

    results = load_runs([Path(r) for r in runs])
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, str] = {}
    notes: list[str] = []
    for name, entry in sorted(results.items()):
        save(plot_kde(entry.scores, name, entry.threshold), out, f"kde_{name}")
        figures[f"kde_{name}"] = f"{name}: score distributions per precision"
        paired = plot_paired(entry.scores, name, entry.threshold)
        if paired is None:
            notes.append(f"no paired view for {name}: no fp32 images with quantized twins")
        else:
            save(paired, out, f"paired_{name}")
            figures[f"paired_{name}"] = f"{name}: quantized vs FP32 twin, image by image"
    table = group_table(results)
    tables = {}
    if table.empty:
        notes.append("no fake groups in these runs: no heatmaps or metric tables")
    else:
        for metric in HEATMAP_METRICS:
            if metric in table.columns:
                save(plot_heatmap(table, metric), out, f"heatmap_{metric}")
                figures[f"heatmap_{metric}"] = f"{metric} per generator × precision"
                tables[metric] = write_table(metric_pivot(table, metric), out / "tables", metric)
        tables["groups"] = write_table(sorted_groups(table), out / "tables", "groups")
    shifts = []
    for name, entry in sorted(results.items()):
        precision = pair_precision(entry.scores)
        if precision is None:
            continue
        pairs = paired_logits(entry.scores, precision)
        for generator, rows in pairs.groupby("generator"):
            delta = rows[precision] - rows["fp32"]
            flipped = (rows["fp32"] > entry.threshold) & (rows[precision] <= entry.threshold)
            shifts.append({"detector": name, "generator": generator, "precision": precision,
                           "pairs": len(rows), "mean_shift": float(delta.mean()),
                           "flipped_to_real": int(flipped.sum())})  # fmt: skip
    if shifts:
        import pandas as pd

        tables["paired_shift"] = write_table(pd.DataFrame(shifts), out / "tables", "paired_shift")
    missing = missing_groups(results)
    for line in missing:
        log.warning("missing: %s", line)
    return write_index(out, results, figures, tables, missing, notes)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="qdd-cli report",
        description="Figures (KDE per detector, heatmaps, paired FP4-vs-FP32 view) and tables "
        "from qdd-cli test run folders, without re-running anything.",
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run folders of qdd-cli test")
    parser.add_argument("--out", type=Path, default=Path("report"), help="report folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    index = build_report(args.runs, args.out)
    print(index)


if __name__ == "__main__":  # pragma: no cover
    import sys

    try:
        main(sys.argv[1:])
    except QddError as error:
        raise SystemExit(f"qdd-cli report: error: {error}") from None
