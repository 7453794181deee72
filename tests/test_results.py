"""fit_heads' results as objects: scores, grids and fitted estimators as attributes, heads by name."""

from __future__ import annotations

import numpy as np
import pytest
from heads_helpers import blobs, synthetic_cache, write_cache
from sklearn.pipeline import Pipeline

from pipeline.core.errors import HeadError
from pipeline.features.cache import load_features
from pipeline.heads.fit import HeadResults, fit_heads, summary_table
from pipeline.heads.registry import HEADS


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("results")
    cache = synthetic_cache(tmp, width=8, per_class=15)
    return cache, fit_heads(cache, "svm,logreg", artifacts_dir=tmp / "artifacts")


def test_scores_are_attributes(swept):
    _, results = swept
    svm = results["svm"]
    m = svm.manifest
    assert svm.name == svm.head == "svm"
    assert svm.val_accuracy == m["metrics"]["val"]["accuracy"] > 0.9
    assert svm.test_accuracy == m["metrics"]["test"]["accuracy"]
    assert svm.cv_score == m["cv"]["score"] and svm.params == m["params"]
    assert svm.fit_seconds == m["fit_seconds"]


def test_cv_results_read_like_grid_search_cv(swept):
    _, results = swept
    cv = results["logreg"].cv_results_
    assert len(cv["params"]) == len(HEADS["logreg"].grid["C"])
    assert sorted(p["C"] for p in cv["params"]) == sorted(HEADS["logreg"].grid["C"])
    best = int(np.argmax(cv["mean_test_score"]))
    assert cv["rank_test_score"][best] == 1 and cv["rank_test_score"].min() == 1
    chosen = cv["params"].index(results["logreg"].params)
    assert cv["rank_test_score"][chosen] == 1  # the search took a best-ranked point


def test_the_fitted_estimator_is_loaded_on_first_use(swept):
    cache, results = swept
    svm = results["svm"]
    assert "estimator_" not in vars(svm)  # nothing read yet
    estimator = svm.estimator_
    assert isinstance(estimator, Pipeline) and svm.estimator_ is estimator
    features = load_features(cache)
    X, y = features.select("val")
    assert np.mean(estimator.predict(X) == y) == pytest.approx(svm.val_accuracy)


def test_heads_by_name_and_the_best_one(swept):
    _, results = swept
    assert isinstance(results, HeadResults) and results.names == ["svm", "logreg"]
    assert "svm" in results and "knn" not in results and results[0] is results["svm"]
    with pytest.raises(KeyError, match="no head 'svn'.*heads: svm, logreg"):
        results["svn"]
    marked = [line for line in summary_table(results).splitlines() if "<- best" in line]
    assert marked[0].split()[0] == results.best_.head
    assert results.best_estimator_ is results.best_.estimator_
    assert results.format() == summary_table(results)
    with pytest.raises(HeadError, match="no heads were fitted"):
        _ = HeadResults([]).best_


def test_a_cache_without_val_or_test_has_none_for_them(tmp_path):
    X, y = blobs(10, 2, 4, separation=4.0)
    path = write_cache(tmp_path / "c.h5", X, y, ["train"] * len(y), ("a", "b"))
    (result,) = fit_heads(path, "logreg", artifacts_dir=tmp_path)
    assert result.val_accuracy is None and result.test_accuracy is None
    assert result.cv_score is not None
