"""`MixDataModule`: train on a weighted mix of shard sources, validate and test on held-out splits.

Splits. Every sample belongs to exactly one split (train / val / test), decided by its
``prompt_id`` (samples without one — real photographs — by a hash of their key; see
`split_position`). The split is a pure function of that id, so

- an image's FP4 and FP32 twins, and one prompt across generators, are always on the same
  side, whichever folders a run names: no prompt_id is both trained and tested on;
- a folder's test split is the same in every experiment, so runs that name the same test
  globs are tested on the same images and stay comparable.

Training sources take only their train split, validation sources their val split, test
sources their test split. ``holdout_generators`` removes whole generators from training
and validation (the cross-generator question: train on SD1.5/SDXL, test on SD3/Flux).

Sampling. Each epoch draws ``samples_per_epoch`` training samples with replacement from
a weighted sampler (seeded by ``seed`` and the epoch). A source's weight is spread evenly
over its samples. With ``class_balance`` (the default) real and fake are each drawn with
probability 1/2 and the weights split a class's half among its sources; without it the
weights are the sources' shares of all draws. The draws are cut into global batches of
``world_size × batch_size``, rank ``r`` taking the ``r``-th part of each: so DDP on N
processes sees the same global batches as one process with an N-times larger batch, and
each draw's random augmentation is seeded by its position among the draws (not by the
process or worker that happens to run it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from qdd.datamodules.dataset import Collate, Sample, ShardDataset, Skipped, Transform
from qdd.datamodules.reader import Entry, index_folders, read_manifest, resolve_folders
from qdd.datamodules.schema import REAL, group_of
from qdd.datamodules.shard import (
    EvaluatedDataModule,
    _perturbations,
    detector_transform,
    evaluation_loader,
    loader_options,
)
from qdd.errors import QddError

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class Indexed:
    """An indexed sample: where it lies, and what the split and the sampler need."""

    entry: Entry
    label: int
    group: str
    generator: str | None
    unit: str  # what the split hashes: "prompt:<prompt_id>" or "key:<key>"


GOLDEN = 0.6180339887498949


def split_position(unit: str) -> float:
    """A unit's fixed position in [0, 1).

    Integer prompt ids use the golden-ratio sequence ``frac(id × 0.618…)``, which spreads
    any run of consecutive ids evenly (24 prompts at test_fraction 0.2 give 5 test prompts,
    not a binomial draw); anything else (real photos' keys) a SHA-1 hash.
    """
    kind, _, value = unit.partition(":")
    if kind == "prompt" and value.lstrip("-").isdigit():
        return (int(value) * GOLDEN) % 1.0
    return int.from_bytes(hashlib.sha1(unit.encode()).digest()[:8], "big") / 2**64


def split_of(unit: str, val_fraction: float, test_fraction: float) -> str:
    """The split of a prompt (or real image): test below ``test_fraction``, then val."""
    position = split_position(unit)
    if position < test_fraction:
        return "test"
    if position < test_fraction + val_fraction:
        return "val"
    return "train"


def split_unit(key: str, meta: dict[str, Any]) -> str:
    """Twins share a prompt_id; real photographs (no prompt) are their own unit."""
    prompt_id = meta.get("prompt_id")
    if meta.get("label") != REAL and prompt_id is not None:
        return f"prompt:{prompt_id}"
    return f"key:{key}"


def index_samples(folders: list[Path]) -> list[Indexed]:
    """Every sample of ``folders`` with its metadata (JSON members only; no image decoded)."""
    entries, _ = index_folders(folders)
    samples = []
    handles: dict[str, Any] = {}
    try:
        for entry in entries:
            if entry.meta is None or entry.png is None:
                log.warning("skipped %s in %s: a member is missing", entry.key, entry.shard)
                continue
            handle = handles.get(entry.shard) or handles.setdefault(
                entry.shard, open(entry.shard, "rb")
            )
            handle.seek(entry.meta[0])
            try:
                meta = json.loads(handle.read(entry.meta[1]))
            except json.JSONDecodeError:
                raise QddError(
                    f"{entry.shard}: sample {entry.key} has unreadable metadata: "
                    "re-create the shards"
                ) from None
            samples.append(
                Indexed(
                    entry,
                    int(meta["label"]),
                    group_of(meta),
                    meta.get("generator"),
                    split_unit(entry.key, meta),
                )
            )
    finally:
        for handle in handles.values():
            handle.close()
    return samples


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Python's and torch's global RNGs seeded for one call, then restored."""
    state = random.getstate()
    random.seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed % 2**63)
        try:
            yield
        finally:
            random.setstate(state)


class DrawDataset(ShardDataset):
    """Items are ``(seed, index)`` pairs: entry ``index``, augmented under ``seed``."""

    def __getitem__(self, item: tuple[int, int]) -> Sample | Skipped:  # type: ignore[override]
        seed, index = item
        with seeded(seed):
            return super().__getitem__(index)


class WeightedDrawSampler(DistributedSampler):
    """Per epoch, ``num_samples`` weighted draws with replacement, cut into global batches.

    Yields this rank's ``(seed, index)`` pairs; the seed depends on (seed, epoch, position
    among all draws) only. A `DistributedSampler`, so Lightning leaves it in place under DDP.
    """

    def __init__(
        self,
        dataset: DrawDataset,
        probabilities: torch.Tensor,
        num_samples: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=False, seed=seed)
        self.probabilities = probabilities.double()
        self.batch_size = batch_size
        global_batch = batch_size * world_size
        self.total = -(-num_samples // global_batch) * global_batch

    def draws(self) -> torch.Tensor:
        """Indices of this epoch's draws (all ranks), in global-batch order."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.multinomial(
            self.probabilities, self.total, replacement=True, generator=generator
        )

    def rank_draws(self) -> list[tuple[int, int]]:
        """(seed, entry index) of this rank's draws, in order."""
        batches = self.draws().view(-1, self.num_replicas, self.batch_size)
        positions = torch.arange(self.total).view_as(batches)
        base = (self.seed * 1_000_003 + self.epoch) * 2**24
        return [
            (base + p, i)
            for p, i in zip(
                positions[:, self.rank].reshape(-1).tolist(),
                batches[:, self.rank].reshape(-1).tolist(),
                strict=True,
            )
        ]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.rank_draws())

    def __len__(self) -> int:
        return self.total // self.num_replicas


class MixDataModule(EvaluatedDataModule):
    """A weighted mix of shard sources for ``fit``; held-out val and test splits.

    Args:
        train: training sources, each ``{path: GLOB, weight: FLOAT}`` (optional ``name``).
        val: validation folders or globs (their val split); default: the train sources.
        test: test folders or globs (their test split), for ``qdd-cli test``.
        val_fraction: share of prompt ids (real: keys) in the validation split.
        test_fraction: share of prompt ids (real: keys) in the test split.
        holdout_generators: generators never trained or validated on (tested only).
        class_balance: draw real and fake with probability 1/2 each (weights split a
            class's half among its sources); ``False``: weights are shares of all draws.
        source_weights: overrides ``weight`` of sources by name (for sweeps).
        samples_per_epoch: draws per epoch; default: the number of training samples.
        batch_size: images per batch and process.
        num_workers: DataLoader worker processes; ``None`` picks them from the cores
            (as `ShardDataModule` does).
        seed: seed of the sampler (combined with the epoch).
        perturb: test-time perturbations of the test split (``--perturb jpeg:75``; see
            `ShardDataModule`).
        train_transform: overrides the detector's training preprocessing.
        eval_transform: overrides the detector's test preprocessing.
    """

    def __init__(
        self,
        train: list[Source] | None = None,
        val: list[str] | None = None,
        test: list[str] | None = None,
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
        train_transform: Transform | None = None,
        eval_transform: Transform | None = None,
    ) -> None:
        super().__init__()
        self.perturb = list(perturb or [])
        self.perturbations = _perturbations(self.perturb)
        self.sources = [s if isinstance(s, Source) else Source(**s) for s in train or []]
        self.val_paths = list(val) if val else [s.path for s in self.sources]
        self.test_paths = list(test or [])
        if not (val_fraction >= 0 and test_fraction >= 0 and val_fraction + test_fraction < 1):
            raise QddError(
                f"val_fraction {val_fraction} + test_fraction {test_fraction} must be in "
                "[0, 1): leave some prompts for training"
            )
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.holdout = set(holdout_generators or [])
        self.class_balance = class_balance
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.samples_per_epoch = samples_per_epoch
        self.train_transform, self.eval_transform = train_transform, eval_transform
        names = [s.label for s in self.sources]
        if len(set(names)) != len(names):
            repeated = sorted(n for n, c in Counter(names).items() if c > 1)
            raise QddError(
                f"train sources share the name(s) {', '.join(repeated)}: give each a `name:`"
            )
        for name, weight in (source_weights or {}).items():
            if name not in names:
                raise QddError(
                    f"source_weights names {name!r}, not a train source: use one of "
                    f"{', '.join(names)}"
                )
            self.sources[names.index(name)].weight = float(weight)
        for source in self.sources:
            if source.weight < 0:
                raise QddError(f"train source {source.label} has weight {source.weight}: use ≥ 0")
        self.split: dict[str, list[Indexed]] = {}
        self.source_of: list[str] = []
        self.probabilities = torch.zeros(0)
        self.groups: dict[str, int] = {}
        for paths in ([s.path for s in self.sources], self.val_paths, self.test_paths):
            for folder in resolve_folders(paths) if paths else []:
                read_manifest(folder)  # fail before the trainer starts, not after

    # -- what each split holds ---------------------------------------------------------------
    @property
    def folders(self) -> list[Path]:
        """The test folders (recorded in a test run's metrics.json)."""
        return resolve_folders(self.test_paths) if self.test_paths else []

    def _take(self, paths: list[str], split: str, holdout: bool) -> list[Indexed]:
        if not paths:
            return []
        return [
            s
            for s in index_samples(resolve_folders(paths))
            if split_of(s.unit, self.val_fraction, self.test_fraction) == split
            and not (holdout and s.generator in self.holdout)
        ]

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate") and self.perturbations:
            raise QddError(
                "--perturb applies to test and predict only: drop it here (training "
                "augmentation is the detector's own)"
            )
        if stage == "fit":
            self._setup_train()
            self.split["val"] = self._take(self.val_paths, "val", holdout=True)
            if not self.split["val"]:
                raise QddError(
                    f"the validation split of {', '.join(self.val_paths)} is empty "
                    f"(val_fraction={self.val_fraction}): add samples or raise it"
                )
        elif stage == "validate":
            self.split["val"] = self._take(self.val_paths, "val", holdout=True)
        else:
            if not self.test_paths:
                raise QddError(
                    "no test sources: list them under data.test in the config, or pass "
                    "--data.test=GLOB"
                )
            self.split["test"] = self._take(self.test_paths, "test", holdout=False)
            if not self.split["test"]:
                raise QddError(
                    f"the test split of {', '.join(self.test_paths)} is empty "
                    f"(test_fraction={self.test_fraction}): add samples or raise it"
                )
            self.groups = dict(sorted(Counter(s.group for s in self.split["test"]).items()))

    def _setup_train(self) -> None:
        if not self.sources:
            raise QddError("no training sources: list them under data.train as {path, weight}")
        samples: list[Indexed] = []
        owner: dict[str, str] = {}
        for source in self.sources:
            taken = self._take([source.path], "train", holdout=True)
            if not taken and source.weight > 0:
                raise QddError(
                    f"train source {source.label} ({source.path}) has no training samples "
                    "after the split and held-out generators: check its path and holdout"
                )
            for sample in taken:
                if sample.entry.shard in owner and owner[sample.entry.shard] != source.label:
                    raise QddError(
                        f"{Path(sample.entry.shard).parent} is in train sources "
                        f"{owner[sample.entry.shard]} and {source.label}: list each folder once"
                    )
                owner[sample.entry.shard] = source.label
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

    def describe(self) -> dict[str, Any]:
        """What training drew from, for metrics.json: the sampler, shares, split sizes."""
        shares: dict[str, float] = {}
        for name, p in zip(self.source_of, self.probabilities.tolist(), strict=True):
            shares[name] = shares.get(name, 0.0) + p
        labels = [s.label for s in self.split.get("train", [])]
        fake_share = sum(
            p for p, lab in zip(self.probabilities.tolist(), labels, strict=True) if lab
        )
        sampler = "weighted random sampler, with replacement"
        return {
            "sampler": sampler
            + (", class-balanced (real 1/2, fake 1/2)" if self.class_balance else ""),
            "class_balance": self.class_balance,
            "split": "by hash of prompt_id (real photographs: key)",
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "holdout_generators": sorted(self.holdout),
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
            "fake_share": round(fake_share, 6),
            "n_train": len(self.split.get("train", [])),
            "n_val": len(self.split.get("val", [])),
            "samples_per_epoch": self.samples_per_epoch or len(self.split.get("train", [])),
            "val": self.val_paths,
            "test": self.test_paths,
        }

    # -- loaders ----------------------------------------------------------------------------
    def _transform(self, kind: str) -> Transform | None:
        own = self.train_transform if kind == "train" else self.eval_transform
        return own if own is not None else detector_transform(self.trainer, kind)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        dataset = DrawDataset([s.entry for s in self.split["train"]], self._transform("train"))
        sampler = WeightedDrawSampler(
            dataset,
            self.probabilities,
            self.samples_per_epoch or len(self.split["train"]),
            self.batch_size,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
            seed=self.seed,
        )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=Collate(dataset.perturbation_names),
            **loader_options(trainer, self.num_workers, persistent=True),
        )

    def _eval_loader(self, split: str, persistent: bool = False) -> DataLoader:
        perturbations = self.perturbations if split == "test" else []
        entries = [s.entry for s in self.split[split]]
        dataset = ShardDataset(entries, self._transform("eval"), perturbations)
        return evaluation_loader(
            dataset, self.batch_size, self.trainer, self.num_workers, persistent=persistent
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val", persistent=True)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
