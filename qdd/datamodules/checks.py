"""Checks of a run's splits at setup, so that what would fail later (after an epoch, or
silently) fails before the trainer starts, in one line: an empty split, a validation split
without both classes of readable images, a misspelt held-out generator."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence

from qdd.datamodules.reader import describe_problems, unreadable
from qdd.datamodules.split import Indexed
from qdd.errors import QddError

log = logging.getLogger(__name__)


def empty_split(
    split: str, paths: Sequence[str], val_fraction: float, test_fraction: float
) -> QddError:
    """The error of a split with no sample, naming the setting that would fill it."""
    fraction = {"train": "", "val": "val_fraction", "test": "test_fraction"}.get(split)
    name = {"val": "validation", "calibration": "calibration set"}.get(split, split)
    hint = f"add samples or raise --data.{fraction}" if fraction else "add samples"
    if split == "train":
        hint = "add samples, lower the fractions or check holdout_generators"
    settings = f"val_fraction={val_fraction}, test_fraction={test_fraction}"
    return QddError(
        f"the {name} split of {', '.join(map(str, paths))} is empty ({settings}): {hint}"
    )


def check_validation(
    samples: Sequence[Indexed],
    paths: Sequence[str],
    both_classes: bool = True,
    calibration_only: bool = False,
) -> None:
    """The validation split must hold readable images of both classes: its threshold and
    AUROC need them. Images are checked now (`qdd.datamodules.reader.image_problem`), not
    when the first epoch's threshold fails; unreadable ones left over are named in a
    warning (the loader skips them every epoch). ``both_classes=False`` (attribution,
    whose classes are precisions) asks for readable images only. ``calibration_only``: the
    samples are a training-free detector's calibration set (all but the test split)."""
    name = "calibration set (all but the test split)" if calibration_only else "validation split"
    widen = "lower --data.test_fraction" if calibration_only else "raise --data.val_fraction"
    problems = unreadable(samples)
    readable = [s for s in samples if (s.entry.shard, s.entry.key) not in problems]
    classes = Counter(s.label for s in readable)
    folders = ", ".join(map(str, paths))
    if not classes:
        raise QddError(
            f"no image of the {name} of {folders} can be read ({describe_problems(problems)}): "
            "re-create those shards"
        )
    for label, have, need in ((0, "real", "fake"), (1, "fake", "real")):
        if both_classes and classes[label] and not classes[1 - label]:
            bad = f"; {describe_problems(problems)}" if problems else ""
            fix = "re-create the unreadable shards, " if problems else ""
            raise QddError(
                f"the {name} of {folders} holds only {have} readable images "
                f"({classes[label]}){bad}: its threshold and AUROC need both classes; "
                f"{fix}add {need} shards to the validation folders or {widen}"
            )
    if problems:
        log.warning("validation images skipped every epoch: %s", describe_problems(problems))


def check_holdout(holdout: Iterable[str], present: set[str]) -> None:
    """A misspelt held-out generator (``SD3`` for ``sd3``) would hold out nothing."""
    from qdd.generation.registry import GENERATORS  # names only: no diffusers

    unknown = [g for g in holdout if g not in present and g not in GENERATORS]
    if unknown:
        raise QddError(
            f"holdout_generators names {', '.join(unknown)}, which no sample has: the "
            f"generators present are {', '.join(sorted(present)) or 'none'} "
            "(names are case-sensitive)"
        )
