"""Tables in CSV (for re-analysis) and Markdown (for reading), from the same frames."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from qdd.report.palette import order_generators, order_precisions
from qdd.report.robustness import spec_rank
from qdd.report.runs import NONE
from qdd.report.stats import METRICS


def markdown(frame: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub Markdown table; floats rounded (p-values, ``p_*``, to 2 significant digits,
    so that 3e-05 does not read 0.000; thresholds, logits that a training-free detector packs
    near −1, to 6, so that RIGID's −0.99989 does not read −1.000), missing values as '–'."""

    def cell(value: object, column: str) -> str:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return "–"
        if isinstance(value, float | np.floating):
            if column.startswith("p_"):
                return f"{value:.2g}"
            return f"{value:.6g}" if "threshold" in column else f"{value:.{digits}f}"
        return str(value)

    columns = [str(c) for c in frame.columns]
    header = "| " + " | ".join(columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    rows = [
        "| " + " | ".join(cell(v, c) for v, c in zip(row, columns, strict=True)) + " |"
        for row in frame.itertuples(False)
    ]
    return "\n".join([header, rule, *rows]) + "\n"


def write_table(frame: pd.DataFrame, folder: Path, stem: str) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    csv, md = folder / f"{stem}.csv", folder / f"{stem}.md"
    frame.to_csv(csv, index=False)
    md.write_text(markdown(frame))
    return csv, md


def with_family(table: pd.DataFrame, lined_up: Mapping[str, str] | None) -> pd.DataFrame:
    """``table`` with a ``family`` column after ``detector`` and ``_d``, the detector's place
    in ``lined_up`` (`qdd.report.families.lineup`; by name without one)."""
    lined_up = lined_up or {}
    names = list(lined_up) + sorted(set(table["detector"]) - set(lined_up))
    rank = {d: i for i, d in enumerate(names)}
    table = table.assign(_d=table["detector"].map(rank))
    if lined_up:
        at = list(table.columns).index("detector") + 1
        table.insert(at, "family", table["detector"].map(lambda d: lined_up.get(d, "other")))
    return table


def sorted_groups(table: pd.DataFrame, lined_up: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Rows family by family (``lined_up``), then in palette/generator order; metric
    columns in the canonical order."""
    generators = {g: i for i, g in enumerate(order_generators(table["generator"].unique()))}
    precisions = {p: i for i, p in enumerate(order_precisions(table["precision"].unique()))}
    table = (
        with_family(table, lined_up)
        .assign(
            _g=table["generator"].map(generators),
            _p=table["precision"].map(precisions),
            _p_order=table["perturbation"].map(spec_rank),
        )
        .sort_values(["_d", "_p_order", "_g", "_p"], kind="stable")
    )
    columns = ["detector", "family", "perturbation", "generator", "precision", "quant_scope",
               "quant_fraction", "source_format", "n_fake", "n_real"]  # fmt: skip
    for m in (*METRICS, "acc_calibrated"):
        columns += [m, f"{m}_lo", f"{m}_hi"]
    return table[[c for c in columns if c in table.columns]].reset_index(drop=True)


def with_interval(table: pd.DataFrame, metric: str) -> pd.Series:
    """``value [lo, hi] n=N`` per row, for reading; the CSV keeps the numbers apart."""
    d = 3 if metric in ("auroc", "ap") else 2

    def cell(row: pd.Series) -> str:
        value = row[metric]
        if value is None or np.isnan(value):
            return "–"
        text = f"{value:.{d}f}"
        lo, hi = row.get(f"{metric}_lo", np.nan), row.get(f"{metric}_hi", np.nan)
        if np.isfinite(lo):
            text += f" [{lo:.{d}f}, {hi:.{d}f}]"
        return text + f" n={int(row['n_fake'])}"

    return table.apply(cell, axis=1)


def values_only(frame: pd.DataFrame) -> pd.DataFrame:
    """A `metric_pivot` with ``text`` cells cut to their value (``0.92 [0.65, 0.99] n=12`` →
    ``0.92``): the narrow form report.md shows when the full one is too wide to read."""

    def value(cell: object) -> object:
        return cell.split(" ", 1)[0] if isinstance(cell, str) and " [" in cell else cell

    return frame.apply(lambda column: column.map(value))


def metric_pivot(
    table: pd.DataFrame, metric: str, text: bool = False, lined_up: Mapping[str, str] | None = None
) -> pd.DataFrame:
    """detector × generator rows (family by family where ``lined_up`` is given, with a
    ``family`` column), one column per precision (unperturbed pass).

    ``text`` puts the 95 % interval and n beside each value (for Markdown).
    """
    table = table[table["perturbation"] == NONE]
    if text:
        table = table.assign(_cell=with_interval(table, metric))
    index = ["detector", "family"] if lined_up else ["detector"]
    table = with_family(table, lined_up)
    pivot = table.pivot_table(index=[*index, "_d", "generator"], columns="precision",
                              values="_cell" if text else metric, aggfunc="first")  # fmt: skip
    pivot = pivot.reindex(columns=order_precisions(pivot.columns))
    order = {g: i for i, g in enumerate(order_generators(table["generator"].unique()))}
    pivot = pivot.reset_index()
    pivot = pivot.iloc[np.lexsort((pivot["generator"].map(order), pivot["_d"]))]
    pivot = pivot.drop(columns="_d")
    pivot.columns.name = None
    return pivot.reset_index(drop=True)
