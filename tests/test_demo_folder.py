"""``qdd-cli demo --overwrite`` replaces only what an earlier demo wrote (`qdd.demo_folder`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from qdd import demo
from qdd.demo import PARTS, run_demo
from qdd.demo_folder import MANIFEST, clear_earlier_demo, record_demo_files
from qdd.errors import QddError
from qdd.report.owned import write_report_folder


def _earlier_demo(out: Path, outside: Path) -> None:
    """A finished demo's folder in miniature, its parts written as their writers write them:
    a report into its owned folder, a run with W&B's links (one pointing out of the folder)."""
    for name in ("photos/train/astronaut_0_0.png", "prompts/train.txt",
                 "models/sd3/model_index.json", "shards/test/sd3-fp4/manifest.json",
                 "runs/test-npr/metrics.json"):  # fmt: skip
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    run = out / "runs" / "test-npr" / "wandb" / "offline-run-1"
    (run / "logs").mkdir(parents=True)
    (run / "run-1.wandb").write_bytes(b"w")
    (run / "tmp" / "code").mkdir(parents=True)  # W&B leaves empty folders too
    os.symlink("offline-run-1", run.parent / "latest-run")
    os.symlink(outside, run / "logs" / "debug-core.log")
    write_report_folder(out / "report", _draw_report)
    record_demo_files(out, PARTS)


def _draw_report(folder: Path) -> Path:
    (folder / "report.md").write_text("# qdd report\n")
    (folder / "tables").mkdir()
    (folder / "tables" / "groups.csv").write_text("a\n")
    return folder / "report.md"


def _tree(folder: Path) -> dict[str, bytes | str]:
    return {p.relative_to(folder).as_posix(): os.readlink(p) if p.is_symlink() else p.read_bytes()
            for p in folder.rglob("*") if p.is_symlink() or p.is_file()}  # fmt: skip


def _no_demo_steps(folder: Path) -> None:
    raise RuntimeError("the demo's steps started")


def test_overwrite_refuses_a_file_of_the_users_in_a_part_before_removing_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo, "photo_tiles", _no_demo_steps)  # fails fast, were it not refused
    out, outside = tmp_path / "demo", tmp_path / "core-debug.log"
    outside.write_text("the W&B service's log")
    _earlier_demo(out, outside)
    (out / "report" / "notes.md").write_text("my reading of the heatmap")
    before = _tree(out)
    with pytest.raises(QddError, match=r"report/notes\.md is not listed") as refused:
        run_demo(out, overwrite=True)
    assert "\n" not in str(refused.value)
    assert _tree(out) == before  # nothing removed, the list not rewritten


def test_overwrite_removes_the_listed_files_and_nothing_else(tmp_path: Path) -> None:
    out, outside = tmp_path / "demo", tmp_path / "core-debug.log"
    outside.write_text("the W&B service's log")
    _earlier_demo(out, outside)
    (out / "notes.md").write_text("beside the parts: never the demo's")
    (tmp_path / "elsewhere.txt").write_text("keep")
    listed = json.loads((out / MANIFEST).read_text())["files"]
    assert "runs/test-npr/wandb/offline-run-1/logs/debug-core.log" in listed
    assert "report/.qdd-report.json" in listed and "notes.md" not in listed
    # a hand-edited list never reaches beyond the parts
    (out / MANIFEST).write_text(json.dumps({"files": [*listed, "notes.md", "../elsewhere.txt"]}))
    clear_earlier_demo(out, PARTS)
    assert sorted(p.name for p in out.iterdir()) == ["notes.md"]
    assert outside.read_text() == "the W&B service's log"  # a link removed, not its target
    assert (tmp_path / "elsewhere.txt").is_file()


def test_an_older_demo_without_a_list_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    (out / "runs" / "test-npr").mkdir(parents=True)
    (out / "runs" / "test-npr" / "metrics.json").write_text("{}")
    with pytest.raises(QddError, match="is not listed"):
        clear_earlier_demo(out, PARTS)
    assert (out / "runs" / "test-npr" / "metrics.json").is_file()


def test_a_failed_demo_lists_what_it_wrote_and_the_next_overwrite_replaces_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "demo"
    runs = []

    def failing_tiles(folder: Path) -> None:
        runs.append(len(runs))
        (folder / "train").mkdir(parents=True, exist_ok=True)
        assert not (folder / "train" / "0.png").exists()  # the earlier demo's was removed
        (folder / "train" / "0.png").write_bytes(b"png")
        raise RuntimeError("failed on purpose")

    monkeypatch.setattr(demo, "photo_tiles", failing_tiles)
    monkeypatch.setenv("WANDB_SILENT", "true")  # what a quiet demo sets, restored after
    with pytest.raises(RuntimeError, match="on purpose"):
        run_demo(out)
    assert json.loads((out / MANIFEST).read_text())["files"] == ["photos/train/0.png"]
    with pytest.raises(RuntimeError, match="on purpose"):
        run_demo(out, overwrite=True)
    assert runs == [0, 1]
