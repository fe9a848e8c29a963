"""The report owns its ``--out`` folder: a second report there leaves no stale figure behind.

Each report lists the files it wrote in `MANIFEST`. The next report into the same folder
removes those of the earlier ones it did not write again (a detector dropped, a metric no
longer drawn), so every figure beside report.md is current. It never removes anything else:
a folder that holds files but no manifest was not written by a report (a run folder, the
user's notes, a report of a qdd version before the manifest) and is refused in one line.
When a report fails half-way, nothing is removed (the old files keep their times) and the
manifest lists the old files and the new ones, so the folder stays the report's and the
next report cleans it. Only regular files reached inside the folder without a link are
ever removed, whatever a hand-edited manifest lists; a file that was the user's before the
report started is never listed, even when it changed meanwhile.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from qdd.errors import QddError

#: The list of files the last report wrote, relative to the folder.
MANIFEST = ".qdd-report.json"
#: How report.md begins (`qdd.report.index`): tells an older qdd's report from a user's file.
INDEX_TITLE = b"# qdd report\n"


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every regular file under ``folder`` (relative POSIX path → mtime, size), the manifest
    and links left out: a report writes no link, so a link is never the report's."""
    found = {}
    for path in folder.rglob("*"):
        if path.name != MANIFEST and not path.is_symlink() and path.is_file():
            stat = path.stat()
            found[path.relative_to(folder).as_posix()] = (stat.st_mtime_ns, stat.st_size)
    return found


def _first_foreign(folder: Path) -> str | None:
    """Some file or link under ``folder``, or None; stops at the first (``--out ~`` is
    refused at once, not after walking the whole home folder)."""
    for root, folders, names in os.walk(folder):
        links = [f for f in folders if os.path.islink(os.path.join(root, f))]
        if names or links:
            first = min(names + links)
            return Path(root, first).relative_to(folder).as_posix()
    return None


def _older_report(index: Path) -> bool:
    """``index`` is the report.md of a qdd report (not a user's own report.md in ``.``)."""
    if index.is_symlink() or not index.is_file():
        return False
    with index.open("rb") as file:
        return file.read(len(INDEX_TITLE)) == INDEX_TITLE


def _earlier(folder: Path) -> list[str]:
    """The files the earlier report listed; refuses a non-empty folder it did not write."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        if _older_report(folder / "report.md"):
            raise QddError(
                f"--out {folder} holds a report written before qdd listed a report's files "
                f"({MANIFEST}), so its stale figures cannot be told from your files: remove "
                "the folder or pass a new --out"
            )
        foreign = _first_foreign(folder)
        if foreign is not None:
            raise QddError(
                f"--out {folder} already holds files that no qdd-cli report wrote (e.g. "
                f"{foreign}): pass a new or empty folder, or the folder of an earlier report "
                "to replace it"
            )
        return []
    try:
        listed = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        listed = None
    if not isinstance(listed, list) or not all(isinstance(name, str) for name in listed):
        raise QddError(f"{manifest} is not a report's file list: delete it, or pass a new "
                       "--out folder")  # fmt: skip
    return listed


def _listed_file(folder: Path, name: str) -> Path | None:
    """``folder/name`` when it is a regular file reached without leaving ``folder``: a
    hand-edited list naming ``../x``, ``/abs``, a link or a path through a linked folder
    never makes a report touch anything but its own files."""
    parts = PurePosixPath(name).parts
    if not parts or parts[0] == "/" or ".." in parts:
        return None
    path = folder.joinpath(*parts)
    if path.parent.resolve() != folder.resolve().joinpath(*parts[:-1]):
        return None  # a linked folder on the way
    if path.is_symlink() or not path.is_file():
        return None
    return path


@contextmanager
def owned_folder(out: Path) -> Iterator[Path]:
    """Create or reuse ``out`` for a report; on success, remove the earlier report's files
    that this one did not write, and list this one's."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise QddError(f"--out {out} is a file: pass a folder for the report")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    earlier = _earlier(out)
    stamps = {}  # the earlier files' times, put back when this report fails
    for name in earlier:  # a rewrite, even of identical bytes, then shows as a new time
        path = _listed_file(out, name)
        if path is not None:
            stat = path.stat()
            stamps[name] = (stat.st_atime_ns, stat.st_mtime_ns)
            os.utime(path, ns=(0, 0))
    before = _files(out)

    def written() -> list[str]:
        """Files new or rewritten since the start: new ones, and the earlier report's (a
        file of the user's that changed meanwhile, notes saved during a long report, is
        never taken for the report's)."""
        changed = (n for n, stamp in _files(out).items() if before.get(n) != stamp)
        return sorted(n for n in changed if n not in before or n in stamps)

    try:
        yield out
    except BaseException:
        rewritten = written()
        files = sorted(set(earlier) | set(rewritten))
        for name in sorted(set(stamps) - set(rewritten)):
            path = _listed_file(out, name)
            if path is not None:
                os.utime(path, ns=stamps[name])
        if files:
            (out / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")
        elif created and not any(out.iterdir()):
            out.rmdir()  # a failed first report leaves no empty folder behind
        raise
    files = written()
    for name in sorted(set(earlier) - set(files)):
        path = _listed_file(out, name)
        if path is not None:
            path.unlink()
            _prune(out, path.parent)
    (out / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")


def _prune(root: Path, folder: Path) -> None:
    """Remove ``folder`` and its parents up to ``root`` while they are empty (tables/)."""
    root = root.resolve()
    folder = folder.resolve()
    while folder != root and folder.is_relative_to(root) and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent
