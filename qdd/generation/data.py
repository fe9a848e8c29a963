"""Split the work items across DDP ranks: strided, no padding, no overlap.

Lightning's DistributedSampler pads the last round with duplicates; for generation that
would write one key twice. Each rank instead takes ``items[rank::world_size]`` and the
union over ranks is exactly the work list.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from qdd.generation.jobs import WorkItem


def _as_list(batch: list[WorkItem]) -> list[WorkItem]:
    return batch


class PromptDataModule(L.LightningDataModule):
    """Batches of `WorkItem` for the predict loop, this rank's share only."""

    def __init__(self, items: list[WorkItem], batch_size: int = 1) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.items = list(items)
        self.batch_size = batch_size

    def transfer_batch_to_device(self, batch: Any, device: torch.device, idx: int) -> Any:
        return batch  # prompts and seeds stay on the host; the pipeline moves its own tensors

    def rank_items(self, rank: int, world_size: int) -> list[WorkItem]:
        return self.items[rank::world_size]

    def predict_dataloader(self) -> DataLoader[Any]:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        return DataLoader(
            self.rank_items(rank, world),  # type: ignore[arg-type]
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=0,
            collate_fn=_as_list,
        )
