"""Tables in CSV (for re-analysis) and Markdown (for reading), from the same frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from qdd.metrics import METRICS
from qdd.report.palette import order_generators, order_precisions


def markdown(frame: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub Markdown table; floats rounded, missing values as '–'."""

    def cell(value: object) -> str:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return "–"
        if isinstance(value, float | np.floating):
            return f"{value:.{digits}f}"
        return str(value)

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(False)]
    return "\n".join([header, rule, *rows]) + "\n"


def write_table(frame: pd.DataFrame, folder: Path, stem: str) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    csv, md = folder / f"{stem}.csv", folder / f"{stem}.md"
    frame.to_csv(csv, index=False)
    md.write_text(markdown(frame))
    return csv, md


def sorted_groups(table: pd.DataFrame) -> pd.DataFrame:
    """Rows in palette/generator order, metric columns in the canonical order."""
    generators = {g: i for i, g in enumerate(order_generators(table["generator"].unique()))}
    precisions = {p: i for i, p in enumerate(order_precisions(table["precision"].unique()))}
    table = table.assign(
        _g=table["generator"].map(generators), _p=table["precision"].map(precisions)
    ).sort_values(["detector", "_g", "_p"])
    columns = ["detector", "generator", "precision", "n_fake", "n_real"]
    columns += [m for m in METRICS if m in table.columns]
    return table[[c for c in columns if c in table.columns]].reset_index(drop=True)


def metric_pivot(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """detector × generator rows, one column per precision."""
    pivot = table.pivot_table(index=["detector", "generator"], columns="precision",
                              values=metric, aggfunc="first")  # fmt: skip
    pivot = pivot.reindex(columns=order_precisions(pivot.columns))
    order = {g: i for i, g in enumerate(order_generators(table["generator"].unique()))}
    pivot = pivot.reset_index()
    pivot = pivot.iloc[np.lexsort((pivot["generator"].map(order), pivot["detector"]))]
    pivot.columns.name = None
    return pivot.reset_index(drop=True)
