"""The one exception type for problems a user can fix.

`qdd-cli` turns a `QddError` into a single line on stderr (no traceback) and exit code 2.
The message names the problem *and* the fix, e.g.
``"no shards in runs/x: make them with `qdd-cli shard --src DIR --out runs/x`"``.
Anything else that escapes is a bug and keeps its traceback.
"""


class QddError(Exception):
    """A user-caused error: bad path, missing weights, corrupt shard, unknown name."""


def one_line(error: QddError) -> str:
    """The error's message on one line, also when a DataLoader worker raised it (a detector's
    input transform): PyTorch re-raises it in the main process as the same type whose
    message is ``Caught <Type> in DataLoader worker process N.`` plus the worker's
    traceback; the message is all that follows the traceback's last ``<module>.<Type>: ``,
    for a subclass of `QddError` too. A message of several lines is joined into one."""
    text = str(error)
    kind = type(error)
    if text.startswith(f"Caught {kind.__name__} in DataLoader worker process"):
        for prefix in (f"\n{kind.__module__}.{kind.__qualname__}: ", f"\n{kind.__qualname__}: "):
            _, found, message = text.rpartition(prefix)
            if found:
                text = message
                break
        else:
            text = text.rstrip().splitlines()[-1]
    return " ".join(line.strip() for line in text.splitlines() if line.strip())
