"""The suite's own layout: pytest's rootdir import mode needs unique test module names."""

from __future__ import annotations

from collections import Counter
from pathlib import Path


def test_test_module_basenames_are_unique() -> None:
    """Two tests/**/test_x.py without __init__.py stop collection with an import mismatch."""
    names = Counter(p.name for p in Path(__file__).parent.rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []
