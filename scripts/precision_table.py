"""Print the precision table of docs/quantization.md from the registry, or rewrite it there.

    python scripts/precision_table.py          # print it
    python scripts/precision_table.py --write  # replace the table in docs/quantization.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qdd.quant import registry

DOC = Path(__file__).resolve().parents[1] / "docs" / "quantization.md"
BEGIN = "<!-- precision table:"
END = "<!-- end of precision table -->"


def documented_table(text: str) -> str:
    """The table between the markers of docs/quantization.md."""
    start = text.index("\n", text.index(BEGIN)) + 1
    return text[start : text.index(END)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite docs/quantization.md")
    table = registry.render_table()
    if not parser.parse_args().write:
        print(table, end="")
        return
    text = DOC.read_text()
    DOC.write_text(text.replace(documented_table(text), table))


if __name__ == "__main__":
    main()
