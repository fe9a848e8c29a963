"""A demo prints its own step lines, warnings and errors; INFO lines only when verbose."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch  # noqa: F401 (sets its logger to INFO, with a handler of its own)
import pytest

from qdd import api, demo
from qdd.api import RunResult
from qdd.logs import VERBOSE_ENV
from tests.conftest import random_image


def _chatty_shard(config: dict) -> RunResult:
    """`api.shard` (which logs an INFO line) beside a Lightning-style INFO line and a
    warning, as a demo step's libraries print them."""
    logging.getLogger("lightning.pytorch").info("GPU available: False, used: False")
    logging.getLogger("qdd.demo_step").warning("heads up")
    return api.shard(config)


def _run_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str]]:
    """(level, message) of every record that reached a handler during one demo step."""
    reached: list[tuple[int, str]] = []
    call_handlers = logging.Logger.callHandlers

    def keep(self: logging.Logger, record: logging.LogRecord) -> None:
        reached.append((record.levelno, record.getMessage()))
        call_handlers(self, record)

    monkeypatch.setattr(logging.Logger, "callHandlers", keep)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        random_image(i, (16, 16)).save(photos / f"{i}.png")
    before = logging.root.manager.disable
    demo.call(_chatty_shard, src=str(photos), out=str(tmp_path / "shards"), label="real",
              source="photos")  # fmt: skip
    assert logging.root.manager.disable == before  # nothing stays switched off after a step
    return reached


def test_a_demo_step_shows_warnings_but_no_info_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    reached = _run_step(tmp_path, monkeypatch)
    assert (logging.WARNING, "heads up") in reached
    assert [m for level, m in reached if level < logging.WARNING] == []


def test_a_verbose_demo_step_shows_info_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(VERBOSE_ENV, "1")
    messages = [m for _, m in _run_step(tmp_path, monkeypatch)]
    assert "GPU available: False, used: False" in messages and "heads up" in messages
    assert any(m.startswith("wrote 2 samples") for m in messages)  # qdd's own INFO line
