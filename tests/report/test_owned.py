"""A reused ``qdd-cli report --out DIR`` leaves only the current report's files, and never
touches a file no report wrote."""

from __future__ import annotations

import json
import re

import pytest

from qdd.cli import main
from qdd.errors import QddError
from qdd.report.command import run_report
from qdd.report.owned import MANIFEST

GRID = {"sd3": ["fp32", "fp4"]}


def linked(report: str) -> set[str]:
    """Every file report.md links."""
    return set(re.findall(r"\]\(([^)]+)\)", report))


def test_a_second_report_removes_the_first_ones_figures_and_keeps_the_users_files(
    make_run, tmp_path
) -> None:
    npr = make_run("npr", "npr", GRID, perturbations=("none", "jpeg:75"))
    clipd = make_run("clipd", "clipd", GRID, seed=1)
    out = tmp_path / "report"
    run_report([npr, clipd], out)
    assert (out / "kde_clipd.png").is_file() and (out / "robustness_npr.png").is_file()
    (out / "notes.txt").write_text("mine")  # the user's, added after the first report
    plain = make_run("npr-plain", "npr", GRID)
    index = run_report([plain], out)
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    # no figure of clipd, no robustness curve: only what this report drew and links
    assert not any("clipd" in n or "robustness" in n or "perturbed" in n for n in names)
    assert linked(index.read_text()) <= names
    assert (out / "notes.txt").read_text() == "mine"
    listed = set(json.loads((out / MANIFEST).read_text())["files"])
    assert listed == names - {"notes.txt", MANIFEST}
    assert not (out / "tables" / "robustness.csv").exists()


def test_the_same_report_twice_keeps_every_file(make_run, tmp_path) -> None:
    """Byte-identical rewrites count as written (the report is deterministic)."""
    run = make_run("npr", "npr", GRID)
    out = tmp_path / "report"
    run_report([run], out)
    first = sorted(p.name for p in out.rglob("*"))
    run_report([run], out)
    assert sorted(p.name for p in out.rglob("*")) == first


def test_a_folder_no_report_wrote_is_refused_in_one_line(make_run, tmp_path, capsys) -> None:
    run = make_run("npr", "npr", GRID)
    with pytest.raises(SystemExit) as info:
        main(["report", str(run), "--out", str(run.parent)])  # the runs folder itself
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no qdd-cli report wrote" in err[0] and "new or empty" in err[0]
    assert sorted(p.name for p in run.iterdir()) == ["metrics.json", "scores.parquet"]
    assert not (run.parent / MANIFEST).exists()


def test_a_failed_report_removes_nothing(make_run, tmp_path) -> None:
    run = make_run("npr", "npr", GRID)
    out = tmp_path / "report"
    run_report([run], out)
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(QddError, match="does not exist"):
        run_report([tmp_path / "nope"], out)
    assert sorted(p.name for p in out.rglob("*")) == before
    with pytest.raises(QddError, match="does not exist"):
        run_report([tmp_path / "nope"], tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()  # a failed first report leaves no folder


def test_a_report_of_an_older_qdd_is_named_as_such(make_run, tmp_path) -> None:
    run = make_run("npr", "npr", GRID)
    out = tmp_path / "report"
    run_report([run], out)
    (out / MANIFEST).unlink()  # as an older qdd left it
    with pytest.raises(QddError, match="holds a report written before qdd listed") as info:
        run_report([run], out)
    assert "\n" not in str(info.value) and (out / "report.md").is_file()
