"""The demo's folder: ``--overwrite`` replaces only what an earlier demo wrote there.

A demo writes into a few sub-folders of ``--out`` (its parts: photos, prompts, models,
shards, runs, report) and, when it ends, finished or failed, lists every file and link it
left there in `MANIFEST`. The next ``demo --overwrite`` removes those, and nothing else.
Before it removes anything it looks for files the list does not name inside the parts (the
user's notes in report/, a shard folder of their own in shards/) and refuses in one line:
kept, such a file would join what the demo reads (its steps glob ``shards/test/*``) or sit
beside a report that does not describe it, and removed, it would be lost. Files beside the
parts (``--out``'s own top level) are never touched. A demo killed outright (SIGKILL, power
loss) lists nothing; its files are then refused like a user's and must be removed by hand.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from qdd.errors import QddError
from qdd.file_list import inside, read_file_list

#: The files and links the last demo left in its parts, relative to ``--out``.
MANIFEST = ".qdd-demo.json"


def _entries(out: Path, parts: Iterable[str]) -> list[str]:
    """Every file and link under the parts (relative POSIX paths); links are never followed."""
    found = []
    for part in parts:
        for root, folders, names in os.walk(out / part):
            links = [f for f in folders if os.path.islink(os.path.join(root, f))]
            for name in names + links:
                found.append(Path(root, name).relative_to(out).as_posix())
    return sorted(found)


def record_demo_files(out: Path, parts: Iterable[str]) -> None:
    """List what the demo left in its parts (the end of every demo, failed ones too)."""
    files = _entries(out, parts)
    (out / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")


def _listed(out: Path) -> set[str]:
    manifest = out / MANIFEST
    if not manifest.is_file():
        return set()
    return set(read_file_list(manifest, "a demo", "delete it and the demo's folders by hand, "
                              "or pass another --out"))  # fmt: skip


def _removable(out: Path, name: str, parts: tuple[str, ...]) -> Path | None:
    """``out/name`` when it lies inside a part, reached without a link on the way, and is a
    file or a link (unlinking a link never touches what it points at): a hand-edited list
    never makes the demo remove anything else."""
    pieces = PurePosixPath(name).parts
    if len(pieces) < 2 or pieces[0] not in parts:
        return None
    path = inside(out, name)
    return path if path is not None and (path.is_symlink() or path.is_file()) else None


def _check_parts(out: Path, parts: Iterable[str]) -> None:
    """Refuse a part that is a link or not a folder: the demo makes its parts itself, and
    through a link it would clear (empty folders) and then write into a folder elsewhere."""
    for part in parts:
        path = out / part
        if path.is_symlink():
            raise QddError(f"{path} is a link to {os.readlink(path)}: the demo writes "
                           f"its {part} folder itself; remove the link, or pass another "
                           "--out")  # fmt: skip
        if path.exists() and not path.is_dir():
            raise QddError(f"{path} is not a folder: the demo writes its {part} folder there; "
                           "move it out, or pass another --out")  # fmt: skip


def clear_earlier_demo(out: Path, parts: tuple[str, ...]) -> None:
    """Remove the files an earlier demo listed, and then its empty folders; first refuse,
    before removing anything, when a part is a link or a file, or holds a file or link the
    list does not name."""
    _check_parts(out, parts)
    listed = _listed(out)
    foreign = [name for name in _entries(out, parts) if name not in listed]
    if foreign:
        which, them = (
            (f"{out / foreign[0]} is", "it")
            if len(foreign) == 1
            else (f"{out / foreign[0]} and {len(foreign) - 1} more files are", "them")
        )
        raise QddError(
            f"--overwrite replaces only what an earlier demo wrote, and {which} not listed in "
            f"{out / MANIFEST} (yours, or left by an older qdd's demo or one killed outright): "
            f"move {them} out of {out}, or pass another --out"
        )
    for name in sorted(listed):
        path = _removable(out, name, parts)
        try:
            if path is not None:
                path.unlink()
        except OSError as error:
            raise QddError(f"cannot remove {path} ({error.strerror}): fix its permissions, "
                           "or pass another --out") from None  # fmt: skip
    for part in parts:
        for root, folders, _ in os.walk(out / part, topdown=False):
            for folder in folders:
                path = Path(root, folder)
                if not path.is_symlink() and not any(path.iterdir()):
                    path.rmdir()
        if (out / part).is_dir() and not any((out / part).iterdir()):
            (out / part).rmdir()
    (out / MANIFEST).unlink(missing_ok=True)
