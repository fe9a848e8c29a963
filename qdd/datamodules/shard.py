"""`ShardDataModule`: shard folders as a LightningDataModule, for every Trainer command.

What it reads, by stage:

- ``paths`` (``--data DIR|GLOB``): folders to benchmark — test and predict read all of
  them (``split: all``), or their test split (``split: test``) — and, for ``fit``, to train
  on (their train split, each sample once per epoch) and validate on (their val split);
- ``train`` sources ``{path, weight, name}``: a weighted mix for ``fit`` (draws with
  replacement, class-balanced by default: `qdd.datamodules.sampling`); ``val`` folders
  (default: the train sources) give their val split; ``test`` folders their test split.

One split rule for all of them (`qdd.datamodules.split`): a sample is train, val or test by
its prompt_id (real photographs: its key), whichever folders a run names, so a checkpoint's
training data is known by its units. ``state_dict()`` stores the split settings and the
trained units in every fit checkpoint; with ``checkpoint`` set (the ``.ckpt`` a test runs),
``setup`` refuses an evaluated split that overlaps that checkpoint's training data, unless
``allow_train_overlap`` says it is on purpose (the count is then in `describe`).

Perturbations (``--perturb``, test and predict) and re-encoding (``reencode``, every split)
apply after decoding and before the detector's own preprocessing, handed in as
``transforms`` (``{"train": ..., "eval": ...}``: `DetectorModule.loader_transforms`).

Exactly once: evaluation loaders (validate, test, predict) use a map-style dataset with
``UnrepeatedDistributedSampler`` (no padding, ranks differ by at most one sample), so every
sample is scored once for any worker count, batch size and number of ranks.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset

from qdd.datamodules.dataset import (
    Collate,
    Perturbation,
    ShardDataset,
    Transform,
    perturbation_names,
)
from qdd.datamodules.reader import Entry, read_manifest, resolve_folders
from qdd.datamodules.sampling import DrawDataset, WeightedDrawSampler
from qdd.datamodules.split import (
    RULE,
    Indexed,
    digest,
    identities,
    index_folder,
    take,
)
from qdd.datamodules.writer import formats_by_group
from qdd.errors import QddError
from qdd.reencode import MATCH, Reencoder, build_reencoder, check_spec

log = logging.getLogger(__name__)

#: Upper bound on automatic DataLoader workers: beyond this the decode rate stops scaling
#: on typical nodes and each worker costs memory.
MAX_AUTO_WORKERS = 16
#: On a CPU, one decoding worker per this many cores (see `default_num_workers`).
CPU_CORES_PER_WORKER = 8
#: What test and predict read of their folders.
TEST_SPLITS = ("all", "test")
#: The split settings a checkpoint stores and a resumed fit must repeat.
SETTINGS = ("val_fraction", "test_fraction", "holdout_generators")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a SLURM allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_num_workers(accelerator: str, processes_per_node: int = 1) -> int:
    """DataLoader workers per process when the user does not choose.

    Each process gets its share of the cores this process may use. On a GPU the model
    leaves the CPU to the loader: the share minus one core for the process itself (it
    runs the loop and collates). On a CPU every worker takes a core from the model's
    threads (`qdd.threads` gives torch the share minus the workers, so nothing is
    oversubscribed); decoding costs ~10-15 % of a core's NPR forward time, so a worker
    pays only from 8 cores on: one worker per 8 cores, none below (decoding then runs
    inline, between batches).
    """
    share = usable_cores() // max(processes_per_node, 1)
    if share <= 1:
        return 0
    if accelerator == "cpu":
        return share // CPU_CORES_PER_WORKER
    return min(share - 1, MAX_AUTO_WORKERS)


@dataclass
class Source:
    """One training source: shard folder(s) or a glob, its sampling weight, a short name.

    ``name`` defaults to the path's last component (``shards/sd15-fp4`` → ``sd15-fp4``);
    sweeps address a source's weight by it (``--data.source_weights.sd15-fp4=0.5``).
    """

    path: str
    weight: float = 1.0
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or Path(self.path).name


def read_split_state(checkpoint: str | Path) -> dict[str, Any] | None:
    """The split settings a fit stored in ``checkpoint`` (None: it stores none)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise QddError(f"checkpoint {path} does not exist: check the path")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not a zip file (legacy format): no memory map
        saved = torch.load(path, map_location="cpu", weights_only=True)
    state = saved.get(ShardDataModule.__qualname__) if isinstance(saved, dict) else None
    return state or None


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
            each (weights split a class's half among its sources); ``False``: weights are
            shares of all draws.
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
            predict, validate); a fit started from it also inherits its trained units.
        allow_train_overlap: evaluate on the checkpoint's training data on purpose (the
            overlap is counted in `describe`) instead of refusing.
        transforms: the detector's loader-side preprocessing, ``{"train": T, "eval": T}``
            (PIL image → tensor); a missing one: a plain uint8 tensor.
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
    ) -> None:
        super().__init__()
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
        self.class_balance = class_balance
        self.samples_per_epoch = samples_per_epoch
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.perturb = list(perturb or [])
        self.perturbations = _perturbations(self.perturb)
        self.reencode: str | None = None if reencode is None else check_spec(reencode)
        self.reencoder: Reencoder | None = None
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.allow_train_overlap = allow_train_overlap
        self.transforms = transforms
        self._weigh_sources(source_weights or {})
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
        for paths_ in ([s.path for s in self.sources], self.val_paths, self.test_paths):
            for folder in resolve_folders(paths_) if paths_ else []:
                read_manifest(folder)  # fail before the trainer starts, not after

    def _weigh_sources(self, source_weights: dict[str, float]) -> None:
        names = [s.label for s in self.sources]
        if len(set(names)) != len(names):
            repeated = sorted(n for n, c in Counter(names).items() if c > 1)
            raise QddError(
                f"train sources share the name(s) {', '.join(repeated)}: give each a `name:`"
            )
        for name, weight in source_weights.items():
            if name not in names:
                raise QddError(
                    f"source_weights names {name!r}, not a train source: use one of "
                    f"{', '.join(names) or '(none: list data.train sources)'}"
                )
            self.sources[names.index(name)].weight = float(weight)
        for source in self.sources:
            if source.weight < 0:
                raise QddError(f"train source {source.label} has weight {source.weight}: use ≥ 0")

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
            state = read_split_state(self.checkpoint)
            if state is None:
                log.warning(
                    "%s stores no split settings (not written by this qdd's fit): whether "
                    "the data was trained on cannot be checked",
                    self.checkpoint,
                )
            elif stage == "fit":
                self._inherited = state["train_units"]
            else:
                self._check_overlap(state, self.checkpoint)

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
        chosen = take(
            self._samples(paths),
            split,
            self.val_fraction,
            self.test_fraction,
            self.holdout if holdout else (),
        )
        if not chosen:
            fraction = {"train": "", "val": "val_fraction", "test": "test_fraction"}.get(split)
            name = {"val": "validation"}.get(split, split)
            hint = f"add samples or raise --data.{fraction}" if fraction else "add samples"
            if split == "train":
                hint = "add samples, lower the fractions or check holdout_generators"
            settings = f"val_fraction={self.val_fraction}, test_fraction={self.test_fraction}"
            raise QddError(
                f"the {name} split of {', '.join(map(str, paths))} is empty ({settings}): {hint}"
            )
        return chosen

    def _setup_sources(self) -> None:
        samples: list[Indexed] = []
        owner: dict[str, str] = {}
        self.source_of = []
        for source in self.sources:
            taken = take(
                self._samples([source.path]),
                "train",
                self.val_fraction,
                self.test_fraction,
                self.holdout,
            )
            if not taken and source.weight > 0:
                raise QddError(
                    f"train source {source.label} ({source.path}) has no training samples "
                    "after the split and held-out generators: check its path and holdout"
                )
            for sample in taken:
                if owner.setdefault(sample.entry.shard, source.label) != source.label:
                    raise QddError(
                        f"{Path(sample.entry.shard).parent} is in train sources "
                        f"{owner[sample.entry.shard]} and {source.label}: list each folder once"
                    )
            samples += taken
            self.source_of += [source.label] * len(taken)
        self.split["train"] = samples
        self.probabilities = self._probabilities()

    def _probabilities(self) -> torch.Tensor:
        """Each training sample's draw probability (sources' weights, class balance)."""
        weights = {s.label: s.weight for s in self.sources}
        counts = Counter(self.source_of)
        q = torch.tensor([weights[n] / counts[n] for n in self.source_of], dtype=torch.float64)
        labels = torch.tensor([s.label for s in self.split["train"]])
        if not self.class_balance:
            if q.sum() <= 0:
                raise QddError("every train source has weight 0: give one a positive weight")
            return q / q.sum()
        p = torch.zeros_like(q)
        for label, name in ((0, "real"), (1, "fake")):
            mask = labels == label
            if q[mask].sum() <= 0:
                raise QddError(
                    f"no {name} training samples with a positive weight: class_balance needs "
                    "both classes (add a source, or set data.class_balance=false)"
                )
            p[mask] = q[mask] / q[mask].sum() / 2
        return p

    def _setup_val(self) -> None:
        if not self.val_paths:
            raise QddError("no validation data: pass --data FOLDER or list data.val folders")
        if getattr(self.trainer, "limit_val_batches", None) == 0:
            self.split["val"] = []  # validation is switched off: nothing to check
            return
        samples = self._split("val", self.val_paths, holdout=True)
        classes = Counter(s.label for s in samples)
        if len(classes) < 2:
            ((label, count),) = classes.items()
            have, need = ("real", "fake") if label == 0 else ("fake", "real")
            raise QddError(
                f"the validation split of {', '.join(self.val_paths)} holds only {have} "
                f"images ({count}): its threshold and AUROC need both classes; add {need} "
                "shards to the validation folders or raise --data.val_fraction"
            )
        self.split["val"] = samples

    def _check_holdout(self) -> None:
        """Bug 4: a misspelt held-out generator (``SD3`` for ``sd3``) would hold out nothing."""
        if not self.holdout:
            return
        from qdd.generation.registry import GENERATORS  # names only: no diffusers

        present = {s.generator for v in self._indexed.values() for s in v if s.generator}
        unknown = [g for g in self.holdout if g not in present and g not in GENERATORS]
        if unknown:
            raise QddError(
                f"holdout_generators names {', '.join(unknown)}, which no sample has: the "
                f"generators present are {', '.join(sorted(present)) or 'none'} "
                "(names are case-sensitive)"
            )

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
    def _trained_units(self) -> torch.Tensor:
        own = identities(self.split.get("train", []))
        return torch.unique(torch.cat([own, self._inherited]))  # sorted

    def state_dict(self) -> dict[str, Any]:
        """The split settings and the trained units (hashed), stored in every fit checkpoint."""
        if "train" not in self.split:
            return {}
        units = self._trained_units()
        return {
            "rule": RULE,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "holdout_generators": list(self.holdout),
            "train_units": units,
            "n_train_units": len(units),
            "train_digest": digest(units),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning restores a checkpoint's split state here (``--ckpt_path``): a resumed fit
        must keep its split; an evaluation is checked against its training data."""
        if not state_dict:
            return
        if self._stage == "fit":
            ours = {"val_fraction": self.val_fraction, "test_fraction": self.test_fraction,
                    "holdout_generators": list(self.holdout)}  # fmt: skip
            differ = [k for k in SETTINGS if state_dict.get(k) != ours[k]]
            if differ:
                given = ", ".join(f"{k}={ours[k]}" for k in differ)
                saved = ", ".join(f"{k}={state_dict.get(k)}" for k in differ)
                raise QddError(
                    f"resuming a fit with {given}, but it was trained with {saved}: pass the "
                    "checkpoint's split settings (they decide which images are trained on)"
                )
            self._inherited = state_dict["train_units"]
        elif not self._checked:
            self._check_overlap(state_dict, "the checkpoint")

    def _check_overlap(self, state: dict[str, Any], checkpoint: str) -> None:
        """Refuse (or count) evaluated images whose unit the checkpoint trained on."""
        self._checked = True
        split = "val" if self._stage == "validate" else "test"
        evaluated = [s for s in self.split.get(split, []) if s.identity is not None]
        if state.get("rule") != RULE:
            log.warning("%s was split by another rule: its training data cannot be checked",
                        checkpoint)  # fmt: skip
            return
        trained = set(state["train_units"].tolist())
        overlap = sum(s.identity in trained for s in evaluated)
        self.train_overlap = overlap
        if not overlap:
            return
        what = f"{overlap} of the {len(evaluated)} images to evaluate"
        if self.allow_train_overlap:
            log.warning("%s were trained on by %s (allow_train_overlap)", what, checkpoint)
            return
        raise QddError(
            f"{what} share a prompt (real photos: the image) with the training data of "
            f"{checkpoint}: evaluate its held-out split with the fractions it was trained with "
            f"(--data.split=test --data.val_fraction={state['val_fraction']} "
            f"--data.test_fraction={state['test_fraction']}) or other shards, or pass "
            "--data.allow_train_overlap=true to evaluate on them on purpose"
        )

    def describe(self) -> dict[str, Any]:
        """What the run read and drew, for metrics.json: sampler, shares, split sizes."""
        train = self.split.get("train", [])
        shares: dict[str, float] = {}
        if self.sources:
            for name, p in zip(self.source_of, self.probabilities.tolist(), strict=True):
                shares[name] = shares.get(name, 0.0) + p
            fake_share = sum(
                p for p, s in zip(self.probabilities.tolist(), train, strict=True) if s.label
            )
            sampler = "weighted random sampler, with replacement" + (
                ", class-balanced (real 1/2, fake 1/2)" if self.class_balance else ""
            )
        else:
            fake_share = sum(s.label == 1 for s in train) / len(train) if train else 0.0
            sampler = "each training sample once per epoch, shuffled"
        return {
            "sampler": sampler,
            "class_balance": self.class_balance and bool(self.sources),
            "split": RULE,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "holdout_generators": list(self.holdout),
            "sources": [
                {
                    "name": s.label,
                    "path": s.path,
                    "weight": s.weight,
                    "n_train": self.source_of.count(s.label),
                    "share": round(shares.get(s.label, 0.0), 6),
                }
                for s in self.sources
            ],
            "paths": self.paths,
            "fake_share": round(fake_share, 6),
            "n_train": len(train),
            "n_val": len(self.split.get("val", [])),
            "samples_per_epoch": self.samples_per_epoch or len(train),
            "val": self.val_paths,
            "test": self.test_paths,
            "test_split": self.split_name,
            "n_test": len(self.split.get("test", [])),
            "checkpoint": self.checkpoint,
            "train_overlap": self.train_overlap,
        }

    # -- loaders -------------------------------------------------------------------------------
    def _transform(self, kind: str) -> Transform | None:
        if self.transforms is not None:
            return self.transforms[kind]
        from torchvision.transforms import PILToTensor

        return PILToTensor()  # no detector's preprocessing given: the decoded uint8 image

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        entries = [s.entry for s in self.split["train"]]
        options = loader_options(trainer, self.num_workers, persistent=True)
        if not self.sources:
            dataset = ShardDataset(entries, self._transform("train"), reencode=self.reencoder)
            return DataLoader(
                dataset,
                batch_size=self.batch_size,
                shuffle=True,  # Lightning swaps in a seeded DistributedSampler under DDP
                generator=torch.Generator().manual_seed(self.seed),
                collate_fn=Collate(dataset.perturbation_names),
                **options,
            )
        draws = DrawDataset(entries, self._transform("train"), reencode=self.reencoder)
        sampler = WeightedDrawSampler(
            draws,
            self.probabilities,
            self.samples_per_epoch or len(entries),
            self.batch_size,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
            seed=self.seed,
        )
        return DataLoader(
            draws,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=Collate(draws.perturbation_names),
            **options,
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


def loader_options(trainer: Any, num_workers: int | None, persistent: bool) -> dict[str, Any]:
    """DataLoader workers, pinned memory and prefetch for this trainer's devices."""
    device = trainer.strategy.root_device.type if trainer else "cpu"
    per_node = trainer.num_devices if trainer else 1
    workers = num_workers
    if workers is None:
        workers = default_num_workers("cpu" if device == "cpu" else "gpu", per_node)
    options: dict[str, Any] = {"num_workers": workers, "pin_memory": device == "cuda"}
    if workers > 0:
        options["persistent_workers"] = persistent
        if device != "cpu":
            options["prefetch_factor"] = 4  # keep the accelerator fed across slow batches
    return options


def evaluation_loader(
    dataset: ShardDataset | Dataset,
    batch_size: int,
    trainer: Any,
    num_workers: int | None = None,
    persistent: bool = False,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """An exactly-once loader of ``dataset`` for this trainer's rank (validate, test,
    predict; quality's pairs with their ``collate_fn``): ``UnrepeatedDistributedSampler``
    under DDP, which Lightning leaves alone."""
    world = trainer.world_size if trainer else 1
    sampler = None
    if world > 1:
        if len(dataset) < world:
            raise QddError(
                f"{len(dataset)} samples for {world} processes: every process needs at "
                "least one; use fewer devices"
            )
        sampler = UnrepeatedDistributedSampler(
            dataset, num_replicas=world, rank=trainer.global_rank, shuffle=False
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn if collate_fn is not None else Collate(dataset.perturbation_names),
        **loader_options(trainer, num_workers, persistent),
    )


def _perturbations(specs: list[str]) -> list[Perturbation]:
    """The parsed perturbations (``none`` first), or ``[]`` when none were asked for."""
    if not specs or all(spec.strip().lower() == "none" for spec in specs):
        return []
    from qdd.perturb import perturbations

    return perturbations(specs)
