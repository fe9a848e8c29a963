"""The flags ``qdd-cli`` commands share, declared once, and how a command line becomes the
config dict `qdd.api` takes.

One flag means one thing in every command: ``--data`` is repeatable everywhere and its
occurrences add up (``quality --data A --data B`` keeps both), as do ``--perturb``'s.
The Trainer commands (fit, validate, test, predict) parse only these short flags
(`trainer_config`); every other argument is LightningCLI's own (``--trainer.*``,
``--model.*``, ``--data.*``, ``--config``, ``--print_config``) and goes to it unchanged,
after the config dict, so it wins over it. No heavy import here: a bad flag answers at once.
"""

from __future__ import annotations

import argparse
from typing import Any

from qdd.errors import QddError

#: flag → (argparse keywords, help). Repeatable flags extend a list (``action="extend"``).
FLAGS: dict[str, dict[str, Any]] = {
    "--data": {"action": "extend", "nargs": "+", "metavar": "DIR|GLOB|PRESET",
               "help": "shard folder(s), quoted glob(s) or a preset under configs/data/; "
                       "repeatable: every occurrence adds up"},
    "--out": {"metavar": "DIR", "help": "the run folder (default: a fresh folder under runs/)"},
    "--detector": {"metavar": "NAME|YAML",
                   "help": "a registered detector (its packaged preset) or your own YAML"},
    "--weights": {"metavar": "FILE", "help": "the detector's weights: an official file or a "
                                             "`qdd-cli fit` checkpoint"},
    "--random-weights": {"action": "store_true", "default": None,
                         "help": "run with an untrained head, on purpose (smoke tests only)"},
    "--perturb": {"action": "extend", "nargs": "+", "metavar": "SPEC",
                  "help": "also after jpeg:Q, resize:S, blur:SIGMA, noise:SIGMA or crop:N "
                          "(repeatable)"},
    "--task": {"choices": ("detection", "attribution"),
               "help": "detection (real vs fake, the default) or attribution (which precision "
                       "made an image)"},
    "--attribute": {"choices": ("precision", "family"),
                    "help": "attribution's classes: each precision, or its family (16-bit, "
                            "8-bit, 4-bit weight-only, 4-bit W4A4, GGUF)"},
    "--seed": {"type": int, "metavar": "N", "help": "the random seed"},
}  # fmt: skip
#: The short flags of the Trainer commands (``--trainer`` takes a preset: cpu, gpu, ddp).
TRAINER_FLAGS = ("--detector", "--data", "--weights", "--random-weights", "--out", "--perturb",
                 "--task", "--attribute")


def add_flags(parser: argparse.ArgumentParser, *flags: str, **changes: dict[str, Any]) -> None:
    """Declare the shared ``flags`` on ``parser``; ``changes`` (keyed by dest, e.g.
    ``data={"required": True}``) adjust a flag's help or requiredness, never its meaning."""
    for flag in flags:
        dest = flag.lstrip("-").replace("-", "_")
        parser.add_argument(flag, **{**FLAGS[flag], **changes.get(dest, {})})


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise QddError(message)


def trainer_config(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """``qdd-cli fit|validate|test|predict ARGS`` as (the config dict `qdd.api` takes, the
    LightningCLI arguments left to it). ``--trainer NAME`` (no dot) is a Trainer preset."""
    parser = _Parser(prog="qdd-cli", add_help=False, allow_abbrev=False)
    add_flags(parser, *TRAINER_FLAGS)
    parser.add_argument("--trainer", metavar="PRESET")
    known, rest = parser.parse_known_args(argv)
    config = {key: value for key, value in vars(known).items() if value is not None}
    return config, rest
