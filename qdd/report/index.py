"""report.md: the index that links every figure and table and states each run's recipe."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from qdd.report.palette import order_generators, order_precisions
from qdd.report.runs import DetectorResults
from qdd.report.tables import markdown

#: Tables shown in full in report.md; the others are only linked (they are long).
EMBEDDED = ("fake_acc", "auroc", "paired_shift")
CAPTIONS = {
    "fake_acc": "Fake accuracy (logit > threshold) per generator × precision",
    "auroc": "AUROC of each fake group against the pooled real images",
    "paired_shift": "Paired shift: quantized minus FP32 logit of the same prompt and seed",
    "groups": "Every metric of every group",
}


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


def runs_table(results: dict[str, DetectorResults]) -> pd.DataFrame:
    """One row per run folder: which weights ran, at which threshold, on which data."""
    rows = [
        {"detector": name, "weights": run["weights"], "threshold": run["threshold"],
         "images": run["n"], "data": data_summary([str(d) for d in run["data"]]),
         "run folder": run["folder"]}
        for name, entry in sorted(results.items()) for run in entry.runs
    ]  # fmt: skip
    return pd.DataFrame(rows)


def recipe_table(results: dict[str, DetectorResults]) -> pd.DataFrame:
    """How each fake group was made, once per distinct recipe, with who measured it."""
    fields = ("quant_backend", "quant_scope", "model_id")
    measured: dict[tuple, list[str]] = {}
    for name, entry in sorted(results.items()):
        for group, recipe in entry.recipes.items():
            generator, _, precision = group.rpartition("/")
            key = (recipe.get("generator") or generator, recipe.get("precision") or precision,
                   *(recipe.get(f) or "–" for f in fields))  # fmt: skip
            measured.setdefault(key, []).append(name)
    columns = ["generator", "precision", "quant backend", "quant scope", "model", "detectors"]
    frame = pd.DataFrame([[*k, ", ".join(v)] for k, v in measured.items()], columns=columns)
    if frame.empty:
        return frame
    g = {n: i for i, n in enumerate(order_generators(frame["generator"].unique()))}
    p = {n: i for i, n in enumerate(order_precisions(frame["precision"].unique()))}
    order = frame.assign(_g=frame["generator"].map(g), _p=frame["precision"].map(p))
    return order.sort_values(["_g", "_p"], kind="stable")[columns].reset_index(drop=True)


def write_index(
    out: Path,
    results: dict[str, DetectorResults],
    figures: dict[str, str],
    tables: dict[str, tuple[Path, Path]],
    missing: list[str],
    notes: list[str],
) -> Path:
    """Write ``out``/report.md; figures and tables are linked by paths relative to it."""
    n_runs = sum(len(entry.runs) for entry in results.values())
    lines = [
        "# qdd report",
        "",
        f"Drawn by `qdd-cli report` from {n_runs} test run(s) of {len(results)} detector(s); "
        "nothing was re-run. Scores are logits: above the threshold means *fake*. "
        "Group metrics score each generator × precision against the pooled real images.",
        "",
        "## Runs",
        "",
        markdown(runs_table(results)),
    ]
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
            lines += [md.read_text()]
        lines += [f"[CSV]({csv.relative_to(out).as_posix()}) · "
                  f"[Markdown]({md.relative_to(out).as_posix()})", ""]  # fmt: skip
    recipes = recipe_table(results)
    lines += ["## Recipes", "", "How each fake group was made, from its samples' metadata.", ""]
    lines += [markdown(recipes) if not recipes.empty else "No fake images in these runs.\n"]
    index = out / "report.md"
    index.write_text("\n".join(lines))
    return index
