"""Weighted training sources: ``data.train`` as ``{path, weight, name}``, and each training
sample's draw probability (the sampler itself is `qdd.datamodules.sampling`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qdd.datamodules.split import Indexed
from qdd.errors import QddError


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


def weigh_sources(sources: list[Source], source_weights: dict[str, float]) -> None:
    """Apply ``source_weights`` (by source name) to ``sources``; names must be distinct."""
    names = [s.label for s in sources]
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
        sources[names.index(name)].weight = float(weight)
    for source in sources:
        if source.weight < 0:
            raise QddError(f"train source {source.label} has weight {source.weight}: use ≥ 0")


def source_samples(
    sources: Sequence[Source], train_split: Callable[[Source], list[Indexed]]
) -> tuple[list[Indexed], list[str]]:
    """Every source's training samples (``train_split(source)``) and, aligned, the name of
    the source each came from; a folder listed by two sources is refused."""
    samples: list[Indexed] = []
    source_of: list[str] = []
    owner: dict[str, str] = {}
    for source in sources:
        taken = train_split(source)
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
        source_of += [source.label] * len(taken)
    return samples, source_of


def draw_probabilities(
    sources: Sequence[Source],
    samples: Sequence[Indexed],
    source_of: Sequence[str],
    class_balance: bool,
) -> torch.Tensor:
    """Each training sample's draw probability (sources' weights, class balance)."""
    weights = {s.label: s.weight for s in sources}
    counts = Counter(source_of)
    q = torch.tensor([weights[n] / counts[n] for n in source_of], dtype=torch.float64)
    labels = torch.tensor([s.label for s in samples])
    if not class_balance:
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


def draw_summary(
    sources: Sequence[Source],
    samples: Sequence[Indexed],
    source_of: Sequence[str],
    probabilities: torch.Tensor,
    class_balance: bool,
) -> dict[str, Any]:
    """How training samples are drawn, for metrics.json: the sampler, each source's share of
    the draws, the share of fakes (no ``sources``: every sample once per epoch)."""
    if not sources:
        fake_share = sum(s.label == 1 for s in samples) / len(samples) if samples else 0.0
        return {
            "sampler": "each training sample once per epoch, shuffled",
            "class_balance": False,
            "sources": [],
            "fake_share": round(fake_share, 6),
        }
    shares: dict[str, float] = {}
    for name, p in zip(source_of, probabilities.tolist(), strict=True):
        shares[name] = shares.get(name, 0.0) + p
    fake_share = sum(p for p, s in zip(probabilities.tolist(), samples, strict=True) if s.label)
    balance = ", class-balanced (real 1/2, fake 1/2)" if class_balance else ""
    return {
        "sampler": f"weighted random sampler, with replacement{balance}",
        "class_balance": class_balance,
        "sources": [
            {
                "name": s.label,
                "path": s.path,
                "weight": s.weight,
                "n_train": list(source_of).count(s.label),
                "share": round(shares.get(s.label, 0.0), 6),
            }
            for s in sources
        ],
        "fake_share": round(fake_share, 6),
    }
