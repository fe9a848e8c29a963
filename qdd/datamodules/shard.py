"""`ShardDataModule`: WebDataset shard folders as a LightningDataModule.

The preprocessing is the detector's, not the data's: a transform handed in wins; otherwise
the DataModule asks the LightningModule for ``train_transform()`` / ``eval_transform()``,
and falls back to a plain uint8 tensor. For ``fit`` the samples are split into train and
validation by a hash of the key, so an image and its twins at other precisions (same key)
always land on the same side.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from qdd.datamodules.dataset import ShardDataset, Transform
from qdd.datamodules.reader import Entry, index_folders, read_manifest, resolve_folders
from qdd.errors import QddError


def in_validation(key: str, fraction: float) -> bool:
    """Deterministic split by key: the same key is on the same side in every folder."""
    digest = int.from_bytes(hashlib.sha1(key.encode()).digest()[:4], "big")
    return digest < fraction * 2**32


# ShardDataset.__len__ is exact per rank and per worker split; Lightning warns regardless.
warnings.filterwarnings("ignore", message=".*IterableDataset. has .__len__. defined")


class EpochDataLoader(DataLoader):
    """Tells the dataset which epoch starts, so training reshuffles every epoch.

    (Lightning only calls ``set_epoch`` on samplers, and an IterableDataset has none.)
    """

    def __iter__(self):
        dataset = self.dataset
        if isinstance(dataset, ShardDataset):
            dataset.set_epoch(getattr(self, "_epoch", 0))
            self._epoch = getattr(self, "_epoch", 0) + 1
        return super().__iter__()


class ShardDataModule(LightningDataModule):
    """Shard folders → batches of ``(images, labels, meta)``.

    Args:
        paths: shard folder(s) or glob(s) to evaluate on (and to train on for ``fit``).
        batch_size: images per batch.
        num_workers: DataLoader worker processes (each reads its own slice).
        val_fraction: share of keys held out for validation in ``fit``.
        seed: shuffling seed for training.
        train_transform: overrides the detector's training preprocessing.
        eval_transform: overrides the detector's test preprocessing.
    """

    def __init__(
        self,
        paths: str | list[str],
        batch_size: int = 32,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        train_transform: Transform | None = None,
        eval_transform: Transform | None = None,
    ) -> None:
        super().__init__()
        self.paths = paths
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.seed = seed
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.entries: list[Entry] = []
        self.groups: dict[str, int] = {}
        for folder in self.folders:  # fail before the trainer starts, not after
            read_manifest(folder)

    @property
    def folders(self) -> list[Path]:
        return resolve_folders(self.paths)

    def setup(self, stage: str) -> None:
        self.entries, self.groups = index_folders(self.folders)
        if not self.entries:
            raise QddError(f"no readable samples in {self.paths}: check the shards")

    def _transform(self, kind: str) -> Transform | None:
        own = self.train_transform if kind == "train" else self.eval_transform
        if own is not None:
            return own
        module = self.trainer.lightning_module if self.trainer else None
        factory = getattr(module, f"{kind}_transform", None)
        return factory() if callable(factory) else None

    def _split(self, validation: bool) -> list[Entry]:
        entries = [e for e in self.entries if in_validation(e.key, self.val_fraction) == validation]
        if not entries:
            side = "validation" if validation else "training"
            raise QddError(
                f"the {side} split of {self.paths} is empty ({len(self.entries)} samples, "
                f"val_fraction={self.val_fraction}): add samples or change --data.val_fraction"
            )
        return entries

    def _loader(self, entries: list[Entry], kind: str, train: bool = False) -> DataLoader:
        trainer = self.trainer
        rank = trainer.global_rank if trainer else 0
        world = trainer.world_size if trainer else 1
        dataset = ShardDataset(
            entries,
            self._transform(kind),
            rank=rank,
            world_size=world,
            shuffle=train,
            even=train,
            seed=self.seed,
        )
        return EpochDataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._split(validation=False), "train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._split(validation=True), "eval")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.entries, "eval")

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.entries, "eval")
