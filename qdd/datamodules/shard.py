"""`ShardDataModule`: WebDataset shard folders as a LightningDataModule.

The preprocessing is the detector's, not the data's: a transform handed in wins; otherwise
the DataModule asks the LightningModule for ``loader_transform(kind)`` (or
``train_transform()`` / ``eval_transform()``), and falls back to a plain uint8 tensor. For
``fit`` the samples are split into train and validation by a hash of the key, so an image
and its twins at other precisions (same key) always land on the same side.

Exactly once: evaluation loaders (validate, test, predict) use a map-style dataset with
``UnrepeatedDistributedSampler`` (no padding, ranks differ by at most one sample), so every
sample is scored once for any worker count, batch size and number of ranks. Training uses
Lightning's own distributed sampler (padding keeps ranks in step; duplicates are harmless
there).
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader

from qdd.datamodules.dataset import (
    Collate,
    Perturbation,
    ShardDataset,
    Transform,
    perturbation_names,
)
from qdd.datamodules.reader import (
    Entry,
    index_folders,
    read_manifest,
    read_meta,
    resolve_folders,
)
from qdd.datamodules.writer import formats_by_group
from qdd.errors import QddError
from qdd.reencode import MATCH, Reencoder, build_reencoder, check_spec

#: Upper bound on automatic DataLoader workers: beyond this the decode rate stops scaling
#: on typical nodes and each worker costs memory.
MAX_AUTO_WORKERS = 16
#: On a CPU, one decoding worker per this many cores (see `default_num_workers`).
CPU_CORES_PER_WORKER = 8


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a SLURM allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_num_workers(accelerator: str, processes_per_node: int = 1) -> int:
    """DataLoader workers per process when the user does not choose.

    Each process gets its share of the cores this process may use. On a GPU the model
    leaves the CPU to the loader: the share minus one core for the process itself (it
    runs the loop and collates). On a CPU every worker takes a core from the model's
    threads (`qdd.threads` gives torch the share minus the workers, so nothing is
    oversubscribed); decoding costs ~10-15 % of a core's NPR forward time, so a worker
    pays only from 8 cores on: one worker per 8 cores, none below (decoding then runs
    inline, between batches).
    """
    share = usable_cores() // max(processes_per_node, 1)
    if share <= 1:
        return 0
    if accelerator == "cpu":
        return share // CPU_CORES_PER_WORKER
    return min(share - 1, MAX_AUTO_WORKERS)


def in_validation(key: str, fraction: float) -> bool:
    """Deterministic split by key: the same key is on the same side in every folder."""
    digest = int.from_bytes(hashlib.sha1(key.encode()).digest()[:4], "big")
    return digest < fraction * 2**32


class EvaluatedDataModule(LightningDataModule):
    """What `qdd-cli test` asks of a data module, the same for `ShardDataModule` and
    `qdd.datamodules.mix.MixDataModule`: they set ``groups`` (samples per test group, from
    the manifests), ``perturbations`` and ``num_workers``."""

    groups: dict[str, int]
    perturbations: list[Perturbation]
    num_workers: int | None
    formats: dict[str, dict[str, int]] | None = None
    reencode: str | None = None

    def describe(self) -> dict[str, Any] | None:
        """What training drew from (metrics.json of a fit); None when there is nothing to add."""
        return None

    @property
    def perturbation_names(self) -> list[str]:
        return perturbation_names(self.perturbations)

    @property
    def expected(self) -> int:
        """Samples of the test split (what a complete test run scores)."""
        return sum(self.groups.values())

    def workers_for(self, trainer: Any) -> int:
        """The DataLoader workers this module's loaders will start under ``trainer``."""
        return loader_options(trainer, self.num_workers, persistent=False)["num_workers"]


class ShardDataModule(EvaluatedDataModule):
    """Shard folders → batches of ``(images, labels, meta)``.

    Args:
        paths: shard folder(s) or glob(s) to evaluate on (and to train on for ``fit``).
        batch_size: samples per batch (with ``P`` perturbations a test batch holds
            ``P`` × ``batch_size`` images).
        num_workers: DataLoader worker processes; ``None`` picks them from the cores this
            process may use (see `default_num_workers`).
        val_fraction: share of keys held out for validation in ``fit``.
        seed: shuffling seed for training.
        perturb: test-time perturbations (``jpeg:75``, ``resize:0.5``, ``blur:1.0`` …,
            see `qdd.perturb`), applied after decoding and before the detector's own
            preprocessing in test and predict; the unperturbed pass (``none``) is always
            included.
        reencode: ``jpeg:Q`` or ``match`` (see `qdd.reencode`): JPEG re-encoding right
            after decoding, in every stage, that removes the JPEG-vs-PNG confound
            between real photos and fakes; ``None`` leaves images as stored.
        train_transform: overrides the detector's training preprocessing.
        eval_transform: overrides the detector's test preprocessing.
    """

    def __init__(
        self,
        paths: str | list[str],
        batch_size: int = 32,
        num_workers: int | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        perturb: list[str] | None = None,
        reencode: str | None = None,
        train_transform: Transform | None = None,
        eval_transform: Transform | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise QddError(f"--data.batch_size must be at least 1, got {batch_size}")
        if num_workers is not None and num_workers < 0:
            raise QddError(f"--data.num_workers must be 0 or more, got {num_workers}")
        self.paths = paths
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.seed = seed
        self.perturb = list(perturb or [])
        self.perturbations = _perturbations(self.perturb)
        self.reencode = None if reencode is None else check_spec(reencode)
        self.reencoder: Reencoder | None = None
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.entries: list[Entry] = []
        self.groups: dict[str, int] = {}
        self.formats: dict[str, dict[str, int]] = {}
        for folder in self.folders:  # fail before the trainer starts, not after
            read_manifest(folder)

    @property
    def folders(self) -> list[Path]:
        return resolve_folders(self.paths)

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate") and len(self.perturbation_names) > 1:
            raise QddError(
                "--perturb applies to test and predict only: drop it here (training "
                "augmentation is the detector's own)"
            )
        self.entries, self.groups = index_folders(self.folders)
        if not self.entries:
            raise QddError(f"no readable samples in {self.paths}: check the shards")
        self.formats = _formats(self.folders)
        if self.reencode is not None:
            metas = _readable_metas(self.entries) if self.reencode == MATCH else []
            self.reencoder = build_reencoder(self.reencode, metas)

    # -- loaders ---------------------------------------------------------------------------
    def _transform(self, kind: str) -> Transform | None:
        own = self.train_transform if kind == "train" else self.eval_transform
        return own if own is not None else detector_transform(self.trainer, kind)

    def _split(self, validation: bool) -> list[Entry]:
        entries = [e for e in self.entries if in_validation(e.key, self.val_fraction) == validation]
        if not entries:
            side = "validation" if validation else "training"
            raise QddError(
                f"the {side} split of {self.paths} is empty ({len(self.entries)} samples, "
                f"val_fraction={self.val_fraction}): add samples or change --data.val_fraction"
            )
        return entries

    def _eval_loader(
        self, entries: Sequence[Entry], perturbed: bool, persistent: bool = False
    ) -> DataLoader:
        perturbations = self.perturbations if perturbed else []
        dataset = ShardDataset(entries, self._transform("eval"), perturbations, self.reencoder)
        return evaluation_loader(
            dataset, self.batch_size, self.trainer, self.num_workers, persistent=persistent
        )

    def train_dataloader(self) -> DataLoader:
        dataset = ShardDataset(
            self._split(validation=False), self._transform("train"), reencode=self.reencoder
        )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=True,  # Lightning swaps in a seeded DistributedSampler under DDP
            generator=torch.Generator().manual_seed(self.seed),
            collate_fn=Collate(dataset.perturbation_names),
            **loader_options(self.trainer, self.num_workers, persistent=True),
        )

    def val_dataloader(self) -> DataLoader:
        # validation runs every epoch: keep its workers
        return self._eval_loader(self._split(validation=True), perturbed=False, persistent=True)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.entries, perturbed=True)

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.entries, perturbed=True)


def detector_transform(trainer: Any, kind: str) -> Transform | None:
    """The LightningModule's preprocessing for ``kind`` (train/eval): up to uint8 when it
    normalises on the device (``loader_transform``), else its full transform, else None."""
    module = trainer.lightning_module if trainer else None
    loader_transform = getattr(module, "loader_transform", None)
    if callable(loader_transform):
        return loader_transform(kind)
    factory = getattr(module, f"{kind}_transform", None)
    return factory() if callable(factory) else None


def loader_options(trainer: Any, num_workers: int | None, persistent: bool) -> dict[str, Any]:
    """DataLoader workers, pinned memory and prefetch for this trainer's devices."""
    device = trainer.strategy.root_device.type if trainer else "cpu"
    per_node = trainer.num_devices if trainer else 1
    workers = num_workers
    if workers is None:
        workers = default_num_workers("cpu" if device == "cpu" else "gpu", per_node)
    options: dict[str, Any] = {"num_workers": workers, "pin_memory": device == "cuda"}
    if workers > 0:
        options["persistent_workers"] = persistent
        if device != "cpu":
            options["prefetch_factor"] = 4  # keep the accelerator fed across slow batches
    return options


def evaluation_loader(
    dataset: ShardDataset,
    batch_size: int,
    trainer: Any,
    num_workers: int | None = None,
    persistent: bool = False,
) -> DataLoader:
    """An exactly-once loader of ``dataset`` for this trainer's rank (validate, test,
    predict): ``UnrepeatedDistributedSampler`` under DDP, which Lightning leaves alone."""
    world = trainer.world_size if trainer else 1
    sampler = None
    if world > 1:
        if len(dataset) < world:
            raise QddError(
                f"{len(dataset)} samples for {world} processes: every process needs at "
                "least one; use fewer devices"
            )
        sampler = UnrepeatedDistributedSampler(
            dataset, num_replicas=world, rank=trainer.global_rank, shuffle=False
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=Collate(dataset.perturbation_names),
        **loader_options(trainer, num_workers, persistent),
    )


def _formats(folders: Sequence[Path]) -> dict[str, dict[str, int]]:
    """Source formats per group over the folders' manifests (older manifests have none)."""
    counts: Counter[tuple[str, str]] = Counter()
    for folder in folders:
        for group, by_format in read_manifest(folder).get("formats", {}).items():
            for source_format, count in by_format.items():
                counts[group, source_format] += count
    return formats_by_group(counts)


def _readable_metas(entries: Sequence[Entry]) -> list[dict[str, Any]]:
    """Every sample's JSON that can be read (the others are counted as skipped later)."""
    metas = []
    for entry in entries:
        try:
            metas.append(read_meta(entry))
        except ValueError:
            continue
    return metas


def _perturbations(specs: list[str]) -> list[Any]:
    """The parsed perturbations (``none`` first), or ``[]`` when none were asked for."""
    if not specs or all(spec.strip().lower() == "none" for spec in specs):
        return []
    from qdd.perturb import perturbations

    return perturbations(specs)
