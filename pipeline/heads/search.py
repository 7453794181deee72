"""Choosing a head's hyper-parameters on the train split: the searches behind ``make head``.

A scikit-learn head's search is :class:`~sklearn.model_selection.GridSearchCV`:
each grid point scored by stratified cross-validation on train (``metric``: accuracy
unless ``METRIC=`` says otherwise, :mod:`pipeline.heads.scoring`), the best
(the first among equals) refitted on all of train; val and test are never seen. When
the best value of a head's own grid sits at its edge with the score still rising
there, the grid moves: GridSearchCV scores the next value out, on the same folds,
until the best is inside (within the head's bounds, three values at most).
Two heads score their grid without GridSearchCV's refits, on the same folds and with the
same scores: ``knn`` from one neighbour query per fold (:mod:`pipeline.heads.neighbours`),
``rbf_svm`` from one kernel matrix per fold (:mod:`pipeline.heads.kernels`).
A Keras head (softmax) is not searched (:func:`held_out_fit`): one fit with its
grid's single values, scored on its own early-stopping hold-out of train. Both
report the same way (``params``, ``scores``, ``score``).
"""

from __future__ import annotations

import functools
import json
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline

from pipeline.heads import scoring
from pipeline.heads.kernels import KernelPath
from pipeline.heads.neighbours import PARAM, NeighbourPath

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


class Progress:
    """What a search tells its caller as it goes: fits planned (a grid that moves plans
    more) and fits done. The base class ignores both."""

    def planned(self, fits: int) -> None:
        """``fits`` more fits are planned."""

    def fitted(self) -> None:
        """One more fit is done (a fold's fit, counted when it is scored)."""


class _CountedScore:
    """The search's metric of a fold's predictions (:func:`pipeline.heads.scoring.score`,
    as GridSearchCV's ``scoring="accuracy"``, ``"balanced_accuracy"``, ``"f1_macro"``),
    counting each scored fold."""

    def __init__(self, metric: str, progress: Progress) -> None:
        self.metric, self.progress = metric, progress

    def __call__(self, estimator: Any, X: np.ndarray, y: np.ndarray) -> float:
        score = scoring.score(self.metric, y, estimator.predict(X))
        self.progress.fitted()
        return score


def timed_search(
    spec: HeadSpec,
    pipe: Pipeline,
    X: np.ndarray,
    y: np.ndarray,
    cv: int,
    seed: int,
    jobs: int,
    *,
    grid: Mapping[str, Sequence] | None = None,
    progress: Progress | None = None,
    metric: str = scoring.DEFAULT_METRIC,
) -> Searched:
    """:func:`search`, timed, its convergence warnings kept as notes (other warnings dropped)."""
    from sklearn.exceptions import ConvergenceWarning

    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        fitted, params, cv_info = search(
            spec, pipe, X, y, cv, seed, jobs, grid=grid, progress=progress, metric=metric
        )
    seconds = time.perf_counter() - started
    notes = sorted(
        {str(w.message).split(".")[0] for w in caught if issubclass(w.category, ConvergenceWarning)}
    )
    return Searched(fitted, params, cv_info, seconds, notes)


def search(
    spec: HeadSpec,
    pipe: Pipeline,
    X: np.ndarray,
    y: np.ndarray,
    cv: int,
    seed: int,
    jobs: int,
    *,
    grid: Mapping[str, Sequence] | None = None,
    progress: Progress | None = None,
    metric: str = scoring.DEFAULT_METRIC,
) -> tuple[Pipeline, dict[str, Any], dict[str, Any]]:
    """Grid search on the train split; returns the refitted pipeline, the chosen params
    (``{"<head>__<param>": value}``) and what the manifest records of the search.

    ``grid`` (``GRID=``) replaces the head's own grid and is searched as given; the head's
    own grid moves past an edge whose score still rises (:func:`_extend`), and
    ``cv_info["grid_moves"]`` records each parameter that moved; ``metric`` scores the
    folds (and the softmax head's hold-out) and ``cv_info["metric"]`` records it.
    """
    progress = progress or Progress()
    counts = np.bincount(y)
    folds = min(cv, int(counts[counts > 0].min()))
    searchable = folds >= 2  # a class with one image: no fold can hold it out
    fold_size = len(y) * (folds - 1) // folds if searchable else len(y)
    given = grid is not None
    values = {key: _fold_bounded(spec, key, v, fold_size) for key, v in (grid or spec.grid).items()}
    prefixed = {f"{spec.name}__{key}": list(v) for key, v in values.items()}
    if not searchable:  # take the grid's middle
        params = {key: v[len(v) // 2] for key, v in prefixed.items()}
        pipe.set_params(**params)
        started = time.perf_counter()
        pipe.fit(X, y)
        progress.fitted()
        scheme = "none (a class has one train image): middle of the grid"
        info = {"folds": 0, "scheme": scheme, "score": None, "scores": {}, "grid_moves": {},
                "metric": metric}  # fmt: skip
        return pipe, params, {**info, "refit_seconds": time.perf_counter() - started}
    if spec.keras:
        fitted, params, info = held_out_fit(pipe, X, y, prefixed, metric)
        progress.fitted()
        return fitted, params, {**info, "grid_moves": {}, "metric": metric}
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    # Workers cannot count into this process's progress: _grid_scores counts their folds.
    scorer = _CountedScore(metric, progress if jobs == 1 else Progress())
    path, key = _path(spec, pipe, X, y, splitter, values, given)
    of_metric = functools.partial(scoring.score, metric)  # (truth, predicted) -> score

    def score(points: Mapping[str, list]) -> dict[str, float]:
        """Each grid point's mean score over the folds (the same folds every call)."""
        if path is not None:  # one neighbour query or kernel per fold serves every value
            found = path.scores(points[f"{spec.name}__{key}"], of_metric, progress.fitted)
            return {json.dumps({key: v}): s for v, s in found.items()}
        searched = GridSearchCV(
            pipe, dict(points), cv=splitter, scoring=scorer, n_jobs=jobs, refit=False,
            error_score="raise",
        )  # fmt: skip
        return _grid_scores(searched, X, y, progress)

    scores = score(prefixed)
    # A rise must be worth an image (about 1 / rows of the mean fold accuracy): not one
    # image traded between folds of unequal size, which moves the mean by a few millionths.
    rise = 0.5 / len(y)
    moves = (
        {} if given else _extend(spec, values, scores, score, (folds, fold_size, rise), progress)
    )
    best = _best(values, scores)
    params = {f"{spec.name}__{key}": value for key, value in best.items()}
    started = time.perf_counter()
    fitted = clone(pipe).set_params(**params).fit(X, y)
    refit_seconds = time.perf_counter() - started
    progress.fitted()
    info = {
        "folds": folds,
        "scheme": f"{folds}-fold",
        "grid": {k: list(v) for k, v in values.items()},
    }
    info.update(score=scores[_key(best)], scores=scores, grid_moves=moves, metric=metric)
    return fitted, params, {**info, "refit_seconds": refit_seconds}


def _grid_scores(
    searched: GridSearchCV, X: np.ndarray, y: np.ndarray, progress: Progress
) -> dict[str, float]:
    """Run an unfitted GridSearchCV; each grid point's mean score, keyed as the manifest keys
    it. Folds scored in worker processes (``n_jobs`` other than 1) are counted here."""
    results = searched.fit(X, y).cv_results_
    if searched.n_jobs != 1:
        for _ in range(len(results["params"]) * searched.cv.get_n_splits()):
            progress.fitted()
    return {
        json.dumps(unprefixed(p), sort_keys=True): float(s)
        for p, s in zip(results["params"], results["mean_test_score"], strict=True)
    }


def _path(
    spec: HeadSpec, pipe: Pipeline, X: np.ndarray, y: np.ndarray, splitter: Any,
    values: Mapping[str, list], given: bool,
) -> tuple[NeighbourPath | KernelPath | None, str]:  # fmt: skip
    """What scores a head's grid without GridSearchCV's refits, and its parameter: knn's one
    neighbour query per fold (:mod:`pipeline.heads.neighbours`), asked for the most
    neighbours its grid may move to; rbf_svm's one kernel per fold
    (:mod:`pipeline.heads.kernels`); ``None`` for every other head."""
    if NeighbourPath.applies(pipe, values):
        most = max(values[PARAM])
        if not given and PARAM in spec.extend:
            most = max(most, int(spec.extend[PARAM][1]))
        return NeighbourPath(pipe, X, y, list(splitter.split(X, y)), most), PARAM
    if KernelPath.applies(pipe, values, len(y), splitter.get_n_splits()):
        return KernelPath(pipe, X, y, list(splitter.split(X, y))), "C"
    return None, ""


def _fold_bounded(spec: HeadSpec, key: str, values: Sequence, fold_size: int) -> list:
    """The grid's values, less those a training fold cannot hold (k beyond its images)."""
    values = sorted(values)
    if key in spec.fold_bounded:
        values = [v for v in values if v <= fold_size] or [1]
    return values


def _key(point: Mapping[str, Any]) -> str:
    return json.dumps({k: _plain(v) for k, v in point.items()}, sort_keys=True)


def _points(values: Mapping[str, list]) -> list[dict[str, Any]]:
    """Every grid point, in GridSearchCV's order (the first parameter varies slowest)."""
    from sklearn.model_selection import ParameterGrid

    return list(ParameterGrid({k: list(v) for k, v in values.items()}))


def _best(values: Mapping[str, list], scores: Mapping[str, float]) -> dict[str, Any]:
    """The best grid point; among equals the first (the smallest values), as GridSearchCV."""
    points = _points(values)
    top = max(scores[_key(p)] for p in points)
    return next(p for p in points if scores[_key(p)] == top)


def _extend(
    spec: HeadSpec,
    values: dict[str, list],
    scores: dict[str, float],
    score: Callable[[Mapping[str, list]], dict[str, float]],
    sizes: tuple[int, int, float],
    progress: Progress,
) -> dict[str, dict[str, Any]]:
    """Move a one-parameter grid past the edge its best value sits at while the score still
    rises there: one value at a time, by the head's factor, within its bounds, at most
    :data:`~pipeline.heads.registry.MAX_EXTENSIONS` values. ``sizes`` is ``(folds, images
    of a training fold, the least rise that counts)``. Updates ``values`` and ``scores`` in
    place; returns ``{param: {"from", "searched", "direction", "stopped"}}``, ``stopped``
    one of ``inside`` (the best is inside the grid), ``flat`` (the best is the last value
    added, by less than an image's worth), ``bound`` or ``limit``.
    """
    from pipeline.heads.registry import MAX_EXTENSIONS

    folds, fold_size, least = sizes
    if len(values) != 1:
        return {}
    ((key, grid),) = values.items()
    if key not in spec.extend or len(grid) < 2:
        return {}
    low, high, factor = spec.extend[key]
    if key in spec.fold_bounded:
        high = min(high, fold_size)
    start, direction, stopped = list(grid), None, "inside"
    for _ in range(MAX_EXTENSIONS + 1):
        best = _best(values, scores)[key]
        at = grid.index(best)
        inner = grid[1] if at == 0 else grid[-2]
        edge = "down" if at == 0 else "up" if at == len(grid) - 1 else None
        rise = scores[_key({key: best})] - scores[_key({key: inner})]
        rising = edge is not None and rise >= least
        if not rising or (direction is not None and edge != direction):
            stopped = "inside" if edge is None or edge != direction else "flat"
            break
        if len(grid) - len(start) >= MAX_EXTENSIONS:
            stopped = "limit"
            break
        new = best * factor if edge == "up" else best / factor
        new = type(best)(min(max(new, low), high))
        if new == best or new in grid:
            stopped = "bound"
            break
        direction = edge
        progress.planned(folds)
        scores.update(score({f"{spec.name}__{key}": [new]}))
        grid.append(new)
        grid.sort()
    if direction is None:
        return {}
    return {
        key: {"from": [_plain(v) for v in start], "searched": [_plain(v) for v in grid],
              "direction": direction, "stopped": stopped}
    }  # fmt: skip


def held_out_fit(
    pipe: Pipeline,
    X: np.ndarray,
    y: np.ndarray,
    grid: Mapping[str, list],
    metric: str = scoring.DEFAULT_METRIC,
) -> tuple[Pipeline, dict[str, Any], dict[str, Any]]:
    """One fit on all of train with the grid's first values, reported as a search.

    The score is the classifier's ``metric`` on its own early-stopping hold-out of
    train (``held_out_y_``, ``held_out_pred_``); val and test are never seen.
    """
    params = {key: values[0] for key, values in grid.items()}
    started = time.perf_counter()
    pipe.set_params(**params).fit(X, y)
    seconds = time.perf_counter() - started
    classifier = pipe.steps[-1][1]
    score, n_held = classifier.held_out_score_, classifier.n_held_out_
    if score is not None and metric != "accuracy":  # held_out_score_ is accuracy
        score = scoring.score(metric, classifier.held_out_y_, classifier.held_out_pred_)
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
