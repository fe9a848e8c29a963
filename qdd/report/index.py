"""report.md: the index that links every figure and table and states each run's recipe."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from qdd.report.runs import DetectorResults
from qdd.report.tables import markdown


def recipe_table(results: dict[str, DetectorResults]) -> pd.DataFrame:
    rows = []
    for name, entry in sorted(results.items()):
        for group, recipe in sorted(entry.recipes.items()):
            rows.append({"detector": name, "group": group,
                         "quant backend": recipe.get("quant_backend") or "none",
                         "quant scope": recipe.get("quant_scope") or "–",
                         "model": recipe.get("model_id") or "–"})  # fmt: skip
    return pd.DataFrame(rows)


def write_index(
    out: Path,
    results: dict[str, DetectorResults],
    figures: dict[str, str],
    tables: dict[str, tuple[Path, Path]],
    missing: list[str],
    notes: list[str],
) -> Path:
    lines = ["# qdd report", "", "Scores are logits; > threshold means *fake*.", ""]
    lines += ["## Runs", ""]
    runs = pd.DataFrame(
        [{"detector": name, "weights": run["weights"], "threshold": run["threshold"],
          "images": run["n"], "run folder": run["folder"]}
         for name, entry in sorted(results.items()) for run in entry.runs]
    )  # fmt: skip
    lines += [markdown(runs), "## Recipes (from each sample's metadata)", ""]
    recipes = recipe_table(results)
    lines += [markdown(recipes) if not recipes.empty else "No fake images in these runs.\n"]
    lines += ["## Figures", ""]
    for stem, caption in figures.items():
        lines += [f"### {caption}", "", f"![{caption}]({stem}.png)", "",
                  f"[SVG]({stem}.svg)", ""]  # fmt: skip
    lines += ["## Tables", ""]
    for name, (csv, md) in tables.items():
        lines += [f"### {name}", "", md.read_text(), f"[CSV]({csv.relative_to(out)}) · "
                  f"[Markdown]({md.relative_to(out)})", ""]  # fmt: skip
    if missing or notes:
        lines += ["## Gaps", ""]
        lines += [f"- missing: {line}" for line in missing] + [f"- {note}" for note in notes]
        lines += [""]
    index = out / "report.md"
    index.write_text("\n".join(lines))
    return index
