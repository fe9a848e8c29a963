"""``qdd-cli report --out DIR`` published whole or not at all: a report that fails or is
killed while drawing leaves the earlier one intact, a second report at once is refused,
a file the report cannot remove or overwrite ends in one line, and nothing is lost."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from qdd.cli import main
from qdd.errors import QddError
from qdd.report.command import run_report
from qdd.report.lock import LOCK
from qdd.report.owned import MANIFEST, STAGING
from tests.report.conftest import write_run

GRID = {"sd3": ["fp32", "fp4"]}
ROOT = Path(__file__).resolve().parents[2]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every entry under ``folder``: its bytes and time (files), or a marker (folders)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_file():
            found[name] = (path.read_bytes(), path.stat().st_mtime_ns)
        else:
            found[name] = (b"<folder>", 0)
    return found


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def drawn_once(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """npr's and clipd's runs and their report, drawn once for the module (each report
    draws a dozen figures: seconds on a loaded host); returns (npr's run, the report)."""
    root = tmp_path_factory.mktemp("earlier")
    npr = write_run(root / "runs" / "npr", "npr", GRID)
    clipd = write_run(root / "runs" / "clipd", "clipd", GRID, seed=1)
    run_report([npr, clipd], root / "report")
    return npr, root / "report"


@pytest.fixture
def earlier(drawn_once, tmp_path) -> tuple[Path, Path, dict[str, tuple[bytes, int]]]:
    """A copy of that report in tmp_path/report (bytes and times as drawn); returns (npr's
    run, folder, snapshot)."""
    npr, drawn = drawn_once
    out = tmp_path / "report"
    shutil.copytree(drawn, out)
    return npr, out, snapshot(out)


def test_a_report_that_fails_while_drawing_leaves_the_earlier_one_whole(
    earlier, make_run, monkeypatch
) -> None:
    """The heatmaps come after the KDE and paired figures: today's main had rewritten
    kde_npr.png and paired_npr.png with the new runs' figures beside the old report.md."""
    import qdd.report.heatmap

    _, out, before = earlier
    plain = make_run("npr-plain", "npr", GRID, seed=7)  # other scores: other KDE bytes

    for failure in (RuntimeError("a figure function failed"), KeyboardInterrupt()):

        def broken(*args, failure=failure, **kwargs):
            raise failure  # a bug, or Ctrl-C while drawing

        monkeypatch.setattr(qdd.report.heatmap, "plot_heatmap", broken)
        with pytest.raises(type(failure)):
            run_report([plain], out)
        assert snapshot(out) == before  # bytes and times, the file list included
        assert not (out / STAGING).exists() and not (out / LOCK).exists()
    monkeypatch.undo()
    run_report([plain], out)  # the next report replaces it as usual
    assert not (out / "kde_clipd.png").exists() and (out / "kde_npr.png").is_file()


def test_a_killed_report_leaves_the_earlier_one_whole_and_blocks_no_one(earlier, make_run) -> None:
    """A report killed (SIGKILL) while it draws, holding the lock: the earlier report is
    untouched, and the next report reclaims the staging folder and is not locked out."""
    _, out, before = earlier
    plain = make_run("npr-plain", "npr", GRID, seed=7)
    script = textwrap.dedent(f"""
        import os, signal
        import qdd.report.heatmap
        from qdd.report.command import run_report

        def killed(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)

        qdd.report.heatmap.plot_heatmap = killed
        run_report([{str(plain)!r}], {str(out)!r})
    """)  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    assert list((out / STAGING).glob("kde_npr.*")), "killed after the KDE figures were drawn"
    left = {n: v for n, v in snapshot(out).items() if not n.startswith((STAGING, LOCK))}
    assert left == before
    index = run_report([plain], out)
    assert index == out / "report.md" and not (out / STAGING).exists()
    assert not (out / LOCK).exists() and not (out / "kde_clipd.png").exists()
    listed = set(json.loads((out / MANIFEST).read_text())["files"])
    assert listed == {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {
        MANIFEST
    }


def test_a_first_report_killed_before_it_published_leaves_a_folder_the_next_one_takes(
    make_run, tmp_path
) -> None:
    """Only the report's bookkeeping in the folder (today's main refused it as a folder
    no report wrote)."""
    out = tmp_path / "report"
    (out / STAGING / "tables").mkdir(parents=True)
    (out / STAGING / "tables" / "groups.csv").write_text("half-drawn")
    (out / LOCK).write_text("")
    run_report([make_run("npr", "npr", GRID)], out)
    assert not (out / STAGING).exists() and (out / "report.md").is_file()
    assert "half-drawn" not in (out / "tables" / "groups.csv").read_text()


def test_a_second_report_into_a_folder_being_written_is_refused(
    earlier, capsys, monkeypatch
) -> None:
    """Another report holds the folder's lock (flock on its lock file), however the second
    spells the folder: absolute, relative, through a link."""
    npr, out, before = earlier
    (out.parent / "linked").symlink_to(out, target_is_directory=True)
    monkeypatch.chdir(out.parent)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for spelled in (str(out), "report", "linked", "./linked/"):  # one folder, one lock
            with pytest.raises(SystemExit) as info:
                main(["report", str(npr), "--out", spelled])
            assert info.value.code == 2
            line = one_error_line(capsys)
            assert "another qdd-cli report is writing into --out" in line, spelled
            assert "pass another --out" in line
        assert {n: v for n, v in snapshot(out).items() if n != LOCK} == before
    finally:
        os.close(fd)  # the holder ends: the lock goes with it
    run_report([npr], out)
    assert not (out / "kde_clipd.png").exists()


def test_an_old_file_that_cannot_be_removed_ends_in_one_line_and_loses_nothing(
    earlier, make_run, monkeypatch, capsys
) -> None:
    """Unlink raising PermissionError (a read-only folder; as root chmod would not stop
    it, so the test raises it itself and runs everywhere). Today's main: a traceback."""
    _, out, _ = earlier
    plain = make_run("npr-plain", "npr", GRID, seed=7)
    unlink = Path.unlink

    def refused(self: Path, missing_ok: bool = False) -> None:
        if self.name == "kde_clipd.png":
            raise PermissionError(13, "Permission denied", str(self))
        unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refused)
    with pytest.raises(SystemExit) as info:
        main(["report", str(plain), "--out", str(out)])
    assert info.value.code == 2
    line = one_error_line(capsys)
    assert f"cannot remove {out / 'kde_clipd.png'}, left by the earlier report" in line
    assert "Permission denied" in line and "chmod u+w" in line
    # this report is whole; the file it could not remove stays listed for the next one
    assert "kde_clipd" not in (out / "report.md").read_text()
    assert (out / "kde_clipd.png").is_file()
    assert "kde_clipd.png" in json.loads((out / MANIFEST).read_text())["files"]
    assert not (out / STAGING).exists() and not (out / LOCK).exists()
    monkeypatch.undo()
    run_report([plain], out)
    assert not (out / "kde_clipd.png").exists()
    assert "kde_clipd.png" not in json.loads((out / MANIFEST).read_text())["files"]


def test_a_file_that_cannot_be_moved_in_ends_in_one_line(
    earlier, make_run, monkeypatch, capsys
) -> None:
    """A rename refused half-way (a read-only tables/): one line; both reports' files stay
    listed, so the next report cleans up."""
    _, out, before = earlier
    plain = make_run("npr-plain", "npr", GRID, seed=7)
    replace = os.replace

    def refused(source, target):
        if Path(target).parent.name == "tables":
            raise PermissionError(13, "Permission denied", str(target))
        replace(source, target)

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(SystemExit) as info:
        main(["report", str(plain), "--out", str(out)])
    assert info.value.code == 2
    line = one_error_line(capsys)
    assert f"cannot write {out / 'tables'}" in line and "allow writing to" in line
    assert not (out / STAGING).exists()
    listed = set(json.loads((out / MANIFEST).read_text())["files"])
    assert set(before) - {MANIFEST, "tables"} <= listed
    monkeypatch.undo()
    run_report([plain], out)
    assert not (out / "kde_clipd.png").exists()


def test_a_users_file_where_the_report_writes_is_refused_before_anything_moves(
    make_run, tmp_path, capsys
) -> None:
    """Today's main wrote over it (and, as the file was there before, did not list it)."""
    npr = make_run("npr", "npr", GRID)
    out = tmp_path / "report"
    run_report([npr], out)
    (out / "kde_clipd.png").write_text("mine")
    before = snapshot(out)
    with pytest.raises(SystemExit) as info:
        main(["report", str(npr), str(make_run("clipd", "clipd", GRID, seed=1)), "--out",
              str(out)])  # fmt: skip
    assert info.value.code == 2
    line = one_error_line(capsys)
    assert line.endswith(f"--out {out} holds kde_clipd.png, which no earlier report wrote (it "
                         f"is not in {MANIFEST}) and this report would write over: move it "
                         "away, or pass a new --out")  # fmt: skip
    assert snapshot(out) == before
    (out / "kde_clipd.png").unlink()
    (out / "tables").rename(out / "my-tables")
    (out / "tables").symlink_to("my-tables", target_is_directory=True)  # a link in the way
    before = snapshot(out)
    with pytest.raises(SystemExit):
        main(["report", str(npr), "--out", str(out)])
    assert f"--out {out} holds tables (a link) where this report writes tables/" in (
        one_error_line(capsys))  # fmt: skip
    assert snapshot(out) == before


def test_the_index_moves_in_after_every_figure_and_the_list_first_and_last(
    make_run, tmp_path, monkeypatch
) -> None:
    """report.md never links a figure that is not there yet; the file list names every
    file of both reports while they move."""
    out = tmp_path / "report"
    run_report([make_run("npr", "npr", GRID)], out)
    moved = []
    replace = os.replace

    def recorded(source, target):
        moved.append(Path(target).relative_to(out).as_posix())
        replace(source, target)

    monkeypatch.setattr(os, "replace", recorded)
    run_report([make_run("clipd", "clipd", GRID, seed=1)], out)
    assert moved[0] == moved[-1] == MANIFEST and moved[-2] == "report.md"
    assert "kde_clipd.png" in moved and MANIFEST not in moved[1:-1]


def test_a_lock_file_replaced_while_it_was_being_locked_is_locked_anew(
    make_run, tmp_path, monkeypatch
) -> None:
    """The holder before us removed the lock file between our open and our flock: holding
    the removed file would guard nothing, so the new file at the path is locked."""
    import qdd.report.lock as lock

    out = tmp_path / "report"
    out.mkdir()
    flock, held = fcntl.flock, []

    def race(fd: int, operation: int) -> None:
        if not held:  # the earlier holder finishes right now: its file goes
            (out / LOCK).unlink()
            (out / LOCK).write_text("")  # and a third report creates the next one
        flock(fd, operation)
        held.append(os.fstat(fd).st_ino)

    monkeypatch.setattr(lock.fcntl, "flock", race)
    run_report([make_run("npr", "npr", GRID)], out)
    assert len(held) == 2 and held[0] != held[1]  # tried again, on the new file
    assert (out / "report.md").is_file() and not (out / LOCK).exists()


def test_a_file_system_without_locks_runs_the_report_with_a_warning(
    make_run, tmp_path, monkeypatch, caplog
) -> None:
    import errno

    import qdd.report.lock as lock

    def unsupported(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(lock.fcntl, "flock", unsupported)
    out = tmp_path / "report"
    run_report([make_run("npr", "npr", GRID)], out)
    assert (out / "report.md").is_file() and not (out / LOCK).exists()
    assert f"cannot lock --out {out} (No locks available)" in caplog.text


def test_two_reports_at_once_one_is_refused_the_other_completes(
    earlier, make_run, tmp_path, capsys
) -> None:
    """A second process draws into the folder (held at its heatmaps until the test lets
    go); a report started meanwhile is refused and changes nothing."""
    npr, out, before = earlier
    plain = make_run("npr-plain", "npr", GRID, seed=7)
    drawing, go = tmp_path / "drawing", tmp_path / "go"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        import qdd.report.heatmap
        from qdd.report.command import run_report

        draw = qdd.report.heatmap.plot_heatmap

        def held(*args, **kwargs):
            Path({str(drawing)!r}).touch()
            while not Path({str(go)!r}).exists():
                time.sleep(0.05)
            return draw(*args, **kwargs)

        qdd.report.heatmap.plot_heatmap = held
        run_report([{str(plain)!r}], {str(out)!r})
    """)  # fmt: skip
    first = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE)
    try:
        waited = 0.0
        while not drawing.exists() and first.poll() is None and waited < 240:
            time.sleep(0.05)
            waited += 0.05
        assert drawing.exists(), first.stderr.read().decode()[-2000:] if first.stderr else ""
        with pytest.raises(SystemExit) as info:
            main(["report", str(npr), "--out", str(out)])
        assert info.value.code == 2
        assert f"another qdd-cli report is writing into --out {out}" in one_error_line(capsys)
        published = {n: v for n, v in snapshot(out).items() if not n.startswith((STAGING, LOCK))}
        assert published == before  # the first has not published yet; the second wrote nothing
    finally:
        go.touch()
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err.decode()[-2000:]
    assert not (out / "kde_clipd.png").exists() and not (out / LOCK).exists()
    assert "npr-plain" in (out / "report.md").read_text()


@pytest.mark.filterwarnings("ignore:constrained_layout not applied")  # a 250-letter title
def test_a_figure_that_cannot_be_written_ends_in_one_line_and_changes_nothing(
    make_run, tmp_path, capsys
) -> None:
    """A detector name that makes a file name longer than the file system allows (255
    bytes), and a full disk: today's main ended both in an OSError traceback (and left
    the parent folders a failed first report had created)."""
    import errno

    from qdd.report.owned import write_report_folder

    npr = make_run("npr", "npr", GRID)
    out = tmp_path / "report"
    run_report([npr], out)
    before = snapshot(out)
    long = make_run("long", "n" * 250, GRID, seed=3)
    for folder in (out, tmp_path / "first" / "report"):  # a first one leaves no folder
        with pytest.raises(SystemExit) as info:
            main(["report", str(long), "--out", str(folder)])
        assert info.value.code == 2
        line = one_error_line(capsys)
        assert "cannot draw kde_nnnn" in line and "(File name too long)" in line, line
        assert "shorten the detector or weights file names" in line and len(line) < 400
    assert snapshot(out) == before and not (tmp_path / "first").exists()

    def full(folder: Path) -> Path:
        (folder / "report.md").write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(QddError, match=f"free space on the file system of {out}"):
        write_report_folder(out, full)
    assert snapshot(out) == before
