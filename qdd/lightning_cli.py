"""The Trainer subcommands (fit, validate, test, predict) as one LightningCLI.

LightningCLI used as it documents itself: the model and the data module by class, the
defaults and loggers in packaged YAML (``configs/trainer/defaults.yaml``: seed 0, W&B
offline + CSV), extra wiring through `add_arguments_to_parser`. `qdd.api` runs it with
a config dict, ``qdd-cli`` with the command line; both get the same two qdd steps, taken
in `before_instantiate_classes`:

- the run folder: ``trainer.default_root_dir`` (``--out``), else
  ``runs/<command>-<detector>-<time>``; loggers without a ``save_dir`` write there, and
  checkpoints go to ``<run>/checkpoints/`` (``last.ckpt`` always).
- `qdd.checkpoint.apply_checkpoint`, the rule of ``--ckpt_path`` and ``--weights X.ckpt``:
  which value wins (your flags > the checkpoint > presets > defaults; the checkpoint's
  architecture is never replaced), and whose training data the data module must not
  evaluate. (LightningCLI alone lets the checkpoint replace the user's values.)
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.cli import LightningCLI

from qdd.checkpoint import apply_checkpoint
from qdd.threads import use_threads

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).parent / "configs"
#: Shared with DDP's child processes, which re-run the command and must find the same run.
RUN_DIR_ENV = "QDD_RUN_DIR"
COMMANDS = ("fit", "validate", "test", "predict")


class QddCLI(LightningCLI):
    """LightningCLI with qdd's run folders and checkpoint rule (see the module docstring)."""

    def __init__(self, model_class: type, datamodule_class: type, args: Any = None) -> None:
        defaults = {"default_config_files": [str(CONFIGS / "trainer" / "defaults.yaml")]}
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

    def given(self) -> dict[str, Any]:
        """The ``model`` values the user set: the arguments parsed again without defaults."""
        parse = self.parser.parse_object if isinstance(self.args, dict) else self.parser.parse_args
        given = parse(self.args, defaults=False)[self.subcommand].get("model") or Namespace()
        return given.as_dict()

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        trainer = config.trainer
        run_dir = trainer.default_root_dir or os.environ.get(RUN_DIR_ENV)
        if not run_dir:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            run_dir = f"runs/{self.subcommand}-{config.model.detector}-{stamp}"
        os.environ[RUN_DIR_ENV] = trainer.default_root_dir = run_dir
        loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
        for logger in [lg for lg in loggers if isinstance(lg, Namespace)]:  # not true/false
            if logger.init_args.get("save_dir") == ".":
                logger.init_args.save_dir = run_dir
            if "WandbLogger" in logger.class_path and logger.init_args.get("name") is None:
                logger.init_args.name = Path(run_dir).name
        apply_checkpoint(config, self.given, self.subcommand)  # qdd.checkpoint's rules

    def after_instantiate_classes(self) -> None:
        use_threads(workers=self.datamodule.workers_for(self.trainer),
                    processes=self.trainer.num_devices)  # fmt: skip
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
