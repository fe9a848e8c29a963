"""An iterable over shard samples that splits work by DDP rank and DataLoader worker.

Why not WebDataset's own pipeline: evaluation must see every sample exactly once, also
under DDP with uneven shards, and a spawn-started worker can miss the rank. Here the rank
and world size are handed in by the DataModule (which knows them from the trainer), the
sample list comes from the manifests, and each (rank, worker) reads one contiguous slice.

- ``even=False`` (evaluation): slices differ by at most one sample, nothing is repeated.
- ``even=True`` (training): the list is reshuffled per epoch and padded by wrap-around to
  a multiple of the world size, so every rank runs the same number of steps (no DDP hang).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.transforms.functional import pil_to_tensor

from qdd.datamodules.reader import Entry, read_entry

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
)

Transform = Callable[[Image.Image], torch.Tensor]


def _slice(items: Sequence[Any], part: int, parts: int) -> Sequence[Any]:
    """The ``part``-th of ``parts`` contiguous slices (sizes differ by at most one)."""
    n = len(items)
    return items[part * n // parts : (part + 1) * n // parts]


class ShardDataset(IterableDataset):
    """Yields ``(image, label, meta)`` for this rank's share of ``entries``."""

    def __init__(
        self,
        entries: Sequence[Entry],
        transform: Transform | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        even: bool = False,
        seed: int = 0,
    ) -> None:
        self.entries = list(entries)
        self.transform = transform or pil_to_tensor
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.even, self.seed = shuffle, even, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rank_entries(self) -> Sequence[Entry]:
        order = list(self.entries)
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        if not self.even:
            return _slice(order, self.rank, self.world_size)
        per_rank = -(-len(order) // self.world_size)
        padded = (order * (1 + per_rank * self.world_size // max(len(order), 1)))[
            : per_rank * self.world_size
        ]
        return padded[self.rank * per_rank : (self.rank + 1) * per_rank]

    def __len__(self) -> int:
        return len(self.rank_entries())

    def __iter__(self):
        entries = self.rank_entries()
        worker = get_worker_info()
        if worker is not None:
            entries = _slice(entries, worker.id, worker.num_workers)
        for entry in entries:
            sample = read_entry(entry)
            if sample is None:
                continue
            image, meta = sample
            info = {"key": entry.key}
            info.update({f: "" if meta.get(f) is None else str(meta[f]) for f in META_FIELDS[1:]})
            yield self.transform(image), int(meta["label"]), info
