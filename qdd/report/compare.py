"""``qdd-cli report --compare RUN... --metric M [--group G] --out DIR``: runs ranked, not merged.

The question after a fine-tune: did the retrained weights beat the official ones, and
where? Each run stays one row (never pooled with another), its metric recomputed from its
own scores.parquet on the chosen test group of the unperturbed pass, with n and a 95 %
interval; rows go best first. A figure compares every run with the first one given (the
reference, e.g. the official weights) per generator × precision: the reference's values,
then each other run's difference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from qdd.errors import QddError
from qdd.report.runs import NONE, DetectorResults, group_table, load_runs
from qdd.report.stats import METRICS, accuracy, group_metrics

#: Metrics a comparison can rank by (all: higher is better).
RANKABLE = (*METRICS, "acc_calibrated")


def load_each(folders: list[Path]) -> dict[str, DetectorResults]:
    """Every run on its own, named by its folder (its path where two folders share a name)."""
    names = [Path(f).name for f in folders]
    if len(set(names)) < len(names):
        names = [str(f) for f in folders]
    if len(set(names)) < len(names):
        raise QddError("the same run folder is given twice: pass each run once to --compare")
    for folder in folders:
        kind = other_kind(Path(folder))
        if kind is not None:
            raise QddError(f"{folder} is {kind} run, which --compare does not rank (it ranks "
                           "detection runs of qdd-cli test): leave it out of --compare, or "
                           "draw it in the full report, without --compare")  # fmt: skip
    results = {}
    for name, folder in zip(names, folders, strict=True):
        (entry,) = load_runs([Path(folder)]).values()
        entry.detector = name
        entry.scores = entry.scores.assign(detector=name)
        results[name] = entry
    return results


def other_kind(folder: Path) -> str | None:
    """What a run folder the full report draws but a ranking cannot take is (an attribution
    test, a quality or a fingerprint run), or None."""
    from qdd.report.attribution import is_attribution_run
    from qdd.report.spectra import is_fingerprint_run
    from qdd.report.tradeoff import is_quality_run

    kinds = (("an attribution test", is_attribution_run), ("a quality", is_quality_run),
             ("a fingerprint", is_fingerprint_run))  # fmt: skip
    return next((kind for kind, test in kinds if test(folder)), None)


def select(scores: pd.DataFrame, group: str) -> pd.Series:
    """The fakes of ``group``: overall, generator/precision, a generator or a precision."""
    fake = scores["label"] == 1
    if group == "overall":
        return fake
    generator, slash, precision = group.rpartition("/")
    if slash:
        return fake & (scores["generator"] == generator) & (scores["precision"] == precision)
    return fake & ((scores["generator"] == group) | (scores["precision"] == group))


def compare_table(results: dict[str, DetectorResults], metric: str, group: str) -> pd.DataFrame:
    """One row per run, best first (runs without the group last), with n and intervals."""
    rows = []
    for name, entry in results.items():
        main = entry.main
        real = main.loc[main["label"] == 0, "logit"].to_numpy(dtype=float)
        fake = main.loc[select(main, group), "logit"].to_numpy(dtype=float)
        values = group_metrics(real, fake, entry.threshold) if len(fake) else {}
        calibrated = entry.calibrated_threshold
        run = entry.runs[0]
        row = {"run": name, "detector": run["detector"], "weights": run["weights"],
               "group": group, "n_fake": len(fake), "n_real": len(real),
               "threshold": entry.threshold, "calibrated_threshold": calibrated,
               "acc": values.get("acc", np.nan),
               "acc_calibrated": accuracy(real, fake, calibrated)
               if calibrated is not None and len(fake) else np.nan}  # fmt: skip
        if metric not in row:
            row[metric] = values.get(metric, np.nan)
        row[f"{metric}_lo"] = values.get(f"{metric}_lo", np.nan)
        row[f"{metric}_hi"] = values.get(f"{metric}_hi", np.nan)
        row["run folder"] = run["folder"]
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame = frame.sort_values(metric, ascending=False, na_position="last", kind="stable")
    frame.insert(0, "rank", range(1, len(frame) + 1))
    if frame["calibrated_threshold"].isna().all():
        frame = frame.drop(columns=["calibrated_threshold", "acc_calibrated"])
    return frame.dropna(axis=1, how="all").reset_index(drop=True)


def plot_compare(table: pd.DataFrame, metric: str, runs: list[str]) -> object:
    """The reference run's heatmap, then one difference panel (run − reference) per run."""
    import matplotlib as mpl
    from matplotlib.colors import TwoSlopeNorm

    from qdd.report.heatmap import (
        CMAP,
        LABELS,
        MISSING,
        digits,
        label_grid,
        metric_grid,
        norm_for,
        text_colour,
    )
    from qdd.report.palette import order_generators, order_precisions
    from qdd.report.style import RC, panel_grid

    table = table[table["perturbation"] == NONE]
    generators = order_generators(table["generator"].unique())
    precisions = order_precisions(table["precision"].unique())
    grids = {r: metric_grid(table[table["detector"] == r], metric, generators, precisions)
             for r in runs}  # fmt: skip
    reference = grids[runs[0]]
    diffs = [grids[r] - reference for r in runs[1:]]
    span = max([np.nanmax(np.abs(d)) for d in diffs if np.isfinite(d).any()] + [0.01])
    size = (0.8 * len(precisions) + 1.6, 0.45 * len(generators) + 1.3)
    fig, axes = panel_grid(len(runs), panel=size, max_cols=3)
    d = digits(metric)
    with mpl.rc_context(RC):
        for ax, run in zip(axes, runs, strict=True):
            first = run == runs[0]
            values = grids[run] if first else grids[run] - reference
            norm = norm_for(metric) if first else TwoSlopeNorm(0.0, -span, span)
            cmap = mpl.colormaps[CMAP if first else "RdBu"]
            image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto",
                              interpolation="nearest")  # fmt: skip
            ax.set_facecolor(MISSING)
            for (i, j), value in np.ndenumerate(values):
                text = (
                    "–" if np.isnan(value) else f"{value:+.{d}f}" if not first else f"{value:.{d}f}"
                )
                shade = text_colour(cmap, norm, value) if np.isfinite(value) else "black"
                ax.text(j, i, text.replace("-", "\N{MINUS SIGN}"), ha="center", va="center",
                        fontsize=8, color=shade)  # fmt: skip
            label_grid(ax, generators, precisions)
            ax.set_title(f"{run} (reference)" if first else f"{run} − {runs[0]}", fontsize=9)
            bar = fig.colorbar(image, ax=ax, shrink=0.8, pad=0.02)
            bar.outline.set_visible(False)
        fig.suptitle(f"{LABELS.get(metric, metric)}: each run against {runs[0]}")
    return fig


def build_comparison(folders: list[Path], out: Path, metric: str, group: str) -> Path:
    """Write compare.csv, compare.md and compare_<metric>.png|svg; returns compare.md."""
    from qdd.report.style import save
    from qdd.report.tables import markdown

    if metric not in RANKABLE:
        raise QddError(f"unknown --metric {metric!r}: one of {', '.join(RANKABLE)}")
    results = load_each([Path(f) for f in folders])
    if not any(select(e.main, group).any() for e in results.values()):
        raise QddError(
            f"no run has fake images in group {group!r}: pass overall, a "
            "generator/precision such as sd3/fp4, a generator or a precision"
        )
    if metric == "acc_calibrated" and all(e.calibrated_threshold is None for e in results.values()):
        raise QddError("no run carries a calibrated_threshold: rank by acc, or test weights "
                       "fitted with threshold calibration")  # fmt: skip
    table = compare_table(results, metric, group)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "compare.csv", index=False)
    figure = None
    groups = group_table(results)
    if len(results) > 1 and not groups.empty and metric in groups.columns:
        save(plot_compare(groups, metric, list(results)), out, f"compare_{metric}")
        figure = f"compare_{metric}"
    lines = [f"# {metric} on {group}: runs ranked, best first", "",
             f"Each run's {metric} recomputed from its own scores.parquet (unperturbed pass), "
             "fakes of the group against the run's real images; 95 % interval: Wilson for "
             "accuracies, bootstrap for balanced accuracy and AUROC.", "",
             markdown(table)]  # fmt: skip
    if figure:
        lines += [f"![{metric} per generator × precision against {next(iter(results))}]"
                  f"({figure}.png)", ""]  # fmt: skip
    (out / "compare.md").write_text("\n".join(lines))
    return out / "compare.md"
