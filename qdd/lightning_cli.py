"""The Trainer subcommands (fit, validate, test, predict) as a LightningCLI.

Short flags of the CLI contract are rewritten into plain LightningCLI arguments before
parsing, so everything else (``--config``, ``--trainer.*``, ``--model.*``, ``--data.*``,
``--print_config``) works as Lightning documents it:

==========================  ==================================================================
``--detector npr``          ``--config qdd/configs/detectors/npr.yaml`` (a packaged preset) or
                            ``--config X.yaml`` for a YAML, else ``--model.detector=NAME``
``--data X``                a preset under ``configs/data/`` or a YAML → ``--data X.yaml``;
                            anything else (folder, glob; repeatable) → ``--data.paths``
``--weights F``             ``--model.weights=F``
``--random-weights``        ``--model.random_weights=true``
``--out DIR``               the run folder (``--trainer.default_root_dir=DIR``)
``--trainer cpu|gpu|ddp``   ``--config`` of the packaged preset ``configs/trainer/NAME.yaml``
                            (any other value is left to LightningCLI)
``--perturb SPEC``          a test-time perturbation (``jpeg:75``, ``resize:0.5``, ``blur:1.0``;
                            repeatable) → ``--data.perturb=[...]``; ``none`` is always run
==========================  ==================================================================

Presets are applied first, so later flags such as ``--data.batch_size=8`` still override.

Data: a data section that lists ``train:`` sources (an experiment YAML under
``configs/experiments/``, or ``--data.train=...``) selects `MixDataModule` (weighted
sources, held-out val/test splits by prompt_id); anything else is a `ShardDataModule`
over the folders given with ``--data``. The two cannot be combined in one command.

``--ckpt_path CKPT`` (Lightning's own flag): the checkpoint's weights are what runs, and
its saved hyperparameters fill every ``--model.*`` value the user did not set. What the
user sets — a ``--model.*`` flag, the ``model:`` section of a ``--config`` file, or
``--detector`` — wins and is logged where it differs from the checkpoint: e.g.
``--model.threshold=0.5`` is the threshold used. (Plain LightningCLI does the opposite and
silently replaces the user's values.) Three combinations are refused with an error: a
``--detector`` other than the checkpoint's, ``--weights`` (two sources of weights), and a
``--model.calibration`` rule other than the one the checkpoint's threshold was fitted by
(a test run never re-fits it). The calibrated threshold always comes from the checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.cli import LightningCLI

from qdd.datamodules.mix import MixDataModule
from qdd.datamodules.shard import ShardDataModule
from qdd.errors import QddError
from qdd.modules.detector import DetectorModule

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).parent / "configs"
RUN_DIR_ENV = "QDD_RUN_DIR"  # shared with DDP child processes, which re-run the command


def _preset(kind: str, value: str) -> Path | None:
    """A packaged preset (``configs/<kind>/<value>.yaml``) or a YAML file the user names."""
    if value.endswith((".yaml", ".yml")):
        if not Path(value).is_file():
            raise QddError(f"config {value} does not exist: check the path")
        return Path(value)
    candidate = CONFIGS / kind / f"{value.lower().replace('-', '_')}.yaml"
    return candidate if candidate.is_file() else None


def _trainer_preset(value: str) -> Path | None:
    """``configs/trainer/<value>.yaml`` when ``value`` names a packaged trainer preset."""
    candidate = CONFIGS / "trainer" / f"{value}.yaml"
    return candidate if value.isidentifier() and candidate.is_file() else None


def expand_shorthands(argv: list[str]) -> list[str]:
    """Rewrite the CLI contract's short flags into LightningCLI arguments."""
    front: list[str] = []
    rest: list[str] = []
    paths: list[str] = []
    perturb: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg.partition("=")
        takes_value = name in ("--detector", "--data", "--weights", "--out", "--perturb")
        if takes_value:
            if eq:
                value = inline
            elif i + 1 < len(argv):
                value = argv[i + 1]
                i += 1
            else:
                raise QddError(f"{name} needs a value")
        if name == "--detector":
            preset = _preset("detectors", value)
            front += [f"--config={preset}"] if preset else []
            rest += [] if preset else [f"--model.detector={value}"]
        elif name == "--data":
            preset = _preset("data", value)
            if preset is not None:
                front.append(f"--data={preset}")
            else:
                paths.append(value)
        elif name == "--weights":
            rest.append(f"--model.weights={value}")
        elif name == "--out":
            rest.append(f"--trainer.default_root_dir={value}")
        elif name == "--trainer" and not eq and i + 1 < len(argv) and _trainer_preset(argv[i + 1]):
            front.append(f"--config={_trainer_preset(argv[i + 1])}")
            i += 1
        elif name == "--perturb":
            perturb.append(value)
        elif arg == "--random-weights":
            rest.append("--model.random_weights=true")
        else:
            rest.append(arg)
        i += 1
    if len(paths) == 1:
        rest.append(f"--data.paths={paths[0]}")
    elif paths:
        rest.append(f"--data.paths={json.dumps(paths)}")
    if perturb:
        rest.append(f"--data.perturb={json.dumps(perturb)}")
    return front + rest


def _option(arg: str, section: str) -> str | None:
    """``--model.lr=1`` / ``--model.detector_args.x`` → ``lr`` / ``detector_args``."""
    name = arg.partition("=")[0]
    prefix = f"--{section}."
    return name[len(prefix) :].split(".")[0] if name.startswith(prefix) else None


def _config_sections(args: list[str], section: str) -> list[dict[str, Any]]:
    """The ``section`` dicts of the YAML files given with ``--config`` or ``--section``."""
    found = []
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name not in ("--config", f"--{section}"):
            continue
        value = value if eq else (args[i + 1] if i + 1 < len(args) else "")
        if not value.endswith((".yaml", ".yml")) or not Path(value).is_file():
            continue
        content = yaml.safe_load(Path(value).read_text()) or {}
        part = content.get(section) if name == "--config" else content
        if isinstance(part, dict):
            found.append(part.get("init_args", part))
    return found


def uses_mix(args: list[str]) -> bool:
    """Whether the data section lists ``train:`` sources (→ `MixDataModule`)."""
    options = {_option(a, "data") for a in args}
    mix = "train" in options or any("train" in d for d in _config_sections(args, "data"))
    if mix and "paths" in options:
        raise QddError(
            "--data FOLDER cannot be combined with a config whose data section lists train/val/"
            "test sources: override those instead (e.g. --data.test='[GLOB]')"
        )
    return mix


def explicit_model_keys(args: list[str]) -> frozenset[str]:
    """``--model.*`` values the user set (flags, ``--config`` files, ``--detector``)."""
    keys = {k for k in (_option(a, "model") for a in args) if k}
    for section in _config_sections(args, "model"):
        keys |= set(section)
    return frozenset(keys)


class QddLightningCLI(LightningCLI):
    """LightningCLI with qdd's run folders and loggers (W&B offline + CSV).

    ``explicit_model_keys``: the ``--model.*`` values the user set, which a checkpoint's
    hyperparameters must not replace (see the module docstring).
    """

    def __init__(self, *args: Any, explicit_model_keys: frozenset[str] = frozenset(), **kwargs):
        self.explicit_model_keys = explicit_model_keys
        super().__init__(*args, **kwargs)

    def _parse_ckpt_path(self) -> None:
        """The checkpoint's hyperparameters fill what the user did not set; theirs win."""
        if not self.config.get("subcommand"):
            return
        command = self.config.subcommand
        ckpt_path = self.config[command].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        import torch

        checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        saved = dict(checkpoint.get("hyper_parameters", {}))
        saved.pop("_instantiator", None)
        model = self.config[command].model
        given = {k: model.get(k) for k in self.explicit_model_keys if k in saved}
        if given.get("detector") not in (None, saved.get("detector")):
            raise QddError(
                f"--ckpt_path {ckpt_path} holds a {saved['detector']} detector, not "
                f"{given['detector']}: pass --detector {saved['detector']}"
            )
        if given.get("weights"):
            raise QddError(
                f"both --weights {given['weights']} and --ckpt_path {ckpt_path} name weights: "
                "pass one of them"
            )
        stored = (checkpoint.get("qdd_calibration") or {}).get("rule")
        if stored and given.get("calibration") not in (None, stored):
            raise QddError(
                f"the threshold in {ckpt_path} was calibrated by {stored}; "
                f"--model.calibration={given['calibration']} cannot be applied at {command} "
                "time (test data never tunes it): drop the flag, or re-fit with that rule"
            )
        for key, value in sorted(given.items()):
            if value != saved[key] and key != "weights":
                log.info(
                    "--model.%s=%r given: used instead of the checkpoint's %r",
                    key,
                    value,
                    saved[key],
                )
        keep = {k: v for k, v in saved.items() if k not in self.explicit_model_keys}
        if keep:
            self.config = self.parser.parse_object({command: {"model": keep}}, self.config)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        trainer = config.trainer
        run_dir = trainer.default_root_dir or os.environ.get(RUN_DIR_ENV)
        if not run_dir:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            run_dir = f"runs/{self.subcommand}-{config.model.detector}-{stamp}"
        os.environ[RUN_DIR_ENV] = run_dir
        trainer.default_root_dir = run_dir
        if trainer.logger in (None, True):
            name = Path(run_dir).name
            trainer.logger = [
                {
                    "class_path": "lightning.pytorch.loggers.WandbLogger",
                    "init_args": {
                        "save_dir": run_dir,
                        "name": name,
                        "project": "qdd",
                        "offline": os.environ.get("WANDB_MODE", "offline") != "online",
                    },
                },
                {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": run_dir, "name": "", "version": ""},
                },
            ]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path:
            if not Path(ckpt_path).is_file():
                raise QddError(f"--ckpt_path {ckpt_path} does not exist: check the path")
            config.model.weights = str(ckpt_path)  # load (and check) it when building the model
            config.model.random_weights = False

    def after_instantiate_classes(self) -> None:
        callback = self.trainer.checkpoint_callback
        if callback is not None and callback.dirpath is None:
            callback.dirpath = str(Path(self.trainer.default_root_dir) / "checkpoints")
            callback.save_last = True  # checkpoints/last.ckpt: a path users can predict


def _fit_metrics(cli: QddLightningCLI) -> None:
    """metrics.json of a fit run: last logged values and the best checkpoint."""
    trainer = cli.trainer
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    callback = trainer.checkpoint_callback
    describe = getattr(cli.datamodule, "describe", None)
    summary = {
        "detector": cli.model.hparams.detector,
        "weights": cli.model.detector.weights_source,
        "epochs": trainer.current_epoch,
        "metrics": metrics,
        "calibrated_threshold": cli.model.calibrated_threshold,
        "calibration": cli.model.calibration,
        "data": describe() if callable(describe) else None,
        "best_checkpoint": callback.best_model_path if callback else None,
        "last_checkpoint": callback.last_model_path if callback else None,
    }
    path = Path(trainer.default_root_dir) / "metrics.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")


def run_trainer_command(command: str, argv: list[str]) -> None:
    """``qdd-cli fit|validate|test|predict ...``; prints the run folder last."""
    expanded = expand_shorthands(argv)
    args = [command, *expanded]
    warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within")
    # Test metrics are computed once on rank 0 from all ranks' gathered scores.
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('test_")
    # DetectorModule normalises uint8 batches on the device in on_after_batch_transfer.
    warnings.filterwarnings("ignore", message="You have overridden `on_after_batch_transfer`")
    # Frozen CLIP towers stay in eval mode on purpose (no dropout, fixed norms).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=".*is smaller than the logging interval")
    # Testing a fit checkpoint in a new run folder: its old checkpoint dir is irrelevant.
    warnings.filterwarnings("ignore", message="The dirpath has changed from")
    # The run folder already holds config.yaml when the CSV logger starts; nothing is lost.
    warnings.filterwarnings("ignore", message="Experiment logs directory .* is not empty")
    cli = QddLightningCLI(
        DetectorModule,
        MixDataModule if uses_mix(expanded) else ShardDataModule,
        args=args,
        explicit_model_keys=explicit_model_keys(expanded),
        seed_everything_default=0,
        save_config_kwargs={"config_filename": "config.yaml", "overwrite": True},
        parser_kwargs={"default_env": False},
    )
    if cli.trainer.global_rank != 0:
        return
    if command == "fit":
        _fit_metrics(cli)
    if "wandb" in sys.modules:  # let W&B say its goodbye before our last line
        sys.modules["wandb"].finish()
    print(cli.trainer.default_root_dir)
