"""The head searches: shared work per fold reports what GridSearchCV reports; one-fit grids."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from heads_helpers import blobs
from sklearn.model_selection import GridSearchCV, StratifiedKFold

from pipeline import head_search
from pipeline.heads import HEADS, build_head


def _reference(name: str, X, y, **classifier_params):
    spec = HEADS[name]
    ((key, values),) = spec.grid.items()
    pipe = build_head(name).set_params(**{f"{name}__{k}": v for k, v in classifier_params.items()})
    return GridSearchCV(
        pipe,
        {f"{name}__{key}": list(values)},
        cv=StratifiedKFold(3, shuffle=True, random_state=0),
        scoring="accuracy",
    ).fit(X, y)


@pytest.mark.parametrize("name", ["rbf_svm", "knn", "ridge", "logreg"])
@pytest.mark.parametrize("seed", [0, 1])
def test_shared_work_per_fold_reports_what_grid_search_does(name, seed):
    """Same folds, same per-value scores, same choice, same refitted head as GridSearchCV."""
    X, y = blobs(30, 3, 24, separation=0.8, seed=seed)
    spec = HEADS[name]
    assert spec.fold_scorer is not None
    fitted, params, info = head_search.search(spec, build_head(name), X, y, 3, 0, 1)
    reference = _reference(name, X, y)
    ((key, values),) = spec.grid.items()
    expected = {
        f'{{"{key}": {v}}}': s
        for v, s in zip(values, reference.cv_results_["mean_test_score"], strict=True)
    }
    assert params == reference.best_params_
    assert info["scores"] == pytest.approx(expected, abs=1e-9)
    assert info["score"] == pytest.approx(reference.best_score_, abs=1e-9)
    assert info["folds"] == 3 and info["scheme"] == "3-fold"
    assert np.array_equal(fitted.predict(X), reference.best_estimator_.predict(X))


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("knn", {"weights": "distance"}),
        ("rbf_svm", {"kernel": "poly"}),
        ("ridge", {"solver": "svd"}),
    ],
)
def test_a_scorer_whose_shortcut_does_not_hold_fits_each_value(name, params):
    """A classifier the shortcut does not cover (distance votes, another kernel, another
    solver) is scored one fit per value: still what GridSearchCV reports."""
    X, y = blobs(20, 2, 10, separation=0.8, seed=4)
    pipe = build_head(name).set_params(**{f"{name}__{k}": v for k, v in params.items()})
    _, chosen, info = head_search.search(HEADS[name], pipe, X, y, 3, 0, 1)
    reference = _reference(name, X, y, **params)
    assert chosen == reference.best_params_
    assert info["score"] == pytest.approx(reference.best_score_, abs=1e-9)


def test_without_a_fold_scorer_the_search_is_grid_search():
    X, y = blobs(20, 2, 10, separation=0.8, seed=5)
    spec = dataclasses.replace(HEADS["knn"], fold_scorer=None)
    _, chosen, info = head_search.search(spec, build_head("knn"), X, y, 3, 0, 1)
    reference = _reference("knn", X, y)
    assert chosen == reference.best_params_
    assert info["score"] == pytest.approx(reference.best_score_, abs=1e-9)


def test_the_softmax_head_is_one_fit_scored_on_its_own_hold_out():
    X, y = blobs(30, 2, 8, separation=2.0, seed=6)
    pipe = build_head("softmax").set_params(softmax__max_epochs=20)
    fitted, chosen, info = head_search.search(HEADS["softmax"], pipe, X, y, 3, 0, 1)
    classifier = fitted.named_steps["softmax"]
    assert info["folds"] == 1 and "early-stopping hold-out (9 images)" in info["scheme"]
    assert (
        chosen
        == {"softmax__learning_rate": 1e-3}
        == {"softmax__learning_rate": classifier.learning_rate}
    )
    assert info["scores"] == {'{"learning_rate": 0.001}': classifier.held_out_score_}
    assert info["score"] == classifier.held_out_score_ > 0.8
    assert info["refit_seconds"] > 0 and fitted.score(X, y) > 0.9


def test_neighbours_at_equal_distance_are_scored_as_grid_search_scores_them():
    """Duplicated images with other labels put equal distances at a k's boundary."""
    X, y = blobs(15, 2, 6, separation=0.5, seed=9)
    X, y = np.concatenate([X, X]), np.concatenate([y, 1 - y])
    _, chosen, info = head_search.search(HEADS["knn"], build_head("knn"), X, y, 3, 0, 1)
    reference = _reference("knn", X, y)
    assert chosen == reference.best_params_
    expected = reference.cv_results_["mean_test_score"]
    assert list(info["scores"].values()) == pytest.approx(list(expected), abs=1e-9)


def test_convergence_warnings_of_parallel_folds_come_back_to_the_caller():
    """Fits in worker processes warn there; the search raises their warnings again here,
    where fit_heads records them in the manifest."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    X, y = blobs(20, 2, 10, separation=0.5, seed=11)
    pipe = build_head("svm").set_params(svm__max_iter=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        head_search.search(HEADS["svm"], pipe, X, y, 3, 0, 2)
    assert any(issubclass(w.category, ConvergenceWarning) for w in caught)
