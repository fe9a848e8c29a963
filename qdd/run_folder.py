"""Run folders: each run's own, passed to what writes into it, never found in the environment.

A call without ``out`` gets `fresh_run_dir`: ``runs/<command>-<name>-<time>``, created here
and now (``mkdir`` without ``exist_ok``), so two runs started in the same second, in one
process or in two, never share a folder (the later one gets ``-2``, ``-3``, ...).
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

#: How a run hands its folder to the DDP processes Lightning's launcher starts (they re-run
#: the command line, which has no ``--out``); set only while the run lasts, read only by them.
DDP_RUN_DIR_ENV = "QDD_DDP_RUN_DIR"


def fresh_run_dir(command: str, name: str | None = None, root: str | Path = "runs") -> Path:
    """A new, empty folder ``root/<command>[-<name>]-<YYYYmmdd-HHMMSS>[-N]``, created now."""
    stem = command
    if name:
        stem += f"-{re.sub(r'[^A-Za-z0-9_.-]+', '_', Path(str(name)).stem)}"
    base = Path(root) / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    Path(root).mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"no free run folder name beside {base}")  # 10,000 in one second


def inherited_ddp_run_dir() -> str | None:
    """The folder of the run that started this process as one of its DDP ranks, else None."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        return None  # not a rank Lightning's launcher started: nothing to inherit
    return os.environ.get(DDP_RUN_DIR_ENV) or None


@contextlib.contextmanager
def shared_with_ddp_ranks(run_dir: str | Path) -> Iterator[None]:
    """`DDP_RUN_DIR_ENV` set to ``run_dir`` while the block runs, restored after it."""
    before = os.environ.get(DDP_RUN_DIR_ENV)
    os.environ[DDP_RUN_DIR_ENV] = str(run_dir)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(DDP_RUN_DIR_ENV, None)
        else:
            os.environ[DDP_RUN_DIR_ENV] = before
