"""The measures of a quality run, named by what they measure.

Per image: PSNR and SSIM on 8-bit values (SSIM: 11×11 Gaussian window, σ 1.5, averaged over
the windows inside the image as Wang et al.'s code and scikit-image do), LPIPS, the CLIP
score against the prompt. Per group, distances between two sets of feature vectors:
``fid``/``kid`` on Inception-V3 pool3 features (the FID of the literature, computed as
torch-fidelity does) and ``fd_clip``/``kd_clip`` on CLIP image embeddings (a Fréchet
distance on other features is named by them, as FD_DINOv2 in Stein et al., NeurIPS 2023;
it is not comparable with any published FID).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

#: SSIM's window (the usual one of Wang et al. 2004 and scikit-image's Gaussian weights).
SSIM_KERNEL, SSIM_SIGMA = 11, 1.5
#: Images are compared as 8-bit values.
DATA_RANGE = 255.0
#: Per-image measures summarised per group (each only when it ran).
PER_IMAGE = ("psnr", "ssim", "lpips", "clip_score", "clip_score_reference")
#: KID subsets, when subsets are drawn (the subset size is the smaller of 1000 and the sets').
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
#: Feature networks and the names of their distances.
FEATURES = {"inception": ("fid", "kid"), "clip": ("fd_clip", "kd_clip")}


def psnr_ssim(images: Tensor, references: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image PSNR (dB) and SSIM of uint8 NCHW batches, as 8-bit values (range 255).

    SSIM is torchmetrics' SSIM map averaged over the windows that lie inside the image, as
    Wang et al.'s reference code and scikit-image do; torchmetrics' own mean (≥ 1.4.2) also
    counts the border windows it reflect-pads, which lowers small images' SSIM.
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


def clip_score(image_features: Tensor, text_features: Tensor) -> Tensor:
    """CLIP score as torchmetrics defines it: 100 · max(cos(image, text), 0), per row."""
    cosine = torch.nn.functional.cosine_similarity(image_features, text_features, dim=-1)
    return 100 * cosine.clamp(min=0)


def distribution_distances(fake: Any, reference: Any, network: str) -> dict[str, float | None]:
    """Fréchet and kernel distances between two sets of ``network``'s feature vectors
    (``fid``/``kid`` for ``inception``, ``fd_clip``/``kd_clip`` for ``clip``), through
    torchmetrics with the vectors as precomputed features; None below 2 images.

    KID draws subsets only when one set is larger than the subset size; ``*_std`` (the
    spread over subsets) is given only then: with every subset the whole set it is 0 by
    construction and says nothing.
    """
    from torch import nn
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    frechet, kernel = FEATURES[network]
    fake, reference = torch.as_tensor(fake).double(), torch.as_tensor(reference).double()
    result: dict[str, float | None] = {frechet: None, kernel: None, f"{kernel}_std": None}
    if len(fake) < 2 or len(reference) < 2:
        return result

    class Precomputed(nn.Identity):
        """The features were computed per image in the (distributed) test loop."""

        num_features = fake.shape[1]

    fid = FrechetInceptionDistance(feature=Precomputed())
    fid.update(reference, real=True)
    fid.update(fake, real=False)
    result[frechet] = float(fid.compute())
    size = min(KID_SUBSET_SIZE, len(fake), len(reference))
    drawn = size < max(len(fake), len(reference))
    kid = KernelInceptionDistance(
        feature=Precomputed(), subsets=KID_SUBSETS if drawn else 1, subset_size=size
    )
    kid.update(reference, real=True)
    kid.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # KID draws its subsets: the same data gives the same value
        kid_mean, kid_std = kid.compute()
    result[kernel] = float(kid_mean)
    result[f"{kernel}_std"] = float(kid_std) if drawn else None
    return result


def interval(values: Any) -> dict[str, Any]:
    """n, mean and 95 % t-interval of finite values (PSNR of identical images is +inf)."""
    import numpy as np

    from qdd.report.stats import mean_interval

    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    mean = float(finite.mean()) if len(finite) else math.nan
    lo, hi = mean_interval(finite)
    return {
        "mean": mean,
        "lo": lo,
        "hi": hi,
        "n": len(finite),
        "n_infinite": int(np.isinf(values).sum()),
    }


def group_summary(
    scores: Any, distances: dict[str, dict[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """Per group (``generator/precision``, the precision as labelled in quality.parquet):
    n, each per-image measure's mean and 95 % interval, and ``distances[group]``."""
    groups = {}
    for (generator, precision), part in scores.groupby(["generator", "precision"], sort=True):
        name = f"{generator}/{precision}"
        entry: dict[str, Any] = {"generator": generator, "precision": precision, "n": len(part)}
        for measure in PER_IMAGE:
            if measure in part.columns:
                s = interval(part[measure])
                entry[measure], entry[f"{measure}_lo"], entry[f"{measure}_hi"] = (
                    s["mean"],
                    s["lo"],
                    s["hi"],
                )
                if s["n_infinite"]:
                    entry[f"{measure}_n_infinite"] = s["n_infinite"]
        entry.update((distances or {}).get(name, {}))
        groups[name] = entry
    return groups
