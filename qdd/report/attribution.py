"""The report's attribution views: per ``qdd-cli test --task attribution`` run, its
confusion matrix as ``attribution_<run>.png`` (colour: the share of each true class,
numbers: image counts) and one table of per-class recall with Wilson intervals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qdd.errors import QddError

CONFUSION = "confusion.csv"


def is_attribution_run(folder: Path) -> bool:
    """Whether ``folder`` is a finished attribution test run."""
    metrics = folder / "metrics.json"
    if not ((folder / CONFUSION).is_file() and metrics.is_file()):
        return False
    try:
        return json.loads(metrics.read_text()).get("task") == "attribution"
    except (ValueError, AttributeError):
        return False


def read_confusion(folder: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The run's confusion matrix (rows: true class) and metrics.json, checked to agree."""
    metrics = json.loads((folder / "metrics.json").read_text())
    table = pd.read_csv(folder / CONFUSION, index_col=0)
    classes = list(metrics["classes"])
    if list(table.index) != classes or list(table.columns) != classes:
        raise QddError(f"{folder / CONFUSION} does not list the classes of its metrics.json "
                       f"({', '.join(classes)}): re-run the attribution test")  # fmt: skip
    return table, metrics


def plot_confusion(table: pd.DataFrame, title: str) -> Any:
    import matplotlib.pyplot as plt

    counts = table.to_numpy()
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    k = len(table)
    size = (max(4.0, 1.8 + 0.9 * k), max(3.2, 1.4 + 0.8 * k))
    fig, ax = plt.subplots(figsize=size, layout="constrained")
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(k):
        for j in range(k):
            colour = "white" if shares[i, j] > 0.6 else "black"
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", color=colour)
    ax.set_xticks(range(k), table.columns, rotation=30, ha="right")
    ax.set_yticks(range(k), table.index)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="share of the true class")
    return fig


def balanced_accuracy(table: pd.DataFrame) -> tuple[float | None, int]:
    """The mean recall over the true classes present, and how many there are: unlike
    accuracy, 1/k for a classifier that calls every image one class, however the test
    set's classes are weighted."""
    counts = table.to_numpy()
    support = counts.sum(axis=1)
    present = support > 0
    if not present.any():
        return None, 0
    return float(np.mean(np.diag(counts)[present] / support[present])), int(present.sum())


def recall_rows(name: str, metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Per class of one run: its recall with the Wilson interval, and which model it was."""
    return [
        {"run": name, "class": cls, "n": v["n"], "recall": v["recall"],
         "recall_low": v["recall_low"], "recall_high": v["recall_high"],
         "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
         "attribute": metrics["attribute"], "weights": metrics.get("weights")}
        for cls, v in metrics["per_class"].items()
    ]  # fmt: skip


def attribution_section(
    runs: list[Path],
    out: Path,
    figures: dict[str, str],
    tables: dict[str, tuple[Path, Path]],
) -> None:
    """Draw ``attribution_<run>`` per run and ``tables/attribution``."""
    if not runs:
        return
    from qdd.report.families import families, family_of
    from qdd.report.style import save
    from qdd.report.tables import write_table

    runs = list(dict.fromkeys(Path(r).resolve() for r in runs))  # a run given twice is one
    names = [run.name for run in runs]
    for name in {n for n in names if names.count(n) > 1}:
        same = " and ".join(str(run) for run in runs if run.name == name)
        raise QddError(f"the attribution runs {same} share the folder name {name}: their "
                       "figures would overwrite each other; rename one run folder")  # fmt: skip
    read = {name: read_confusion(run) for run, name in zip(runs, names, strict=True)}
    # family by family, then by run name: never by the order the runs were given
    order = families()
    ranked = sorted(read, key=lambda n: (order.index(family_of(read[n][1]["detector"])), n))
    rows = []
    for name in ranked:
        table, metrics = read[name]
        balanced, present = balanced_accuracy(table)
        chance = 1 / present if present else None
        title = (f"{metrics['detector']}: {metrics['attribute']} attribution\n"
                 f"n={metrics['n']}, accuracy {_fmt(metrics['accuracy'])}\n"
                 f"balanced accuracy {_fmt(balanced)} (chance {_fmt(chance)})")  # fmt: skip
        save(plot_confusion(table, title), out, f"attribution_{name}")
        figures[f"attribution_{name}"] = f"{name}: which {metrics['attribute']} made each image"
        rows += [{**row, "balanced_accuracy": balanced} for row in recall_rows(name, metrics)]
    tables["attribution"] = write_table(pd.DataFrame(rows), out / "tables", "attribution")


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"
