"""The one split rule: every sample is train, val or test by its prompt (real photos: key).

A sample's *unit* is ``prompt:<prompt_id>`` for a generated image and ``key:<key>`` for a
real photograph (which has no prompt). A unit's split is a pure function of the unit and
the two fractions, so

- an image's FP4 and FP32 twins, and one prompt across generators, are always on the same
  side, whichever folders a run names: no prompt is both trained and tested on;
- a folder's test split is the same in every run with the same fractions, so the runs that
  benchmark it stay comparable, and a checkpoint can say which units it trained on
  (`identities`) for a later test to check against.

Indexing reads each sample's JSON member only (one ``pread``); no image is decoded.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qdd.datamodules.reader import Entry, index_shard, read_manifest
from qdd.datamodules.schema import REAL, upgrade
from qdd.identity import group_label

log = logging.getLogger(__name__)

#: What a state_dict calls this rule (a checkpoint written under another rule is not
#: comparable unit by unit).
RULE = "qdd-split/1: prompt_id (golden-ratio position), real photographs by SHA-1 of the key"
GOLDEN = 0.6180339887498949
#: What `take` calls a training-free detector's calibration set: the train and val splits
#: together (every unit outside the test split; nothing is trained).
CALIBRATION = "calibration"


def split_position(unit: str) -> float:
    """A unit's fixed position in [0, 1).

    Integer prompt ids use the golden-ratio sequence ``frac(id × 0.618…)``, which spreads
    any run of consecutive ids evenly (24 prompts at test_fraction 0.2 give 5 test prompts,
    not a binomial draw); anything else (real photos' keys) a SHA-1 hash.
    """
    kind, _, value = unit.partition(":")
    if kind == "prompt" and value.lstrip("-").isdigit():
        return (int(value) * GOLDEN) % 1.0
    return int.from_bytes(hashlib.sha1(unit.encode()).digest()[:8], "big") / 2**64


def split_of(unit: str, val_fraction: float, test_fraction: float) -> str:
    """The split of a prompt (or real image): test below ``test_fraction``, then val."""
    position = split_position(unit)
    if position < test_fraction:
        return "test"
    if position < test_fraction + val_fraction:
        return "val"
    return "train"


def split_unit(key: str, meta: dict[str, Any]) -> str:
    """Twins share a prompt_id; real photographs (no prompt) are their own unit."""
    prompt_id = meta.get("prompt_id")
    if meta.get("label") != REAL and prompt_id is not None:
        return f"prompt:{prompt_id}"
    return f"key:{key}"


def identity(unit: str, meta: dict[str, Any]) -> int:
    """What a checkpoint remembers of a trained sample: its unit with the prompt's text, as a
    non-negative 63-bit integer (compact in a checkpoint).

    The text matters because prompt ids count lines of a prompt file: two prompt sets (a
    demo's train and test prompts) reuse the same ids for different prompts.
    """
    text = f"{unit}\0{meta.get('prompt') or ''}" if unit.startswith("prompt:") else unit
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def identities(samples: Iterable[Indexed]) -> torch.Tensor:
    """The sorted, distinct identities of ``samples`` as an int64 tensor."""
    found = {s.identity for s in samples if s.identity is not None}
    return torch.tensor(sorted(found), dtype=torch.int64)


def digest(hashes: torch.Tensor) -> str:
    """SHA-256 of a sorted hash tensor: names a set of units in one short string."""
    return hashlib.sha256(hashes.numpy().tobytes()).hexdigest()


@dataclass(frozen=True)
class Indexed:
    """An indexed sample: where it lies, and what the split, sampler and re-encoder need.

    A sample whose JSON member is missing or unreadable has ``label`` −1 and ``unit``
    ``None``: it belongs to no split, but a benchmark of whole folders (``split: all``)
    still reads it, so that it is counted and named as skipped instead of vanishing.
    """

    entry: Entry
    label: int
    group: str | None
    generator: str | None
    unit: str | None
    identity: int | None = None  # see `identity`
    source_format: str | None = None
    jpeg_quality: int | None = None
    recorded_format: bool = True  # False for samples sharded before formats were recorded

    @property
    def readable(self) -> bool:
        return self.unit is not None

    def format_meta(self) -> dict[str, Any]:
        """What `qdd.reencode.build_reencoder` reads of this sample."""
        meta: dict[str, Any] = {"label": self.label, "jpeg_quality": self.jpeg_quality}
        if self.recorded_format:
            meta["source_format"] = self.source_format
        return meta


def _indexed(entry: Entry, raw: bytes | None) -> Indexed:
    meta: dict[str, Any] | None = None
    if raw is not None:
        try:
            meta = upgrade(json.loads(raw))
        except json.JSONDecodeError:
            meta = None
    if not isinstance(meta, dict) or meta.get("label") not in (0, 1):
        reason = "no .json member" if raw is None else "unreadable .json member"
        log.warning("%s in %s: %s (counted as skipped where read)", entry.key, entry.shard, reason)
        return Indexed(entry, -1, None, None, None)
    unit = split_unit(entry.key, meta)
    return Indexed(
        entry,
        int(meta["label"]),
        group_label(meta),
        meta.get("generator"),
        unit,
        identity(unit, meta),
        meta.get("source_format"),
        meta.get("jpeg_quality"),
        "source_format" in meta,
    )


def index_folder(folder: Path) -> list[Indexed]:
    """Every sample of one shard folder (checked against its manifest), in a stable order."""
    samples: list[Indexed] = []
    for shard in read_manifest(folder)["shards"]:
        path = folder / shard["name"]
        entries = index_shard(path, shard["count"])
        with open(path, "rb") as handle:
            for entry in entries:
                raw = None
                if entry.meta is not None:
                    handle.seek(entry.meta[0])
                    raw = handle.read(entry.meta[1])
                samples.append(_indexed(entry, raw))
    return samples


def take(
    samples: Sequence[Indexed],
    split: str,
    val_fraction: float,
    test_fraction: float,
    holdout: Iterable[str] = (),
) -> list[Indexed]:
    """The samples of ``split`` less those of the ``holdout`` generators; ``all``: every
    sample, unreadable ones included (a benchmark of whole folders); `CALIBRATION`: those
    of the train and val splits."""
    if split == "all":
        return list(samples)
    held = set(holdout)
    wanted = {"train", "val"} if split == CALIBRATION else {split}
    return [
        s
        for s in samples
        if s.unit is not None
        and split_of(s.unit, val_fraction, test_fraction) in wanted
        and s.generator not in held
    ]


def split_state(
    train: Sequence[Indexed],
    inherited: torch.Tensor,
    val_fraction: float,
    test_fraction: float,
    holdout: Sequence[str],
) -> dict[str, Any]:
    """What a fit checkpoint stores of its data: the split settings and the units trained on
    (its own ``train`` samples and those ``inherited`` from its start checkpoint), hashed."""
    units = torch.unique(torch.cat([identities(train), inherited]))  # sorted
    return {
        "rule": RULE,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "holdout_generators": list(holdout),
        "train_units": units,
        "n_train_units": len(units),
        "train_digest": digest(units),
    }
