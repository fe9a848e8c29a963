"""The report's numbers against scikit-learn / scipy, computed from the same scores."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score

from qdd.errors import QddError
from qdd.report.runs import group_table, load_runs
from qdd.report.stats import METRICS, bootstrap, group_metrics, wilson
from tests.report.conftest import reference_metrics


def test_the_report_computes_the_metrics_qdd_cli_test_computes() -> None:
    from qdd import metrics

    assert METRICS == metrics.METRICS


def test_group_metrics_match_scikit_learn_with_ties() -> None:
    rng = np.random.default_rng(3)
    real = np.round(rng.normal(-1, 1.5, 150), 1)  # rounded: many ties, also across classes
    fake = np.round(rng.normal(0.5, 1.5, 90), 1)
    for threshold in (0.0, 0.35):
        ours = group_metrics(real, fake, threshold, resamples=200)
        expected = reference_metrics(real, fake, threshold)
        for name, value in expected.items():
            assert ours[name] == pytest.approx(value, abs=1e-12), name


def test_wilson_matches_scipy_and_intervals_hold_the_estimate() -> None:
    for k, n in ((0, 10), (3, 10), (10, 10), (57, 200)):
        ci = binomtest(k, n).proportion_ci(method="wilson")
        assert wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)
    rng = np.random.default_rng(0)
    real, fake = rng.normal(0, 1, 40), rng.normal(1, 1, 30)
    m = group_metrics(real, fake, 0.0)
    for name in ("fake_acc", "real_acc", "acc", "balanced_acc", "auroc"):
        assert m[f"{name}_lo"] <= m[name] <= m[f"{name}_hi"], name


def test_bootstrap_is_seeded_and_agrees_with_a_plain_loop() -> None:
    rng = np.random.default_rng(1)
    real, fake = np.round(rng.normal(0, 1, 60), 1), np.round(rng.normal(0.8, 1, 50), 1)
    first, again = bootstrap(real, fake, 0.0), bootstrap(real, fake, 0.0)
    assert first == again  # fixed seed: the same scores give the same interval
    loop = np.random.default_rng(123)
    draws = [roc_auc_score(np.r_[np.zeros(60), np.ones(50)],
                           np.r_[loop.choice(real, 60), loop.choice(fake, 50)])
             for _ in range(2000)]  # fmt: skip
    assert first["auroc"] == pytest.approx(tuple(np.percentile(draws, [2.5, 97.5])), abs=0.025)


def test_merged_runs_give_the_metrics_of_the_pooled_scores(make_run) -> None:
    """Two runs of one detector whose per-group metrics differ: the report pools the scores."""
    a = make_run("a", "npr", {"sd3": ["fp32", "fp4"]}, seed=0)
    b = make_run("b", "npr", {"sd3": ["fp32", "fp4"]}, seed=5, shift=-2.0, n=20)
    # different images in each run: rename b's keys so that both runs' scores are pooled
    b_scores = pd.read_parquet(b / "scores.parquet")
    b_scores["key"] = "b-" + b_scores["key"]
    b_scores.to_parquet(b / "scores.parquet")
    scores = pd.concat([pd.read_parquet(r / "scores.parquet") for r in (a, b)])
    table = group_table(load_runs([a, b])).set_index(["generator", "precision"])
    real = scores.loc[scores["label"] == 0, "logit"].to_numpy()
    for precision in ("fp32", "fp4"):
        fake = scores.loc[scores["group"] == f"sd3/{precision}", "logit"].to_numpy()
        expected = reference_metrics(real, fake)
        row = table.loc[("sd3", precision)]
        for name in METRICS:
            assert row[name] == pytest.approx(expected[name], abs=1e-12), (precision, name)
        assert row["n_fake"] == 32 and row["n_real"] == 32
    run_a = json.loads((a / "metrics.json").read_text())["groups"]["sd3/fp4"]["fake_acc"]
    run_b = json.loads((b / "metrics.json").read_text())["groups"]["sd3/fp4"]["fake_acc"]
    assert run_a != run_b and table.loc[("sd3", "fp4"), "fake_acc"] not in (run_a, run_b)


def test_a_single_run_reproduces_its_metrics_json(make_run) -> None:
    run = make_run("one", "clipd", threshold=0.4)
    groups = json.loads((run / "metrics.json").read_text())["groups"]
    table = group_table(load_runs([run]))
    for row in table.itertuples():
        for name in METRICS:
            expected = groups[f"{row.generator}/{row.precision}"][name]
            assert getattr(row, name) == pytest.approx(expected, abs=1e-12)


def test_runs_that_disagree_on_threshold_are_refused(make_run) -> None:
    a = make_run("a", "npr", {"sd3": ["fp32"]})
    b = make_run("b", "npr", {"sd3": ["fp4"]}, threshold=0.5)
    with pytest.raises(QddError, match="disagree on threshold .*0.0 vs 0.5.*one --model.threshold"):
        load_runs([a, b])


def test_paired_statistics_match_hand_computed_values() -> None:
    from qdd.report.stats import mcnemar_p, mean_interval, signed_rank_p

    # mean 2.5, s = 1.2910, t(3, 0.975) = 3.182446: 2.5 ± 2.0543
    lo, hi = mean_interval(np.array([1.0, 2.0, 3.0, 4.0]))
    assert (lo, hi) == pytest.approx((0.445737, 4.554263), abs=1e-5)
    assert all(math.isnan(v) for v in mean_interval(np.array([1.0])))
    # five positive shifts: exact two-sided P = 2 / 2^5; McNemar 5 vs 0 flips: the same
    assert signed_rank_p(np.array([0.1, 0.4, 0.2, 0.5, 0.3])) == pytest.approx(0.0625)
    assert mcnemar_p(5, 0) == pytest.approx(0.0625) and mcnemar_p(0, 5) == pytest.approx(0.0625)
    assert mcnemar_p(3, 3) == pytest.approx(1.0) and mcnemar_p(0, 0) == 1.0
    assert signed_rank_p(np.zeros(4)) == 1.0 and math.isnan(signed_rank_p(np.array([])))


def test_signed_rank_p_uses_the_documented_method_on_every_scipy() -> None:
    """Exact without ties (up to 50 pairs), the tie-corrected normal approximation otherwise.

    scipy's ``method="auto"`` turned into a permutation test for small samples with ties
    (1.15); the report passes its method explicitly, so these hand-computed values hold on
    every scipy qdd allows.
    """
    from qdd.report.stats import signed_rank_p

    # |d| ranks 1.5 1.5 3.5 3.5 5 6; T- = 1.5; mean 6*7/4 = 10.5;
    # var 6*7*13/24 - ((2^3-2) + (2^3-2))/48 = 22.75 - 0.25 = 22.5
    z = (1.5 - 10.5) / math.sqrt(22.5)
    tied = np.array([1.0, 2.0, 2.0, 3.0, -1.0, 4.0])
    assert signed_rank_p(tied) == pytest.approx(math.erfc(abs(z) / math.sqrt(2)), rel=1e-12)
    assert signed_rank_p(tied) == pytest.approx(0.0577796, abs=1e-7)  # not 0.09375 (permutation)
    # zeros dropped first: three positive shifts left, exact P = 2 / 2^3
    assert signed_rank_p(np.array([0.0, 0.0, 0.3, 0.1, 0.2])) == pytest.approx(0.25)
    # 60 distinct shifts, the 10 smallest negative: T- = 55, normal approximation
    large = np.arange(1.0, 61.0) * np.where(np.arange(60) < 10, -1, 1)
    z = (55 - 60 * 61 / 4) / math.sqrt(60 * 61 * 121 / 24)
    assert signed_rank_p(large) == pytest.approx(math.erfc(abs(z) / math.sqrt(2)), rel=1e-12)
