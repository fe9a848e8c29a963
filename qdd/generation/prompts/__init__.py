"""Prompt sets: a text file with one prompt per line, or the built-in default set.

The default set (``default.txt``, 306 prompts) was written for this project: everyday
scenes, animals, food, people, places and objects in photographic and painted styles, with
no artist names, trademarks or people who exist, so the generated images can be shared.

A prompt's id is its position among the non-empty lines (0-based); together with the base
seed it fixes the sample key, so the same file gives the same keys at every precision.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from qdd.errors import QddError

DEFAULT_FILE = Path(__file__).with_name("default.txt")


def load_prompts(path: str | Path | None = None) -> list[str]:
    """The prompts of ``path`` (default: the built-in set), blank lines skipped."""
    source = DEFAULT_FILE if path is None else Path(path)
    if not source.is_file():
        raise QddError(f"prompt file {source} not found: pass --prompts FILE (one prompt a line)")
    prompts = [line.strip() for line in source.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise QddError(f"prompt file {source} holds no prompts: write one prompt per line")
    return prompts


def default_prompts() -> list[str]:
    """The built-in prompt set."""
    return load_prompts(None)


def prompts_digest(prompts: list[str]) -> str:
    """A short fingerprint of a prompt list (recorded so a resumed run uses the same one)."""
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()[:16]
