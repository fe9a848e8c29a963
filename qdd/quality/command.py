"""``qdd-cli quality``: run the pairs through the Lightning loop and write the run folder.

Outputs in ``--out``: ``quality.parquet`` (one row per image: its group's generator and
precision label, backend, key, its twin's key, the per-image measures) and
``metrics.json`` (kind ``quality``; per group n, means with 95 % t-intervals, the
distances; the feature networks' files with sha256 and ``verified``; the costs each
group's samples recorded, `qdd.generation.costs`; the images without a twin, by name).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qdd.errors import QddError

log = logging.getLogger(__name__)

#: ``kind`` in metrics.json that marks a quality run (``qdd-cli report`` tells runs apart by it).
KIND = "quality"
PARQUET = "quality.parquet"
#: quality.parquet's columns before the measures.
COLUMNS = ["generator", "precision", "quant_backend", "prompt_id", "seed", "key", "reference_key"]


@dataclass
class QualityResult:
    """What a quality run wrote: its folder, metrics.json's content, quality.parquet."""

    run_dir: Path
    metrics: dict[str, Any]
    scores: Path | None
    notes: list[str] = field(default_factory=list)


def _json(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json(v) for v in value]
    if hasattr(value, "item"):
        return _json(value.item())
    return value


def group_distances(
    rows: list[dict[str, Any]], real: list[dict[str, Any]], reference: str
) -> dict[str, dict[str, Any]]:
    """Per group: the distances of its images to their twins (``fid``, ``fd_clip`` …) and,
    with real photos, to them (``fid_real`` …; also for the reference precision's images)."""
    import numpy as np

    from qdd.quality.metrics import distribution_distances

    vectors: dict[str, dict[str, tuple[list, list]]] = {}
    twins: dict[str, dict[str, Any]] = {}
    for row in rows:
        group = f"{row['generator']}/{row['precision']}"
        for network in ("inception", "clip"):
            pair = row.pop(f"_{network}", None)
            if pair is not None:
                fake, ref = vectors.setdefault(group, {}).setdefault(network, ([], []))
                fake.append(pair[0])
                ref.append(pair[1])
                if network == "inception":
                    slot = twins.setdefault(f"{row['generator']}/{reference}", {})
                    slot.setdefault(row["reference_key"], pair[1])
    out: dict[str, dict[str, Any]] = {}
    for group, by_network in vectors.items():
        for network, (fake, ref) in by_network.items():
            out.setdefault(group, {}).update(
                distribution_distances(np.stack(fake), np.stack(ref), network)
            )
    if real:
        photos = np.stack([r["_inception"] for r in real])
        sets = {g: v["inception"][0] for g, v in vectors.items() if "inception" in v}
        sets |= {g: list(by_key.values()) for g, by_key in twins.items()}
        for group, fake in sets.items():
            distances = distribution_distances(np.stack(fake), photos, "inception")
            named = {
                "fid_real": distances["fid"],
                "kid_real": distances["kid"],
                "kid_real_std": distances["kid_std"],
            }
            out.setdefault(group, {}).update(named)
    return out


def run_quality(
    data: str | Path | list[str | Path],
    reference: str = "fp32",
    out: str | Path | None = None,
    *,
    real: str | Path | list[str | Path] | None = None,
    batch_size: int = 8,
    num_workers: int = 0,
    lpips_weights: str | Path | None = None,
    lpips_net: str = "alex",
    fid_weights: str | Path | None = None,
    feature_weights: str | None = None,
    feature_model: str = "ViT-L-14",
    trainer: dict[str, Any] | None = None,
) -> QualityResult:
    """Compare every image in ``data`` with its twin at ``reference`` (see `qdd.quality`).

    ``trainer``: Lightning Trainer keyword arguments (``devices``, ``strategy``,
    ``accelerator`` …). Under DDP every rank runs this function; rank 0 writes the files
    and returns the metrics, the other ranks return empty metrics.
    """
    import pandas as pd

    from qdd.datamodules.reader import resolve_folders
    from qdd.generation.costs import summarise_samples
    from qdd.quality.metrics import group_summary
    from qdd.quality.module import PairDataModule, QualityModule
    from qdd.quality.networks import load_clip, load_inception, load_lpips
    from qdd.quality.pairing import find_pairs, real_images, refuse_unpaired

    folders = resolve_folders(data if isinstance(data, list) else [data])
    real_folders = resolve_folders(real if isinstance(real, list) else [real]) if real else []
    # DDP's other ranks may stamp another second: only rank 0 writes, so it does not matter
    run_dir = Path(out) if out else Path("runs") / f"quality-{time.strftime('%Y%m%d-%H%M%S')}"
    pairing = find_pairs(folders, reference)
    refuse_unpaired(pairing, reference)
    photos, unreadable_real = real_images(real_folders) if real_folders else ([], [])
    if photos and not fid_weights:
        raise QddError(
            "--real needs --fid-weights: the FID against real photos is on "
            "Inception-V3 features (torch-fidelity's weights file)"
        )
    notes = []
    lpips, lpips_record = load_lpips(lpips_weights, lpips_net) if lpips_weights else (None, None)
    if lpips is None:
        notes.append(
            "LPIPS not computed: pass --lpips-weights with torchvision's alexnet "
            "(or --lpips-net vgg: vgg16) state_dict file; nothing is downloaded"
        )
    inception, fid_record = load_inception(fid_weights) if fid_weights else (None, None)
    if inception is None:
        notes.append(
            "FID/KID not computed: pass --fid-weights with torch-fidelity's "
            "weights-inception-2015-12-05-6726825d.pth"
        )
    clip, clip_record = (
        load_clip(feature_weights, feature_model) if feature_weights else (None, None)
    )
    if clip is None:
        notes.append(
            "fd_clip/kd_clip and CLIP score not computed: pass --feature-weights with "
            "a local open_clip file (e.g. the CLIP ViT-L/14 the CLIP detectors use)"
        )
    from qdd.generation.command import make_trainer

    lightning_trainer = make_trainer({"default_root_dir": str(run_dir), **(trainer or {})})
    module = QualityModule(lpips=lpips, clip=clip, inception=inception)
    datamodule = PairDataModule(pairing.pairs + photos, batch_size, num_workers)
    lightning_trainer.test(module, datamodule=datamodule, verbose=False)
    gathered = module.gathered
    if gathered is None:  # not rank 0
        return QualityResult(run_dir, {}, None, notes)
    rows = gathered["rows"]
    distances = group_distances(rows, gathered["real"], reference)
    columns = COLUMNS + ["psnr", "ssim"] + (["lpips"] if lpips is not None else [])
    columns += ["clip_score", "clip_score_reference"] if clip is not None else []
    scores = pd.DataFrame(rows, columns=columns)
    scores = scores.astype({"prompt_id": "Int64", "seed": "Int64"})
    scores = scores.sort_values(["generator", "precision", "key"], ignore_index=True)
    skipped = sorted(
        gathered["skipped"] + pairing.unreadable + unreadable_real, key=lambda s: s["key"]
    )
    groups = group_summary(scores, distances)
    for group, values in distances.items():  # the reference's FID against real photos
        groups.setdefault(
            group,
            {"generator": group.rpartition("/")[0], "precision": reference, "n": None, **values},
        )
    checked = [r for r in (lpips_record, fid_record) if r is not None]
    metrics = {
        "kind": KIND,
        "reference": reference,
        "data": [str(f) for f in folders],
        "real": [str(f) for f in real_folders],
        "n": len(scores),
        "expected": len(pairing.pairs),
        "n_real_photos": len(gathered["real"]),
        "n_skipped": len(skipped),
        "skipped": skipped,
        "n_unpaired": len(pairing.unpaired),
        "unpaired": pairing.unpaired,
        "n_real_ignored": pairing.n_real,
        "n_repeated_keys": pairing.n_repeated,
        "ssim": {"kernel_size": 11, "sigma": 1.5, "data_range": 255, "windows": "interior"},
        "lpips": lpips_record,
        "fid": fid_record and {**fid_record, "features": "Inception-V3 pool3 (torch-fidelity)"},
        "clip": clip_record,
        "verified": all(r["verified"] for r in checked),
        "notes": notes,
        "groups": groups,
        "costs": summarise_samples(pairing.metas),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    scores.to_parquet(run_dir / PARQUET, index=False)
    (run_dir / "metrics.json").write_text(json.dumps(_json(metrics), indent=2) + "\n")
    if pairing.unpaired:
        log.warning(pairing.summary(reference))
    if skipped:
        log.warning("%d pair(s) could not be compared (named in metrics.json)", len(skipped))
    for note in notes:
        log.info(note)
    return QualityResult(run_dir, _json(metrics), run_dir / PARQUET, notes)


def build_parser() -> argparse.ArgumentParser:
    """``qdd-cli quality``'s flags, the keys of `qdd.api.quality` (``--data``/``--real``
    repeatable: occurrences add up; ``--trainer.*`` aside)."""
    from qdd.flags import add_flags

    parser = argparse.ArgumentParser(
        prog="qdd-cli quality",
        description="Compare every generated image with its twin at the reference precision "
        "(same generator, model, prompt, seed, steps, guidance and size): PSNR, SSIM, LPIPS, "
        "FID/KID on Inception-V3, fd_clip/kd_clip on CLIP (local files only). Writes "
        "quality.parquet and metrics.json into --out. Lightning Trainer flags: "
        "--trainer.devices N, --trainer.strategy ddp, --trainer.accelerator cpu|gpu.",
    )
    add_flags(parser, "--data", data={"required": True, "help": "shard folders or globs: "
              "the reference folder and the others (repeatable: occurrences add up)"})  # fmt: skip
    parser.add_argument(
        "--reference",
        default="fp32",
        help="precision label of the twins (fp32; fp4@emulate for an emulation)",
    )
    parser.add_argument(
        "--real",
        nargs="+",
        action="extend",
        help="real-photo shards: FID of each precision against them",
    )
    parser.add_argument("--out", help="run folder (default runs/quality-TIMESTAMP)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--lpips-weights", help="torchvision alexnet/vgg16 state_dict file")
    parser.add_argument("--lpips-net", choices=["alex", "vgg"], default="alex")
    parser.add_argument(
        "--fid-weights",
        help="torch-fidelity's FID Inception-V3 weights file "
        "(weights-inception-2015-12-05-6726825d.pth): FID/KID",
    )
    parser.add_argument(
        "--feature-weights", help="local open_clip weight file: fd_clip/kd_clip and the CLIP score"
    )
    parser.add_argument(
        "--feature-model", default="ViT-L-14", help="open_clip architecture of --feature-weights"
    )
    return parser
