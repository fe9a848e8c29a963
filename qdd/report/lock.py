"""One report at a time per ``--out`` folder: a second is refused in one line, never mixed in.

The guard is ``fcntl.flock`` on a lock file inside the folder, not a file created with
``O_EXCL``: the kernel drops a flock when its holder exits, killed or not, so a report
killed half-way never blocks the next one, and there is no pid to check (a pid is reused,
and means nothing in another container or on another host of a shared file system; Linux
NFS clients carry flock to the server as a byte-range lock). The holder removes the file
before it lets go, so a finished report leaves no lock behind; a process that opened the
file just before that checks, once it holds the lock, that it holds the file still at the
path, and otherwise tries again on the new one. Where there is no flock (Windows has no
``fcntl``; some FUSE and network file systems refuse it) the report runs unguarded, as it
did before the lock, and says so in one warning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qdd.errors import QddError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

#: The lock file, inside the report folder.
LOCK = ".qdd-report.lock"
#: Tries when another report removes the lock file between our open and our lock.
_TRIES = 5


@contextmanager
def report_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s report lock for the body; refuses at once when another report
    holds it."""
    path = Path(folder) / LOCK
    fd = _hold(path, folder)
    try:
        yield
    finally:
        if fd is not None:
            try:
                path.unlink(missing_ok=True)  # while held: no one can hold the unlinked file
            except OSError:
                pass  # a lock file left behind blocks no one: the lock is the flock
            os.close(fd)


def _hold(path: Path, folder: Path) -> int | None:
    """The descriptor of the lock file at ``path``, flocked; None where the platform or the
    file system has no flock."""
    for _ in range(_TRIES):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as error:
            raise QddError(f"cannot create {path} ({error.strerror}): pass an --out folder "
                           "you can write to") from None  # fmt: skip
        try:
            if fcntl is None:
                raise OSError(0, "no flock on this platform")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise QddError(_busy(folder)) from None
        except OSError as error:  # ENOLCK, EOPNOTSUPP: a file system without locks
            os.close(fd)
            path.unlink(missing_ok=True)
            log.warning("cannot lock --out %s (%s): a second report into it at once would "
                        "not be refused", folder, error.strerror)  # fmt: skip
            return None
        if _same_file(fd, path):
            return fd
        os.close(fd)  # the holder before us removed this one: lock the new file
    raise QddError(_busy(folder))


def _same_file(fd: int, path: Path) -> bool:
    try:
        held, named = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


def _busy(folder: Path) -> str:
    return (f"another qdd-cli report is writing into --out {folder} right now: wait for it "
            "to finish, or pass another --out folder")  # fmt: skip
