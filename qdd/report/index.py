"""report.md: the index that links every figure and table and states each run's recipe."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from qdd.report.families import lineup
from qdd.report.heatmap import LOW_FRACTION
from qdd.report.palette import order_generators, order_precisions
from qdd.report.runs import DEMO_ORIGIN, NONE, DetectorResults
from qdd.report.stats import BOOTSTRAP, SEED
from qdd.report.tables import markdown, values_only

#: Tables shown in full in report.md; the others are only linked (they are long).
EMBEDDED = ("fake_acc", "balanced_acc", "auroc", "paired_shift", "tradeoff", "spectral_distance")
#: Tables whose cells carry an interval and n (`qdd.report.tables.with_interval`): too wide,
#: report.md shows their values only.
INTERVAL_TABLES = ("fake_acc", "balanced_acc", "auroc")
#: The most characters a shown table's row may take, and the most rows: ten detectors'
#: tables past these are linked with their size, not poured into report.md.
EMBED_WIDTH = 200
EMBED_ROWS = 60
#: The trade-off's columns report.md keeps when the whole table is too wide (and each
#: detector's ``<detector>_fake_acc``).
TRADEOFF_SHOWN = ("generator", "precision", "memory_saved", "ssim")
CAPTIONS = {
    "spectral_distance": "Spectral distance of each group to its reference (fp32) twin "
    "group: RMS over frequencies of the log ratio of their mean residual spectra (dB), its "
    "sampling-noise floor removed by a jackknife over images, with a 95 % jackknife "
    "interval; distance_plugin: the uncorrected RMS, which noise inflates (qdd-cli "
    "fingerprint)",
    "fake_acc": "Fake accuracy (logit > threshold) per generator × precision",
    "balanced_acc": "Balanced accuracy (mean of real and fake accuracy)",
    "auroc": "AUROC of each fake group against the pooled real images",
    "paired_shift": "Paired shift: each lower precision minus the FP32 logit of the same "
    "prompt and seed; shift_lo/hi: 95 % t-interval of the mean; p_shift: Wilcoxon "
    "signed-rank test of a zero shift; p_flips: exact McNemar test of flips to real vs to "
    "fake (a change of fake accuracy). p-values are not corrected for the number of groups",
    "robustness": "Metrics per perturbation, per precision (all generators pooled)",
    "groups": "Every metric of every group, with 95 % intervals",
    "tradeoff": "Trade-off per generator × precision: the denoiser's deployed bytes and their "
    "ratio to the reference, seconds per image and peak memory as the shards recorded them "
    "(– where not recorded); image quality against the reference twin of the same prompt and "
    "seed (PSNR in dB, SSIM, LPIPS; mean and 95 % t-interval; FID/KID on Inception-V3 pool3 "
    "features against the twins, fid_real against real photos; fd_clip/kd_clip on CLIP "
    "features, not comparable with any published FID; the CLIP score of the image and of its "
    "twin against their prompt where a CLIP model ran); each detector's "
    "AUROC and fake accuracy on the unperturbed images. memory_saved: the share of the "
    "reference's denoiser bytes saved, from recorded bytes, or from nominal bits for a "
    "generator some of whose groups lack them (memory_saved_from)",
}
#: Shown at the top of a report whose runs were made by `qdd-cli demo`.
DEMO_CAVEAT = ("**Demo:** these runs come from `qdd-cli demo` — tiny random-init generators "
               "and detectors trained for seconds. The numbers show that the pipeline works, "
               "not how real detectors behave on real quantized models.")  # fmt: skip


def data_summary(folders: list[str]) -> str:
    """Shard folders as given, or their common parent and count when there are many."""
    if not folders:
        return "–"
    if len(folders) <= 3:
        return ", ".join(folders)
    try:
        parent = os.path.commonpath(folders)
    except ValueError:  # absolute and relative paths mixed
        parent = ""
    return f"{len(folders)} folders" + (f" under {parent}" if parent else "")


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def run_counts(results: dict[str, DetectorResults]) -> str:
    """ "3 test runs of 1 detector" (and how many sets of weights, where more than one)."""
    runs = [run for entry in results.values() for run in entry.runs]
    detectors = {run["detector"] for run in runs}
    text = f"{plural(len(runs), 'test run')} of {plural(len(detectors), 'detector')}"
    if len(results) > len(detectors):
        text += f" ({len(results)} detector × weights combinations)"
    return text


def is_demo(results: dict[str, DetectorResults]) -> bool:
    """Every run was made by `qdd-cli demo` (it writes ``origin`` into metrics.json)."""
    runs = [run for entry in results.values() for run in entry.runs]
    return bool(runs) and all(run.get("origin") == DEMO_ORIGIN for run in runs)


def by_family(results: dict[str, DetectorResults]) -> list[tuple[str, DetectorResults]]:
    """``results`` family by family, then by name, as every figure lists them (`lineup`)."""
    lined_up = lineup({name: entry.runs[0]["detector"] for name, entry in results.items()})
    return [(name, results[name]) for name in lined_up]


def runs_table(results: dict[str, DetectorResults]) -> pd.DataFrame:
    """One row per run folder: which weights ran, at which threshold, on which data."""
    rows = []
    for name, entry in by_family(results):
        for run in entry.runs:
            row = {"detector": name, "weights": run["weights"], "threshold": run["threshold"]}
            if any(r["calibrated_threshold"] is not None for r in entry.runs):
                row["calibrated threshold"] = run["calibrated_threshold"]
            row.update({"images": run["n"], "data": data_summary([str(d) for d in run["data"]]),
                        "run folder": run["folder"]})  # fmt: skip
            rows.append(row)
    return pd.DataFrame(rows)


def recipe_table(results: dict[str, DetectorResults]) -> pd.DataFrame:
    """How each fake group was made and how much of it was quantized, with who measured it."""
    columns = ["generator", "precision", "quant backend", "quant scope", "quantized fraction",
               "model", "detectors"]  # fmt: skip
    measured: dict[tuple, list[str]] = {}
    for name, entry in by_family(results):
        fakes = entry.main[entry.main["label"] == 1]
        for (generator, precision), part in fakes.groupby(["generator", "precision"]):
            fraction = part["quant_fraction"].dropna()
            key = (generator, precision, _joined(part["quant_backend"]),
                   _joined(part["quant_scope"]),
                   f"{fraction.mean():.3f}" if len(fraction) else "–",
                   _joined(part["model_id"]))  # fmt: skip
            measured.setdefault(key, []).append(name)
    every = len(results)

    def who(names: list[str]) -> str:  # ten names on every row would crowd the table
        return f"all {every}" if len(names) == every > 2 else ", ".join(names)

    frame = pd.DataFrame([[*k, who(v)] for k, v in measured.items()], columns=columns)
    if frame.empty:
        return frame
    g = {n: i for i, n in enumerate(order_generators(frame["generator"].unique()))}
    p = {n: i for i, n in enumerate(order_precisions(frame["precision"].unique()))}
    order = frame.assign(_g=frame["generator"].map(g), _p=frame["precision"].map(p))
    return order.sort_values(["_g", "_p"], kind="stable")[columns].reset_index(drop=True)


def fits(text: str) -> bool:
    """A Markdown table narrow and short enough to read inside report.md."""
    rows = text.strip().splitlines()
    return len(rows) - 2 <= EMBED_ROWS and max(map(len, rows), default=0) <= EMBED_WIDTH


def shown_table(name: str, csv: Path, md: Path) -> list[str]:
    """What report.md shows of an embedded table: all of it where it fits; the values
    without intervals where only they fit; else a line with its size (the links follow)."""
    text = md.read_text()
    if fits(text):
        return [text]
    if name in INTERVAL_TABLES:
        frame = pd.read_csv(csv, keep_default_na=False)
        narrow = markdown(values_only(frame.replace("", "–")))
        if fits(narrow):
            return ["Values only (the 95 % intervals and n are in the linked tables):", "",
                    narrow]  # fmt: skip
    frame = pd.read_csv(csv)
    if name == "tradeoff":
        keep = [c for c in frame.columns if c in TRADEOFF_SHOWN or c.endswith("_fake_acc")]
        short = {c: c.removesuffix("_fake_acc") for c in keep if c.endswith("_fake_acc")}
        narrow = markdown(frame[keep].rename(columns=short))
        if fits(narrow):
            return ["Memory saved, SSIM and, under each detector's name, its fake accuracy "
                    "(every column in the linked tables):", "", narrow]  # fmt: skip
    return [f"{plural(len(frame), 'row')} × {len(frame.columns)} columns, too large to show "
            "here: open the linked table.", ""]  # fmt: skip


def _joined(values: pd.Series) -> str:
    distinct = sorted({str(v) for v in values.dropna() if str(v)})
    return ", ".join(distinct) if distinct else "–"


def write_index(
    out: Path,
    results: dict[str, DetectorResults],
    figures: dict[str, str],
    tables: dict[str, tuple[Path, Path]],
    missing: list[str],
    notes: list[str],
    warnings: list[str],
    marked: bool = False,
    tradeoff: list[str] | None = None,
) -> Path:
    """Write ``out``/report.md; figures and tables are linked by paths relative to it.

    ``marked``: some heatmap cell carries the low-quantized-fraction mark. ``tradeoff``:
    the trade-off section's lines (its rule, then one verdict per generator), when quality
    runs were given.
    """
    perturbed = any((e.scores["perturbation"] != NONE).any() for e in results.values())
    lines = ["# qdd report", ""]
    if is_demo(results):
        lines += [DEMO_CAVEAT, ""]
    lines += [
        f"Drawn by `qdd-cli report` from {run_counts(results)}; nothing was re-run. Scores "
        "are logits: above the threshold means *fake*. Every number is computed from the "
        "runs' pooled scores.parquet: each generator × precision against the real images of "
        "the same perturbation, with its count n and a 95 % interval (Wilson for "
        f"accuracies; percentile bootstrap, {BOOTSTRAP} resamples of the real and the fake "
        f"images apart, seed {SEED}, for balanced accuracy and AUROC)."
        + (
            f" The KDE, paired views and main heatmaps use the unperturbed pass (`{NONE}`)."
            if perturbed
            else ""
        )
        + (
            f" Heatmap cells marked ▼ had under {LOW_FRACTION:.0%} of their scoped "
            "parameters quantized (see Recipes)."
            if marked
            else ""
        ),
        "",
    ]
    if warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""]
    if results:
        lines += ["## Runs", "", markdown(runs_table(results))]
    if tradeoff:
        rule, *verdicts = tradeoff
        lines += ["## Trade-off", "", f"What each lower precision saves, keeping quality, and "
                  f"what it hides. {rule}", ""] + [f"- {v}" for v in verdicts] + [""]  # fmt: skip
    if missing or notes:
        lines += ["## Gaps", ""]
        lines += [f"- missing: {line}" for line in missing] + [f"- {note}" for note in notes]
        lines += [""]
    lines += ["## Figures", ""]
    for stem, caption in figures.items():
        lines += [f"### {caption}", "", f"![{caption}]({stem}.png)", "",
                  f"[PNG]({stem}.png) · [SVG]({stem}.svg)", ""]  # fmt: skip
    lines += ["## Tables", ""]
    for name, (csv, md) in tables.items():
        lines += [f"### {CAPTIONS.get(name, name)}", ""]
        if name in EMBEDDED:
            lines += shown_table(name, csv, md)
        lines += [f"[CSV]({csv.relative_to(out).as_posix()}) · "
                  f"[Markdown]({md.relative_to(out).as_posix()})", ""]  # fmt: skip
    recipes = recipe_table(results)
    lines += ["## Recipes", "",
              "How each fake group was made, from its samples' metadata; *quantized fraction*: "
              "the share of the scoped components' parameters stored in the quantized format "
              "(only Linear layers are quantized).", ""]  # fmt: skip
    lines += [markdown(recipes) if not recipes.empty else "No fake images in these runs.\n"]
    index = out / "report.md"
    index.write_text("\n".join(lines))
    return index
