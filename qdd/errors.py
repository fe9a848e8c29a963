"""The one exception type for problems a user can fix.

`qdd-cli` turns a `QddError` into a single line on stderr (no traceback) and exit code 2.
The message names the problem *and* the fix, e.g.
``"no shards in runs/x: make them with `qdd-cli shard --src DIR --out runs/x`"``.
Anything else that escapes is a bug and keeps its traceback.
"""

#: How PyTorch's DataLoader re-raises an error of a worker process in the main process: the
#: same type, its message replaced by this line and the worker's traceback.
_FROM_WORKER = "Caught QddError in DataLoader worker process"


class QddError(Exception):
    """A user-caused error: bad path, missing weights, corrupt shard, unknown name."""


def one_line(error: QddError) -> str:
    """The error's message, also when a DataLoader worker raised it (a detector's input
    transform): the worker's own last line, not the traceback PyTorch wraps around it."""
    text = str(error)
    if not text.startswith(_FROM_WORKER):
        return text
    last = text.rstrip().splitlines()[-1]
    return last.removeprefix(f"{QddError.__module__}.{QddError.__qualname__}: ")
