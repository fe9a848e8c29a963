"""Group metrics recomputed from per-image scores, each with its count and a 95 % interval.

The report never copies numbers from a run's metrics.json: merged runs pool their scores,
and every value is computed here from the pooled logits, with the same definitions as
`qdd.metrics` (accuracies at ``logit > threshold``, ranking metrics over fakes vs the pooled
real images). Plain numpy, so a report needs no torch.

Intervals: Wilson score intervals for the accuracies (a proportion of n images); for
balanced accuracy and AUROC a percentile bootstrap that resamples real and fake images
separately (`BOOTSTRAP` resamples, seed `SEED`), so the same scores always give the same
interval.
"""

from __future__ import annotations

import math

import numpy as np

#: The metrics of `qdd.metrics.METRICS`, in its order (named here so that a report does not
#: import torchmetrics, ~10 s; a test keeps the two equal).
METRICS: tuple[str, ...] = ("acc", "real_acc", "fake_acc", "balanced_acc", "auroc", "ap",
                            "tpr_at_fpr1", "tpr_at_fpr5")  # fmt: skip
#: Bootstrap resamples and seed of every interval that is not a Wilson interval.
BOOTSTRAP = 1000
SEED = 0
#: Two-sided 95 %: the normal quantile of 0.975.
Z95 = 1.959963984540054
#: Resamples per vectorised block (bounds memory for large groups).
BLOCK = 100
#: Most nonzero paired shifts whose signed-rank p is computed exactly (scipy's own bound).
EXACT_PAIRS = 50


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion; (nan, nan) for n = 0."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def auroc(real: np.ndarray, fake: np.ndarray) -> float:
    """P(fake logit > real logit) + ½ P(tie): the Mann–Whitney form of the ROC area."""
    real, fake = np.sort(real), np.asarray(fake)
    below = np.searchsorted(real, fake, side="left")
    ties = np.searchsorted(real, fake, side="right") - below
    return float((below + 0.5 * ties).sum() / (len(real) * len(fake)))


def roc_points(real: np.ndarray, fake: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct threshold, from "nothing is fake" to "all is fake"."""
    values = np.unique(np.concatenate([real, fake]))[::-1]
    real_sorted, fake_sorted = np.sort(real), np.sort(fake)
    fp = len(real) - np.searchsorted(real_sorted, values, side="left")
    tp = len(fake) - np.searchsorted(fake_sorted, values, side="left")
    fpr = np.concatenate([[0.0], fp / len(real)])
    tpr = np.concatenate([[0.0], tp / len(fake)])
    return fpr, tpr


def average_precision(real: np.ndarray, fake: np.ndarray) -> float:
    """Step-wise area under precision–recall: Σ (recall_k − recall_k−1) · precision_k."""
    fpr, tpr = roc_points(real, fake)
    tp, fp = tpr[1:] * len(fake), fpr[1:] * len(real)
    precision = tp / np.maximum(tp + fp, 1)
    return float(np.sum(np.diff(tpr) * precision))


def tpr_at_fpr(real: np.ndarray, fake: np.ndarray, max_fpr: float) -> float:
    """Highest true-positive rate whose false-positive rate is at most ``max_fpr``."""
    fpr, tpr = roc_points(real, fake)
    return float(tpr[fpr <= max_fpr + 1e-12].max())


def _resampled_counts(
    rng: np.random.Generator, codes: np.ndarray, n_codes: int, size: int
) -> np.ndarray:
    """``size`` bootstrap resamples of ``codes`` as counts per code (size × n_codes)."""
    picks = codes[rng.integers(0, len(codes), size=(size, len(codes)))]
    flat = picks + n_codes * np.arange(size)[:, None]
    return np.bincount(flat.ravel(), minlength=size * n_codes).reshape(size, n_codes)


def bootstrap(
    real: np.ndarray, fake: np.ndarray, threshold: float, resamples: int = BOOTSTRAP
) -> dict[str, tuple[float, float]]:
    """95 % percentile intervals of AUROC and balanced accuracy, real and fake resampled apart.

    Each resample is held as counts per distinct logit, so AUROC of a resample is one
    cumulative sum: exact with ties, and vectorised over blocks of resamples.
    """
    values, codes = np.unique(np.concatenate([real, fake]), return_inverse=True)
    real_codes, fake_codes = codes[: len(real)], codes[len(real) :]
    above = values > threshold
    rng = np.random.default_rng(SEED)
    aurocs, balanced = [], []
    for start in range(0, resamples, BLOCK):
        size = min(BLOCK, resamples - start)
        r = _resampled_counts(rng, real_codes, len(values), size)
        f = _resampled_counts(rng, fake_codes, len(values), size)
        below = np.cumsum(r, axis=1) - r
        aurocs.append((f * (below + 0.5 * r)).sum(axis=1) / (len(real) * len(fake)))
        real_acc = r[:, ~above].sum(axis=1) / len(real)
        fake_acc = f[:, above].sum(axis=1) / len(fake)
        balanced.append((real_acc + fake_acc) / 2)
    return {
        name: tuple(float(q) for q in np.percentile(np.concatenate(draws), [2.5, 97.5]))
        for name, draws in (("auroc", aurocs), ("balanced_acc", balanced))
    }


def group_metrics(
    real: np.ndarray, fake: np.ndarray, threshold: float, resamples: int = BOOTSTRAP
) -> dict[str, float | int]:
    """Every metric of one fake set against the real images, with n and 95 % intervals.

    Keys: ``n_fake``, ``n_real``, the metrics of `qdd.metrics.METRICS`, and ``<metric>_lo`` /
    ``<metric>_hi`` for accuracies (Wilson), balanced accuracy and AUROC (bootstrap).
    NaN where a class is missing.
    """
    real = np.asarray(real, dtype=float)
    fake = np.asarray(fake, dtype=float)
    n_real, n_fake = len(real), len(fake)
    real_right, fake_right = int((real <= threshold).sum()), int((fake > threshold).sum())
    nan = math.nan
    out: dict[str, float | int] = {"n_fake": n_fake, "n_real": n_real}
    for name, right, n in (
        ("acc", real_right + fake_right, n_real + n_fake),
        ("real_acc", real_right, n_real),
        ("fake_acc", fake_right, n_fake),
    ):
        out[name] = right / n if n else nan
        out[f"{name}_lo"], out[f"{name}_hi"] = wilson(right, n)
    out["balanced_acc"] = (out["real_acc"] + out["fake_acc"]) / 2
    both = n_real > 0 and n_fake > 0
    out["auroc"] = auroc(real, fake) if both else nan
    out["ap"] = average_precision(real, fake) if both else nan
    out["tpr_at_fpr1"] = tpr_at_fpr(real, fake, 0.01) if both else nan
    out["tpr_at_fpr5"] = tpr_at_fpr(real, fake, 0.05) if both else nan
    intervals = bootstrap(real, fake, threshold, resamples) if both else {}
    for name in ("balanced_acc", "auroc"):
        out[f"{name}_lo"], out[f"{name}_hi"] = intervals.get(name, (nan, nan))
    return out


def accuracy(real: np.ndarray, fake: np.ndarray, threshold: float) -> float:
    """Accuracy over real and fake images at one threshold (e.g. a calibrated one)."""
    n = len(real) + len(fake)
    right = int((np.asarray(real) <= threshold).sum() + (np.asarray(fake) > threshold).sum())
    return right / n if n else math.nan


def mean_interval(delta: np.ndarray) -> tuple[float, float]:
    """95 % Student-t interval of the mean of paired differences; (nan, nan) below 2 pairs."""
    from scipy.stats import t

    delta = np.asarray(delta, dtype=float)
    if len(delta) < 2:
        return math.nan, math.nan
    mean, sem = float(delta.mean()), float(delta.std(ddof=1) / math.sqrt(len(delta)))
    half = float(t.ppf(0.975, len(delta) - 1)) * sem
    return mean - half, mean + half


def signed_rank_p(delta: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p of "the shift is centred on 0" (zero shifts dropped).

    1.0 when no pair moved; nan without pairs. Exact for up to `EXACT_PAIRS` nonzero shifts
    without ties, the normal approximation (tie-corrected variance, no continuity
    correction) otherwise. The method is passed to scipy explicitly: what ``method="auto"``
    does has changed between the scipy versions qdd allows (1.15 made it a permutation test
    for small samples with ties).
    """
    from scipy import __version__ as scipy_version
    from scipy.stats import wilcoxon

    delta = np.asarray(delta, dtype=float)
    if len(delta) == 0:
        return math.nan
    delta = delta[delta != 0]  # Wilcoxon's own rule; dropped here so "exact" sees no zeros
    if len(delta) == 0:
        return 1.0
    ties = len(np.unique(np.abs(delta))) < len(delta)
    if len(delta) <= EXACT_PAIRS and not ties:
        method = "exact"
    else:  # scipy 1.15 renamed "approx" to "asymptotic"
        major, minor = (int(part) for part in scipy_version.split(".")[:2])
        method = "asymptotic" if (major, minor) >= (1, 15) else "approx"
    return float(wilcoxon(delta, zero_method="wilcox", correction=False, method=method).pvalue)


def mcnemar_p(flipped_one_way: int, flipped_other_way: int) -> float:
    """Exact two-sided McNemar p: are flips in one direction likelier than in the other?

    The discordant pairs of a paired accuracy comparison; 1.0 when no pair flipped.
    """
    from scipy.stats import binomtest

    n = flipped_one_way + flipped_other_way
    return float(binomtest(flipped_one_way, n, 0.5).pvalue) if n else 1.0
