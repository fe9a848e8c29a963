"""Lightning pieces of ``qdd-cli quality``: image pairs as a dataset, and the test loop that
measures each image against its twin at the reference precision.

Exactly-once works as in ``qdd-cli test``: a map-style dataset of pairs through the
evaluation loader (`qdd.datamodules.shard.evaluation_loader`: rank ``r`` gets pairs
``r::world``, no padding), and the per-pair rows gathered to rank 0 through the process
group. The module writes no files: rank 0 keeps the gathered rows in ``gathered``.

Per pair: PSNR and SSIM, LPIPS when a network is given, and the feature vectors of both
images for each feature network given (Inception pool3 for FID/KID, CLIP for
fd_clip/kd_clip; the distances are computed per group on rank 0, so every rank's images
count once) with both images' CLIP scores against their prompt. A real photo (``--real``)
has no twin: only its Inception features are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning import LightningDataModule, LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import pil_to_tensor

from qdd.datamodules.reader import read_sample
from qdd.errors import QddError
from qdd.quality.metrics import clip_score, psnr_ssim
from qdd.quality.pairing import Pair


class PairDataset(Dataset):
    """Item ``i``: the ``i``-th pair decoded to two uint8 CHW tensors (the twin None for a
    real photo), or why it could not be.

    A pair whose image or twin does not decode, or whose sizes differ, is returned as
    ``(None, None, meta)`` with ``meta["error"]`` set: counted and named, never dropped.
    """

    def __init__(self, pairs: Sequence[Pair]) -> None:
        self.pairs = list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor | None, Tensor | None, dict[str, Any]]:
        pair = self.pairs[index]
        meta = {**pair.meta(), "real": pair.reference is None}
        try:
            image, _ = read_sample(pair.image)
            reference = read_sample(pair.reference)[0] if pair.reference is not None else None
        except ValueError as error:
            return None, None, {**meta, "error": f"cannot read the pair: {error}"}
        if reference is None:
            return pil_to_tensor(image), None, meta
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
    """The pairs (and real photos) of a quality run as a test loader that sees each once."""

    def __init__(self, pairs: Sequence[Pair], batch_size: int = 8, num_workers: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise QddError(f"--batch-size must be at least 1, got {batch_size}")
        self.dataset = PairDataset(pairs)
        self.batch_size = batch_size
        self.num_workers = num_workers

    def test_dataloader(self) -> DataLoader:
        from qdd.datamodules.loaders import evaluation_loader

        return evaluation_loader(
            self.dataset,
            self.batch_size,
            self.trainer,
            self.num_workers,
            collate_fn=collate_pairs,
        )


class QualityModule(LightningModule):
    """Scores every pair in ``test``; rank 0 ends with all ranks' rows in ``gathered``.

    Args:
        lpips: an LPIPS network (torchmetrics' ``_LPIPS``) with local weights, or None.
        clip: `qdd.quality.networks.ClipFeatures` (fd_clip/kd_clip, CLIP score), or None.
        inception: `qdd.quality.networks.InceptionPool3` (FID/KID), or None.
    """

    def __init__(
        self,
        lpips: nn.Module | None = None,
        clip: nn.Module | None = None,
        inception: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.lpips = lpips
        self.clip = clip
        self.inception = inception
        self.gathered: dict[str, Any] | None = None

    def on_test_epoch_start(self) -> None:
        self._rows: list[dict[str, Any]] = []
        self._skipped: list[dict[str, Any]] = []
        self._real: list[dict[str, Any]] = []

    def test_step(self, batch: Any, batch_idx: int) -> None:
        images, references, metas = batch
        by_size: dict[tuple[tuple[int, ...], bool], list[int]] = {}
        for i, (image, meta) in enumerate(zip(images, metas, strict=True)):
            if image is None:
                self._skipped.append(meta)
            else:
                by_size.setdefault((tuple(image.shape), meta["real"]), []).append(i)
        for (_, real), indices in by_size.items():
            x = torch.stack([images[i] for i in indices]).to(self.device)
            if real:
                self._real_features(x, [metas[i] for i in indices])
                continue
            y = torch.stack([references[i] for i in indices]).to(self.device)
            self._rows.extend(self._measure(x, y, [metas[i] for i in indices]))

    def _real_features(self, x: Tensor, metas: list[dict[str, Any]]) -> None:
        if self.inception is None:
            return
        for meta, vector in zip(metas, self.inception(x).cpu(), strict=True):
            self._real.append(
                {
                    "key": meta["key"],
                    "group": f"{meta['generator']}/{meta['precision']}",
                    "_inception": vector.numpy(),
                }
            )

    def _measure(self, x: Tensor, y: Tensor, metas: list[dict[str, Any]]) -> list[dict[str, Any]]:
        psnr, ssim = psnr_ssim(x, y)
        rows = [
            {**{k: v for k, v in meta.items() if k != "real"}, "psnr": float(p), "ssim": float(s)}
            for meta, p, s in zip(metas, psnr.tolist(), ssim.tolist(), strict=True)
        ]
        if self.lpips is not None:
            distance = self.lpips(x.float() / 255, y.float() / 255, normalize=True)
            for row, value in zip(rows, distance.flatten().tolist(), strict=True):
                row["lpips"] = float(value)
        if self.inception is not None:
            fx, fy = self.inception(x).cpu(), self.inception(y).cpu()
            for row, a, b in zip(rows, fx, fy, strict=True):
                row["_inception"] = (a.numpy(), b.numpy())
        if self.clip is not None:
            fx, fy = self.clip(x), self.clip(y)
            for row, a, b in zip(rows, fx.cpu(), fy.cpu(), strict=True):
                row["_clip"] = (a.numpy(), b.numpy())
            self._clip_scores(rows, fx, fy)
        return rows

    def _clip_scores(self, rows: list[dict[str, Any]], fx: Tensor, fy: Tensor) -> None:
        """The CLIP score of the image and of its twin against their prompt (NaN without
        a recorded prompt)."""
        have = [i for i, row in enumerate(rows) if row.get("prompt")]
        for row in rows:
            row["clip_score"] = row["clip_score_reference"] = float("nan")
        if not have:
            return
        text = self.clip.encode_text([rows[i]["prompt"] for i in have])
        image, twin = clip_score(fx[have], text), clip_score(fy[have], text)
        for i, a, b in zip(have, image.tolist(), twin.tolist(), strict=True):
            rows[i]["clip_score"], rows[i]["clip_score_reference"] = a, b

    def on_test_epoch_end(self) -> None:
        from qdd.callbacks.scores import gather_to_rank_zero

        local = {"rows": self._rows, "skipped": self._skipped, "real": self._real}
        parts = gather_to_rank_zero(local, self.trainer.world_size)
        if parts is None:
            return
        self.gathered = {name: [item for part in parts for item in part[name]] for name in local}
