"""Grouped detection metrics against scikit-learn on the same scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    roc_auc_score,
    roc_curve,
)

from qdd.metrics import GroupedDetectionMetrics, detection_metrics


def sklearn_tpr_at(labels: np.ndarray, logits: np.ndarray, max_fpr: float) -> float:
    fpr, tpr, _ = roc_curve(labels, logits)
    return float(tpr[fpr <= max_fpr].max())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 400)
    # scores partly inside [0, 1] (the torchmetrics "probability" trap) and some ties
    logits = np.round(rng.normal(labels * 0.8, 1.0), 1).astype(np.float32)
    logits[:20] = rng.uniform(0, 1, 20)
    result = detection_metrics(torch.from_numpy(logits), torch.from_numpy(labels))
    predicted = (logits > 0).astype(int)
    assert result["auroc"] == pytest.approx(roc_auc_score(labels, logits), abs=1e-6)
    assert result["ap"] == pytest.approx(average_precision_score(labels, logits), abs=1e-6)
    assert result["balanced_acc"] == pytest.approx(balanced_accuracy_score(labels, predicted))
    assert result["acc"] == pytest.approx((predicted == labels).mean())
    assert result["real_acc"] == pytest.approx((predicted[labels == 0] == 0).mean())
    assert result["fake_acc"] == pytest.approx((predicted[labels == 1] == 1).mean())
    for fpr, name in [(0.01, "tpr_at_fpr1"), (0.05, "tpr_at_fpr5")]:
        assert result[name] == pytest.approx(sklearn_tpr_at(labels, logits, fpr), abs=1e-6)


def test_large_logits_do_not_saturate() -> None:
    """sigmoid(40) == sigmoid(50) in float; ranking by logit must still separate them."""
    logits = torch.tensor([40.0, 45.0, 50.0, 55.0])
    labels = torch.tensor([0, 0, 1, 1])
    assert detection_metrics(logits, labels)["auroc"] == 1.0


def test_groups_are_scored_against_pooled_reals() -> None:
    groups = ["sd3/fp32", "sd3/fp4"]
    metric = GroupedDetectionMetrics(groups)
    rng = np.random.default_rng(0)
    real = rng.normal(-1, 1, 50)
    fp32 = rng.normal(2, 1, 30)
    fp4 = rng.normal(-0.5, 1, 30)
    logits = np.concatenate([real, fp32, fp4]).astype(np.float32)
    labels = np.array([0] * 50 + [1] * 60)
    ids = np.array([-1] * 50 + [0] * 30 + [1] * 30)
    for chunk in np.array_split(np.arange(110), 4):  # several batches
        metric.update(*(torch.from_numpy(a[chunk]) for a in (logits, labels, ids)))
    result = metric.compute()
    assert result["n"] == 110 and set(result["groups"]) == set(groups)
    for index, name in enumerate(groups):
        chosen = (ids == index) | (labels == 0)
        group = result["groups"][name]
        assert group["n_fake"] == 30 and group["n_real"] == 50
        assert group["auroc"] == pytest.approx(roc_auc_score(labels[chosen], logits[chosen]))
    assert result["groups"]["sd3/fp4"]["fake_acc"] < result["groups"]["sd3/fp32"]["fake_acc"]
    assert result["overall"]["auroc"] == pytest.approx(roc_auc_score(labels, logits))


def test_undefined_metrics_are_none() -> None:
    result = detection_metrics(torch.tensor([1.0, 2.0]), torch.tensor([1, 1]))
    assert result["auroc"] is None and result["real_acc"] is None
    assert result["fake_acc"] == 1.0 and result["balanced_acc"] is None
