"""``qdd-cli``: one entry point for the whole study; it parses, then calls `qdd.api`.

The Trainer subcommands (fit, validate, test, predict) are LightningCLI
(`qdd.lightning_cli`); their short flags are rewritten into plain LightningCLI arguments
first, so ``--config``, ``--trainer.*``, ``--model.*``, ``--data.*`` and
``--print_config`` work as Lightning documents them:

==========================  ==================================================================
``--detector npr``          ``--config configs/detectors/npr.yaml`` (the packaged preset, or a
                            YAML you name), else ``--model.detector=NAME``
``--data X``                a preset under ``configs/data/`` (or a YAML) → ``--data X.yaml``;
                            anything else (folder, glob; repeatable) → ``--data.paths``
``--weights F``             ``--model.weights=F``; ``--random-weights``: ``--model.random_weights``
``--out DIR``               the run folder, ``--trainer.default_root_dir=DIR``
``--trainer cpu|gpu|ddp``   ``--config configs/trainer/NAME.yaml``
``--perturb SPEC``          ``--data.perturb=[...]`` (repeatable); ``none`` always runs
==========================  ==================================================================

Presets come first, so later flags such as ``--data.batch_size=8`` still override. Nothing
heavy is imported before a command runs: ``qdd-cli test --help`` and a bad ``--data``
answer before Lightning (~7 s to import), weights or models are touched. The other
subcommands run the ``main(argv)`` of their module (`COMMANDS`). A `QddError` ends in one
line on stderr and exit code 2; the run folder is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from importlib import import_module
from importlib.util import find_spec

from qdd import __version__
from qdd.api import check_data, preset, read_yaml
from qdd.errors import QddError
from qdd.logs import VERBOSE_ENV, configure_logging, is_verbose

__all__ = ["VERBOSE_ENV", "main"]

TRAINER_COMMANDS = {
    "fit": "train a detector on shards (FP4-augmented retraining)",
    "validate": "run a detector's validation loop",
    "test": "benchmark a detector on shards: metrics.json + scores.parquet",
    "predict": "score shards with a detector",
}
#: The other subcommands: the ``module:function`` taking the arguments, and what it does.
COMMANDS = {
    "shard": ("qdd.cli:shard_command", "turn a folder of images (real photos) into shards"),
    "generate": ("qdd.generation.command:main", "generate images at each precision"),
    "detectors": ("qdd.cli:detectors_command", "every detector: family, input, files, licence"),
    "quality": ("qdd.quality:main", "PSNR, SSIM, LPIPS, FID of each image vs its fp32 twin"),
    "report": ("qdd.report.command:main", "draw the study's figures and tables from runs"),
    "quantize": ("qdd.generation.quantize:main", "write a deployable quantized denoiser file"),
    "sweep": ("qdd.sweep:main", "run a W&B sweep (grid or random) offline: a fit per trial"),
    "demo": ("qdd.demo:main", "the whole study in miniature, offline, on CPU"),
}
#: The flag that shows LightningCLI's full help (every --trainer.*, --model.*, --data.*).
HELP_ALL = "--help-all"
_PURPOSE = {
    "fit": "Train a detector on shards: real vs fake, split into train/val/test by prompt_id.\n"
    "Writes checkpoints/ (last.ckpt and the best), metrics.json and config.yaml into --out.",
    "validate": "Run a detector's validation loop on shards (the validation side of a fit).",
    "test": "Benchmark a detector on shards: metrics per generator x precision.\n"
    "Writes metrics.json, scores.parquet (one logit per image) and config.yaml into --out.",
    "predict": "Score shards with a detector: scores.parquet (one logit per image), no metrics.",
}
_EXAMPLES = {
    "fit": [
        "qdd-cli fit --detector npr --data shards/real-coco --data 'shards/sd3-*' "
        "--random-weights --out runs/npr-fp4aug",
        "qdd-cli fit --detector npr --data 'shards/*' --random-weights "
        "--trainer.max_steps=200 --data.batch_size=16",
        "qdd-cli fit --detector clipd --data 'shards/*' --weights checkpoints/clipd.pth",
    ],
    "test": [
        "qdd-cli test --detector npr --data shards/sd3-fp4 --data shards/real-coco",
        "qdd-cli test --detector clipd --data paper --out runs/clipd-paper",
        "qdd-cli test --detector npr --data 'shards/*' --data.split=test "
        "--ckpt_path runs/fit-npr/checkpoints/last.ckpt   (the fit's held-out split)",
    ],
}


def short_help(command: str) -> str:
    """The help of ``qdd-cli COMMAND --help``: qdd's flags and examples, then where the rest is."""
    examples = _EXAMPLES.get(command, _EXAMPLES["test"])
    if command not in _EXAMPLES:
        examples = [e.replace("qdd-cli test", f"qdd-cli {command}") for e in examples[:2]]
    return "\n".join([
        f"usage: qdd-cli {command} --detector NAME --data DIR|GLOB|PRESET",
        "           [--weights FILE | --random-weights] [--out DIR] [--ckpt_path CKPT]",
        "           [--verbose] [LightningCLI flags: --trainer.* --model.* --data.* --config]",
        "",
        _PURPOSE[command],
        "",
        "qdd's flags:",
        "  --detector NAME|YAML  npr, clipd, univfd or corvi (its packaged preset: the",
        "                        published recipe), or your own YAML config",
        "  --data DIR|GLOB|PRESET  shard folder(s) from `qdd-cli shard` / `generate`; repeat",
        "                        it or use a quoted glob; or a preset under configs/data/",
        "                        (paper). Checked first, before any model is built",
        "  --weights FILE        the detector's weights: an official file or a .ckpt of",
        "                        `qdd-cli fit` (default: its official file under",
        "                        checkpoints/ or $QDD_CHECKPOINTS; see checkpoints/README.md)",
        "  --random-weights      run with an untrained head, on purpose (smoke tests only)",
        f"  --out DIR             the run folder (default runs/{command}-DETECTOR-TIMESTAMP/);",
        "                        printed as the last line",
        "  --ckpt_path CKPT      resume (fit) or evaluate (test) a `qdd-cli fit`",
        "                        checkpoint; --model.* flags you give win, it fills the rest",
        "  --perturb SPEC        test also after jpeg:Q, resize:S, blur:SIGMA, noise:SIGMA or",
        "                        crop:N (repeatable; the unperturbed pass always runs)",
        "  --trainer cpu|gpu|ddp a packaged Trainer preset (configs/trainer/)",
        "  --verbose             show every library message (see qdd/quiet.py)",
        "",
        "often used LightningCLI flags:",
        "  --trainer.accelerator cpu|gpu   --trainer.devices N   --trainer.max_epochs N",
        "  --trainer.max_steps N   --data.batch_size N   --data.num_workers N",
        "  --model.lr X   --model.threshold X   --config FILE   --print_config",
        "",
        "examples:",
        *(f"  {e}" for e in examples),
        "",
        f"every flag (LightningCLI's full help, ~580 lines): qdd-cli {command} {HELP_ALL}",
    ])  # fmt: skip


def expand_shorthands(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
    """The short flags as LightningCLI arguments (table above); also the shard folders and
    perturbations they name, for `qdd.api.check_data`."""
    front, rest, folders, paths, perturb = [], [], [], [], []
    i = 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name in ("--detector", "--data", "--weights", "--out", "--perturb") and not eq:
            if i + 1 == len(argv):
                raise QddError(f"{name} needs a value")
            i, value = i + 1, argv[i + 1]
        if name == "--detector":
            path = preset("detectors", value)
            front += [f"--config={path}"] if path else []
            rest += [] if path else [f"--model.detector={value}"]
        elif name == "--data" and preset("data", value):
            front.append(f"--data={preset('data', value)}")
            named = read_yaml(preset("data", value)).get("paths")  # type: ignore[arg-type]
            paths += [named] if isinstance(named, str) else list(named or [])
        elif name in ("--data", "--perturb"):
            (folders if name == "--data" else perturb).append(value)
        elif name in ("--weights", "--out"):
            flag = "--model.weights" if name == "--weights" else "--trainer.default_root_dir"
            rest.append(f"{flag}={value}")
        elif argv[i] == "--random-weights":
            rest.append("--model.random_weights=true")
        elif argv[i] == "--trainer" and i + 1 < len(argv) and preset("trainer", argv[i + 1]):
            i += 1
            front.append(f"--config={preset('trainer', argv[i])}")
        else:
            rest.append(argv[i])
        i += 1
    if folders:
        rest.append(f"--data.paths={folders[0] if len(folders) == 1 else json.dumps(folders)}")
    if perturb:
        rest.append(f"--data.perturb={json.dumps(perturb)}")
    return front + rest, paths + folders, perturb


def run_trainer(command: str, argv: list[str]) -> None:
    """``qdd-cli fit|validate|test|predict ARGS``: prints the run folder last."""
    if {"-h", "--help"} & set(argv):  # qdd's flags; LightningCLI's ~580 lines: --help-all
        print(short_help(command))
        return
    args, paths, perturb = expand_shorthands(argv)
    if HELP_ALL in args:
        args = ["--help" if a == HELP_ALL else a for a in args]
    elif "--print_config" not in " ".join(args):
        check_data(paths, perturb)  # before Lightning is imported, weights read, models built
    from qdd.api import run_lightning

    result = run_lightning(command, args)
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank == 0:
        print(result.run_dir)


def shard_command(argv: Sequence[str]) -> None:
    """``qdd-cli shard``: prints the shard folder last."""
    parser = argparse.ArgumentParser(
        prog="qdd-cli shard",
        description="Write a folder tree of images into WebDataset shards (PNG + JSON).",
    )
    parser.add_argument("--src", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--out", required=True, help="output shard folder")
    parser.add_argument("--label", required=True, choices=["real", "fake"])
    parser.add_argument("--source", required=True, help="name of the image source, e.g. coco")
    parser.add_argument("--max-count", type=int, default=1000, help="samples per shard")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes that decode images (default: every core this process "
                        "may use); the shards are identical for any count")  # fmt: skip
    args = parser.parse_args(argv)
    from qdd.api import shard

    result = shard(vars(args))
    print(f"{result.metrics['total']} samples in {result.metrics['shards']} shard(s)",
          file=sys.stderr)  # fmt: skip
    print(args.out)


def detectors_command(argv: Sequence[str]) -> None:
    """``qdd-cli detectors``. Named here, not by its module: finding ``qdd.detectors.table``
    would import every detector (torch, ~10 s) for each ``qdd-cli --help``."""
    from qdd.detectors.table import main as print_table

    print_table(argv)


def available() -> dict[str, str]:
    """Every subcommand whose module is installed in this package, and what it does."""
    others = {n: text for n, (target, text) in COMMANDS.items()
              if find_spec(target.partition(":")[0]) is not None}  # fmt: skip
    return {**TRAINER_COMMANDS, **others}


def usage(commands: dict[str, str]) -> str:
    lines = [
        f"qdd-cli {__version__}: do AI-image detectors survive quantized diffusion models?",
        "",
        "usage: qdd-cli SUBCOMMAND [options] [--verbose]  (qdd-cli SUBCOMMAND --help: options)",
        "",
        "subcommands:",
        *(f"  {name:<9} {text}" for name, text in commands.items()),
        "",
        "examples:",
        "  qdd-cli demo --out demo",
        "  qdd-cli shard --src photos/ --out shards/real-coco --label real --source coco",
        "  qdd-cli test --detector npr --data shards/sd3-fp4",
        "",
        "--verbose shows every library message; by default qdd.quiet drops a listed few that",
        "do not apply (e.g. diffusers' float16-on-CPU warning), and nothing else.",
    ]
    return "\n".join(lines)


def main(args: Sequence[str] | None = None) -> None:
    """Run ``qdd-cli`` with ``args`` (default: ``sys.argv[1:]``); callable from tests."""
    argv = list(sys.argv[1:] if args is None else args)
    verbose = "--verbose" in argv or is_verbose()
    argv = [a for a in argv if a != "--verbose"]
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    from qdd.threads import prefer_passive_waits

    prefer_passive_waits()  # before any subcommand imports torch
    configure_logging(verbose)
    commands = available()
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(commands))
        return
    if argv[0] == "--version":
        print(__version__)
        return
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(f"qdd-cli: unknown subcommand {name!r}; choose from: {', '.join(commands)}",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
    try:
        if name in TRAINER_COMMANDS:
            run_trainer(name, rest)
        else:
            module, _, function = COMMANDS[name][0].partition(":")
            getattr(import_module(module), function)(rest)
    except QddError as error:
        print(f"qdd-cli {name}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"qdd-cli {name}: interrupted; complete shards and files were kept", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
