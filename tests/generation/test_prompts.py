from __future__ import annotations

from pathlib import Path

import pytest

from qdd.errors import QddError
from qdd.generation.jobs import sample_key, work_items
from qdd.generation.prompts import default_prompts, load_prompts, prompts_digest


def test_default_set_is_a_few_hundred_distinct_prompts() -> None:
    prompts = default_prompts()
    assert 250 <= len(prompts) <= 400
    assert len(set(prompts)) == len(prompts)
    assert all(5 <= len(p.split()) <= 30 for p in prompts)


def test_prompt_file_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("a cat\n\n  a dog  \n")
    assert load_prompts(path) == ["a cat", "a dog"]
    assert prompts_digest(["a cat", "a dog"]) != prompts_digest(["a dog", "a cat"])


def test_missing_or_empty_prompt_file(tmp_path: Path) -> None:
    with pytest.raises(QddError, match="not found"):
        load_prompts(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(QddError, match="no prompts"):
        load_prompts(tmp_path / "empty.txt")


def test_seeds_and_keys_follow_the_prompt_id() -> None:
    items = work_items(["a", "b", "c"], base_seed=100, limit=2)
    assert [(i.prompt_id, i.seed, i.key) for i in items] == [
        (0, 100, "p00000-s100"),
        (1, 101, "p00001-s101"),
    ]
    assert sample_key(42, 7) == "p00042-s7"
    with pytest.raises(QddError):
        work_items(["a"], 0, limit=0)
