"""``qdd-cli fingerprint``: each group's residual spectrum and its distance to the fp32 twin.

Groups are generator × precision × perturbation (`qdd.fingerprint.spectra.group_key`);
every group is measured against the group of the same generator and perturbation at the
reference precision (default fp32). Images are centre-cropped to ``--crop`` pixels (default
256), or to the smallest image side in ``--data`` when that is smaller: one size for the
whole run, so every spectrum shares one frequency grid.

Outputs in ``--out``:

- ``spectra.npz``: per group ``generator/precision[/perturbation]`` its mean residual power
  spectrum (2-D, ``np.fft.fftshift`` layout), ``<group>@radial`` its radial profile,
  ``<group>@fingerprint`` the power spectrum of its mean residual (Corvi et al.'s
  fingerprint), and ``frequency`` the radial profiles' frequencies (cycles per pixel);
- ``spectral_distance.csv``: generator, precision, perturbation, n, distance (dB: the
  jackknife estimate, noise floor removed), low, high (its 95 % jackknife interval over
  images), distance_plugin (the plug-in RMS, biased upward by noise) for each group with
  a twin group;
- ``metrics.json`` (kind ``fingerprint``): the crop, filter, the distance's and the
  interval's methods, every group's n (and ``unpaired``/``twin_unpaired``: its images
  whose key its twin group lacks, and the reverse), the groups without a reference twin
  or with too few images for an interval, and every sample that could not be read.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qdd.errors import QddError
from qdd.fingerprint import DISTANCE_COLUMNS, DISTANCES, KIND, SPECTRA
from qdd.fingerprint.spectra import (
    FILTER,
    MIN_IMAGES,
    distance,
    group_name,
    radial_profile,
    twin_key,
)

log = logging.getLogger(__name__)

#: The smallest crop that still resolves a period-8 trace with some bins around it.
MIN_CROP = 16
#: A jackknife interval's t quantile needs one degree of freedom at least.
MIN_FOLDS = 2
#: More folds only cost memory (folds × crop² float64 per group): 200 at 256² is 105 MB.
MAX_FOLDS = 200
#: How the distance columns are computed, as metrics.json records it.
DISTANCE_METHOD = (
    "sqrt(max(0, m_J)), m_J the delete-a-group jackknife bias-corrected estimate of m, the "
    "mean over non-DC bins of (10*log10(spectrum / reference spectrum))^2; dB"
)
PLUGIN_METHOD = "sqrt(m): the plug-in RMS, biased upward by the spectra's sampling noise; dB"
INTERVAL_METHOD = (
    "jackknife-t: m_J +- t(folds-1) * jackknife se, through sqrt(max(0, .)); folds by "
    "(seed, key), twins in one fold (paired)"
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class FingerprintResult:
    """What a fingerprint run wrote: its folder and metrics.json's content (rank 0)."""

    run_dir: Path
    metrics: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def image_size(shard: str, span: tuple[int, int]) -> tuple[int, int] | None:
    """(width, height) of a stored image from its PNG header (24 bytes read), or from
    PIL's header parser for other formats; None if neither can tell."""
    fd = os.open(shard, os.O_RDONLY)
    try:
        head = os.pread(fd, min(24, span[1]), span[0])
        if head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR":
            return struct.unpack(">II", head[16:24])
        from PIL import Image

        try:
            return Image.open(io.BytesIO(os.pread(fd, span[1], span[0]))).size
        except Exception:  # PIL raises many types for bad data; the loader names it
            return None
    finally:
        os.close(fd)


def check_repeated(entries: list[Any]) -> None:
    """Refuse a key that appears twice in one group (a shard folder copied under another
    name): its image would count twice in the group's mean."""
    from qdd.datamodules.reader import read_meta
    from qdd.fingerprint.spectra import UNPERTURBED, group_key

    seen: dict[tuple[tuple[str, str, str], str], str] = {}
    for entry in entries:
        try:
            meta = read_meta(entry)
        except ValueError:
            continue  # the loader names it as skipped
        fields = (meta.get(f) for f in ("source", "generator", "precision", "quant_backend"))
        label = 0 if meta.get("label") == 0 else 1
        key = (group_key(label, *fields, UNPERTURBED), entry.key)
        if key in seen:
            raise QddError(
                f"{entry.key} is twice in group {group_name(key[0])} ({seen[key]} and "
                f"{entry.shard}): pass each shard folder once"
            )
        seen[key] = entry.shard


def crop_size(
    entries: list[Any], crop: int, perturb: list[str] | None = None
) -> tuple[int, dict[str, Any] | None]:
    """The run's crop: ``crop``, or the smallest image side of ``entries`` — after each
    perturbation of ``perturb`` (``resize:0.5`` halves it) — if smaller, returned with the
    image that set it; refuses a run without images."""
    from PIL import Image

    from qdd.perturb import perturbations

    smallest: dict[tuple[int, int], Any] = {}  # one image of each size
    for entry in entries:
        size = image_size(entry.shard, entry.png) if entry.png else None
        if size is not None:
            smallest.setdefault(size, entry)
    if not smallest:
        raise QddError(
            "no images in --data: pass shard folders that hold images (qdd-cli generate or "
            "qdd-cli shard)"
        )
    passes = perturbations(perturb) if perturb else []
    sides = []
    for size, entry in smallest.items():
        side = min(size)
        for perturbation in passes:  # their output size depends on the input size alone
            side = min(side, *perturbation.apply(Image.new("RGB", size), entry.key).size)
        sides.append((side, entry))
    side, entry = min(sides, key=lambda pair: pair[0])
    if side >= crop:
        return crop, None
    if side < MIN_CROP:
        after = " after --perturb" if passes else ""
        raise QddError(
            f"{entry.key} in {entry.shard} is {side} pixels on its short side{after}, below "
            f"the {MIN_CROP}-pixel minimum crop: leave such images (or perturbations) out"
        )
    return side, {"key": entry.key, "shard": entry.shard, "side": side}


def summarise(totals: dict[str, Any], reference: str) -> dict[str, Any]:
    """Mean spectra, radial profiles, fingerprints and distances from the summed totals."""
    groups = totals["groups"]
    arrays: dict[str, np.ndarray] = {}
    rows, info, without, too_few, unpaired = [], {}, [], [], []
    for key, sums in groups.items():
        n = int(sums["fold_n"].sum())
        name = group_name(key)
        mean = sums["fold_power"].sum(0) / n
        arrays[name] = mean
        frequency, profile = radial_profile(mean)
        arrays[f"{name}@radial"] = profile
        arrays["frequency"] = frequency
        arrays[f"{name}@fingerprint"] = (
            np.abs(np.fft.fftshift(np.fft.fft2(sums["residual"] / n))) ** 2 / mean.size
        )
        generator, precision, perturbation = key
        entry = {"generator": generator, "precision": precision,
                 "perturbation": perturbation, "n": n, "reference": None}  # fmt: skip
        twin = twin_key(key, reference)
        if twin is not None and twin != key:
            if twin not in groups:
                without.append(name)
            else:
                ref = groups[twin]
                found = distance(sums["fold_power"], sums["fold_n"],
                                 ref["fold_power"], ref["fold_n"])  # fmt: skip
                if math.isnan(found.distance):
                    too_few.append(name)
                keys, twin_keys = totals["keys"][key], totals["keys"][twin]
                entry["unpaired"] = len(keys - twin_keys)
                entry["twin_unpaired"] = len(twin_keys - keys)
                if entry["unpaired"] or entry["twin_unpaired"]:
                    unpaired.append(f"{name} ({entry['unpaired']} of {n} without a twin, "
                                    f"{entry['twin_unpaired']} of the twin group's without "
                                    "one)")  # fmt: skip
                entry.update(reference=group_name(twin), distance=found.distance,
                             low=found.low, high=found.high,
                             distance_plugin=found.plugin)  # fmt: skip
                rows.append({c: entry[c] for c in DISTANCE_COLUMNS})
        info[name] = entry
    return {"arrays": arrays, "rows": rows, "groups": info, "without_reference": without,
            "too_few": too_few, "unpaired": unpaired}  # fmt: skip


def _finite(value: Any) -> Any:
    """NaN and infinities as None: JSON null, an empty CSV cell."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def run_fingerprint(
    data: str | Path | list[str | Path],
    out: str | Path | None = None,
    *,
    crop: int = 256,
    reference: str = "fp32",
    perturb: list[str] | None = None,
    batch_size: int = 16,
    num_workers: int = 0,
    folds: int = 20,
    seed: int = 0,
    trainer: dict[str, Any] | None = None,
) -> FingerprintResult:
    """Spectra and distances of every group in ``data``; see the module doc.

    ``trainer``: Lightning Trainer keyword arguments (``devices``, ``strategy`` …). Under
    DDP every rank runs this; rank 0 writes the files and returns the metrics.
    """
    from qdd.callbacks.scores import report_count
    from qdd.datamodules.dataset import UNPERTURBED
    from qdd.datamodules.reader import index_folders, resolve_folders
    from qdd.datamodules.shard import ShardDataModule
    from qdd.fingerprint.module import CentreCrop, FingerprintModule
    from qdd.generation.command import make_trainer

    if crop < MIN_CROP:
        raise QddError(f"--crop {crop} is below {MIN_CROP} pixels: pass --crop {MIN_CROP} or more")
    if folds < MIN_FOLDS:
        raise QddError(f"--folds {folds} is below {MIN_FOLDS}: pass --folds {MIN_FOLDS} or more")
    if folds > MAX_FOLDS:  # each group holds folds × crop² float64 sums
        raise QddError(f"--folds {folds} is above {MAX_FOLDS} (each group would hold {folds} "
                       f"spectra): pass --folds {MAX_FOLDS} or fewer; the jackknife needs "
                       "no more")  # fmt: skip
    folders = resolve_folders(data if isinstance(data, list) else [data])
    run_dir = Path(out) if out else Path("runs") / f"fingerprint-{time.strftime('%Y%m%d-%H%M%S')}"
    entries, _ = index_folders(folders)
    check_repeated(entries)
    size, limited_by = crop_size(entries, crop, perturb)
    transform = CentreCrop(size)
    datamodule = ShardDataModule(
        paths=[str(f) for f in folders],
        split="all",
        batch_size=batch_size,
        num_workers=num_workers,
        perturb=perturb,
        transforms={"train": transform, "eval": transform},
    )
    module = FingerprintModule(folds=folds, seed=seed)
    lightning = make_trainer({"default_root_dir": str(run_dir), **(trainer or {})})
    lightning.test(module, datamodule=datamodule, verbose=False)
    if module.totals is None:  # not rank 0
        return FingerprintResult(run_dir, {})
    summary = summarise(module.totals, reference)
    skipped = module.totals["skipped"]
    groups = summary["groups"]
    scored = sum(g["n"] for g in groups.values() if g["perturbation"] == UNPERTURBED)
    notes = []
    if limited_by:
        notes.append(f"crop {size} (not {crop}): {limited_by['key']} in {limited_by['shard']} "
                     f"is {size} pixels on its short side")  # fmt: skip
    warnings = []
    if summary["without_reference"]:
        warnings.append(f"{len(summary['without_reference'])} group(s) have no {reference} twin "
                     f"group, so no distance: {', '.join(summary['without_reference'])}; add "
                     f"their {reference} shard folder to --data")  # fmt: skip
    if summary["too_few"]:
        warnings.append(f"{len(summary['too_few'])} group(s) or their twins have fewer than "
                        f"{MIN_IMAGES} images or all in one fold, so no distance but the "
                        f"plug-in: {', '.join(summary['too_few'])}; add images")  # fmt: skip
    if summary["unpaired"]:
        warnings.append(f"{len(summary['unpaired'])} group(s) hold images without a twin (same "
                        f"model, prompt, seed, steps, guidance, size) in their {reference} "
                        f"group (kept in both means, but not paired in the jackknife): "
                        f"{'; '.join(summary['unpaired'])}; add the "
                        "missing twins' shards, or generate both precisions from one prompt "
                        "set")  # fmt: skip
    metrics = {
        "kind": KIND,
        "reference": reference,
        "data": [str(f) for f in folders],
        "crop": size,
        "crop_requested": crop,
        "crop_limited_by": limited_by,
        "filter": FILTER,
        "distance": DISTANCE_METHOD,
        "distance_plugin": PLUGIN_METHOD,
        "interval": {"kind": INTERVAL_METHOD, "folds": folds, "seed": seed, "level": 0.95},
        "perturbations": datamodule.perturbation_names,
        "n": scored,
        "expected": datamodule.expected,
        "n_skipped": len(skipped),
        "skipped": skipped,
        "groups": {k: {f: _finite(v) for f, v in g.items()} for k, g in groups.items()},
        "without_reference": summary["without_reference"],
        "too_few_images": summary["too_few"],
        "notes": notes + warnings,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    np.savez(run_dir / SPECTRA, **summary["arrays"])
    with open(run_dir / DISTANCES, "w", newline="") as handle:
        writer = csv.DictWriter(handle, DISTANCE_COLUMNS)
        writer.writeheader()
        writer.writerows({k: _finite(v) for k, v in row.items()} for row in summary["rows"])
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    report_count(scored, datamodule.expected, skipped)
    for note in notes:
        log.info(note)
    for warning in warnings:
        log.warning(warning)
    return FingerprintResult(run_dir, metrics, notes + warnings)


def build_parser() -> argparse.ArgumentParser:
    """``qdd-cli fingerprint``'s flags (`qdd.cli.fingerprint_command` runs it)."""
    parser = argparse.ArgumentParser(
        prog="qdd-cli fingerprint",
        description="Residual power spectra per generator x precision (x perturbation) and "
        "each group's distance to its fp32 twin group (noise floor removed), with a "
        "jackknife interval. Writes "
        "spectra.npz, spectral_distance.csv and metrics.json into --out. Lightning Trainer "
        "flags: --trainer.devices N, --trainer.strategy ddp, --trainer.accelerator cpu|gpu.",
    )
    parser.add_argument("--data", nargs="+", action="extend", required=True,
                        help="shard folders or globs (repeatable)")  # fmt: skip
    parser.add_argument("--crop", type=int, default=256,
                        help="centre-crop side in pixels (never resized; default 256, or "
                        "the smallest image side when smaller)")  # fmt: skip
    parser.add_argument("--reference", default="fp32", help="precision of the twin groups")
    parser.add_argument("--perturb", nargs="+", action="extend",
                        help="test-time perturbations as in qdd-cli test (jpeg:75 …)")  # fmt: skip
    parser.add_argument("--out", help="run folder (default runs/fingerprint-TIMESTAMP)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--folds", type=int, default=20,
                        help="jackknife folds of the distance's estimate and interval "
                        "(default 20; each group holds folds x crop² float64 sums)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of each image's fold")
    return parser
