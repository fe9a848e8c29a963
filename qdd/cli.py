"""``qdd-cli``: one entry point for the whole study; it parses, then calls `qdd.api`.

Every subcommand parses its flags into the config dict its `qdd.api` function takes and
calls it; the flags several commands share are declared once, in `qdd.flags` (``--data``
is repeatable everywhere, its occurrences add up). The Trainer subcommands (fit, validate,
test, predict) are LightningCLI (`qdd.lightning_cli`): qdd's short flags become the dict
(`qdd.flags.trainer_config`; `qdd.api.lightning_config` maps its keys and presets onto
LightningCLI's sections), and every other argument (``--config``, ``--trainer.*``,
``--model.*``, ``--data.*``, ``--print_config``) goes to LightningCLI unchanged, after
the dict, so it wins:

==========================  ==================================================================
``--detector npr``          the packaged preset ``configs/detectors/npr.yaml`` (or a YAML you
                            name), else ``model.detector``
``--data X``                a preset under ``configs/data/`` (or a YAML); anything else
                            (folder, glob) → ``data.paths``; repeatable
``--weights F``             ``model.weights``; ``--random-weights``: ``model.random_weights``
``--out DIR``               the run folder, ``trainer.default_root_dir`` (default: a fresh one)
``--trainer cpu|gpu|ddp``   the packaged ``configs/trainer/NAME.yaml``
``--perturb SPEC``          ``data.perturb`` (repeatable); ``none`` always runs
==========================  ==================================================================

Nothing heavy is imported before a command runs: ``qdd-cli test --help`` and a bad
``--data`` answer before Lightning (~7 s to import), weights or models are touched. A
`QddError` ends in one line on stderr and exit code 2; the run folder is printed last.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib.util import find_spec
from pathlib import Path

from qdd import __version__, api
from qdd.api import read_yaml
from qdd.errors import QddError, one_line
from qdd.flags import add_flags, trainer_config
from qdd.logs import VERBOSE_ENV, configure_logging, is_verbose

__all__ = ["VERBOSE_ENV", "main"]

TRAINER_COMMANDS = {
    "fit": "train a detector on shards (FP4-augmented retraining)",
    "validate": "run a detector's validation loop",
    "test": "benchmark a detector on shards: metrics.json + scores.parquet",
    "predict": "score shards with a detector",
}
#: The other subcommands: the module they need (listed only where it is installed), and what
#: they do. Each runs its function in `OTHER_COMMANDS`: parse, then call `qdd.api`.
COMMANDS = {
    "shard": ("qdd.datamodules.tars", "turn a folder of images (real photos) into shards"),
    "generate": ("qdd.generation.command", "generate images at each precision"),
    "decode": ("qdd.generation.redecode", "decode stored latents with the VAE at a precision"),
    "detectors": ("qdd.detectors", "every detector: family, input, files, licence"),
    "quality": ("qdd.quality", "PSNR, SSIM, LPIPS, FID of each image vs its fp32 twin"),
    "fingerprint": ("qdd.fingerprint", "residual spectra per group vs the fp32 twin"),
    "report": ("qdd.report.command", "draw the study's figures and tables from runs"),
    "quantize": ("qdd.generation.quantize", "write a deployable quantized denoiser file"),
    "sweep": ("qdd.sweep", "run a W&B sweep (grid or random) offline: a fit per trial"),
    "demo": ("qdd.demo", "the whole study in miniature, offline, on CPU"),
}
#: The flag that shows LightningCLI's full help (every --trainer.*, --model.*, --data.*).
HELP_ALL = "--help-all"
_PURPOSE = {
    "fit": "Train a detector on shards: real vs fake, split into train/val/test by prompt_id.\n"
    "Writes checkpoints/ (last.ckpt and the best), metrics.json and config.yaml into --out.\n"
    "A training-free detector (rigid, aeroblade) trains nothing: fit calibrates its threshold\n"
    "(--model.calibration) on every image outside the test split and writes last.ckpt.",
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
        "qdd-cli fit --task attribution --detector npr --data 'shards/sd3-*' --random-weights",
        "qdd-cli fit --detector rigid --data 'shards/*' --out runs/rigid-calibrated   (a "
        "threshold only)",
    ],
    "test": [
        "qdd-cli test --detector npr --data shards/sd3-fp4 --data shards/real-coco",
        "qdd-cli test --detector clipd --data paper --out runs/clipd-paper",
        "qdd-cli test --data 'shards/*' --data.split=test "
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
        "           [--weights FILE | --random-weights | --ckpt_path CKPT] [--out DIR]",
        "           [--verbose] [LightningCLI flags: --trainer.* --model.* --data.* --config]",
        "",
        _PURPOSE[command],
        "",
        "qdd's flags:",
        "  --detector NAME|YAML  a detector `qdd-cli detectors` lists (npr, clipd, rigid,",
        "                        ...: its packaged preset, the published recipe), or your",
        "                        own YAML config",
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
        "                        checkpoint: its detector and detector_args are used (no",
        "                        --detector needed; a conflicting value is refused); other",
        "                        --model.* flags you give win over its saved ones",
        "  --perturb SPEC        test also after jpeg:Q, resize:S, blur:SIGMA, noise:SIGMA or",
        "                        crop:N (repeatable; the unperturbed pass always runs)",
        "  --task detection|attribution  real vs fake (default), or which precision made",
        "                        an image: a head over the training data's precisions",
        "                        (test: class probabilities, confusion.csv)",
        "  --attribute precision|family  attribution's classes (family: 16-bit, 8-bit,",
        "                        4-bit weight-only, 4-bit W4A4, GGUF); reals as a class:",
        "                        --model.include_real=true",
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


def run_trainer(command: str, argv: list[str]) -> None:
    """``qdd-cli fit|validate|test|predict ARGS``: prints the run folder last."""
    if {"-h", "--help"} & set(argv):  # qdd's flags; LightningCLI's ~580 lines: --help-all
        print(short_help(command))
        return
    config, passed = trainer_config(argv)
    passed = ["--help" if a == HELP_ALL else a for a in passed]
    result = getattr(api, command)(config, lightning_args=passed)
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


def decode_command(argv: Sequence[str]) -> None:
    """``qdd-cli decode``: parse, then `qdd.api.decode`; prints the new folder."""
    from qdd.generation.redecode import build_parser

    print(api.decode(vars(build_parser().parse_args(argv))).run_dir)


def fingerprint_command(argv: Sequence[str]) -> None:
    """``qdd-cli fingerprint``: prints the run folder last (on rank 0)."""
    from qdd.fingerprint.command import build_parser
    from qdd.generation.command import split_trainer_flags

    argv, trainer = split_trainer_flags(list(argv))
    result = api.fingerprint({**vars(build_parser().parse_args(argv)), "trainer": trainer})
    if result.metrics:
        print(result.run_dir)


def generate_command(argv: Sequence[str]) -> None:
    """``qdd-cli generate``: prints the output folder (a plan: its parent) last, or with
    ``--dry-run`` what the jobs would make and weigh."""
    from qdd.generation.command import build_parser, is_launch_leader, split_trainer_flags

    argv, trainer = split_trainer_flags(list(argv))
    result = api.generate({**vars(build_parser().parse_args(argv)), "trainer": trainer})
    if "dry_run" in result.metrics:
        print(result.metrics["dry_run"])
    elif is_launch_leader():
        print(result.run_dir)


def quality_command(argv: Sequence[str]) -> None:
    """``qdd-cli quality``: prints the run folder last (on rank 0)."""
    from qdd.generation.command import split_trainer_flags
    from qdd.quality import build_parser

    argv, trainer = split_trainer_flags(list(argv))
    result = api.quality({**vars(build_parser().parse_args(argv)), "trainer": trainer})
    if result.scores is not None:
        print(result.run_dir)


def report_command(argv: Sequence[str]) -> None:
    """``qdd-cli report``: prints report.md (with --compare: compare.md) last."""
    from qdd.report.command import parse_args

    print(api.report(parse_args(list(argv))).metrics["index"])


def quantize_command(argv: Sequence[str]) -> None:
    """``qdd-cli quantize``: prints the file written last."""
    from qdd.generation.quantize import build_parser

    print(api.quantize(vars(build_parser().parse_args(argv))).run_dir)


def demo_command(argv: Sequence[str]) -> None:
    """``qdd-cli demo``: `qdd.demo` runs every step of the study through `qdd.api` (it sits a
    layer above the API, so an ``api.demo`` would be an import circle)."""
    from qdd.demo import main as demo_main

    demo_main(list(argv))


def sweep_command(argv: Sequence[str]) -> None:
    """``qdd-cli sweep``: run the sweep, print one line per trial and the sweep folder."""
    parser = argparse.ArgumentParser(
        prog="qdd-cli sweep",
        description="Run a W&B sweep YAML (configs/sweeps/: method grid or random) offline: "
        "one `qdd-cli fit` run folder per trial under --out.",
    )
    parser.add_argument("config", help="W&B sweep YAML with method: grid or random")
    add_flags(parser, "--out", "--seed", out={"help": "folder for the trials (default: "
              "runs/sweep-NAME-TIME)"}, seed={"help": "seed of a random sweep's draws "
              "(default: the one --out recorded, else 0; recorded in sweep.json)"})  # fmt: skip
    args = parser.parse_args(argv)
    result = api.sweep(args.config, seed=args.seed, out=args.out)
    records = result.metrics["trials"]
    metric = (read_yaml(Path(args.config)).get("metric") or {}).get("name", "metric")
    for record in records:
        value = "—" if record["metric"] is None else f"{record['metric']:.4f}"
        print(f"{record['trial']}  {metric}={value}  {record['params']}", file=sys.stderr)
    failed = [r["trial"] for r in records if r["returncode"] != 0]
    if failed:
        raise QddError(
            f"{len(failed)} of {len(records)} trials failed ({', '.join(failed)}): read their "
            f"sweep.log under {result.run_dir}, fix, and re-run the same command (finished "
            "trials are kept)"
        )
    print(result.run_dir)


#: What runs each subcommand of `COMMANDS`.
OTHER_COMMANDS = {
    "shard": shard_command,
    "generate": generate_command,
    "decode": decode_command,
    "detectors": detectors_command,
    "fingerprint": fingerprint_command,
    "quality": quality_command,
    "report": report_command,
    "quantize": quantize_command,
    "sweep": sweep_command,
    "demo": demo_command,
}


def available() -> dict[str, str]:
    """Every subcommand whose module is installed in this package, and what it does."""
    others = {n: text for n, (module, text) in COMMANDS.items()
              if find_spec(module) is not None}  # fmt: skip
    return {**TRAINER_COMMANDS, **others}


def usage(commands: dict[str, str]) -> str:
    lines = [
        f"qdd-cli {__version__}: do AI-image detectors survive quantized diffusion models?",
        "",
        "usage: qdd-cli SUBCOMMAND [options] [--verbose]  (qdd-cli SUBCOMMAND --help: options)",
        "",
        "subcommands:",
        *(f"  {name:<11} {text}" for name, text in commands.items()),
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
            OTHER_COMMANDS[name](rest)
    except QddError as error:
        print(f"qdd-cli {name}: error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"qdd-cli {name}: interrupted; complete shards and files were kept", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
