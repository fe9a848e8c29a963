"""`ShardDataModule`: shard folders as a LightningDataModule, for every Trainer command.

What it reads, by stage:

- ``paths`` (``--data DIR|GLOB``): folders to benchmark — test and predict read all of
  them (``split: all``), or their test split (``split: test``) — and, for ``fit``, to train
  on (their train split, each sample once per epoch) and validate on (their val split);
- ``train`` sources ``{path, weight, name}``: a weighted mix for ``fit`` (draws with
  replacement, class-balanced by default: `qdd.datamodules.sampling`); ``val`` folders
  (default: the train sources) give their val split; ``test`` folders their test split.

One split rule for all of them (`qdd.datamodules.split`): a sample is train, val or test by
its prompt_id (real photographs: its key), whichever folders a run names. ``state_dict()``
stores the split settings and the trained units in every fit checkpoint; with
``checkpoint`` set, every evaluated split (a fit's validation split included) is checked
against that checkpoint's training data by `qdd.checkpoint` (refused, or counted with
``allow_train_overlap``). Validation images are checked readable at setup.

A training-free detector's ``fit`` calibrates only (`qdd.training_free`): after
`calibrate_only`, the validation pass reads every image of the validation folders outside
their test split (there is nothing to train on, so the train split joins the calibration
set), and ``state_dict()`` stores those units in the checkpoint, as a fit stores the units
it trained on: a later test refuses or counts them exactly the same way.

Perturbations (``--perturb``, test and predict) and re-encoding (``reencode``, every split)
apply after decoding and before the detector's own preprocessing, handed in as
``transforms`` (``{"train": ..., "eval": ...}``: `DetectorModule.loader_transforms`).
Sources and their draws: `qdd.datamodules.sources`, `qdd.datamodules.sampling`; loaders
(workers, exactly-once evaluation): `qdd.datamodules.loaders`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from qdd.checkpoint import DATA_KEY, FitCheckpoint, read_checkpoint
from qdd.datamodules.checks import check_holdout, check_validation, empty_split
from qdd.datamodules.dataset import (
    Perturbation,
    ShardDataset,
    Transform,
    perturbation_names,
)
from qdd.datamodules.loaders import default_num_workers as default_num_workers
from qdd.datamodules.loaders import evaluation_loader, loader_options
from qdd.datamodules.loaders import usable_cores as usable_cores
from qdd.datamodules.reader import (
    Entry,
    read_manifest,
    resolve_folders,
)
from qdd.datamodules.sampling import train_loader
from qdd.datamodules.sources import (
    Source,
    draw_probabilities,
    draw_summary,
    source_samples,
    weigh_sources,
)
from qdd.datamodules.split import CALIBRATION, RULE, Indexed, index_folder, split_state, take
from qdd.datamodules.writer import formats_by_group
from qdd.errors import QddError
from qdd.reencode import MATCH, Reencoder, build_reencoder, check_spec

log = logging.getLogger(__name__)

#: What test and predict read of their folders.
TEST_SPLITS = ("all", "test")


class ShardDataModule(LightningDataModule):
    """Shard folders → batches of ``(images, labels, meta)``.

    Args:
        paths: shard folder(s) or glob(s) (``--data``): benchmarked by test and predict
            (``split``), trained and validated on by ``fit`` when no ``train`` is given.
        train: weighted training sources, each ``{path: GLOB, weight: FLOAT}`` (optional
            ``name``); with them ``fit`` draws a weighted mix.
        val: validation folders or globs (their val split); default: the train sources
            or ``paths``.
        test: test folders or globs, for test and predict (their test split).
        split: what test and predict read of their folders: ``all`` or ``test`` (the held-out
            split); default: ``test`` for ``test`` folders, ``all`` for ``paths``.
        val_fraction: share of prompt ids (real: keys) in the validation split.
        test_fraction: share of prompt ids (real: keys) in the test split (never trained on).
        holdout_generators: generators never trained or validated on (tested only).
        class_balance: with ``train`` sources, draw real and fake with probability 1/2
            each (weights split a class's half among its sources); ``False``, and always
            for ``task="attribution"``: weights are shares of all draws.
        source_weights: overrides ``weight`` of train sources by name (for sweeps).
        samples_per_epoch: draws per epoch from ``train`` sources; default: the number of
            training samples.
        batch_size: images per batch and process (with ``P`` perturbations a test batch
            holds ``P`` × ``batch_size`` images).
        num_workers: DataLoader worker processes; ``None`` picks them from the cores this
            process may use (see `default_num_workers`).
        seed: seed of the training order (combined with the epoch).
        perturb: test-time perturbations (``jpeg:75``, ``resize:0.5``, ``blur:1.0`` …, see
            `qdd.perturb`) for test and predict; the unperturbed pass (``none``) always runs.
        reencode: ``jpeg:Q`` or ``match`` (see `qdd.reencode`): JPEG re-encoding right
            after decoding, in every split; ``None`` leaves images as stored.
        checkpoint: the ``.ckpt`` whose training data must not be evaluated on (test,
            predict, validate, a fit's validation split); a fit started from it also
            inherits its trained units (`qdd.checkpoint`).
        allow_train_overlap: evaluate on the checkpoint's training data on purpose (the
            overlap is counted in `describe`) instead of refusing.
        transforms: the detector's loader-side preprocessing, ``{"train": T, "eval": T}``
            (PIL image → tensor); a missing one: a plain uint8 tensor.
        task: ``detection`` (the validation split needs real and fake images) or
            ``attribution`` (any readable images: the classes are precisions).
    """

    def __init__(
        self,
        paths: str | list[str] | None = None,
        train: list[Source] | None = None,
        val: list[str] | None = None,
        test: list[str] | None = None,
        split: Literal["all", "test"] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        holdout_generators: list[str] | None = None,
        class_balance: bool = True,
        source_weights: dict[str, float] | None = None,
        samples_per_epoch: int | None = None,
        batch_size: int = 32,
        num_workers: int | None = None,
        seed: int = 0,
        perturb: list[str] | None = None,
        reencode: str | None = None,
        checkpoint: str | None = None,
        allow_train_overlap: bool = False,
        transforms: dict[str, Any] | None = None,
        task: Literal["detection", "attribution"] = "detection",
    ) -> None:
        super().__init__()
        if task not in ("detection", "attribution"):
            raise QddError(f"--task {task!r}: use detection or attribution")
        self.task = task
        if batch_size < 1:
            raise QddError(f"--data.batch_size must be at least 1, got {batch_size}")
        if num_workers is not None and num_workers < 0:
            raise QddError(f"--data.num_workers must be 0 or more, got {num_workers}")
        if not (val_fraction >= 0 and test_fraction >= 0 and val_fraction + test_fraction < 1):
            raise QddError(
                f"val_fraction {val_fraction} + test_fraction {test_fraction} must be in "
                "[0, 1): leave some prompts for training"
            )
        self.paths = [paths] if isinstance(paths, str) else list(paths or []) or None
        self.sources = [s if isinstance(s, Source) else Source(**s) for s in train or []]
        if self.paths and (self.sources or test):
            raise QddError(
                "--data FOLDER cannot be combined with a config whose data section lists train/"
                "test sources: override those instead (e.g. --data.test='[GLOB]')"
            )
        if split is not None and split not in TEST_SPLITS:
            raise QddError(f"--data.split={split!r}: use one of {', '.join(TEST_SPLITS)}")
        if samples_per_epoch is not None and not self.sources:
            raise QddError(
                "--data.samples_per_epoch applies to weighted data.train sources: drop it "
                "(a fit on --data folders sees each training image once per epoch)"
            )
        self.val_paths = list(val or []) or [s.path for s in self.sources] or self.paths or []
        self.test_paths = list(test or []) or self.paths or []
        self.split_name = split or ("test" if test else "all")
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.holdout = sorted(set(holdout_generators or []))
        # real vs fake halves are detection's classes; attribution's are precisions, drawn
        # as the sources' weights say (a fit without reals must not need them)
        self.class_balance = class_balance and task == "detection"
        self.samples_per_epoch = samples_per_epoch
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.perturb = list(perturb or [])
        self.perturbations = _perturbations(self.perturb)
        self.reencode: str | None = None if reencode is None else check_spec(reencode)
        self.reencoder: Reencoder | None = None
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.allow_train_overlap = allow_train_overlap
        self.transforms = transforms
        weigh_sources(self.sources, source_weights or {})
        # what setup found
        self.split: dict[str, list[Indexed]] = {}
        self.entries: list[Entry] = []  # what test and predict read
        self.groups: dict[str, int] = {}
        self.formats: dict[str, dict[str, int]] = {}
        self.source_of: list[str] = []
        self.probabilities = torch.zeros(0)
        self.train_overlap: int | None = None
        self._inherited = torch.zeros(0, dtype=torch.int64)  # units a start checkpoint trained
        self._indexed: dict[Path, list[Indexed]] = {}
        self._stage: str | None = None
        self._checked = False
        self.calibration_only = False  # see `calibrate_only`
        for paths_ in ([s.path for s in self.sources], self.val_paths, self.test_paths):
            for folder in resolve_folders(paths_) if paths_ else []:
                read_manifest(folder)  # fail before the trainer starts, not after

    # -- typed views the callbacks read --------------------------------------------------------
    @property
    def folders(self) -> list[Path]:
        """The folders test and predict read (recorded in a test run's metrics.json)."""
        return resolve_folders(self.test_paths) if self.test_paths else []

    @property
    def perturbation_names(self) -> list[str]:
        """The passes a test run scores, in the user's own spelling (``none`` first)."""
        return perturbation_names(self.perturbations)

    @property
    def expected(self) -> int | None:
        """Samples of the evaluated split (what a complete test run scores); None before
        ``setup("test")``."""
        return sum(self.groups.values()) if self.groups else None

    def workers_for(self, trainer: Any) -> int:
        """The DataLoader workers this module's loaders will start under ``trainer``."""
        return loader_options(trainer, self.num_workers, persistent=False)["num_workers"]

    def calibrate_only(self) -> None:
        """Make the validation pass a training-free detector's calibration set: every image
        of the validation folders outside their test split (see the module docstring)."""
        self.calibration_only = True

    # -- setup ---------------------------------------------------------------------------
    def _samples(self, paths: Sequence[str]) -> list[Indexed]:
        """Every sample of the folders ``paths`` name (each folder indexed once per module)."""
        samples: list[Indexed] = []
        for folder in resolve_folders(list(paths)):
            if folder not in self._indexed:
                self._indexed[folder] = index_folder(folder)
            samples += self._indexed[folder]
        return samples

    def setup(self, stage: str) -> None:
        self._stage = stage
        if stage in ("fit", "validate") and self.perturbations:
            raise QddError(
                "--perturb applies to test and predict only: drop it here (training "
                "augmentation is the detector's own)"
            )
        if stage == "fit":
            self._setup_train()
            self._setup_val()
            self._check_holdout()
        elif stage == "validate":
            self._setup_val()
            self._check_holdout()
        else:
            self._setup_test()
        if self.reencode is not None:
            reals = [s.format_meta() for v in self._indexed.values() for s in v if s.label == 0]
            metas = reals if self.reencode == MATCH else []
            self.reencoder = build_reencoder(self.reencode, metas)
        if self.checkpoint is not None:
            start = read_checkpoint(self.checkpoint)
            if stage == "fit" and start.trained_units() is not None:
                self._inherited = start.trained_units()  # a fine-tune has seen them too
            self._check_overlap(start)

    def _setup_train(self) -> None:
        if self.sources:
            self._setup_sources()
            return
        if not self.paths:
            raise QddError(
                "no training data: pass --data FOLDER or list data.train sources as {path, weight}"
            )
        samples = self._split("train", self.paths, holdout=True)
        self.split["train"] = samples
        self.source_of = ["paths"] * len(samples)

    def _split(self, split: str, paths: Sequence[str], holdout: bool) -> list[Indexed]:
        chosen = take(self._samples(paths), split, self.val_fraction, self.test_fraction,
                      self.holdout if holdout else ())  # fmt: skip
        if not chosen:
            raise empty_split(split, paths, self.val_fraction, self.test_fraction)
        return chosen

    def _setup_sources(self) -> None:
        def train_split(source: Source) -> list[Indexed]:
            return take(self._samples([source.path]), "train", self.val_fraction,
                        self.test_fraction, self.holdout)  # fmt: skip

        self.split["train"], self.source_of = source_samples(self.sources, train_split)
        self.probabilities = draw_probabilities(
            self.sources, self.split["train"], self.source_of, self.class_balance
        )

    def _setup_val(self) -> None:
        if not self.val_paths:
            raise QddError("no validation data: pass --data FOLDER or list data.val folders")
        if getattr(self.trainer, "limit_val_batches", None) == 0:
            self.split["val"] = []  # validation is switched off: nothing to check
            return
        split = CALIBRATION if self.calibration_only else "val"  # all but the test split
        samples = self._split(split, self.val_paths, holdout=True)
        check_validation(samples, self.val_paths, both_classes=self.task == "detection",
                         calibration_only=self.calibration_only)  # fmt: skip
        self.split["val"] = samples

    def _check_holdout(self) -> None:
        if not self.holdout:
            return
        present = {s.generator for v in self._indexed.values() for s in v if s.generator}
        check_holdout(self.holdout, present)

    def _setup_test(self) -> None:
        if not self.test_paths:
            raise QddError(
                "no test sources: list them under data.test in the config, or pass --data.test=GLOB"
            )
        samples = self._split(self.split_name, self.test_paths, holdout=False)
        if not any(s.readable for s in samples):
            raise QddError(f"no readable samples in {', '.join(self.test_paths)}: check the shards")
        self.split["test"] = samples
        self.entries = [s.entry for s in samples]
        readable = [s for s in samples if s.readable]
        self.groups = dict(sorted(Counter(s.group for s in readable).items()))
        self.formats = formats_by_group(
            Counter((s.group, s.source_format or "unknown") for s in readable)
        )

    # -- what a checkpoint stores and checks ---------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The split settings and the trained units (hashed), stored in every fit checkpoint;
        for a training-free detector's calibration, the units calibrated on."""
        if self.calibration_only and "val" in self.split:
            return {**split_state(self.split["val"], self._inherited, self.val_fraction,
                                  self.test_fraction, self.holdout), "calibration_only": True}
        if "train" not in self.split:
            return {}
        return split_state(self.split["train"], self._inherited, self.val_fraction,
                           self.test_fraction, self.holdout)  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning restores a checkpoint's split state here (``--ckpt_path``): a resumed fit
        must keep its split; what is evaluated is checked against its training data."""
        if not state_dict:
            return
        restored = FitCheckpoint("the checkpoint", {DATA_KEY: state_dict})
        if self._stage == "fit":
            restored.check_resume({"val_fraction": self.val_fraction,
                                   "test_fraction": self.test_fraction,
                                   "holdout_generators": list(self.holdout)})  # fmt: skip
            self._inherited = state_dict["train_units"]
        if not self._checked:
            self._check_overlap(restored)

    def _check_overlap(self, start: FitCheckpoint) -> None:
        """Count (or refuse) evaluated images whose unit ``start`` trained on: a fit's or
        validate's validation split, test's and predict's split (`FitCheckpoint.overlap`)."""
        self._checked = True
        stage = self._stage if self._stage in ("fit", "validate") else "test"
        evaluated = self.split.get("val" if stage != "test" else "test", [])
        self.train_overlap = start.overlap(evaluated, stage, self.allow_train_overlap)

    def describe(self) -> dict[str, Any]:
        """What the run read and drew, for metrics.json: sampler, shares, split sizes."""
        train = self.split.get("train", [])
        drawn = draw_summary(
            self.sources, train, self.source_of, self.probabilities, self.class_balance
        )
        return {
            "sampler": drawn["sampler"],
            "class_balance": drawn["class_balance"],
            "split": RULE,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "holdout_generators": list(self.holdout),
            "sources": drawn["sources"],
            "paths": self.paths,
            "fake_share": drawn["fake_share"],
            "n_train": len(train),
            "n_val": len(self.split.get("val", [])),
            "samples_per_epoch": self.samples_per_epoch or len(train),
            "val": self.val_paths,
            "test": self.test_paths,
            "test_split": self.split_name,
            "n_test": len(self.split.get("test", [])),
            "checkpoint": self.checkpoint,
            "train_overlap": self.train_overlap,
            "calibration_only": self.calibration_only,
        }

    # -- loaders -------------------------------------------------------------------------------
    def _transform(self, kind: str) -> Transform | None:
        if self.transforms is not None:
            return self.transforms[kind]
        from torchvision.transforms import PILToTensor

        return PILToTensor()  # no detector's preprocessing given: the decoded uint8 image

    def train_dataloader(self) -> DataLoader:
        return train_loader(
            [s.entry for s in self.split["train"]],
            self._transform("train"),
            self.reencoder,
            self.probabilities if self.sources else None,
            self.samples_per_epoch,
            self.batch_size,
            self.trainer,
            self.seed,
            loader_options(self.trainer, self.num_workers, persistent=True),
        )

    def _eval_loader(self, split: str, persistent: bool = False) -> DataLoader:
        perturbations = self.perturbations if split == "test" else []
        entries = [s.entry for s in self.split[split]]
        dataset = ShardDataset(entries, self._transform("eval"), perturbations, self.reencoder)
        return evaluation_loader(
            dataset, self.batch_size, self.trainer, self.num_workers, persistent=persistent
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val", persistent=True)  # every epoch: keep its workers

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("test")


def _perturbations(specs: list[str]) -> list[Perturbation]:
    """The parsed perturbations (``none`` first), or ``[]`` when none were asked for."""
    if not specs or all(spec.strip().lower() == "none" for spec in specs):
        return []
    from qdd.perturb import perturbations

    return perturbations(specs)
