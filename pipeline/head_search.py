"""Choosing a head's hyper-parameters on the train split: the searches behind ``make head``.

A search scores each grid value by cross-validation on train and refits the best
on all of train, as :class:`~sklearn.model_selection.GridSearchCV` does; val and
test are never seen. Three ways, one report (``params``, ``scores``, ``score``):

- **GridSearchCV**, for grids of several parameters.
- **Fold by fold** (:func:`fold_search`), for a one-parameter grid: one fit per
  value (:func:`fit_each`), or, where the values can share a fold's costly part,
  the RBF kernel matrix (``rbf_svm``), one nearest-neighbour query for every k
  (``knn``), one Gram matrix for every ridge alpha (``ridge``), a warm-started path
  along C (``logreg``). The folds, the normalisation fitted per fold, the scores
  and the choice (the first value among equals) are GridSearchCV's; only repeated
  work is gone. Each scorer checks its preconditions and falls back to one fit per
  value. Folds run in parallel with ``jobs``; their convergence warnings come back
  to the calling process.
- **No search** (:func:`held_out_fit`): a Keras head (softmax) is fitted once with
  its grid's single values and scored on its own early-stopping hold-out of train.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.base import clone
from sklearn.pipeline import Pipeline

if TYPE_CHECKING:
    from pipeline.heads import HeadSpec

#: ``(classifier, parameter, values, X_train, y_train, X_test, y_test) -> accuracy per value``:
#: the classifier is unfitted, the features already through the fold's fitted normalisation.
FoldScorer = Callable[..., list[float]]


@dataclass
class Searched:
    """One head's search as it ran (:func:`timed_search`)."""

    fitted: Pipeline  # refitted on all of train with the chosen params
    params: dict[str, Any]  # {"<head>__<param>": value}
    cv_info: dict[str, Any]  # what the manifest records of the search
    seconds: float  # the search and the final fit
    notes: list[str]  # its convergence warnings, first sentence each


def timed_search(
    spec: HeadSpec, pipe: Pipeline, X: np.ndarray, y: np.ndarray, cv: int, seed: int, jobs: int
) -> Searched:
    """:func:`search`, timed, its convergence warnings kept as notes (other warnings dropped)."""
    from sklearn.exceptions import ConvergenceWarning

    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        fitted, params, cv_info = search(spec, pipe, X, y, cv, seed, jobs)
    seconds = time.perf_counter() - started
    notes = sorted(
        {str(w.message).split(".")[0] for w in caught if issubclass(w.category, ConvergenceWarning)}
    )
    return Searched(fitted, params, cv_info, seconds, notes)


def search(
    spec: HeadSpec, pipe: Pipeline, X: np.ndarray, y: np.ndarray, cv: int, seed: int, jobs: int
) -> tuple[Pipeline, dict[str, Any], dict[str, Any]]:
    """Grid search on the train split; returns the refitted pipeline, the chosen params
    (``{"<head>__<param>": value}``) and what the manifest records of the search."""
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    counts = np.bincount(y)
    folds = min(cv, int(counts[counts > 0].min()))
    searchable = folds >= 2  # a class with one image: no fold can hold it out
    fold_size = len(y) * (folds - 1) // folds if searchable else len(y)
    grid = {}
    for key, values in spec.grid.items():
        if key in spec.fold_bounded:  # k cannot exceed the images of a training fold
            values = [v for v in values if v <= fold_size] or [1]
        grid[f"{spec.name}__{key}"] = list(values)
    if not searchable:  # take the grid's middle
        params = {key: values[len(values) // 2] for key, values in grid.items()}
        pipe.set_params(**params)
        started = time.perf_counter()
        pipe.fit(X, y)
        scheme = "none (a class has one train image): middle of the grid"
        info = {"folds": 0, "scheme": scheme, "score": None, "scores": {}}
        return pipe, params, {**info, "refit_seconds": time.perf_counter() - started}
    if spec.keras:
        return held_out_fit(pipe, X, y, grid)
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    info = {"folds": folds, "scheme": f"{folds}-fold"}
    if len(grid) == 1:
        return fold_search(spec.fold_scorer or fit_each, pipe, X, y, splitter, grid, info, jobs)
    search = GridSearchCV(
        pipe,
        grid,
        cv=splitter,
        scoring="accuracy",
        n_jobs=1 if spec.keras else jobs,
        refit=True,
        error_score="raise",
    )
    search.fit(X, y)
    results = search.cv_results_
    scores = {
        json.dumps(unprefixed(p), sort_keys=True): float(s)
        for p, s in zip(results["params"], results["mean_test_score"], strict=True)
    }
    info = {**info, "score": float(search.best_score_), "scores": scores}
    return (
        search.best_estimator_,
        search.best_params_,
        {**info, "refit_seconds": search.refit_time_},
    )


def fold_search(
    scorer: FoldScorer,
    pipe: Pipeline,
    X: np.ndarray,
    y: np.ndarray,
    splitter: Any,
    grid: Mapping[str, list],
    info: dict[str, Any],
    jobs: int = 1,
) -> tuple[Pipeline, dict[str, Any], dict[str, Any]]:
    """A one-parameter grid scored fold by fold with ``scorer``, chosen as GridSearchCV does.

    Each fold fits the pipeline's steps before the classifier on its training part
    (as GridSearchCV's fits do) and lets ``scorer`` score every value at once; the
    choice is the best mean fold accuracy, the first grid value among equals; the
    final fit on all of train starts cold. Folds run in parallel with ``jobs``
    (joblib, so :func:`pipeline.ray_engine.joblib_on_ray` spreads them too).
    """
    from joblib import Parallel, delayed

    ((key, values),) = grid.items()
    param = key.split("__", 1)[1]
    folds = Parallel(n_jobs=jobs)(
        delayed(_score_fold)(scorer, pipe, param, values, X, y, train, test)
        for train, test in splitter.split(X, y)
    )
    for _, caught in folds:  # raised in worker processes: raised again here, where they count
        for category, message in caught:
            warnings.warn(message, category, stacklevel=2)
    per_fold = [scores for scores, _ in folds]
    means = [float(np.mean(column)) for column in zip(*per_fold, strict=True)]
    best = max(range(len(values)), key=lambda i: (means[i], -i))
    params = {key: values[best]}
    started = time.perf_counter()
    fitted = clone(pipe).set_params(**params).fit(X, y)
    scores = {
        json.dumps(unprefixed({key: value}), sort_keys=True): mean
        for value, mean in zip(values, means, strict=True)
    }
    info = {**info, "score": means[best], "scores": scores}
    return fitted, params, {**info, "refit_seconds": time.perf_counter() - started}


def _score_fold(scorer, pipe, param, values, X, y, train, test) -> tuple[list[float], list]:
    """One fold's scores, and the convergence warnings its fits raised (``(category, text)``)."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        prepare = clone(pipe[:-1])
        X_train = prepare.fit_transform(X[train], y[train])
        X_test = prepare.transform(X[test])
        classifier = clone(pipe.steps[-1][1])
        scores = scorer(classifier, param, list(values), X_train, y[train], X_test, y[test])
    found = [
        (w.category, str(w.message)) for w in caught if issubclass(w.category, ConvergenceWarning)
    ]
    return scores, found


def held_out_fit(
    pipe: Pipeline, X: np.ndarray, y: np.ndarray, grid: Mapping[str, list]
) -> tuple[Pipeline, dict[str, Any], dict[str, Any]]:
    """One fit on all of train with the grid's first values, reported as a search.

    The score is the classifier's accuracy on its own early-stopping hold-out of
    train (``held_out_score_``); val and test are never seen.
    """
    params = {key: values[0] for key, values in grid.items()}
    started = time.perf_counter()
    pipe.set_params(**params).fit(X, y)
    seconds = time.perf_counter() - started
    classifier = pipe.steps[-1][1]
    score, n_held = classifier.held_out_score_, classifier.n_held_out_
    if score is None:
        scheme, scores = "no search: one fit; no hold-out (too few images)", {}
    else:
        scheme = f"no search: one fit, scored on its early-stopping hold-out ({n_held} images)"
        scores = {json.dumps(unprefixed(params), sort_keys=True): score}
    info = {"folds": 0 if score is None else 1, "scheme": scheme, "score": score}
    # The one fit is the search and the final fit.
    return pipe, params, {**info, "scores": scores, "refit_seconds": seconds}


def unprefixed(params: Mapping[str, Any]) -> dict[str, Any]:
    """``{"svm__C": 1.0}`` -> ``{"C": 1.0}``, NumPy scalars as Python ones."""
    return {key.split("__", 1)[1]: _plain(v) for key, v in params.items()}


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


# --------------------------------------------------------------------------- fold scorers


def _accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(pred == y))


def fit_each(classifier, param, values, X_train, y_train, X_test, y_test) -> list[float]:
    """One fit per value: what GridSearchCV does, the fallback of every scorer."""
    return [
        _accuracy(
            clone(classifier).set_params(**{param: v}).fit(X_train, y_train).predict(X_test), y_test
        )
        for v in values
    ]


def warm_path(classifier, param, values, X_train, y_train, X_test, y_test) -> list[float]:
    """One classifier with ``warm_start=True`` fitted along the grid in increasing order,
    each fit starting from the last solution (the same optima in fewer iterations)."""
    from sklearn.linear_model import LogisticRegression

    path_of_c = isinstance(classifier, LogisticRegression) and param == "C"
    if (
        not path_of_c or classifier.get_params()["solver"] == "liblinear"
    ):  # liblinear: no warm start
        return fit_each(classifier, param, values, X_train, y_train, X_test, y_test)
    path = clone(classifier).set_params(warm_start=True)
    scores = {}
    for value in sorted(values):
        path.set_params(**{param: value}).fit(X_train, y_train)
        scores[value] = _accuracy(path.predict(X_test), y_test)
    return [scores[value] for value in values]


def shared_kernel(classifier, param, values, X_train, y_train, X_test, y_test) -> list[float]:
    """An RBF :class:`~sklearn.svm.SVC` for every C on one kernel matrix of the fold.

    ``gamma="scale"`` is resolved as SVC resolves it (``1 / (width * X.var())`` of the
    fold's training features); the matrices come from one matrix product each
    instead of libsvm's one dot product per pair, per C.
    """
    from sklearn.metrics.pairwise import rbf_kernel
    from sklearn.svm import SVC

    params = classifier.get_params()
    if not isinstance(classifier, SVC) or params["kernel"] != "rbf" or param != "C":
        return fit_each(classifier, param, values, X_train, y_train, X_test, y_test)
    X_train64, X_test64 = np.asarray(X_train, np.float64), np.asarray(X_test, np.float64)
    gamma = params["gamma"]
    if gamma == "scale":  # on the float64 copy, as SVC computes it
        variance = float(X_train64.var())
        gamma = 1.0 / (X_train64.shape[1] * variance) if variance != 0 else 1.0
    elif gamma == "auto":
        gamma = 1.0 / X_train64.shape[1]
    K_train = rbf_kernel(X_train64, gamma=gamma)
    K_test = rbf_kernel(X_test64, X_train64, gamma=gamma)
    precomputed = clone(classifier).set_params(kernel="precomputed")
    return [
        _accuracy(
            clone(precomputed).set_params(**{param: v}).fit(K_train, y_train).predict(K_test),
            y_test,
        )
        for v in values
    ]


def shared_neighbours(classifier, param, values, X_train, y_train, X_test, y_test) -> list[float]:
    """Every k of a :class:`~sklearn.neighbors.KNeighborsClassifier` from one query of the
    largest k: the nearest k are the first k of the nearest ``max(k)`` (uniform votes,
    ties to the smallest class, as scikit-learn breaks them). Equal distances at a k's
    boundary (duplicated images) fall back to one fit per k."""
    from sklearn.neighbors import KNeighborsClassifier

    if (
        not isinstance(classifier, KNeighborsClassifier)
        or param != "n_neighbors"
        or classifier.get_params()["weights"] != "uniform"
    ):
        return fit_each(classifier, param, values, X_train, y_train, X_test, y_test)
    classes, encoded = np.unique(y_train, return_inverse=True)
    deepest = min(max(values) + 1, len(X_train))  # one more, to see ties at each k's boundary
    largest = clone(classifier).set_params(n_neighbors=deepest).fit(X_train, encoded)
    distance, index = largest.kneighbors(X_test)
    if any(k < deepest and np.any(distance[:, k - 1] == distance[:, k]) for k in values):
        # Equal distances at a boundary: which neighbour counts is the search's own choice.
        return fit_each(classifier, param, values, X_train, y_train, X_test, y_test)
    nearest = encoded[index]
    scores = []
    for k in values:
        votes = np.zeros((len(X_test), len(classes)), np.int64)
        np.add.at(votes, (np.arange(len(X_test))[:, None], nearest[:, :k]), 1)
        scores.append(_accuracy(classes[np.argmax(votes, axis=1)], y_test))
    return scores


def shared_gram(classifier, param, values, X_train, y_train, X_test, y_test) -> list[float]:
    """Every alpha of a :class:`~sklearn.linear_model.RidgeClassifier` from one Gram matrix.

    RidgeClassifier's ``auto`` solver on dense data (Cholesky) with an intercept:
    centred features and ``-1/+1`` targets, ``(X'X + alpha I) w = X'y`` (or its dual
    when the fold has fewer images than features). The Gram matrix is formed once;
    each alpha costs one Cholesky solve.
    """
    from scipy.linalg import cho_factor, cho_solve
    from sklearn.linear_model import RidgeClassifier
    from sklearn.preprocessing import LabelBinarizer

    params = classifier.get_params()
    plain = (
        isinstance(classifier, RidgeClassifier)
        and param == "alpha"
        and params["fit_intercept"]
        and params["class_weight"] is None
        and params["solver"] in ("auto", "cholesky")
        and not params.get("positive", False)
    )
    if not plain:
        return fit_each(classifier, param, values, X_train, y_train, X_test, y_test)
    # In the features' own precision, as RidgeClassifier computes (float32 caches stay float32).
    dtype = np.float32 if np.asarray(X_train).dtype == np.float32 else np.float64
    binarizer = LabelBinarizer(pos_label=1, neg_label=-1)
    Y = binarizer.fit_transform(y_train).astype(dtype)
    X = np.asarray(X_train, dtype)
    x_mean, y_mean = X.mean(axis=0), Y.mean(axis=0)
    Xc, Yc = X - x_mean, Y - y_mean
    Xt = np.asarray(X_test, dtype) - x_mean
    primal = X.shape[1] <= X.shape[0]
    gram = Xc.T @ Xc if primal else Xc @ Xc.T
    rhs = Xc.T @ Yc if primal else Yc
    scores = []
    for alpha in values:
        ridged = gram + np.asarray(alpha, dtype) * np.eye(len(gram), dtype=dtype)
        # LAPACK's potrf and potrs, as solve(assume_a="pos") calls them, without its
        # condition estimate: 14 ms against 26 for 1280 features in float32 (2 cores).
        solution = cho_solve(cho_factor(ridged, check_finite=False), rhs, check_finite=False)
        coef = solution if primal else Xc.T @ solution
        decision = Xt @ coef + y_mean
        if decision.shape[1] == 1:
            pred = binarizer.classes_[(decision[:, 0] > 0).astype(int)]
        else:
            pred = binarizer.classes_[np.argmax(decision, axis=1)]
        scores.append(_accuracy(pred, y_test))
    return scores
