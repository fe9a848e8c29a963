"""The one exception type for problems a user can fix.

`qdd-cli` turns a `QddError` into a single line on stderr (no traceback) and exit code 2.
The message names the problem *and* the fix, e.g.
``"no shards in runs/x: make them with `qdd-cli shard --src DIR --out runs/x`"``.
Anything else that escapes is a bug and keeps its traceback.
"""


class QddError(Exception):
    """A user-caused error: bad path, missing weights, corrupt shard, unknown name."""
