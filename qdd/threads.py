"""How many threads qdd's work may use: never more than the cores it may run on.

PyTorch starts one OpenMP thread per core of the machine in every process. When the
threads of a run (torch threads × processes, plus one per DataLoader worker) outnumber the
cores the run may use, or other jobs take some of those cores, the threads of a parallel
region wait at each barrier for partners that are not running, and a loaded laptop slows
a run tenfold instead of in proportion. So qdd counts the cores this process may run on —
its CPU affinity (``taskset``, containers, SLURM's ``--cpus-per-task``), not the machine's
core count — shares them between the processes of one run on this node (DDP ranks), leaves
one core to each DataLoader worker (PyTorch already runs each worker with one thread) and
gives the rest to the process's torch threads, at least one. ``OMP_NUM_THREADS``, when
set, is an upper bound. The count depends only on the affinity and the run's settings,
never on the current load, so a rerun on the same machine computes the same numbers.

Other jobs can still take cores at any time, so OpenMP's waiting threads also sleep
instead of spinning (``OMP_WAIT_POLICY=PASSIVE``, unless set otherwise). Measured on the
2-core sandbox with ~8 other runnable processes (NPR, 40 training steps of 16 × 64²):
2 threads spinning 228 s wall / 94 s CPU; 2 threads passive 18–29 s; 1 thread 16–25 s.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def prefer_passive_waits() -> None:
    """Idle OpenMP threads sleep rather than spin; call before torch is imported."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def usable_cores() -> int:
    """The number of cores this process may run on (its CPU affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def torch_threads(workers: int = 0, processes: int = 1, cores: int | None = None) -> int:
    """Torch threads per process so that processes × (threads + workers) ≤ cores, at least 1."""
    cores = usable_cores() if cores is None else cores
    share = max(1, cores // max(1, processes))
    threads = max(1, share - max(0, workers))
    limit = os.environ.get("OMP_NUM_THREADS", "")
    if limit.isdigit() and int(limit) > 0:
        threads = min(threads, int(limit))
    return threads


def use_threads(workers: int = 0, processes: int = 1) -> int:
    """Set this process's torch threads by `torch_threads`; returns the count set."""
    import torch

    threads = torch_threads(workers, processes)
    cores = usable_cores()
    if processes * (1 + workers) > cores:
        log.warning(
            "%d process(es) with %d DataLoader worker(s) each need more than the %d core(s) "
            "this run may use: each process keeps 1 torch thread; lower --data.num_workers "
            "for a faster run",
            processes,
            workers,
            cores,
        )
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    log.debug("torch threads %d (%d cores, %d process(es), %d worker(s))", threads, cores,
              processes, workers)  # fmt: skip
    return threads
