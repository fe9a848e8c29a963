"""Shard samples as a map-style dataset: item ``i`` is the manifests' ``i``-th sample.

Why map-style and not an iterable (WebDataset-style) pipeline: with an iterable dataset
every DataLoader worker yields its own partial last batch, so a loader gives more batches
than its ``len()`` and Lightning, which stops at ``len()``, silently drops samples (46 of
49 images with 3 workers and batch 5). With a map-style dataset the *sampler* decides which
indices a process sees and the DataLoader cuts them into batches in the main process, so
the number of batches is exact for any worker count and batch size, and exactly-once
becomes a property of the sampler alone: `ShardDataModule` uses
``UnrepeatedDistributedSampler`` for evaluation (rank ``r`` gets indices ``r::world``, no
padding, so no sample is scored twice) and Lightning's ordinary distributed sampler for
training (padding there only keeps ranks in step).

Random access is cheap because shards are plain uncompressed tars: the reader indexes
every member's byte offset once from the tar headers, and an item is two ``os.pread``
calls (no shared file offset, so forked workers cannot disturb each other) plus the PNG
decode, which dominates.

A sample that cannot be read (PNG that does not decode, a member missing) becomes a
`Skipped` record instead of an exception: it travels through the batch to the
LightningModule, which counts and names it in metrics.json.

With ``--data.reencode`` (see `qdd.reencode`) the decoded image is first JPEG re-encoded,
to take the JPEG-vs-PNG confound out of the comparison; perturbations come after.

With test-time perturbations (``--perturb``), one item decodes its image once and yields
one preprocessed tensor per perturbation, so ``P`` perturbations cost one decode, and each
perturbation still sees every sample exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from qdd.datamodules.reader import Entry, read_sample
from qdd.errors import QddError
from qdd.identity import twin_id
from qdd.reencode import Reencoder

#: Metadata passed along with each image (strings only, so batches collate cleanly).
META_FIELDS = (
    "key",
    "source",
    "generator",
    "precision",
    "quant_backend",
    "quant_scope",
    "model_id",
    "quant_fraction",
    "source_format",
    "twin",  # `qdd.identity.twin_id`: what pairs an image with its fp32 twin in the report
)
#: The unperturbed pass, as named in scores.parquet and metrics.json.
UNPERTURBED = "none"

Transform = Callable[[Image.Image], torch.Tensor]


class Perturbation(Protocol):
    """What `qdd.perturb` provides: a named, deterministic post-processing operation."""

    name: str

    def apply(self, image: Image.Image, key: str) -> Image.Image: ...


def perturbation_names(perturbations: Sequence[Perturbation]) -> list[str]:
    """The passes a test run scores: the perturbations', or the unperturbed one alone."""
    return [p.name for p in perturbations] or [UNPERTURBED]


@dataclass(frozen=True)
class Skipped:
    """A sample that could not be read, and why (reported in metrics.json)."""

    key: str
    shard: str
    error: str


@dataclass(frozen=True)
class Sample:
    """One decoded sample: one tensor per perturbation, its label and metadata."""

    images: list[torch.Tensor]
    label: int
    meta: dict[str, str]


class ShardDataset(Dataset):
    """Map-style dataset over manifest entries.

    Args:
        entries: the samples, as indexed by `qdd.datamodules.reader.index_folders`.
        transform: the detector's preprocessing (PIL → tensor); default: uint8 tensor.
        perturbations: test-time perturbations applied after decoding and before
            ``transform``; ``None`` means the unperturbed image only.
        reencode: JPEG re-encoding applied right after decoding (`qdd.reencode`), or
            ``None``.
    """

    def __init__(
        self,
        entries: Sequence[Entry],
        transform: Transform | None = None,
        perturbations: Sequence[Perturbation] | None = None,
        reencode: Reencoder | None = None,
    ) -> None:
        self.entries = list(entries)
        self.reencode = reencode
        self.transform = transform or pil_to_tensor
        self.perturbations = list(perturbations or [])

    @property
    def perturbation_names(self) -> list[str]:
        return perturbation_names(self.perturbations)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Sample | Skipped:
        entry = self.entries[index]
        try:
            image, meta = read_sample(entry)
        except ValueError as error:  # logged by the module that counts it
            return Skipped(entry.key, entry.shard, str(error))
        if self.reencode is not None:
            image = self.reencode.apply(image, entry.key, meta)
        info = {"key": entry.key}
        info.update({f: "" if meta.get(f) is None else str(meta[f]) for f in META_FIELDS[1:]})
        info["twin"] = twin_id(meta) or ""
        try:
            if not self.perturbations:
                images = [self.transform(image)]
            else:
                images = [self.transform(p.apply(image, entry.key)) for p in self.perturbations]
        except QddError as error:  # the detector cannot read this image: say which it is
            raise QddError(f"{entry.key} in {entry.shard}: {error}") from None
        return Sample(images, int(meta["label"]), info)


def collate(items: list[Sample | Skipped], perturbations: Sequence[str]) -> tuple[Any, ...]:
    """``(images, labels, meta)``: images stacked sample-major, one row per perturbation.

    ``meta`` holds lists aligned with the rows (``key`` … ``model_id``, ``label`` as Python
    ints so bookkeeping never waits on the device, ``perturbation``) and ``skipped``: the
    `Skipped` records of this batch as dicts (not aligned). A batch whose samples were all skipped
    has zero rows. Images of different sizes (detectors that read full resolution) are a
    list instead of one tensor; the detector module scores them one at a time.
    """
    samples = [item for item in items if isinstance(item, Sample)]
    meta: dict[str, list[Any]] = {f: [] for f in (*META_FIELDS, "label", "perturbation")}
    for sample in samples:
        for name in perturbations:
            for field in META_FIELDS:
                meta[field].append(sample.meta[field])
            meta["label"].append(sample.label)
            meta["perturbation"].append(name)
    meta["skipped"] = [asdict(item) for item in items if isinstance(item, Skipped)]
    tensors = [image for sample in samples for image in sample.images]
    if tensors and any(t.shape != tensors[0].shape for t in tensors):
        images: Any = tensors  # full-resolution detectors: sizes differ, each image alone
    else:
        images = torch.stack(tensors) if tensors else torch.zeros(0)
    return images, torch.tensor(meta["label"], dtype=torch.long), meta


class Collate:
    """`collate` bound to the perturbation names (a class, so workers can pickle it)."""

    def __init__(self, perturbations: Sequence[str]) -> None:
        self.perturbations = list(perturbations)

    def __call__(self, items: list[Sample | Skipped]) -> tuple[Any, ...]:
        return collate(items, self.perturbations)
