"""The Trainer subcommands (fit, validate, test, predict) as a LightningCLI.

qdd's short flags (``--detector``, ``--data``, ``--weights``, ``--random-weights``,
``--out``) are rewritten into plain LightningCLI arguments by `qdd.trainer_args`, which
also checks the data before this module (and Lightning) is imported.
With ``--ckpt_path``, Lightning restores the model's hyperparameters from the checkpoint
(they replace ``--model.*`` flags: the weights must match their architecture), and the
checkpoint's weights are what is evaluated.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, Trainer
from lightning.pytorch.cli import LightningCLI

from qdd.datamodules.shard import ShardDataModule
from qdd.errors import QddError
from qdd.modules.detector import DetectorModule
from qdd.threads import use_threads
from qdd.trainer_args import HELP_ALL, expand_shorthands

__all__ = ["QddLightningCLI", "expand_shorthands", "run_trainer_command"]

RUN_DIR_ENV = "QDD_RUN_DIR"  # shared with DDP child processes, which re-run the command


class QddLightningCLI(LightningCLI):
    """LightningCLI with qdd's run folders and loggers (W&B offline + CSV)."""

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
        if callable(workers_for):  # ShardDataModule: num_workers=None picks from the cores
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


def fit_progress(trainer: Trainer) -> dict[str, Any]:
    """How far a fit went: epochs (a fraction for a partial last one), steps, what stopped it."""
    completed = trainer.fit_loop.epoch_progress.current.completed
    batches = trainer.fit_loop.epoch_loop.batch_progress.current.completed
    per_epoch = trainer.num_training_batches
    epochs: float = completed
    if completed and 0 < batches < per_epoch < float("inf"):
        epochs = completed - 1 + batches / per_epoch  # the last epoch stopped part-way
    if 0 < trainer.max_steps <= trainer.global_step:
        stopped_by = "max_steps"
    elif trainer.max_epochs is not None and 0 <= trainer.max_epochs <= completed:
        stopped_by = "max_epochs"
    else:
        stopped_by = "stop requested (a callback, e.g. early stopping, or an interrupt)"
    return {
        "epochs": round(epochs, 4),
        "steps": trainer.global_step,
        "batches_per_epoch": per_epoch if per_epoch < float("inf") else None,
        "stopped_by": stopped_by,
    }


def _fit_metrics(cli: QddLightningCLI) -> None:
    """metrics.json of a fit run: how far it went, last logged values, the checkpoints."""
    trainer = cli.trainer
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    callback = trainer.checkpoint_callback
    summary = {
        "detector": cli.model.hparams.detector,
        **fit_progress(trainer),
        "metrics": metrics,
        "best_checkpoint": callback.best_model_path if callback else None,
        "last_checkpoint": callback.last_model_path if callback else None,
    }
    path = Path(trainer.default_root_dir) / "metrics.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")


def run_trainer_command(command: str, argv: list[str]) -> None:
    """``qdd-cli fit|validate|test|predict ...``; prints the run folder last."""
    if HELP_ALL in argv:  # LightningCLI's own, full help
        argv = ["--help" if a == HELP_ALL else a for a in argv]
    args = [command, *expand_shorthands(argv)]  # (qdd.cli checked --data before importing us)
    cli = QddLightningCLI(
        DetectorModule,
        ShardDataModule,
        args=args,
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
