"""``qdd-cli detectors``: every registered detector's card as one table.

Family, how images are fed at test time, the files each needs and their licence, so a
user knows what to download (checkpoints/README.md says where from) before a run; read
from the cards alone (`qdd.detectors.cards`), so no model library is imported. The
``fit`` column says what ``qdd-cli fit`` does: train, or for a training-free detector only
calibrate a threshold (`qdd.training_free`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from qdd.detectors.card import FAMILIES

COLUMNS = ("detector", "family", "fit", "test-time input", "files", "licence")
#: The ``fit`` cell of a training-free detector: `qdd-cli fit` calibrates, trains nothing.
CALIBRATION_ONLY = "calibrates a threshold only"


def rows() -> list[tuple[str, ...]]:
    """One row per detector, by family (as `FAMILIES` orders them), then name."""
    from qdd.detectors.registry import cards as registered_cards

    cards = sorted(registered_cards().items(),
                   key=lambda item: (FAMILIES.index(item[1].family), item[0]))  # fmt: skip
    return [
        (name, card.family, "yes" if card.trainable else CALIBRATION_ONLY, card.input_policy(),
         "; ".join(card.files), card.licence)
        for name, card in cards
    ]  # fmt: skip


def markdown(table: list[tuple[str, ...]]) -> str:
    lines = [f"| {' | '.join(COLUMNS)} |", f"|{'---|' * len(COLUMNS)}"]
    lines += [f"| {' | '.join(row)} |" for row in table]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="qdd-cli detectors",
        description="Every detector: family, test-time input, files it needs, licence "
        "(a Markdown table). Where each file comes from: checkpoints/README.md. A "
        "training-free detector's `qdd-cli fit` trains nothing: it calibrates a threshold "
        "on all but the test split, for `qdd-cli test --ckpt_path`.",
    )
    parser.parse_args(argv)
    print(markdown(rows()))
