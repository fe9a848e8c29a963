"""``qdd-cli``: one entry point for the whole study.

A small dispatcher in front of LightningCLI: the Trainer subcommands (fit, validate, test,
predict) go to `qdd.lightning_cli`, the others (shard, generate, report, sweep, demo) to plain
functions. Nothing heavy is imported here, so ``qdd-cli --help`` and ``qdd-cli shard`` do
not pay for Lightning, torchmetrics or diffusers.

User-caused errors (`QddError`) end in one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from qdd import __version__
from qdd.errors import QddError

#: Set by ``--verbose`` so that the commands a demo runs in-process stay verbose too.
VERBOSE_ENV = "QDD_VERBOSE"

TRAINER_COMMANDS = {
    "fit": "train a detector on shards (FP4-augmented retraining)",
    "validate": "run a detector's validation loop",
    "test": "benchmark a detector on shards: metrics.json + scores.parquet",
    "predict": "score shards with a detector",
}


def _shard(argv: Sequence[str]) -> None:
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
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes that decode images (default: every core this process may use); "
        "the shards are identical for any count",
    )
    args = parser.parse_args(argv)
    from qdd.datamodules.folder import shard_folder
    from qdd.datamodules.schema import FAKE, REAL

    manifest = shard_folder(
        args.src,
        args.out,
        label=REAL if args.label == "real" else FAKE,
        source=args.source,
        generator=args.source if args.label == "fake" else None,
        max_count=args.max_count,
        overwrite=args.overwrite,
        workers=args.workers,
    )
    print(f"{manifest['total']} samples in {len(manifest['shards'])} shard(s)", file=sys.stderr)
    print(args.out)


def _generate(argv: Sequence[str]) -> None:
    from qdd.generation.command import main

    main(list(argv))


def _report(argv: Sequence[str]) -> None:
    from qdd.report.command import main

    main(list(argv))


def _sweep(argv: Sequence[str]) -> None:
    from qdd.sweep import main

    main(list(argv))


def _quantize(argv: Sequence[str]) -> None:
    from qdd.quant.gguf import main

    main(list(argv))


def _demo(argv: Sequence[str]) -> None:
    from qdd.demo import main

    main(list(argv))


def _trainer(command: str) -> Callable[[Sequence[str]], None]:
    def run(argv: Sequence[str]) -> None:
        from qdd.trainer_args import HELP_ALL, check_data, expand_shorthands, short_help

        if {"-h", "--help"} & set(argv):  # qdd's flags; LightningCLI's ~580 lines: --help-all
            print(short_help(command))
            return
        if HELP_ALL not in argv and "--print_config" not in " ".join(argv):
            # before Lightning is imported (~7 s), weights are read or models are built
            check_data(expand_shorthands(list(argv)))
        from qdd.lightning_cli import run_trainer_command

        run_trainer_command(command, list(argv))

    return run


def _available() -> dict[str, tuple[str, Callable[[Sequence[str]], None]]]:
    """Subcommands whose capability is installed in this package."""
    from importlib.util import find_spec

    commands: dict[str, tuple[str, Callable[[Sequence[str]], None]]] = {
        name: (text, _trainer(name)) for name, text in TRAINER_COMMANDS.items()
    }
    commands["shard"] = ("turn a folder of images (real photos) into shards", _shard)
    optional = {
        "generate": ("qdd.generation.command", "generate images at each precision", _generate),
        "report": ("qdd.report.command", "draw the study's figures and tables from runs", _report),
        "quantize": ("qdd.quant.gguf", "write a deployable quantized denoiser file", _quantize),
        "sweep": ("qdd.sweep", "run a W&B grid sweep offline: one fit run per trial", _sweep),
        "demo": ("qdd.demo", "the whole study in miniature, offline, on CPU", _demo),
        "quality": (
            "qdd.quality",
            "PSNR, SSIM, LPIPS, FID of each image vs its fp32 twin",
            lambda argv: __import__("qdd.quality", fromlist=["main"]).main(list(argv)),
        ),
    }
    for name, (module, text, function) in optional.items():
        if find_spec(module) is not None:
            commands[name] = (text, function)
    return commands


def usage(commands: dict[str, tuple[str, Callable]]) -> str:
    lines = [
        f"qdd-cli {__version__}: do AI-image detectors survive quantized diffusion models?",
        "",
        "usage: qdd-cli SUBCOMMAND [options] [--verbose]  (qdd-cli SUBCOMMAND --help: options)",
        "",
        "subcommands:",
    ]
    lines += [f"  {name:<9} {text}" for name, (text, _) in commands.items()]
    lines += [
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


class _Unhandled(logging.Filter):
    """Pass only records no handler below the root printed: Python's own last-resort rule."""

    def filter(self, record: logging.LogRecord) -> bool:
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None and logger is not logging.getLogger():
            if logger.handlers or not logger.propagate:
                return False
            logger = logger.parent
        return True


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record comes (like Python's last resort), so
    a caller that swaps stderr (tests, notebooks, a closed capture) never gets a dead stream."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def _reopen_closed_streams() -> None:
    """Point library handlers whose stream was closed at the current stderr.

    Lightning binds a StreamHandler to the ``sys.stderr`` of its import; when a caller that
    runs several commands in one process swaps stderr (pytest, notebooks), its next log line
    would fail with "I/O operation on closed file" instead of being printed.
    """
    for logger in list(logging.Logger.manager.loggerDict.values()):
        for handler in getattr(logger, "handlers", ()):
            stream = getattr(handler, "stream", None)
            if isinstance(handler, logging.StreamHandler) and getattr(stream, "closed", False):
                handler.stream = sys.stderr  # not setStream: it flushes the closed one first


def _configure_logging(verbose: bool) -> None:
    """qdd's own INFO lines (DEBUG with --verbose) on stderr; other libraries keep their own
    handlers, less the messages `qdd.quiet` lists as not applying (all shown with --verbose).
    """
    logger = logging.getLogger("qdd")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    root = logging.getLogger()
    if not root.handlers:
        # What Python prints for unhandled WARNINGs anyway, in place: without it, the first
        # library to call logging.warning() (open_clip does) installs basicConfig's handler,
        # and every qdd (and Lightning) warning is printed twice from then on.
        fallback = _StderrHandler()
        fallback.setLevel(logging.WARNING)
        fallback.addFilter(_Unhandled())
        root.addHandler(fallback)
    _reopen_closed_streams()
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    from qdd.quiet import silence

    silence(quiet=not verbose)


def main(args: Sequence[str] | None = None) -> None:
    """Run ``qdd-cli`` with ``args`` (default: ``sys.argv[1:]``); callable from tests."""
    argv = list(sys.argv[1:] if args is None else args)
    verbose = "--verbose" in argv or os.environ.get(VERBOSE_ENV) == "1"
    argv = [a for a in argv if a != "--verbose"]
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    from qdd.threads import prefer_passive_waits

    prefer_passive_waits()  # before any subcommand imports torch
    _configure_logging(verbose)
    commands = _available()
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(commands))
        return
    if argv[0] == "--version":
        print(__version__)
        return
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(
            f"qdd-cli: unknown subcommand {name!r}; choose from: {', '.join(commands)}",
            file=sys.stderr,
        )
        raise SystemExit(2)
    try:
        commands[name][1](rest)
    except QddError as error:
        print(f"qdd-cli {name}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"qdd-cli {name}: interrupted; complete shards and files were kept", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
