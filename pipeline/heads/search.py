"""Choosing a head's hyper-parameters on the train split: the searches behind ``make head``.

A scikit-learn head's search is :class:`~sklearn.model_selection.GridSearchCV`:
each grid point scored by stratified cross-validation (accuracy) on train, the best
(the first among equals) refitted on all of train; val and test are never seen.
A Keras head (softmax) is not searched (:func:`held_out_fit`): one fit with its
grid's single values, scored on its own early-stopping hold-out of train. Both
report the same way (``params``, ``scores``, ``score``).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.pipeline import Pipeline

if TYPE_CHECKING:
    from pipeline.heads.registry import HeadSpec


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
    search = GridSearchCV(
        pipe, grid, cv=splitter, scoring="accuracy", n_jobs=jobs, refit=True, error_score="raise"
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
