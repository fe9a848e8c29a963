"""``qdd-cli quality``: what a precision costs in image quality, against its reference twin.

Every generated image is compared with its twin at the reference precision (default
fp32): the same generator and the same paired key, which generation derives from the
prompt id and the seed alone (``p00042-s1042``), so the twin lies under the same key in the
sibling shard folder. Per image: PSNR and SSIM (8-bit values; SSIM with an 11×11 Gaussian
window, σ 1.5) and LPIPS when local network weights are given; per group (generator ×
precision): FID and KID between the precision's images and their reference twins when a
local CLIP model is given (open_clip; the one the CLIP detectors load), and each image's
CLIP score against its prompt beside its twin's.

Outputs in ``--out``: ``quality.parquet`` (one row per image) and ``metrics.json`` (kind
``quality``; per group n, means with 95 % t-intervals, FID/KID; the costs each group's
samples recorded — ``denoiser_bytes``, ``seconds_per_image``, ``peak_memory_bytes`` — so
that ``qdd-cli report`` reads only run folders; the images without a twin, by name).

Nothing is downloaded: LPIPS and CLIP load only from the files named.
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
#: Costs that `qdd-cli generate` records in every sample's JSON (absent in older shards).
COST_FIELDS = ("denoiser_bytes", "seconds_per_image", "peak_memory_bytes")
#: Per-image measures summarised per group (LPIPS only when it ran).
PER_IMAGE = ("psnr", "ssim", "lpips", "clip_score", "clip_score_reference")
#: KID subsets (the subset size is the smaller of 1000 and the group's count).
KID_SUBSETS = 100


@dataclass
class QualityResult:
    """What a quality run wrote: its folder, metrics.json's content, quality.parquet."""

    run_dir: Path
    metrics: dict[str, Any]
    scores: Path | None
    notes: list[str] = field(default_factory=list)


def _int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def find_pairs(
    folders: list[Path], reference: str
) -> tuple[list[Any], list[dict[str, Any]], dict[str, Any]]:
    """Every fake image below the reference precision with its twin at ``reference``.

    Returns ``(pairs, unpaired, info)``: ``unpaired`` names each image whose twin is
    missing; ``info`` holds the costs per group, the counts of real images (not compared)
    and of repeated keys (the first copy is used), and samples whose JSON is unreadable.
    """
    from qdd.datamodules.reader import index_folders, read_meta
    from qdd.modules.quality import Pair

    entries, _ = index_folders(folders)
    images: dict[tuple[str, str, str], tuple[Any, dict[str, Any]]] = {}
    costs: dict[str, dict[str, list[float]]] = {}
    n_real = n_repeated = 0
    unreadable: list[dict[str, str]] = []
    for entry in entries:
        try:
            meta = read_meta(entry)
        except ValueError as error:
            unreadable.append({"key": entry.key, "shard": entry.shard, "error": str(error)})
            continue
        if meta.get("label") != 1:
            n_real += 1
            continue
        generator = str(meta.get("generator") or meta.get("source"))
        precision = str(meta.get("precision") or "unknown")
        slot = (generator, precision, entry.key)
        if slot in images:
            n_repeated += 1
            continue
        images[slot] = (entry, meta)
        group = costs.setdefault(f"{generator}/{precision}", {c: [] for c in COST_FIELDS})
        for name in COST_FIELDS:
            value = meta.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                group[name].append(float(value))
    if not any(precision == reference for _, precision, _ in images):
        have = sorted({p for _, p, _ in images})
        raise QddError(
            f"no {reference} images in --data (precisions found: {', '.join(have) or 'none'}): "
            f"add the {reference} shard folder of the same generators, or pick --reference"
        )
    pairs, unpaired = [], []
    for (generator, precision, key), (entry, meta) in sorted(images.items()):
        if precision == reference:
            continue
        twin = images.get((generator, reference, key))
        if twin is None:
            unpaired.append(
                {"generator": generator, "precision": precision, "key": key, "shard": entry.shard}
            )
            continue
        pairs.append(
            Pair(
                generator,
                precision,
                _int(meta.get("prompt_id")),
                _int(meta.get("seed")),
                key,
                entry,
                twin[0],
                meta.get("prompt"),
            )
        )
    info = {
        "costs": summarise_costs(costs),
        "n_real": n_real,
        "n_repeated": n_repeated,
        "unreadable": unreadable,
    }
    return pairs, unpaired, info


def summarise_costs(costs: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, Any]]:
    """Per group: the denoiser's bytes (one per recipe), mean seconds per image, the peak
    memory (the largest recorded); None where the group's samples did not record them."""
    out = {}
    for group, values in sorted(costs.items()):
        size, seconds, peak = (values[c] for c in COST_FIELDS)
        out[group] = {
            "denoiser_bytes": int(max(size)) if size else None,
            "seconds_per_image": sum(seconds) / len(seconds) if seconds else None,
            "peak_memory_bytes": int(max(peak)) if peak else None,
            "n_recorded": len(seconds),
        }
    return out


def load_lpips(weights: str | Path, net: str = "alex") -> Any:
    """LPIPS (torchmetrics' network and its bundled linear layers) with the backbone's
    ImageNet weights read from a local torchvision state_dict (``alexnet`` or ``vgg16``):
    torchmetrics would otherwise download them."""
    import torch
    from torchmetrics.functional.image.lpips import _LPIPS

    path = Path(weights).expanduser()
    if not path.is_file():
        raise QddError(
            f"LPIPS weights {path} do not exist: pass torchvision's {net} state_dict file "
            "(e.g. alexnet-owt-7be5be79.pth), or drop --lpips-weights to skip LPIPS"
        )
    network = _LPIPS(pretrained=True, net=net, pnet_rand=True)  # no download: random trunk
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise QddError(f"cannot read LPIPS weights {path} ({error})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    mapped, missing = {}, []
    for name, _ in network.net.named_parameters():
        _, index, rest = name.split(".", 2)  # slice1.0.weight → torchvision's features.0.weight
        source = f"features.{index}.{rest}"
        if source in state:
            mapped[name] = state[source]
        else:
            missing.append(source)
    if missing:
        raise QddError(
            f"{path} is not a torchvision {net} state_dict (lacks {missing[0]}): pass the "
            f"file torchvision's {net} weights download to, or choose --lpips-net"
        )
    try:
        network.net.load_state_dict(mapped)
    except RuntimeError as error:
        reason = str(error).splitlines()[0]
        raise QddError(f"LPIPS weights {path} do not fit {net} ({reason})") from None
    return network.eval().requires_grad_(False)


def load_clip(weights: str, model: str) -> Any:
    """The CLIP model of a local open_clip weight file (the ViT-L/14 the CLIP detectors
    load, `qdd.detectors.clip_backbone`), frozen: features for FID/KID, the CLIP score."""
    import open_clip

    from qdd.detectors.clip_backbone import _create_pretrained, _register_configs, image_size
    from qdd.modules.quality import ClipFeatures

    _register_configs()
    if model not in open_clip.list_models():
        raise QddError(f"unknown --feature-model {model!r}: use an open_clip name (ViT-L-14)")
    clip = _create_pretrained(open_clip, model, weights).eval().requires_grad_(False)
    return ClipFeatures(clip, open_clip.get_tokenizer(model), image_size(clip.visual))


def _interval(values: Any) -> dict[str, Any]:
    """n, mean and 95 % t-interval of finite values (PSNR of identical images is +inf)."""
    import numpy as np

    from qdd.report.stats import mean_interval

    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    mean = float(finite.mean()) if len(finite) else math.nan
    lo, hi = mean_interval(finite)
    return {
        "mean": mean,
        "lo": lo,
        "hi": hi,
        "n": len(finite),
        "n_infinite": int(np.isinf(values).sum()),
    }


def distribution_distances(
    fake: Any, reference: Any, subsets: int = KID_SUBSETS
) -> dict[str, float | None]:
    """FID and KID (mean, std over subsets) between two sets of feature vectors, through
    torchmetrics with the vectors as precomputed features; None below 2 images."""
    import torch
    from torch import nn
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    fake, reference = torch.as_tensor(fake).double(), torch.as_tensor(reference).double()
    if len(fake) < 2 or len(reference) < 2:
        return {"fid": None, "kid": None, "kid_std": None}

    class Precomputed(nn.Identity):
        """The features were computed per image in the (distributed) test loop."""

        num_features = fake.shape[1]

    fid = FrechetInceptionDistance(feature=Precomputed())
    fid.update(reference, real=True)
    fid.update(fake, real=False)
    size = min(1000, len(fake), len(reference))
    kid = KernelInceptionDistance(feature=Precomputed(), subsets=subsets, subset_size=size)
    kid.update(reference, real=True)
    kid.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # KID draws its subsets: the same data gives the same value
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}


def group_summary(scores: Any, features: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
    """Per group (generator/precision): n, each per-image measure's mean and 95 % interval,
    FID/KID where features were computed."""
    groups = {}
    for (generator, precision), part in scores.groupby(["generator", "precision"], sort=True):
        name = f"{generator}/{precision}"
        entry: dict[str, Any] = {"generator": generator, "precision": precision, "n": len(part)}
        for measure in PER_IMAGE:
            if measure in part.columns:
                s = _interval(part[measure])
                entry[measure], entry[f"{measure}_lo"], entry[f"{measure}_hi"] = (
                    s["mean"],
                    s["lo"],
                    s["hi"],
                )
                if s["n_infinite"]:
                    entry[f"{measure}_n_infinite"] = s["n_infinite"]
        if name in features:
            entry.update(distribution_distances(*features[name]))
        groups[name] = entry
    return groups


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


def run_quality(
    data: str | Path | list[str | Path],
    reference: str = "fp32",
    out: str | Path | None = None,
    *,
    batch_size: int = 8,
    num_workers: int = 0,
    lpips_weights: str | Path | None = None,
    lpips_net: str = "alex",
    feature_weights: str | None = None,
    feature_model: str = "ViT-L-14",
    trainer: dict[str, Any] | None = None,
) -> QualityResult:
    """Compare every image in ``data`` with its twin at ``reference``; see the module doc.

    ``trainer``: Lightning Trainer keyword arguments (``devices``, ``strategy``,
    ``accelerator`` …). Under DDP every rank runs this function; rank 0 writes the files
    and returns the metrics, the other ranks return empty metrics.
    """
    import numpy as np
    import pandas as pd

    from qdd.datamodules.reader import resolve_folders
    from qdd.modules.quality import PairDataModule, QualityModule

    folders = resolve_folders(data if isinstance(data, list) else [data])
    # DDP's other ranks may stamp another second: only rank 0 writes, so it does not matter
    run_dir = Path(out) if out else Path("runs") / f"quality-{time.strftime('%Y%m%d-%H%M%S')}"
    pairs, unpaired, info = find_pairs(folders, reference)
    notes = []
    if not pairs:
        raise QddError(
            f"no image in --data has a {reference} twin (same generator and key): pass the "
            f"{reference} folder beside the lower precisions of the same prompts and seeds"
        )
    lpips = load_lpips(lpips_weights, lpips_net) if lpips_weights else None
    if lpips is None:
        notes.append(
            "LPIPS not computed: pass --lpips-weights with torchvision's alexnet "
            "(or --lpips-net vgg: vgg16) state_dict file; nothing is downloaded"
        )
    features = load_clip(feature_weights, feature_model) if feature_weights else None
    if features is None:
        notes.append(
            "FID/KID and CLIP score not computed: pass --feature-weights with a local "
            "open_clip file (e.g. the CLIP ViT-L/14 the CLIP detectors use)"
        )
    from qdd.generation.command import make_trainer

    lightning_trainer = make_trainer({"default_root_dir": str(run_dir), **(trainer or {})})
    module = QualityModule(lpips=lpips, features=features)
    datamodule = PairDataModule(pairs, batch_size=batch_size, num_workers=num_workers)
    lightning_trainer.test(module, datamodule=datamodule, verbose=False)
    gathered = module.gathered
    if gathered is None:  # not rank 0
        return QualityResult(run_dir, {}, None, notes)
    rows = gathered["rows"]
    vectors: dict[str, tuple[list, list]] = {}
    for row in rows:
        pair = row.pop("_features", None)
        if pair is not None:
            fake, ref = vectors.setdefault(f"{row['generator']}/{row['precision']}", ([], []))
            fake.append(pair[0])
            ref.append(pair[1])
    columns = ["generator", "precision", "prompt_id", "seed", "key", "psnr", "ssim"]
    columns += ["lpips"] if lpips is not None else []
    columns += ["clip_score", "clip_score_reference"] if features is not None else []
    scores = pd.DataFrame(rows, columns=columns)
    scores = scores.astype({"prompt_id": "Int64", "seed": "Int64"})
    scores = scores.sort_values(["generator", "precision", "key"], ignore_index=True)
    features_by_group = {g: (np.stack(f), np.stack(r)) for g, (f, r) in vectors.items()}
    skipped = sorted(gathered["skipped"] + info["unreadable"], key=lambda s: s["key"])
    metrics = {
        "kind": KIND,
        "reference": reference,
        "data": [str(f) for f in folders],
        "n": len(scores),
        "expected": len(pairs),
        "n_skipped": len(skipped),
        "skipped": skipped,
        "n_unpaired": len(unpaired),
        "unpaired": unpaired,
        "n_real_ignored": info["n_real"],
        "n_repeated_keys": info["n_repeated"],
        "ssim": {"kernel_size": 11, "sigma": 1.5, "data_range": 255},
        "lpips": {"net": lpips_net, "weights": str(lpips_weights)} if lpips else None,
        "features": {"model": feature_model, "weights": feature_weights} if features else None,
        "notes": notes,
        "groups": group_summary(scores, features_by_group),
        "costs": info["costs"],
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    scores.to_parquet(run_dir / PARQUET, index=False)
    (run_dir / "metrics.json").write_text(json.dumps(_json(metrics), indent=2) + "\n")
    for item in unpaired[:20]:
        log.warning(
            "no %s twin: %s/%s %s", reference, item["generator"], item["precision"], item["key"]
        )
    if unpaired:
        log.warning("%d image(s) have no %s twin (named in metrics.json)", len(unpaired), reference)
    if skipped:
        log.warning("%d pair(s) could not be compared (named in metrics.json)", len(skipped))
    for note in notes:
        log.info(note)
    return QualityResult(run_dir, _json(metrics), run_dir / PARQUET, notes)


def build_parser() -> argparse.ArgumentParser:
    """``qdd-cli quality``'s flags (the keys of `qdd.api.quality`; ``--trainer.*`` aside)."""
    from qdd.flags import add_flags

    parser = argparse.ArgumentParser(
        prog="qdd-cli quality",
        description="Compare every generated image with its twin at the reference precision "
        "(same generator, prompt and seed): PSNR, SSIM, LPIPS (local weights), FID/KID "
        "(local CLIP). Writes quality.parquet and metrics.json into --out. "
        "Lightning Trainer flags: --trainer.devices N, --trainer.strategy ddp, "
        "--trainer.accelerator cpu|gpu.",
    )
    add_flags(parser, "--data", data={"required": True, "help": "shard folders or globs: "
              "the reference folder and the others (repeatable: occurrences add up)"})  # fmt: skip
    parser.add_argument("--reference", default="fp32", help="precision of the twins")
    parser.add_argument("--out", help="run folder (default runs/quality-TIMESTAMP)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--lpips-weights", help="torchvision alexnet/vgg16 state_dict file")
    parser.add_argument("--lpips-net", choices=["alex", "vgg"], default="alex")
    parser.add_argument(
        "--feature-weights", help="local open_clip weight file: FID/KID features and the CLIP score"
    )
    parser.add_argument(
        "--feature-model", default="ViT-L-14", help="open_clip architecture of --feature-weights"
    )
    return parser
