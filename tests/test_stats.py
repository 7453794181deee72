"""pipeline.report.stats against values known by hand, from the binomial law and from scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics

from pipeline.report import stats


def _pairs(only_a: int, only_b: int, both: int = 0, neither: int = 0):
    a = np.array([True] * only_a + [False] * only_b + [True] * both + [False] * neither)
    b = np.array([False] * only_a + [True] * only_b + [True] * both + [False] * neither)
    return a, b


@pytest.mark.parametrize(
    ("only_a", "only_b", "p"),
    [
        (10, 1, 2 * (1 + 11) / 2**11),  # 0.01171875
        (1, 7, 2 * (1 + 8) / 2**8),  # 0.0703125
        (0, 6, 2 / 2**6),  # 0.03125
        (3, 3, 1.0),
        (0, 0, 1.0),  # no discordant pair
    ],
)
def test_mcnemar_exact_known_values(only_a, only_b, p):
    result = stats.mcnemar_exact(*_pairs(only_a, only_b, both=20, neither=4))
    assert result.p_value == pytest.approx(p, rel=1e-9)
    assert (result.only_a, result.only_b, result.both, result.neither) == (only_a, only_b, 20, 4)
    assert result.n == only_a + only_b + 24


def test_mcnemar_is_symmetric_and_checks_shapes():
    a, b = _pairs(9, 2, both=5)
    assert stats.mcnemar_exact(a, b).p_value == pytest.approx(stats.mcnemar_exact(b, a).p_value)
    with pytest.raises(ValueError, match="same length"):
        stats.mcnemar_exact(a, b[:-1])


def test_point_metrics_match_scikit_learn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 300)
    pred = np.where(rng.random(300) < 0.7, y, rng.integers(0, 3, 300))  # class 3 never predicted
    values = stats.metrics_from_confusion(stats.confusion(y, pred, 4))
    assert values["accuracy"] == pytest.approx(metrics.accuracy_score(y, pred))
    assert values["balanced_accuracy"] == pytest.approx(metrics.balanced_accuracy_score(y, pred))
    assert values["macro_f1"] == pytest.approx(
        metrics.f1_score(y, pred, average="macro", zero_division=0)
    )
    assert stats.per_class_f1(y, pred, 4) == pytest.approx(
        metrics.f1_score(y, pred, average=None, labels=range(4), zero_division=0)
    )


def test_top_k_and_log_loss_match_scikit_learn():
    rng = np.random.default_rng(2)
    proba = rng.dirichlet(np.ones(8), size=200)
    y = rng.integers(0, 8, 200)
    assert stats.top_k_accuracy(y, proba, 5) == pytest.approx(
        metrics.top_k_accuracy_score(y, proba, k=5, labels=range(8))
    )
    assert stats.log_loss(y, proba) == pytest.approx(metrics.log_loss(y, proba, labels=range(8)))


def test_bootstrap_interval_of_a_proportion_matches_the_normal_approximation():
    n, right = 400, 320  # accuracy 0.8: 0.8 +- 1.96 * sqrt(0.8 * 0.2 / 400) = [0.761, 0.839]
    y = np.zeros(n, dtype=int)
    pred = np.where(np.arange(n) < right, 0, 1)
    low, high = stats.bootstrap_metrics(y, pred, 2, n_resamples=4000, seed=0)["accuracy"]
    half = 1.96 * np.sqrt(0.8 * 0.2 / n)
    assert low == pytest.approx(0.8 - half, abs=0.01)
    assert high == pytest.approx(0.8 + half, abs=0.01)


def test_bootstrap_matches_scipy_percentile_bootstrap():
    from scipy.stats import bootstrap

    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 250)
    pred = np.where(rng.random(250) < 0.75, y, rng.integers(0, 3, 250))
    ours = stats.bootstrap_metrics(y, pred, 3, n_resamples=4000, seed=1)["accuracy"]
    theirs = bootstrap(
        ((pred == y).astype(float),), np.mean, n_resamples=4000, method="percentile", random_state=1
    ).confidence_interval
    assert ours == pytest.approx((theirs.low, theirs.high), abs=0.012)


def test_bootstrap_edge_cases_and_determinism():
    y = np.array([0, 1, 2, 1, 0])
    perfect = stats.bootstrap_metrics(y, y, 3, n_resamples=200)
    assert perfect == {m: (1.0, 1.0) for m in stats.METRICS}
    a = stats.bootstrap_metrics(y, np.array([0, 1, 1, 1, 2]), 3, seed=5)
    assert a == stats.bootstrap_metrics(y, np.array([0, 1, 1, 1, 2]), 3, seed=5)
    with pytest.raises(ValueError, match="confidence"):
        stats.bootstrap_metrics(y, y, 3, confidence=1.5)
