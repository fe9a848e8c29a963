"""The Trainer subcommands (fit, validate, test, predict) as one LightningCLI.

LightningCLI used as it documents itself: the model and the data module by class, the
defaults and loggers in packaged YAML (``configs/trainer/defaults.yaml``: seed 0, W&B
offline + CSV), extra wiring through `add_arguments_to_parser`. `qdd.api` runs it with
a config dict, ``qdd-cli`` with the command line; both get the same two qdd steps, taken
in `before_instantiate_classes`:

- the run folder: ``trainer.default_root_dir`` (``--out``), else a fresh
  ``runs/<command>-<detector>-<time>`` (`qdd.run_folder.fresh_run_dir`); it is handed to
  the Trainer pieces as an argument: loggers without a ``save_dir`` write there, config.yaml
  and metrics.json go there, checkpoints to ``<run>/checkpoints/`` (``last.ckpt`` always).
  Every logger is finished when the command ends, failed or not (`finish_loggers`), so
  the next run in the process starts its own W&B run in its own folder. A W&B run the
  caller opened (``wandb.init()`` in a notebook) is never ended; a command whose
  WandbLogger would log into it (Lightning reuses an open run) is refused in one line.
- `qdd.checkpoint.apply_checkpoint`, the rule of ``--ckpt_path`` and ``--weights X.ckpt``:
  which value wins (your flags > the checkpoint > presets > defaults; the checkpoint's
  architecture is never replaced), and whose training data the data module must not
  evaluate. (LightningCLI alone lets the checkpoint replace the user's values.)

``fit`` of a training-free detector (RIGID, AEROBLADE) trains nothing: it calibrates a
threshold in one validation pass and writes ``last.ckpt`` (`qdd.training_free`).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.cli import LightningCLI

from qdd.checkpoint import apply_checkpoint
from qdd.errors import QddError
from qdd.run_folder import fresh_run_dir, inherited_ddp_run_dir, shared_with_ddp_ranks
from qdd.threads import use_threads
from qdd.training_free import calibrate, check_start, is_training_free, warn_ignored

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).parent / "configs"
COMMANDS = ("fit", "validate", "test", "predict")


class QddCLI(LightningCLI):
    """LightningCLI with qdd's run folders and checkpoint rule (see the module docstring)."""

    def __init__(self, model_class: type, datamodule_class: type, args: Any = None) -> None:
        defaults = {"default_config_files": [str(CONFIGS / "trainer" / "defaults.yaml")]}
        self.users_wandb_run = open_wandb_run()  # the caller's own: never logged into or ended
        super().__init__(
            model_class,
            datamodule_class,
            args=args,
            trainer_defaults={"callbacks": [ValidateAtMaxSteps()]},
            save_config_kwargs={"config_filename": "config.yaml", "overwrite": True},
            parser_kwargs={"default_env": False, **{c: dict(defaults) for c in COMMANDS}},
        )

    def add_arguments_to_parser(self, parser: Any) -> None:
        # The detector's own preprocessing runs in the DataLoader: the data module gets it.
        parser.link_arguments(
            "model", "data.transforms", compute_fn=lambda m: m.loader_transforms(),
            apply_on="instantiate",
        )  # fmt: skip

    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        self.args = args  # what the user gave, for `apply_checkpoint`

    def given(self, section: str = "model") -> dict[str, Any]:
        """The ``section`` values the user set: the arguments parsed again without defaults."""
        parse = self.parser.parse_object if isinstance(self.args, dict) else self.parser.parse_args
        given = parse(self.args, defaults=False)[self.subcommand].get(section) or Namespace()
        return given.as_dict()

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        check_start(config, self.subcommand)  # a training-free fit starts from nothing
        detector = config.model.get("detector")
        if self.subcommand == "fit" and detector and is_training_free(detector):
            warn_ignored(detector, self.given(), self.given("trainer"))
        apply_checkpoint(config, self.given, self.subcommand)  # qdd.checkpoint's rules, first:
        loggers = config.trainer.logger
        loggers = [lg for lg in (loggers if isinstance(loggers, list) else [loggers])
                   if isinstance(lg, Namespace)]  # not true/false  # fmt: skip
        wandb_logger = any("WandbLogger" in lg.class_path for lg in loggers)
        if self.users_wandb_run is not None and wandb_logger:
            run = self.users_wandb_run
            raise QddError(
                f"a W&B run of yours ({run.name or run.id}) is open in this process, and "
                "Lightning's WandbLogger would log this command into it: call wandb.finish() "
                "first, or pass trainer logger=False (--trainer.logger=false)"
            )
        trainer = config.trainer  # a refusal leaves no folder; the folder names its detector
        run_dir = trainer.default_root_dir or inherited_ddp_run_dir()
        if not run_dir:
            run_dir = self.fresh_run_dir = fresh_run_dir(self.subcommand, config.model.detector)
        trainer.default_root_dir = run_dir = str(run_dir)
        for logger in loggers:
            if logger.init_args.get("save_dir") == ".":  # absolute: W&B's service process
                logger.init_args.save_dir = str(Path(run_dir).resolve())  # has its own cwd
            if "WandbLogger" in logger.class_path and logger.init_args.get("name") is None:
                logger.init_args.name = Path(run_dir).name

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except BaseException:  # refused before anything ran: leave no empty run folder behind
            folder = getattr(self, "fresh_run_dir", None)
            if folder is not None and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
            raise

    def after_instantiate_classes(self) -> None:
        use_threads(workers=self.datamodule.workers_for(self.trainer),
                    processes=self.trainer.num_devices)  # fmt: skip
        callback = self.trainer.checkpoint_callback
        if callback is not None and callback.dirpath is None:
            callback.dirpath = str(Path(self.trainer.default_root_dir) / "checkpoints")
            callback.save_last = True  # checkpoints/last.ckpt: a path users can predict

    def _run_subcommand(self, subcommand: str) -> None:
        """The command, its DDP ranks told the run folder, its loggers finished in any case."""
        failed = True
        try:
            with shared_with_ddp_ranks(self.trainer.default_root_dir):
                if subcommand == "fit" and is_training_free(self.model.hparams.detector):
                    calibrate(self.trainer, self.model, self.datamodule)
                else:
                    super()._run_subcommand(subcommand)
            failed = False
        finally:
            finish_loggers(self.trainer, failed, keep=self.users_wandb_run)


def open_wandb_run() -> Any:
    """The process's open W&B run (None without one, or without wandb imported)."""
    wandb = sys.modules.get("wandb")
    return getattr(wandb, "run", None) if wandb is not None else None


def finish_loggers(trainer: Trainer | None, failed: bool, keep: Any = None) -> None:
    """Finalize every logger of ``trainer`` and end the process's W&B run, if one is open
    and is not ``keep`` (a run the caller had open before the command: theirs to end).

    Lightning finalizes loggers on success only, and never ends a W&B run: left open, the
    next WandbLogger in the process would reuse it, writing into this run's folder.
    """
    status = "failed" if failed else "success"
    for logger in trainer.loggers if trainer is not None else []:
        try:
            logger.finalize(status)
        except Exception:  # noqa: BLE001 (one logger's failure must not keep the others open)
            log.warning("logger %s could not be finalized", type(logger).__name__, exc_info=True)
    run = open_wandb_run()
    if run is not None and run is not keep:
        wandb = sys.modules["wandb"]
        wandb.finish(exit_code=1 if failed else 0)
        wait_for_wandb_files(wandb)


def wait_for_wandb_files(wandb: Any) -> None:
    """Return once W&B's service process has written and closed the finished run's files.

    ``wandb.finish`` returns when the service has taken the run's last record, and only then
    tells it to close the run, without waiting: the service writes the run's transaction log
    (``run-*.wandb``) as it closes it, so on a loaded machine a command returned while its
    run folder was still being written. Tearing the service down waits for every run it
    holds to close (the next run starts a new service, ~0.2 s). Skipped while the process
    holds another W&B run of its own, which a teardown would end.
    """
    if getattr(wandb.setup(), "most_recent_active_run", None) is None:  # (absent: older wandb)
        wandb.teardown()


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
