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
With ``--ckpt_path``, Lightning restores the model's hyperparameters from the checkpoint
(they replace ``--model.*`` flags: the weights must match their architecture), and the
checkpoint's weights are what is evaluated.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from qdd.datamodules.shard import ShardDataModule
from qdd.errors import QddError
from qdd.modules.detector import DetectorModule

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
        callback = self.trainer.checkpoint_callback
        if callback is not None and callback.dirpath is None:
            callback.dirpath = str(Path(self.trainer.default_root_dir) / "checkpoints")
            callback.save_last = True  # checkpoints/last.ckpt: a path users can predict


def _fit_metrics(cli: QddLightningCLI) -> None:
    """metrics.json of a fit run: last logged values and the best checkpoint."""
    trainer = cli.trainer
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    callback = trainer.checkpoint_callback
    summary = {
        "detector": cli.model.hparams.detector,
        "epochs": trainer.current_epoch,
        "metrics": metrics,
        "best_checkpoint": callback.best_model_path if callback else None,
        "last_checkpoint": callback.last_model_path if callback else None,
    }
    path = Path(trainer.default_root_dir) / "metrics.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")


def run_trainer_command(command: str, argv: list[str]) -> None:
    """``qdd-cli fit|validate|test|predict ...``; prints the run folder last."""
    args = [command, *expand_shorthands(argv)]
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
