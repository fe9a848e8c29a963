"""The Trainer subcommands (fit, validate, test, predict) as a LightningCLI.

qdd's short flags (``--detector``, ``--data``, ``--weights``, ``--random-weights``,
``--out``) are rewritten into plain LightningCLI arguments by `qdd.trainer_args`, which
also checks the data before this module (and Lightning) is imported.

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

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.cli import LightningCLI

from qdd.calibration import stored_calibration
from qdd.datamodules.shard import ShardDataModule
from qdd.errors import QddError
from qdd.modules.detector import DetectorModule
from qdd.threads import use_threads
from qdd.trainer_args import HELP_ALL, expand_shorthands

__all__ = ["QddLightningCLI", "expand_shorthands", "run_trainer_command"]

log = logging.getLogger(__name__)

RUN_DIR_ENV = "QDD_RUN_DIR"  # shared with DDP child processes, which re-run the command


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
        stored = (stored_calibration(checkpoint) or {}).get("rule")
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
        workers_for = getattr(self.datamodule, "workers_for", None)
        if callable(workers_for):  # qdd's data modules: num_workers=None picks from the cores
            workers = workers_for(self.trainer)
        else:
            workers = getattr(self.datamodule, "num_workers", 0) or 0
        use_threads(workers=workers, processes=self.trainer.num_devices)
        if self.subcommand == "fit":
            self.trainer.callbacks.append(ValidateAtMaxSteps())
        callback = self.trainer.checkpoint_callback
        if callback is not None and callback.dirpath is None:
            callback.dirpath = str(Path(self.trainer.default_root_dir) / "checkpoints")
            callback.save_last = True  # checkpoints/last.ckpt: a path users can predict


class ValidateAtMaxSteps(Callback):
    """Stop through ``trainer.should_stop`` when ``max_steps`` is reached mid-epoch.

    Lightning validates at the end of each epoch, and when a callback asks the loop to stop,
    but not when ``max_steps`` ends a fit mid-epoch: such a run would end unvalidated, its
    best checkpoint chosen on nothing. Asking to stop at the last step makes Lightning run
    the validation loop first (the ModelCheckpoint then saves on fresh val metrics).
    """

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


def run_trainer_command(command: str, argv: list[str]) -> None:
    """``qdd-cli fit|validate|test|predict ...``; prints the run folder last."""
    if HELP_ALL in argv:  # LightningCLI's own, full help
        argv = ["--help" if a == HELP_ALL else a for a in argv]
    expanded = expand_shorthands(argv)  # (qdd.cli checked --data before importing us)
    args = [command, *expanded]
    cli = QddLightningCLI(
        DetectorModule,
        ShardDataModule,
        args=args,
        explicit_model_keys=explicit_model_keys(expanded),
        seed_everything_default=0,
        save_config_kwargs={"config_filename": "config.yaml", "overwrite": True},
        parser_kwargs={"default_env": False},
    )
    if cli.trainer.global_rank != 0:
        return
    if "wandb" in sys.modules:  # let W&B say its goodbye before our last line
        sys.modules["wandb"].finish()
    print(cli.trainer.default_root_dir)
