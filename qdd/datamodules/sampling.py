"""Weighted draws for training on a mix of sources, the same under DDP as on one process.

Each epoch draws ``num_samples`` training samples with replacement, each with its own
probability (sources' weights, class balance: see `ShardDataModule`), seeded by
(seed, epoch). The draws are cut into global batches of ``world_size × batch_size``, rank
``r`` taking the ``r``-th part of each: so DDP on N processes sees the same global batches
as one process with an N-times larger batch, and each draw's random augmentation is seeded
by its position among the draws (not by the process or worker that happens to run it).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from qdd.datamodules.dataset import Collate, Sample, ShardDataset, Skipped, Transform
from qdd.datamodules.reader import Entry
from qdd.reencode import Reencoder


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Python's and torch's global RNGs seeded for one call, then restored."""
    state = random.getstate()
    random.seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed % 2**63)
        try:
            yield
        finally:
            random.setstate(state)


class DrawDataset(ShardDataset):
    """Items are ``(seed, index)`` pairs: entry ``index``, augmented under ``seed``."""

    def __getitem__(self, item: tuple[int, int]) -> Sample | Skipped:  # type: ignore[override]
        seed, index = item
        with seeded(seed):
            return super().__getitem__(index)


class WeightedDrawSampler(DistributedSampler):
    """Per epoch, ``num_samples`` weighted draws with replacement, cut into global batches.

    Yields this rank's ``(seed, index)`` pairs; the seed depends on (seed, epoch, position
    among all draws) only. A `DistributedSampler`, so Lightning leaves it in place under DDP.
    """

    def __init__(
        self,
        dataset: DrawDataset,
        probabilities: torch.Tensor,
        num_samples: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=False, seed=seed)
        self.probabilities = probabilities.double()
        self.batch_size = batch_size
        global_batch = batch_size * world_size
        self.total = -(-num_samples // global_batch) * global_batch

    def draws(self) -> torch.Tensor:
        """Indices of this epoch's draws (all ranks), in global-batch order."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.multinomial(
            self.probabilities, self.total, replacement=True, generator=generator
        )

    def rank_draws(self) -> list[tuple[int, int]]:
        """(seed, entry index) of this rank's draws, in order."""
        batches = self.draws().view(-1, self.num_replicas, self.batch_size)
        positions = torch.arange(self.total).view_as(batches)
        base = (self.seed * 1_000_003 + self.epoch) * 2**24
        return [
            (base + p, i)
            for p, i in zip(
                positions[:, self.rank].reshape(-1).tolist(),
                batches[:, self.rank].reshape(-1).tolist(),
                strict=True,
            )
        ]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.rank_draws())

    def __len__(self) -> int:
        return self.total // self.num_replicas


def train_loader(
    entries: list[Entry],
    transform: Transform | None,
    reencoder: Reencoder | None,
    probabilities: torch.Tensor | None,
    samples_per_epoch: int | None,
    batch_size: int,
    trainer: Any,
    seed: int,
    options: dict[str, Any],
) -> DataLoader:
    """The training loader: weighted draws (`WeightedDrawSampler`) when ``probabilities``
    are given, else each sample once per epoch, shuffled by ``seed`` (Lightning swaps in a
    seeded DistributedSampler under DDP)."""
    if probabilities is None:
        dataset = ShardDataset(entries, transform, reencode=reencoder)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
            collate_fn=Collate(dataset.perturbation_names),
            **options,
        )
    draws = DrawDataset(entries, transform, reencode=reencoder)
    sampler = WeightedDrawSampler(
        draws,
        probabilities,
        samples_per_epoch or len(entries),
        batch_size,
        rank=trainer.global_rank if trainer else 0,
        world_size=trainer.world_size if trainer else 1,
        seed=seed,
    )
    return DataLoader(
        draws,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=Collate(draws.perturbation_names),
        **options,
    )
