"""Lightning pieces of ``qdd-cli quality``: image pairs as a dataset, and the test loop that
measures each image against its twin at the reference precision.

Exactly-once works as in ``qdd-cli test``: a map-style dataset of pairs, cut into batches
by an ``UnrepeatedDistributedSampler`` under DDP (rank ``r`` gets pairs ``r::world``, no
padding), and the per-pair rows gathered to rank 0 through the process group. The module
writes no files: rank 0 keeps the gathered rows in ``gathered`` for `qdd.quality`.

Per pair: PSNR and SSIM (torchmetrics, 8-bit values, data range 255, SSIM with an 11×11
Gaussian window of σ 1.5), LPIPS when a network is given, and, when a CLIP model is given,
the feature vectors of both images (FID/KID are computed per group from them on rank 0, so
every rank's images count once) and both images' CLIP scores against their prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning import LightningDataModule, LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import pil_to_tensor

from qdd.datamodules.reader import Entry, read_sample
from qdd.errors import QddError

#: The metadata of a pair that travels with it into quality.parquet.
PAIR_FIELDS = ("generator", "precision", "prompt_id", "seed", "key")
#: SSIM's window (the usual one of Wang et al. 2004 and scikit-image's Gaussian weights).
SSIM_KERNEL, SSIM_SIGMA = 11, 1.5
#: Images are compared as 8-bit values.
DATA_RANGE = 255.0


@dataclass(frozen=True)
class Pair:
    """An image and its twin at the reference precision (same generator, prompt, seed)."""

    generator: str
    precision: str
    prompt_id: int | None
    seed: int | None
    key: str
    image: Entry
    reference: Entry
    prompt: str | None = None

    def meta(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in (*PAIR_FIELDS, "prompt")}


class PairDataset(Dataset):
    """Item ``i``: the ``i``-th pair decoded to two uint8 CHW tensors, or why it could not be.

    A pair whose image or twin does not decode, or whose sizes differ, is returned as
    ``(None, None, meta)`` with ``meta["error"]`` set: counted and named, never dropped.
    """

    def __init__(self, pairs: Sequence[Pair]) -> None:
        self.pairs = list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor | None, Tensor | None, dict[str, Any]]:
        pair = self.pairs[index]
        meta = pair.meta()
        try:
            image, _ = read_sample(pair.image)
            reference, _ = read_sample(pair.reference)
        except ValueError as error:
            return None, None, {**meta, "error": f"cannot read the pair: {error}"}
        if image.size != reference.size:
            return None, None, {**meta, "error": f"size {image.size} vs twin {reference.size}"}
        return pil_to_tensor(image), pil_to_tensor(reference), meta


def collate_pairs(items: list) -> tuple[list[Tensor], list[Tensor], list[dict[str, Any]]]:
    """Lists, not stacked tensors: one batch may hold images of several sizes."""
    images, references, metas = [], [], []
    for image, reference, meta in items:
        images.append(image)
        references.append(reference)
        metas.append(meta)
    return images, references, metas


class PairDataModule(LightningDataModule):
    """The pairs of a quality run as a test loader that sees every pair once per run."""

    def __init__(self, pairs: Sequence[Pair], batch_size: int = 8, num_workers: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise QddError(f"--batch-size must be at least 1, got {batch_size}")
        self.dataset = PairDataset(pairs)
        self.batch_size = batch_size
        self.num_workers = num_workers

    def test_dataloader(self) -> DataLoader:
        from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

        from qdd.datamodules.shard import loader_options

        trainer = self.trainer
        world = trainer.world_size if trainer else 1
        sampler = None
        if world > 1:
            if len(self.dataset) < world:
                raise QddError(
                    f"{len(self.dataset)} pairs for {world} processes: every process needs "
                    "at least one; use fewer devices"
                )
            sampler = UnrepeatedDistributedSampler(
                self.dataset, num_replicas=world, rank=trainer.global_rank, shuffle=False
            )
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=collate_pairs,
            **loader_options(trainer, self.num_workers, persistent=False),
        )


def psnr_ssim(images: Tensor, references: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image PSNR (dB) and SSIM of uint8 NCHW batches, as 8-bit values (range 255).

    SSIM is torchmetrics' SSIM map averaged over the windows that lie inside the image, as
    Wang et al.'s reference code and scikit-image do; torchmetrics' own mean also counts
    the border windows it reflect-pads, which lowers small images' SSIM.
    """
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    x, y = images.double(), references.double()
    psnr = peak_signal_noise_ratio(x, y, data_range=DATA_RANGE, reduction="none", dim=(1, 2, 3))
    _, ssim_map = structural_similarity_index_measure(
        x,
        y,
        data_range=DATA_RANGE,
        kernel_size=SSIM_KERNEL,
        sigma=SSIM_SIGMA,
        gaussian_kernel=True,
        reduction="none",
        return_full_image=True,
    )
    pad = (SSIM_KERNEL - 1) // 2
    return psnr, ssim_map[..., pad:-pad, pad:-pad].mean(dim=(1, 2, 3))


class ClipFeatures(nn.Module):
    """A CLIP model (open_clip) as the feature network: projected image embeddings of uint8
    NCHW images for FID/KID, and text embeddings of prompts for the CLIP score.

    Images are resized (bicubic, shorter side) and centre-cropped to the tower's input size,
    then normalised with CLIP's mean and standard deviation, as the CLIP detectors do.
    """

    MEAN = (0.48145466, 0.4578275, 0.40821073)
    STD = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, clip: nn.Module, tokenizer: Any, size: int) -> None:
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.size = size
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        from torchvision.transforms.v2.functional import center_crop, resize

        x = images.float() / 255.0
        x = resize(x, [self.size], interpolation=3, antialias=True)  # 3: bicubic
        x = center_crop(x, [self.size, self.size]).clamp(0, 1)
        return self.clip.encode_image((x - self.mean) / self.std).float()

    def encode_text(self, prompts: list[str]) -> Tensor:
        tokens = self.tokenizer(prompts).to(self.mean.device)
        return self.clip.encode_text(tokens).float()


def clip_score(image_features: Tensor, text_features: Tensor) -> Tensor:
    """CLIP score as torchmetrics defines it: 100 · max(cos(image, text), 0), per row."""
    cosine = torch.nn.functional.cosine_similarity(image_features, text_features, dim=-1)
    return 100 * cosine.clamp(min=0)


class QualityModule(LightningModule):
    """Scores every pair in ``test``; rank 0 ends with all ranks' rows in ``gathered``.

    Args:
        lpips: an LPIPS network (torchmetrics' ``_LPIPS``) with local weights, or None.
        features: `ClipFeatures` for FID/KID and the CLIP score, or None.
    """

    def __init__(self, lpips: nn.Module | None = None, features: nn.Module | None = None):
        super().__init__()
        self.lpips = lpips
        self.features = features
        self.gathered: dict[str, Any] | None = None

    def on_test_epoch_start(self) -> None:
        self._rows: list[dict[str, Any]] = []
        self._skipped: list[dict[str, Any]] = []
        self._features: list[tuple[Tensor, Tensor]] = []

    def test_step(self, batch: Any, batch_idx: int) -> None:
        images, references, metas = batch
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, (image, meta) in enumerate(zip(images, metas, strict=True)):
            if image is None:
                self._skipped.append(meta)
            else:
                by_size.setdefault(tuple(image.shape), []).append(i)
        for indices in by_size.values():
            x = torch.stack([images[i] for i in indices]).to(self.device)
            y = torch.stack([references[i] for i in indices]).to(self.device)
            psnr, ssim = psnr_ssim(x, y)
            rows = [
                {**metas[i], "psnr": float(p), "ssim": float(s)}
                for i, p, s in zip(indices, psnr.tolist(), ssim.tolist(), strict=True)
            ]
            if self.lpips is not None:
                distance = self.lpips(x.float() / 255, y.float() / 255, normalize=True)
                for row, value in zip(rows, distance.flatten().tolist(), strict=True):
                    row["lpips"] = float(value)
            if self.features is not None:
                fx, fy = self.features(x), self.features(y)
                for row, a, b in zip(rows, fx.cpu(), fy.cpu(), strict=True):
                    row["_features"] = (a.numpy(), b.numpy())
                self._clip_scores(rows, fx, fy)
            self._rows.extend(rows)

    def _clip_scores(self, rows: list[dict[str, Any]], fx: Tensor, fy: Tensor) -> None:
        """The CLIP score of the image and of its twin against their prompt (NaN without
        a recorded prompt)."""
        have = [i for i, row in enumerate(rows) if row.get("prompt")]
        for row in rows:
            row["clip_score"] = row["clip_score_reference"] = float("nan")
        if not have:
            return
        text = self.features.encode_text([rows[i]["prompt"] for i in have])
        image, twin = clip_score(fx[have], text), clip_score(fy[have], text)
        for i, a, b in zip(have, image.tolist(), twin.tolist(), strict=True):
            rows[i]["clip_score"], rows[i]["clip_score_reference"] = a, b

    def on_test_epoch_end(self) -> None:
        from qdd.callbacks.scores import gather_to_rank_zero

        local = {"rows": self._rows, "skipped": self._skipped}
        parts = gather_to_rank_zero(local, self.trainer.world_size)
        if parts is None:
            return
        self.gathered = {
            "rows": [row for part in parts for row in part["rows"]],
            "skipped": [s for part in parts for s in part["skipped"]],
        }
