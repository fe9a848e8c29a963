"""The list of files a qdd command left in a folder it owns (the report's `.qdd-report.json`,
the demo's `.qdd-demo.json`): ``{"files": [relative POSIX paths]}``. One reader, so a
malformed or hand-edited list is refused alike everywhere, never read letter by letter."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from qdd.errors import QddError


def read_file_list(manifest: Path, owner: str, fix: str) -> list[str]:
    """The paths ``manifest`` lists; one line naming it, its ``owner`` and the ``fix`` when
    it is not a list of strings under ``"files"``."""
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        files = None
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        raise QddError(f"{manifest} is not {owner}'s file list: {fix}")
    return files


def inside(folder: Path, name: str) -> Path | None:
    """``folder/name`` for a listed relative path reached without leaving ``folder`` (no
    ``..``, no absolute path, no linked folder on the way), else None: a hand-edited list
    never points a removal anywhere else. The path itself may be anything (a link too)."""
    parts = PurePosixPath(name).parts
    if not parts or parts[0] == "/" or ".." in parts:
        return None
    path = folder.joinpath(*parts)
    if path.parent.resolve() != folder.resolve().joinpath(*parts[:-1]):
        return None  # a linked folder on the way
    return path
