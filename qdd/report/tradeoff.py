"""The study's trade-off, per generator × precision: what a precision saves (denoiser bytes,
time, memory), what it costs in image quality (PSNR, SSIM … against the reference twin),
and what it hides from each detector (fake accuracy, AUROC).

Quality runs (``qdd-cli quality``) bring the per-image quality (quality.parquet, pooled
over runs and recomputed here) and the costs the shards recorded (copied into their
metrics.json, so a report reads only run folders); test runs bring the detection metrics
(`qdd.report.runs.group_table`). Costs missing in older shards stay empty ("–").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from qdd.errors import QddError
from qdd.report.palette import bits, generator_style, order_generators, order_precisions
from qdd.report.runs import NONE

#: The quality a precision must keep to count in the per-generator verdict of report.md.
KEEP_SSIM = 0.90
#: Colour map of the quality (SSIM) in the figure: dark = degraded, bright = like the twin.
CMAP = "viridis"
QUALITY_PARQUET = "quality.parquet"
#: Group-level quality measures copied from the quality runs' metrics.json.
DISTANCES = ("fid", "kid", "kid_std", "fid_real", "kid_real", "kid_real_std",
             "fd_clip", "kd_clip", "kd_clip_std")  # fmt: skip
COSTS = ("denoiser_bytes", "seconds_per_image", "peak_memory_bytes")


@dataclass
class QualityResults:
    """Every quality run, pooled: per-image rows, per-group FID/KID and costs."""

    scores: pd.DataFrame
    reference: str
    distances: dict[str, dict[str, Any]] = field(default_factory=dict)
    costs: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)


def is_quality_run(folder: Path) -> bool:
    """A folder made by ``qdd-cli quality``: it holds quality.parquet, or its metrics.json
    says ``"kind": "quality"``."""
    folder = Path(folder)
    if (folder / QUALITY_PARQUET).is_file():
        return True
    try:
        return json.loads((folder / "metrics.json").read_text()).get("kind") == "quality"
    except (OSError, ValueError, AttributeError):
        return False


def load_quality(folders: list[Path]) -> QualityResults:
    """Pool quality runs (an image measured twice counts once); one reference for all."""
    frames, runs = [], []
    distances: dict[str, dict[str, Any]] = {}
    costs: dict[str, dict[str, Any]] = {}
    references = set()
    for folder in folders:
        parquet, metrics_path = folder / QUALITY_PARQUET, folder / "metrics.json"
        try:
            frames.append(pd.read_parquet(parquet))
            metrics = json.loads(metrics_path.read_text())
        except Exception as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise QddError(
                f"cannot read quality run {folder} ({reason}): re-run qdd-cli quality "
                f"--data SHARDS --out {folder}"
            ) from None
        references.add(metrics.get("reference", "fp32"))
        for group, entry in (metrics.get("groups") or {}).items():
            if any(entry.get(k) is not None for k in DISTANCES):
                distances.setdefault(group, {k: entry.get(k) for k in DISTANCES})
        for group, entry in (metrics.get("costs") or {}).items():
            costs.setdefault(group, dict(entry))
        runs.append(
            {
                "folder": str(folder),
                "reference": metrics.get("reference"),
                "n": metrics.get("n"),
                "n_unpaired": metrics.get("n_unpaired", 0),
                "data": metrics.get("data") or [],
            }
        )
    if len(references) > 1:
        raise QddError(
            f"quality runs against different references ({', '.join(sorted(references))}): "
            "report them in separate qdd-cli report calls"
        )
    scores = pd.concat(frames, ignore_index=True)
    scores = scores.drop_duplicates(["generator", "precision", "key"], ignore_index=True)
    return QualityResults(scores, references.pop(), distances, costs, runs)


def tradeoff_table(quality: QualityResults, detection: pd.DataFrame) -> pd.DataFrame:
    """One row per generator × precision: costs, ratio to the reference, quality (mean and
    95 % interval), FID/KID and the CLIP scores (the image's and its twin's) where measured,
    each detector's AUROC and fake accuracy.

    ``detection``: `qdd.report.runs.group_table` (only its unperturbed rows are used).
    The reference's own row has no quality values (it is what the others are measured by).
    """
    from qdd.quality import group_summary

    summary = group_summary(quality.scores, {})
    detection = detection[detection["perturbation"] == NONE] if not detection.empty else detection
    groups = set(summary) | set(quality.costs)
    groups |= {f"{g}/{quality.reference}" for g in quality.scores["generator"].unique()}
    detectors = sorted(detection["detector"].unique()) if not detection.empty else []
    rows = []
    for group in groups:
        generator, _, precision = group.rpartition("/")
        cost = quality.costs.get(group, {})
        reference_cost = quality.costs.get(f"{generator}/{quality.reference}", {})
        size, base = cost.get("denoiser_bytes"), reference_cost.get("denoiser_bytes")
        row: dict[str, Any] = {
            "generator": generator,
            "precision": precision,
            "denoiser_bytes": size,
            f"bytes_vs_{quality.reference}": size / base if size and base else None,
            "seconds_per_image": cost.get("seconds_per_image"),
            "peak_memory_bytes": cost.get("peak_memory_bytes"),
            "n_pairs": summary.get(group, {}).get("n", 0),
        }
        for measure in ("psnr", "ssim", "lpips"):
            for suffix in ("", "_lo", "_hi"):
                row[f"{measure}{suffix}"] = summary.get(group, {}).get(f"{measure}{suffix}")
        row.update(quality.distances.get(group, {}))
        for measure in ("clip_score", "clip_score_reference"):  # against the prompt
            row[measure] = summary.get(group, {}).get(measure)
        for name in detectors:
            match = detection[
                (detection["detector"] == name)
                & (detection["generator"] == generator)
                & (detection["precision"] == precision)
            ]
            for metric in ("auroc", "fake_acc"):
                row[f"{name}_{metric}"] = float(match[metric].iloc[0]) if len(match) else None
        rows.append(row)
    table = pd.DataFrame(rows)
    empty = [
        c
        for c in table.columns
        if table[c].isna().all() and c.startswith(("lpips", "fid", "kid", "fd_", "kd_", "clip"))
    ]
    table = table.drop(columns=empty)
    g = {n: i for i, n in enumerate(order_generators(table["generator"].unique()))}
    p = {n: i for i, n in enumerate(order_precisions(table["precision"].unique()))}
    table = table.assign(_g=table["generator"].map(g), _p=table["precision"].map(p))
    return table.sort_values(["_g", "_p"]).drop(columns=["_g", "_p"]).reset_index(drop=True)


def detectors_in(table: pd.DataFrame) -> list[str]:
    """The detectors with columns in a trade-off table."""
    return [c[: -len("_fake_acc")] for c in table.columns if c.endswith("_fake_acc")]


def memory_saved(table: pd.DataFrame, reference: str) -> tuple[pd.Series, bool]:
    """Share of the reference's denoiser bytes each row saves, and whether it is measured.

    Where some row lacks ``denoiser_bytes`` (shards older than the cost fields), every row
    falls back to the nominal share ``1 − bits/32`` of its precision name, and the second
    value is False so that the figure says so.
    """
    ratio = table[f"bytes_vs_{reference}"]
    if ratio.notna().all():
        return 1.0 - ratio.astype(float), True
    nominal = table["precision"].map(lambda p: (bits(p) or math.nan) / (bits(reference) or 32))
    return 1.0 - nominal.astype(float), False


def plot_tradeoff(table: pd.DataFrame, detector: str, reference: str = "fp32") -> Figure:
    """Memory saved (x) against the detector's fake accuracy and AUROC (two panels), one
    marker shape per generator, marker colour = SSIM against the reference twin, each
    point labelled with its precision; a generator's precisions joined by a thin line."""
    import matplotlib as mpl
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D

    from qdd.report.style import RC, panel_grid

    saved, measured = memory_saved(table, reference)
    frame = table.assign(_saved=saved * 100)
    frame = frame[frame[f"{detector}_fake_acc"].notna() & frame["_saved"].notna()]
    ssim = frame["ssim"].where(frame["precision"] != reference, 1.0)  # its own twin
    frame = frame.assign(_ssim=ssim.astype(float))
    finite = frame["_ssim"].dropna()
    low = min(float(finite.min()), KEEP_SSIM - 0.05) if len(finite) else 0.0
    norm, cmap = Normalize(vmin=max(0.0, low), vmax=1.0), mpl.colormaps[CMAP]
    styles = generator_style(frame["generator"].unique())
    metrics = (
        ("fake_acc", "fake accuracy\n(lower: evades more)"),
        ("auroc", "AUROC\n(lower: evades more)"),
    )
    with mpl.rc_context(RC):
        fig, axes = panel_grid(2, panel=(3.6, 3.2), max_cols=2)
        for ax, (metric, label) in zip(axes, metrics, strict=True):
            for generator, part in frame.groupby("generator", sort=False):
                part = part.sort_values("_saved")
                colour, marker = styles[generator]
                values = part[f"{detector}_{metric}"].astype(float)
                ax.plot(
                    part["_saved"],
                    values,
                    color="#BBBBBB",
                    lw=0.8,
                    zorder=1,
                    label=f"_{generator} path",
                )
                faces = [cmap(norm(s)) if np.isfinite(s) else "#DDDDDD" for s in part["_ssim"]]
                ax.scatter(
                    part["_saved"],
                    values,
                    c=faces,
                    marker=marker,
                    s=60,
                    edgecolors="black",
                    linewidths=0.6,
                    zorder=2,
                    label=generator,
                )
                for x, y, precision in zip(part["_saved"], values, part["precision"], strict=True):
                    ax.annotate(
                        precision, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7
                    )
            ax.set_ylim(-0.05, 1.05)
            ax.set_xlim(-5, 100)
            ax.set_ylabel(label)
            what = "denoiser memory" if measured else "nominal weight bits"
            ax.set_xlabel(f"{what} saved vs {reference} (%)")
            ax.grid(alpha=0.3, lw=0.5)
        handles = [
            Line2D(
                [], [], ls="", marker=m, markerfacecolor="white", markeredgecolor="black", label=g
            )
            for g, (_, m) in styles.items()
        ]
        fig.legend(
            handles=handles,
            loc="outside lower center",
            ncols=max(1, len(handles)),
            title="generator",
            frameon=False,
        )
        bar = fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, shrink=0.9)
        bar.set_label(f"SSIM vs {reference} twin")
        bar.ax.axhline(KEEP_SSIM, color="white", lw=1.5, label="_keeps quality")
        title = f"{detector}: what each precision saves, costs in quality, and hides"
        if not measured:
            title += "\n(denoiser bytes not recorded by these shards: nominal bits shown)"
        fig.suptitle(title)
    return fig


def verdicts(table: pd.DataFrame, reference: str = "fp32", keep: float = KEEP_SSIM) -> list[str]:
    """Per generator, one line: among the precisions that keep SSIM ≥ ``keep`` against the
    reference, the one that saves the most memory and the one that evades the detectors
    most (lowest fake accuracy, averaged over detectors)."""
    detectors = detectors_in(table)
    saved, measured = memory_saved(table, reference)
    frame = table.assign(_saved=saved)
    lines = []
    for generator in order_generators(frame["generator"].unique()):
        rows = frame[(frame["generator"] == generator) & (frame["precision"] != reference)]
        if rows.empty:
            continue
        kept = rows[rows["ssim"].astype(float) >= keep]
        if kept.empty:
            best = (
                rows.loc[rows["ssim"].astype(float).idxmax()]
                if rows["ssim"].notna().any()
                else None
            )
            worst = (
                f" (best: {best['precision']}, SSIM {best['ssim']:.3f})" if best is not None else ""
            )
            lines.append(
                f"**{generator}**: no lower precision keeps SSIM ≥ {keep:.2f} "
                f"against {reference}{worst}"
            )
            continue
        what = "denoiser memory" if measured else "nominal weight bits"
        columns = [f"{d}_fake_acc" for d in detectors]
        accuracy = kept[columns].astype(float).mean(axis=1) if detectors else None
        # ties in memory (e.g. two 4-bit formats) go to the one that evades more
        order = kept.assign(_acc=accuracy if accuracy is not None else np.nan)
        order = order.sort_values(["_saved", "_acc"], ascending=[False, True], kind="stable")
        saver = order.iloc[0] if order["_saved"].notna().any() else None
        text = f"**{generator}**: of the precisions that keep SSIM ≥ {keep:.2f} against {reference}"
        if saver is not None:
            text += (
                f", {saver['precision']} saves the most ({saver['_saved']:.0%} of the "
                f"{what}, SSIM {saver['ssim']:.3f})"
            )
        if accuracy is not None and accuracy.notna().any():
            evader = kept.loc[accuracy.idxmin()]
            per = ", ".join(
                f"{d} {evader[f'{d}_fake_acc']:.2f}"
                for d in detectors
                if pd.notna(evader[f"{d}_fake_acc"])
            )
            same = saver is not None and evader["precision"] == saver["precision"]
            name = " and" if same else f"; {evader['precision']}"
            text += (
                f"{name} evades the detectors most (mean fake accuracy {accuracy.min():.2f}: {per})"
            )
        lines.append(text)
    return lines
