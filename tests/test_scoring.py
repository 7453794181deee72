"""METRIC= on `make head`: the searches score by it, the heads are ranked by it, manifests
record it, reuse respects it, and an unknown one is refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from heads_helpers import write_cache
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.pipeline import Pipeline

from pipeline.core.errors import HeadError
from pipeline.heads import scoring
from pipeline.heads import search as head_search
from pipeline.heads.fit import HeadResult, fit_heads, summary_table
from pipeline.heads.registry import HeadSpec
from pipeline.heads.results import chosen_head


class Threshold(ClassifierMixin, BaseEstimator):
    """Class 1 where column 0 exceeds ``t``: a high ``t`` always says the majority class."""

    def __init__(self, t=0.5):
        self.t = t

    def fit(self, X, y):
        self.classes_ = np.unique(y)
        return self

    def predict(self, X):
        return (X[:, 0] > self.t).astype(int)


def _imbalanced():
    """180 rows of class 0 (27 of them look like class 1) and 20 of class 1."""
    y = np.r_[np.zeros(180, int), np.ones(20, int)]
    x = y.astype(float)
    x[np.arange(0, 180, 180 // 27)[:27]] = 1.0
    spec = HeadSpec("cut", "test", lambda seed: Threshold(), "none", {"t": (0.5, 5.0)})
    pipe = Pipeline([("norm", "passthrough"), ("pca", "passthrough"), ("cut", Threshold())])
    return spec, pipe, np.c_[x, np.zeros_like(x)], y


def test_scores_follow_scikit_learns_definitions():
    from sklearn.metrics import balanced_accuracy_score, f1_score

    y, pred = np.array([0, 0, 0, 1, 2]), np.array([0, 0, 1, 1, 1])
    got = scoring.scores(y, pred)
    assert got == {
        "accuracy": 0.6,
        "balanced_accuracy": pytest.approx(balanced_accuracy_score(y, pred)),
        "macro_f1": pytest.approx(f1_score(y, pred, average="macro", zero_division=0)),
    }
    assert got["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 0) / 3)


@pytest.mark.parametrize(
    ("metric", "chosen"), [("accuracy", 5.0), ("balanced_accuracy", 0.5), ("macro_f1", 0.5)]
)
def test_the_search_scores_its_folds_by_the_metric(metric, chosen):
    """Always the majority class: accuracy 0.9, balanced accuracy 0.5; the threshold that
    finds the minority: accuracy 0.865, balanced accuracy 0.925. Each metric picks its own."""
    spec, pipe, X, y = _imbalanced()
    # (JOBS=2 copies the same scorer into its workers: test_search runs that path.)
    _, params, info = head_search.search(spec, pipe, X, y, 3, 0, 1, metric=metric)
    assert params == {"cut__t": chosen} and info["metric"] == metric
    majority = info["scores"]['{"t": 5.0}']
    expected = {"accuracy": 0.9, "balanced_accuracy": 0.5}.get(metric, majority)
    assert majority == pytest.approx(expected, abs=1e-3)  # folds of unequal size


def _cache(tmp_path: Path) -> Path:
    """Imbalanced blobs (3 classes, 60/12/6 train images), overlapping enough to err."""
    rng = np.random.default_rng(0)
    sizes = (100, 20, 10)
    y = np.repeat(np.arange(3), sizes)
    X = rng.normal(0, 1, (len(y), 8)).astype(np.float32) + 1.2 * np.eye(3, 8)[y]
    split = np.array(["train"] * len(y), dtype=object)
    for c, n in enumerate(sizes):
        rows = np.flatnonzero(y == c)
        split[rows[: n // 5]], split[rows[n // 5 : 2 * (n // 5)]] = "val", "test"
    path = tmp_path / "artifacts" / "features" / "synthetic" / "imb.h5"
    return write_cache(path, X, y, split, ("many", "some", "few"))


def test_the_manifest_records_the_metric_and_reuse_respects_it(tmp_path):
    cache, artifacts = _cache(tmp_path), tmp_path / "artifacts"
    lines: list[str] = []
    (first,) = fit_heads(cache, "logreg", artifacts_dir=artifacts, metric="balanced_accuracy",
                         log=lines.append)  # fmt: skip
    m = first.manifest
    assert m["metric"] == m["cv"]["metric"] == first.metric == "balanced_accuracy"
    assert set(m["metrics"]["val"]) == {"accuracy", "balanced_accuracy", "macro_f1", "n"}
    assert first.val_score == m["metrics"]["val"]["balanced_accuracy"]
    assert max(m["cv"]["scores"].values()) == m["cv"]["score"]
    assert "(balanced accuracy)" in lines[-1] and f"val {first.val_score:.3f}" in lines[-1]
    again = fit_heads(cache, "logreg", artifacts_dir=artifacts, metric="balanced_accuracy")
    assert again[0].reused
    (other,) = fit_heads(cache, "logreg", artifacts_dir=artifacts)  # accuracy: not reused
    assert not other.reused and other.metric == "accuracy" and "metric" in other.manifest
    assert other.manifest["search_key"] != m["search_key"]
    assert not fit_heads(cache, "logreg", artifacts_dir=artifacts, metric="macro_f1")[0].reused


def test_an_unknown_metric_is_refused_in_one_line_before_anything_is_written(tmp_path, capsys):
    from pipeline.cli.main import main

    cache, artifacts = _cache(tmp_path), tmp_path / "artifacts"
    with pytest.raises(HeadError, match=r"METRIC= \(--metric\) must be one of accuracy, "
                                        r"balanced_accuracy, macro_f1; got 'balanced'"):  # fmt: skip
        fit_heads(cache, "svm", artifacts_dir=artifacts, metric="balanced")
    assert not (artifacts / "heads").exists()
    argv = ["head", "--cache", str(cache), "--metric", "top5", "--artifacts", str(artifacts)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: METRIC= (--metric) must be one of") and "\n" not in err


def _result(name: str, metric: str | None, val: dict[str, float]) -> HeadResult:
    manifest = {"name": name, "cv": {"score": 0.9}, "fit_seconds": 1.0,
                "metrics": {"val": val, "test": dict(val)}}  # fmt: skip
    if metric:
        manifest["metric"] = metric
    return HeadResult(name, Path(f"{name}.json"), manifest)


def test_the_heads_are_ranked_and_shown_by_their_metric():
    lean = {"accuracy": 0.90, "balanced_accuracy": 0.50, "macro_f1": 0.47}
    fair = {"accuracy": 0.86, "balanced_accuracy": 0.92, "macro_f1": 0.80}
    by_accuracy = [_result("svm", None, lean), _result("logreg", None, fair)]
    assert chosen_head(by_accuracy).head == "svm"
    balanced = [_result("svm", "balanced_accuracy", lean),
                _result("logreg", "balanced_accuracy", fair)]  # fmt: skip
    assert chosen_head(balanced).head == "logreg"
    table = summary_table(balanced)
    assert table.splitlines()[0] == "  scores: balanced accuracy (METRIC=balanced_accuracy)"
    (marked,) = [line for line in table.splitlines() if "<- best on val" in line]
    assert marked.split()[:3] == ["logreg", "0.900", "0.920"]
    mixed = [_result("svm", "balanced_accuracy", lean), _result("logreg", None, fair)]
    assert chosen_head(mixed).head == "svm"  # they disagree: accuracy ranks
    assert scoring.common_metric(r.manifest for r in mixed) == (
        "accuracy", {"balanced_accuracy": ["svm"], "accuracy": ["logreg"]})  # fmt: skip


class HeldOut(ClassifierMixin, BaseEstimator):
    """A stand-in for the softmax head: its early-stopping hold-out, without Keras."""

    def __init__(self, learning_rate=1e-3):
        self.learning_rate = learning_rate

    def fit(self, X, y):
        self.classes_ = np.unique(y)
        self.held_out_y_, self.held_out_pred_ = np.array([0, 0, 0, 1]), np.array([0, 0, 0, 0])
        self.held_out_score_, self.n_held_out_ = 0.75, 4
        return self


@pytest.mark.parametrize(("metric", "score"), [("accuracy", 0.75), ("balanced_accuracy", 0.5)])
def test_the_softmax_heads_hold_out_is_scored_by_the_metric(metric, score):
    pipe = Pipeline([("norm", "passthrough"), ("softmax", HeldOut())])
    grid = {"softmax__learning_rate": [1e-3]}
    _, _, info = head_search.held_out_fit(pipe, np.zeros((8, 2)), np.r_[[0] * 6, [1] * 2], grid,
                                          metric)  # fmt: skip
    assert info["score"] == score and info["scores"] == {'{"learning_rate": 0.001}': score}
