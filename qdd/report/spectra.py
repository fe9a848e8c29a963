"""The report's spectral-fingerprint part, from ``qdd-cli fingerprint`` run folders.

Per generator, ``spectra_<generator>``: the reference (fp32) group's mean residual power
spectrum in dB (left column, its own colour bar), then each precision's difference from it
(``10·log10`` of the ratio, dB), every difference panel on one symmetric colour scale so
that panels compare; one row per perturbation. ``radial_<generator>``: the radial profiles
(dB) per precision (real photographs dashed, for scale), with dotted lines at multiples of
1/8 cycle per pixel (the 8× up-sampling of the VAE decoder puts its traces there).
``tables/spectral_distance``: every group's distance to its twin (noise floor removed) with
its jackknife interval, and the plug-in distance beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from qdd.errors import QddError
from qdd.fingerprint import DISTANCES, KIND, SPECTRA
from qdd.fingerprint.spectra import UNPERTURBED, log_ratio_db
from qdd.report.palette import color, order_generators, order_precisions
from qdd.report.style import RC, panel_grid

#: Colour maps: absolute spectra, and differences (red: the precision has more power).
SPECTRUM_CMAP, DIFFERENCE_CMAP = "magma", "RdBu_r"
#: The difference scale covers this percentile of |difference| (a few bins may saturate).
SCALE_PERCENTILE = 99.5


def is_fingerprint_run(folder: Path) -> bool:
    """Whether ``folder`` is a finished ``qdd-cli fingerprint`` run."""
    metrics = folder / "metrics.json"
    if not ((folder / SPECTRA).is_file() and metrics.is_file()):
        return False
    try:
        return json.loads(metrics.read_text()).get("kind") == KIND
    except (ValueError, AttributeError):
        return False


def load_fingerprints(folders: list[Path]) -> tuple[dict[str, Any], pd.DataFrame]:
    """Every run's groups (name → spectrum, radial profile, metadata) and distances; a group
    that two runs both measured is refused (one figure cannot show two measurements), and
    so is a run whose ``distance`` was the plug-in RMS (written before the jackknife: its
    numbers would sit in one column with the corrected ones)."""
    groups: dict[str, Any] = {}
    tables = []
    for folder in folders:
        metrics = json.loads((folder / "metrics.json").read_text())
        if "interval" not in metrics:
            raise QddError(f"{folder} holds plug-in spectral distances (an older qdd-cli "
                           "fingerprint): re-run qdd-cli fingerprint on its shards")  # fmt: skip
        try:
            with np.load(folder / SPECTRA) as arrays:
                stored = {name: arrays[name] for name in arrays.files}
        except Exception as error:
            raise QddError(f"cannot read {folder / SPECTRA} ({error}): re-run qdd-cli "
                           "fingerprint") from None  # fmt: skip
        for name, info in metrics["groups"].items():
            if name in groups:
                raise QddError(f"group {name} is in both {groups[name]['run']} and {folder}: "
                               "pass one fingerprint run per group")  # fmt: skip
            groups[name] = {**info, "run": folder, "spectrum": stored[name],
                            "radial": stored[f"{name}@radial"],
                            "frequency": stored["frequency"],
                            "reference_precision": metrics["reference"]}  # fmt: skip
        table = pd.read_csv(folder / DISTANCES, keep_default_na=False, na_values=[""])
        tables.append(table.assign(crop=metrics["crop"], folds=metrics["interval"]["folds"]))
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    if not table.empty:
        generators = order_generators(table["generator"].unique())
        table = (
            table.assign(
                _g=table["generator"].map(generators.index),
                _p=table["precision"].map(order_precisions(table["precision"].unique()).index),
            )
            .sort_values(["_g", "perturbation", "_p"], kind="stable")
            .drop(columns=["_g", "_p"])
        )
    return groups, table.reset_index(drop=True)


def _extent(shape: tuple[int, ...]) -> tuple[float, float, float, float]:
    """imshow extent in cycles per pixel for the fftshift layout (origin lower)."""
    h, w = shape
    return ((-(w // 2) - 0.5) / w, (w - w // 2 - 0.5) / w,
            (-(h // 2) - 0.5) / h, (h - h // 2 - 0.5) / h)  # fmt: skip


def _layout(groups: dict[str, Any], generator: str) -> tuple[list[str], list[str], str]:
    """(perturbations, precisions other than the reference, the reference) of a generator."""
    mine = [g for g in groups.values() if g["generator"] == generator]
    reference = mine[0]["reference_precision"]
    perturbations = sorted({g["perturbation"] for g in mine}, key=lambda p: p != UNPERTURBED)
    precisions = order_precisions({g["precision"] for g in mine} - {reference})
    return perturbations, precisions, reference


def _find(groups: dict[str, Any], generator: str, precision: str, perturbation: str) -> Any:
    for group in groups.values():
        if (group["generator"], group["precision"], group["perturbation"]) == (
            generator, precision, perturbation,
        ):  # fmt: skip
            return group
    return None


def plot_spectra(groups: dict[str, Any], generator: str) -> Figure | None:
    """The reference spectrum and each precision's difference (None without a reference
    group or another precision to compare)."""
    import matplotlib as mpl

    perturbations, precisions, reference = _layout(groups, generator)
    rows = [p for p in perturbations if _find(groups, generator, reference, p) is not None]
    if not rows or not precisions:
        return None
    differences: dict[tuple[int, int], np.ndarray] = {}
    for r, perturbation in enumerate(rows):
        base = _find(groups, generator, reference, perturbation)["spectrum"]
        for c, precision in enumerate(precisions):
            group = _find(groups, generator, precision, perturbation)
            if group is not None:
                differences[r, c] = log_ratio_db(group["spectrum"], base)
    if not differences:
        return None
    values = np.concatenate([np.abs(d).ravel() for d in differences.values()])
    scale = max(float(np.percentile(values, SCALE_PERCENTILE)), 0.01)
    with mpl.rc_context(RC):
        fig = Figure(figsize=(2.6 * (len(precisions) + 1) + 1.2, 2.4 * len(rows)),
                     layout="constrained")  # fmt: skip
        axes = fig.subplots(len(rows), len(precisions) + 1, squeeze=False)
        spectrum_image = difference_image = None
        for r, perturbation in enumerate(rows):
            base = _find(groups, generator, reference, perturbation)
            suffix = "" if perturbation == UNPERTURBED else f" · {perturbation}"
            ax = axes[r][0]
            spectrum_image = ax.imshow(10 * np.log10(base["spectrum"] + 1e-12),
                                       cmap=SPECTRUM_CMAP, origin="lower",
                                       extent=_extent(base["spectrum"].shape))  # fmt: skip
            ax.set_title(f"{reference}\n(n={base['n']}){suffix}", fontsize=8)
            for c, precision in enumerate(precisions):
                ax = axes[r][c + 1]
                if (r, c) not in differences:
                    ax.set_axis_off()
                    continue
                group = _find(groups, generator, precision, perturbation)
                difference_image = ax.imshow(differences[r, c], cmap=DIFFERENCE_CMAP,
                                             vmin=-scale, vmax=scale, origin="lower",
                                             extent=_extent(group["spectrum"].shape))  # fmt: skip
                ax.set_title(f"{precision}\n− {reference} (n={group['n']}){suffix}", fontsize=8)
        for ax in axes.flat:
            ax.set_xlabel("cycles/pixel")
        fig.colorbar(spectrum_image, ax=axes[:, 0].tolist(), shrink=0.8,
                     label=f"{reference} power, dB")  # fmt: skip
        fig.colorbar(difference_image, ax=axes[:, 1:].ravel().tolist(), shrink=0.8,
                     label=f"minus {reference}, dB")  # fmt: skip
        fig.suptitle(f"{generator}: residual power spectra")
    return fig


def plot_radial(groups: dict[str, Any], generator: str) -> Figure:
    """Radial profiles (dB) per precision, one panel per perturbation."""
    perturbations, precisions, reference = _layout(groups, generator)
    fig, axes = panel_grid(len(perturbations), panel=(4.2, 3.0))
    for ax, perturbation in zip(axes, perturbations, strict=True):
        for precision in [reference, *precisions]:
            group = _find(groups, generator, precision, perturbation)
            if group is None:
                continue
            ax.plot(group["frequency"], 10 * np.log10(group["radial"] + 1e-12),
                    color=color(precision), label=f"{precision} (n={group['n']})")  # fmt: skip
        for group in groups.values():  # real photographs, for scale
            if group["generator"] == "real" and group["perturbation"] == perturbation:
                ax.plot(group["frequency"], 10 * np.log10(group["radial"] + 1e-12),
                        color=color("real"), linestyle="--",
                        label=f"real/{group['precision']} (n={group['n']})")  # fmt: skip
        for k in range(1, 5):
            ax.axvline(k / 8, color="#999999", linestyle=":", linewidth=0.8)
        ax.set_xlabel("frequency, cycles/pixel")
        ax.set_ylabel("mean residual power, dB")
        ax.set_title(perturbation if perturbation != UNPERTURBED else generator)
        ax.legend(fontsize="small")
    fig.suptitle(f"{generator}: radial profiles (dotted: multiples of 1/8)")
    return fig


def fingerprint_section(
    groups: dict[str, Any],
    table: pd.DataFrame,
    out: Path,
    figures: dict[str, str],
    tables: dict[str, tuple[Path, Path]],
    notes: list[str],
) -> None:
    """Draw the spectra and radial figures and the distance table (`load_fingerprints`'s
    groups and table) into ``out``."""
    if not groups:
        return
    from qdd.report.style import save
    from qdd.report.tables import write_table

    generators = order_generators({g["generator"] for g in groups.values()} - {"real"})
    for generator in generators:
        figure = plot_spectra(groups, generator)
        if figure is None:
            _, precisions, reference = _layout(groups, generator)
            missing = f"another precision than {reference}" if not precisions else reference
            notes.append(f"no spectra_{generator}: no {generator} group at {missing} "
                         "(add those shards to the fingerprint run)")  # fmt: skip
        else:
            save(figure, out, f"spectra_{generator}")
            reference = _layout(groups, generator)[2]
            figures[f"spectra_{generator}"] = (
                f"{generator}: {reference} residual spectrum and each precision's difference"
            )
        save(plot_radial(groups, generator), out, f"radial_{generator}")
        figures[f"radial_{generator}"] = f"{generator}: radial profiles of the residual spectra"
    if not table.empty:
        tables["spectral_distance"] = write_table(table, out / "tables", "spectral_distance")
