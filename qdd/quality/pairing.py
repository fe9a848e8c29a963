"""Which images a quality run compares: each generated image with its twin (`qdd.identity`).

A twin is found by identity (generator, model, prompt, seed, steps, guidance, size), not by
the shard key: two folders of different prompts or step counts share keys. An image whose
key matches a reference image that differs in any of these is counted as unpaired and the
differing fields are named; a run in which nothing pairs is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qdd.datamodules.reader import Entry
from qdd.errors import QddError
from qdd.identity import group_key, group_label, precision_label, twin_key, twin_mismatches

#: The metadata of a pair that travels with it into quality.parquet.
PAIR_FIELDS = ("generator", "precision", "quant_backend", "prompt_id", "seed", "key")


@dataclass(frozen=True)
class Pair:
    """An image and its twin at the reference precision; ``precision`` is the group's
    precision label (``fp4@emulate``, `qdd.identity.precision_label`). A real photo (for
    FID against real images) has no twin: ``reference`` is None."""

    generator: str
    precision: str
    quant_backend: str | None
    prompt_id: int | None
    seed: int | None
    key: str
    image: Entry
    reference: Entry | None
    prompt: str | None = None
    reference_key: str | None = None

    @property
    def group(self) -> str:
        return f"{self.generator}/{self.precision}"

    def meta(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in (*PAIR_FIELDS, "reference_key", "prompt")}


@dataclass
class Pairing:
    """The pairs, and what did not pair and why (all of it goes into metrics.json)."""

    pairs: list[Pair]
    unpaired: list[dict[str, Any]]
    n_real: int
    n_repeated: int
    unreadable: list[dict[str, str]]
    metas: list[dict[str, Any]] = field(default_factory=list)

    def summary(self, reference: str) -> str:
        """One line: how many images have no twin, how many of them differ from the
        reference image of their key (with the first example), where they are named."""
        differ = [u for u in self.unpaired if u.get("differs")]
        line = f"{len(self.unpaired)} image(s) have no {reference} twin"
        if differ:
            first = differ[0]
            line += (
                f"; {len(differ)} share a key with a {reference} image that is not their twin "
                f"(e.g. {first['generator']}/{first['precision']} {first['key']}: "
                f"{', '.join(first['differs'])})"
            )
        return line + " (named in metrics.json)"


def _int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _pair(meta: dict[str, Any], entry: Entry, twin: Entry | None, twin_key_: str | None) -> Pair:
    generator, precision, backend = group_key(meta)
    return Pair(
        generator,
        precision_label(precision, backend) if meta["label"] == 1 else precision,
        backend,
        _int(meta.get("prompt_id")),
        _int(meta.get("seed")),
        entry.key,
        entry,
        twin,
        meta.get("prompt"),
        twin_key_,
    )


def find_pairs(folders: list[Path], reference: str) -> Pairing:
    """Every generated image not at ``reference`` with its twin at ``reference``.

    ``reference`` is a precision label (``fp32``, or ``fp4@emulate`` for the emulation's
    images). Real photos are counted, not compared; a sample whose group and key repeat
    is counted once (the first copy), as is a reference image whose identity repeats.
    """
    read, unreadable = read_samples(folders)
    images: dict[tuple[str, str], tuple[Entry, dict[str, Any]]] = {}
    metas: list[dict[str, Any]] = []
    n_real = n_repeated = 0
    for entry, meta in read:
        if meta.get("label") != 1:
            n_real += 1
            continue
        slot = (group_label(meta), entry.key)
        if slot in images:
            refuse_two_recipes(slot, images[slot], (entry, meta))
            n_repeated += 1
            continue
        images[slot] = (entry, meta)
        metas.append(meta)
    twins: dict[tuple[Any, ...], tuple[Entry, dict[str, Any]]] = {}
    by_key: dict[tuple[str, str], dict[str, Any]] = {}
    labels = set()
    for (_, key), (entry, meta) in sorted(images.items()):
        label = precision_label(meta.get("precision"), meta.get("quant_backend"))
        labels.add(label)
        if label != reference:
            continue
        identity = twin_key(meta)
        if identity in twins:
            n_repeated += 1
            continue
        twins[identity] = (entry, meta)
        by_key.setdefault((str(meta.get("generator") or meta.get("source")), key), meta)
    if not twins:
        raise QddError(
            f"no {reference} images in --data (precisions found: "
            f"{', '.join(sorted(labels)) or 'none'}): add the {reference} shard folder of the "
            "same generators, or pick --reference"
        )
    pairs, unpaired = [], []
    for (_, key), (entry, meta) in sorted(images.items()):
        pair = _pair(meta, entry, None, None)
        if pair.precision == reference:
            continue
        twin = twins.get(twin_key(meta))
        if twin is not None:
            pairs.append(_pair(meta, entry, twin[0], twin[0].key))
            continue
        item = {
            "generator": pair.generator,
            "precision": pair.precision,
            "key": key,
            "shard": entry.shard,
        }
        namesake = by_key.get((pair.generator, key))
        if namesake is not None:
            item["differs"] = twin_mismatches(meta, namesake)
        unpaired.append(item)
    return Pairing(pairs, unpaired, n_real, n_repeated, unreadable, metas)


def refuse_two_recipes(
    slot: tuple[str, str], kept: tuple[Entry, dict[str, Any]], other: tuple[Entry, dict[str, Any]]
) -> None:
    """One group and key twice: the same image (a folder named twice) is counted once; two
    images of different identity (another model, prompt, steps ...) are refused in one line,
    since keeping either would silently drop the other from the group."""
    differs = twin_mismatches(other[1], kept[1])
    if not differs:
        return
    group, key = slot
    raise QddError(
        f"{group} {key} is in --data twice with different recipes ({', '.join(differs)}; "
        f"shards {kept[0].shard} and {other[0].shard}): one group holds one recipe, so "
        "measure each model or recipe in its own qdd-cli quality run"
    )


def refuse_unpaired(pairing: Pairing, reference: str) -> None:
    """No image has a twin: one line naming why (mismatched twins or missing folders)."""
    if pairing.pairs:
        return
    raise QddError(
        f"no image in --data has a {reference} twin: {pairing.summary(reference)}; pass the "
        f"{reference} folder made with the same model, prompts, seeds, steps, guidance and size"
    )


def read_samples(
    folders: list[Path],
) -> tuple[list[tuple[Entry, dict[str, Any]]], list[dict[str, str]]]:
    """Every sample of ``folders`` with its metadata, and the unreadable ones (key, shard,
    error) named instead."""
    from qdd.datamodules.reader import index_folders, read_meta

    entries, _ = index_folders(folders)
    read, unreadable = [], []
    for entry in entries:
        try:
            read.append((entry, read_meta(entry)))
        except ValueError as error:
            unreadable.append({"key": entry.key, "shard": entry.shard, "error": str(error)})
    return read, unreadable


def real_images(folders: list[Path]) -> tuple[list[Pair], list[dict[str, str]]]:
    """The real photos of ``--real`` folders (FID against real images), and the unreadable."""
    read, unreadable = read_samples(folders)
    photos = []
    for entry, meta in read:
        if meta.get("label") == 0:
            photos.append(_pair(meta, entry, None, None))
    if not photos:
        raise QddError(
            f"--real {', '.join(map(str, folders))} holds no real images: pass shards made "
            "with qdd-cli shard --label real"
        )
    return photos, unreadable
