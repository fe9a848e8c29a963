"""The report owns its ``--out`` folder: a report appears there whole or not at all, and
leaves no stale figure of an earlier one behind.

A report is drawn into a staging folder inside ``--out`` (`STAGING`, hidden), then
published: the list of files (`MANIFEST`) first names the earlier report's files and the
new ones; the new files are moved into place (renames within one file system, the index
last, so report.md never links a figure that is not there yet); the earlier report's files
this one did not write again (a detector dropped, a metric no longer drawn) are removed;
and the list is rewritten to name this report's files only, atomically. A report that
fails while drawing leaves the folder as it was (the earlier report whole, its files'
times unchanged) and removes its staging folder. One killed outright leaves a staging
folder that the next report removes first; one killed while publishing leaves every file
of both reports listed, so the next report cleans up. One report at a time writes a folder
(`qdd.report.lock`).

It never removes or overwrites anything but its own files: a folder that holds files but
no manifest was not written by a report (a run folder, the user's notes, a report of a qdd
version before the manifest) and is refused in one line; a file in the way that the
earlier report did not list is refused before anything moves; and only regular files
reached inside the folder without a link are ever removed, whatever a hand-edited manifest
lists.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from qdd.errors import QddError
from qdd.file_list import inside, read_file_list
from qdd.report.lock import LOCK, report_lock

#: The list of files the last report wrote, relative to the folder.
MANIFEST = ".qdd-report.json"
#: Where a report is drawn before it is published.
STAGING = ".qdd-report-staging"
#: How report.md begins (`qdd.report.index`): tells an older qdd's report from a user's file.
INDEX_TITLE = b"# qdd report\n"
#: The report's own bookkeeping at the top of the folder: never a user's file.
_RESERVED = frozenset({MANIFEST, STAGING, LOCK})


def write_report_folder(out: Path, draw: Callable[[Path], Path]) -> Path:
    """Create or reuse ``out`` for the report ``draw(folder)`` draws (returning its index,
    e.g. report.md); returns the index's path in ``out`` once the report is published."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise QddError(f"--out {out} is a file: pass a folder for the report")
    created = [f for f in (out, *out.parents) if not os.path.lexists(f)]  # deepest first
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise QddError(f"cannot create --out {out} ({error.strerror}): pass a folder you can "
                       "write to") from None  # fmt: skip
    try:
        with report_lock(out):
            earlier = _earlier(out)
            staging = _fresh_staging(out)
            try:
                try:
                    index = draw(staging)
                except OSError as error:
                    raise _unwritable(out, staging, error) from None
                return _publish(out, staging, earlier, index.relative_to(staging).as_posix())
            finally:
                shutil.rmtree(staging, ignore_errors=True)  # else the next report removes it
    except BaseException:
        for folder in created:  # a failed first report leaves no empty folder behind
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: a file moved in before the failure, listed in MANIFEST
        raise


def _publish(out: Path, staging: Path, earlier: list[str], index: str) -> Path:
    """Move the drawn files from ``staging`` into ``out``, then remove the earlier
    report's files this one did not write; ``MANIFEST`` lists every file of ``out`` that
    is a report's at each step."""
    drawn = _drawn(staging)
    for name in drawn:  # before anything moves: refuse to write over what is not ours
        blocked = _blocked(out, name, set(earlier))
        if blocked is not None:
            raise QddError(f"--out {out} holds {blocked}: move it away, or pass a new --out")
    _write_manifest(out, staging, sorted(set(earlier) | set(drawn)))
    for name in sorted(drawn, key=lambda n: n == index):  # the index last
        target = out.joinpath(*PurePosixPath(name).parts)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, target)
        except OSError as error:
            raise QddError(
                f"cannot write {target} ({error.strerror}): allow writing to {target.parent}, "
                f"then run the report again ({MANIFEST} lists both reports' files, so the "
                "next one cleans up)"
            ) from None
    kept: list[tuple[str, OSError]] = []
    for name in sorted(set(earlier) - set(drawn)):
        path = _listed_file(out, name)
        if path is None:
            continue
        try:
            path.unlink()
        except OSError as error:
            kept.append((name, error))
            continue
        _prune(out, path.parent)
    _write_manifest(out, staging, sorted(set(drawn) | {name for name, _ in kept}))
    if kept:
        name, error = kept[0]
        path = out / name
        more = f" and {len(kept) - 1} more" if len(kept) > 1 else ""
        raise QddError(
            f"cannot remove {path}{more}, left by the earlier report ({error.strerror}): "
            f"allow writing to {path.parent} (chmod u+w) or delete it yourself; this report "
            f"is complete, and lists it in {MANIFEST} for the next one to remove"
        )
    return out / index


def _unwritable(out: Path, staging: Path, error: OSError) -> OSError | QddError:
    """One line for a file the report could not draw into ``staging`` (a name longer than
    the file system allows, a full disk); other errors, e.g. reading a run, stay as they
    are. The earlier report is untouched: nothing was published yet."""
    name, inside = Path(os.path.abspath(error.filename or "/")), Path(os.path.abspath(staging))
    written = error.filename is not None and name.is_relative_to(inside)
    if not written and error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return error
    shown = name.relative_to(inside).as_posix() if written else "a file"
    if len(shown) > 80:
        shown = f"{shown[:60]}…{shown[-12:]}"
    if error.errno == errno.ENAMETOOLONG:
        fix = ("its name is longer than the file system allows: shorten the detector or "
               "weights file names of the runs (they name the figures)")  # fmt: skip
    elif error.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"free space on the file system of {out}"
    else:
        fix = f"allow writing to {out}, or pass another --out"
    return QddError(f"cannot draw {shown} of the report ({error.strerror}): {fix}, then run "
                    f"the report again (--out {out} is as it was)")  # fmt: skip


def _drawn(staging: Path) -> list[str]:
    """The regular files a report drew, relative POSIX paths."""
    found = []
    for root, _, names in os.walk(staging):
        for name in names:
            path = Path(root, name)
            if not path.is_symlink() and path.is_file():
                found.append(path.relative_to(staging).as_posix())
    return sorted(found)


def _blocked(out: Path, name: str, earlier: set[str]) -> str | None:
    """What stands where the drawn file ``name`` goes and is not the earlier report's (a
    file of the user's, a link, a file where a folder goes), said for the error; None: its
    place is free or holds the earlier report's file."""
    parts = PurePosixPath(name).parts
    here = out
    for part in parts[:-1]:
        here = here / part
        if here.is_symlink() or (here.exists() and not here.is_dir()):
            kind = "a link" if here.is_symlink() else "a file"
            return f"{here.relative_to(out).as_posix()} ({kind}) where this report writes {name}"
    target = out.joinpath(*parts)
    if not os.path.lexists(target):
        return None
    if name in earlier and _listed_file(out, name) is not None:
        return None
    return (f"{name}, which no earlier report wrote (it is not in {MANIFEST}) and this report "
            "would write over")  # fmt: skip


def _write_manifest(out: Path, staging: Path, files: list[str]) -> None:
    """Replace ``out``'s file list at once (written in ``staging``, then renamed)."""
    draft = staging / MANIFEST
    try:
        draft.write_text(json.dumps({"files": files}, indent=1) + "\n")
        os.replace(draft, out / MANIFEST)
    except OSError as error:
        raise QddError(f"cannot write {out / MANIFEST} ({error.strerror}): allow writing to "
                       f"{out}, then run the report again") from None  # fmt: skip


def _fresh_staging(out: Path) -> Path:
    """An empty staging folder; one an interrupted report left is removed first."""
    staging = out / STAGING
    try:
        if staging.is_symlink() or staging.is_file():
            staging.unlink()
        elif staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
    except OSError as error:
        raise QddError(f"cannot prepare {staging}, the report's staging folder "
                       f"({error.strerror}): delete it yourself, or pass an --out folder you "
                       "can write to") from None  # fmt: skip
    return staging


def _first_foreign(folder: Path) -> str | None:
    """Some file or link under ``folder`` (the report's bookkeeping left out), or None;
    stops at the first (``--out ~`` is refused at once, not after walking the whole home
    folder)."""
    top = True
    for root, folders, names in os.walk(folder):
        if top:  # a lock or staging folder of a first report that was interrupted
            folders[:] = [f for f in folders if f not in _RESERVED]
            names = [n for n in names if n not in _RESERVED]
            top = False
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
    return read_file_list(manifest, "a report", "delete it, or pass a new --out folder")


def _listed_file(folder: Path, name: str) -> Path | None:
    """``folder/name`` when it is a regular file reached without leaving ``folder``: a
    hand-edited list naming ``../x``, ``/abs``, a link, a path through a linked folder or
    the report's bookkeeping never makes a report touch anything but its own files."""
    parts = PurePosixPath(name).parts
    path = inside(folder, name)
    if path is None or parts[0] in _RESERVED or path.is_symlink() or not path.is_file():
        return None
    return path


def _prune(root: Path, folder: Path) -> None:
    """Remove ``folder`` and its parents up to ``root`` while they are empty (tables/)."""
    root = root.resolve()
    folder = folder.resolve()
    try:
        while folder != root and folder.is_relative_to(root) and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent
    except OSError:
        pass  # an empty folder left behind harms no one
