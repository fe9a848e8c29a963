"""DataLoaders for shard data: how many workers, pinned memory, and exactly-once evaluation.

Evaluation loaders (validate, test, predict) use ``UnrepeatedDistributedSampler`` (no padding,
ranks differ by at most one sample), so every sample is scored once for any worker count,
batch size and number of ranks.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset

from qdd.datamodules.dataset import Collate, ShardDataset
from qdd.errors import QddError

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
    dataset: ShardDataset | Dataset,
    batch_size: int,
    trainer: Any,
    num_workers: int | None = None,
    persistent: bool = False,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """An exactly-once loader of ``dataset`` for this trainer's rank (validate, test,
    predict; quality's pairs with their ``collate_fn``): ``UnrepeatedDistributedSampler``
    under DDP, which Lightning leaves alone."""
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
        collate_fn=collate_fn if collate_fn is not None else Collate(dataset.perturbation_names),
        **loader_options(trainer, num_workers, persistent),
    )
