"""The Lightning loop of ``qdd-cli fingerprint``: per group, sums of residual spectra.

Images come through `qdd.datamodules.ShardDataModule` as a test run reads them (map-style
dataset, ``UnrepeatedDistributedSampler`` under DDP: each sample once, for any worker count
and batch size), centre-cropped by `CentreCrop` in the loader. Per group the module keeps
sums only — per jackknife fold its images and summed power spectra, and the summed
residuals — so ranks combine by addition (``all_reduce``) and the result does not depend on how
samples were split; and its samples' keys (gathered to rank 0), to count the images whose twin
is missing. Rank 0 ends with the totals in `totals`.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning import LightningModule
from PIL import Image
from torch import Tensor
from torchvision.transforms.functional import pil_to_tensor

from qdd.fingerprint.spectra import folds_of, group_key, power_spectrum, residuals

#: What is summed per group: per fold the spectra and the images, and the residuals.
SUMS = ("fold_power", "fold_n", "residual")


class CentreCrop:
    """PIL image → uint8 ``3×size×size`` tensor of its centre; never resamples."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Image.Image) -> Tensor:
        width, height = image.size
        if min(width, height) < self.size:
            raise ValueError(f"image {width}×{height} is smaller than the crop {self.size}")
        left, top = (width - self.size) // 2, (height - self.size) // 2
        return pil_to_tensor(image.crop((left, top, left + self.size, top + self.size)))


class FingerprintModule(LightningModule):
    """Sums per group of the images' residuals, and per jackknife fold (`folds_of`) of
    their power spectra and their count (float64: a ``folds×size×size`` array per group).

    Args:
        folds: jackknife folds.
        seed: the seed of the fold of each key.
    """

    def __init__(self, folds: int = 20, seed: int = 0) -> None:
        super().__init__()
        self.folds, self.seed = folds, seed
        self.totals: dict[str, Any] | None = None

    def on_test_epoch_start(self) -> None:
        self._sums: dict[tuple[str, str, str], dict[str, Tensor]] = {}
        self._skipped: list[dict[str, str]] = []
        self._keys: dict[tuple[str, str, str], list[str]] = {}  # a twin group's keys: pairing

    def _group(self, key: tuple[str, str, str], size: int) -> dict[str, Tensor]:
        if key not in self._sums:
            f64 = {"dtype": torch.float64, "device": self.device}
            self._sums[key] = {
                "fold_power": torch.zeros(self.folds, size, size, **f64),
                "fold_n": torch.zeros(self.folds, **f64),
                "residual": torch.zeros(size, size, **f64),
            }
        return self._sums[key]

    def test_step(self, batch: Any, batch_idx: int) -> None:
        images, _, meta = batch
        self._skipped.extend(meta["skipped"])
        if not len(images):
            return
        residual = residuals(images)
        power = power_spectrum(residual)
        # a generated image is paired with its twins by `qdd.identity.twin_id` (the batch's
        # "twin"), never by its shard key alone; a real photo has no twin: its key
        pairs = [twin or f"key:{key}" for twin, key in zip(meta["twin"], meta["key"], strict=True)]
        folds = torch.from_numpy(folds_of(pairs, self.folds, self.seed)).to(self.device)
        fields = ("label", "source", "generator", "precision", "quant_backend", "perturbation")
        keys = [group_key(*row) for row in zip(*(meta[f] for f in fields), strict=True)]
        for key in sorted(set(keys)):
            mine = [i for i, k in enumerate(keys) if k == key]
            self._keys.setdefault(key, []).extend(pairs[i] for i in mine)
            rows = torch.tensor(mine, device=self.device)
            sums = self._group(key, images.shape[-1])
            sums["fold_power"].index_add_(0, folds[rows], power[rows])
            sums["fold_n"] += torch.bincount(folds[rows], minlength=self.folds)
            sums["residual"] += residual[rows].sum(0)

    def on_test_epoch_end(self) -> None:
        import torch.distributed as dist

        from qdd.callbacks.scores import gather_to_rank_zero

        world = self.trainer.world_size
        keys = sorted(self._sums)
        if world > 1 and dist.is_available() and dist.is_initialized():
            every: list[Any] = [None] * world
            dist.all_gather_object(every, [(k, self._sums[k]["residual"].shape[-1]) for k in keys])
            sizes = dict(pair for part in every for pair in part)
            keys = sorted(sizes)
            for key in keys:  # the same order on every rank
                sums = self._group(key, sizes[key])
                for name in SUMS:
                    dist.all_reduce(sums[name])
        parts = gather_to_rank_zero((self._skipped, self._keys), world)
        if parts is None:
            return
        sample_keys: dict[tuple[str, str, str], set[str]] = {key: set() for key in keys}
        for _, part in parts:
            for key, names in part.items():
                sample_keys[key].update(names)
        self.totals = {
            "groups": {
                key: {name: value.double().cpu().numpy() for name, value in self._sums[key].items()}
                for key in keys
            },
            "keys": sample_keys,
            "skipped": sorted((s for part, _ in parts for s in part), key=lambda s: s["key"]),
        }
