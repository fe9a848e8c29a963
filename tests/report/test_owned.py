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


def test_a_listed_link_removes_the_link_never_the_file_it_points_to(make_run, tmp_path) -> None:
    """A hand-edited list, or a figure the user replaced by a link: only the report's own
    regular files inside the folder are ever removed."""
    run = make_run("npr", "npr", GRID)
    out = tmp_path / "report"
    run_report([run], out)
    (out / "mine.png").write_text("mine")
    (out / "kde_old.png").symlink_to("mine.png")  # inside, pointing at the user's file
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "v.txt").write_text("keep")
    (tmp_path / "v.txt").write_text("keep")
    (out / "linked").symlink_to(outside, target_is_directory=True)
    manifest = out / MANIFEST
    listed = json.loads(manifest.read_text())["files"]
    extra = ["kde_old.png", "../v.txt", str(tmp_path / "v.txt"), "linked/v.txt",
             "tables/../../v.txt", "mine.png/.."]  # fmt: skip
    manifest.write_text(json.dumps({"files": listed + extra}))
    run_report([run], out)
    assert (out / "mine.png").read_text() == "mine"
    assert (outside / "v.txt").read_text() == "keep" and (tmp_path / "v.txt").read_text() == "keep"
    assert (out / "kde_old.png").is_symlink()
    assert set(json.loads(manifest.read_text())["files"]) == set(listed)


@pytest.mark.parametrize("files", [None, 5, "report.md", [None], [{"a": 1}]])
def test_a_list_that_is_not_a_list_of_names_is_refused_in_one_line(
    make_run, tmp_path, capsys, files
) -> None:
    run = make_run("npr", "npr", GRID)
    out = tmp_path / "report"
    run_report([run], out)
    before = sorted(p.name for p in out.rglob("*"))
    (out / MANIFEST).write_text(json.dumps({"files": files}))
    with pytest.raises(SystemExit) as info:
        main(["report", str(run), "--out", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a report's file list" in err[0]
    assert sorted(p.name for p in out.rglob("*")) == before


def test_a_failed_report_keeps_the_earlier_files_times(make_run, tmp_path) -> None:
    run = make_run("npr", "npr", GRID)
    out = tmp_path / "report"
    run_report([run], out)
    times = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != MANIFEST}
    with pytest.raises(QddError, match="does not exist"):
        run_report([tmp_path / "nope"], out)
    assert {p: p.stat().st_mtime_ns for p in times} == times


def test_a_folder_of_links_only_is_not_taken_for_an_empty_one(tmp_path, capsys) -> None:
    target = tmp_path / "data"
    target.mkdir()
    (target / "big.bin").write_text("x")
    out = tmp_path / "out"
    out.mkdir()
    (out / "data").symlink_to(target, target_is_directory=True)
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path / "nope"), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no qdd-cli report wrote (e.g. data)" in err[0]
    assert (target / "big.bin").is_file() and not (out / MANIFEST).exists()


def test_a_ranking_with_the_default_out_leaves_the_full_report_alone(
    make_run, tmp_path, monkeypatch, capsys
) -> None:
    """Both without --out: the ranking goes to compare/, never replacing report/'s figures."""
    npr = make_run("npr", "npr", GRID)
    tuned = make_run("npr-tuned", "npr", GRID, seed=1, weights="checkpoints/tuned.ckpt")
    monkeypatch.chdir(tmp_path)
    main(["report", str(npr), str(tuned)])
    figures = sorted(p.name for p in (tmp_path / "report").rglob("*"))
    main(["report", "--compare", str(npr), str(tuned)])
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-2:] == ["report/report.md", "compare/compare.md"]
    assert sorted(p.name for p in (tmp_path / "report").rglob("*")) == figures
    assert (tmp_path / "compare" / "compare.csv").is_file()


def test_a_users_file_saved_during_a_report_is_never_taken_for_the_reports(
    make_run, tmp_path, monkeypatch
) -> None:
    import qdd.report.command as command

    run = make_run("npr", "npr", GRID)
    out = tmp_path / "report"
    run_report([run], out)
    notes = out / "notes.md"
    notes.write_text("mine")
    draw = command.build_report

    def draw_while_the_user_saves(runs, folder):
        notes.write_text("mine, edited while the report ran")
        return draw(runs, folder)

    monkeypatch.setattr(command, "build_report", draw_while_the_user_saves)
    run_report([run], out)
    assert "notes.md" not in json.loads((out / MANIFEST).read_text())["files"]
    monkeypatch.setattr(command, "build_report", draw)
    run_report([make_run("clipd", "clipd", GRID)], out)  # removes npr's figures
    assert notes.read_text() == "mine, edited while the report ran"
    assert not (out / "kde_npr.png").exists()


def test_a_users_own_report_md_is_not_taken_for_an_older_qdd_report(
    make_run, tmp_path, capsys
) -> None:
    """``--out .`` in a project whose report.md is the user's: never "remove the folder"."""
    run = make_run("npr", "npr", GRID)
    project = tmp_path / "project"
    project.mkdir()
    (project / "report.md").write_text("# My project report\n")
    with pytest.raises(SystemExit):
        main(["report", str(run), "--out", str(project)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no qdd-cli report wrote" in err[0] and "remove" not in err[0]
    assert (project / "report.md").read_text() == "# My project report\n"
