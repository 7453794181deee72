"""The head searches: GridSearchCV as the manifest records it; the softmax head's one fit."""

from __future__ import annotations

import numpy as np
import pytest
from heads_helpers import blobs
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import GridSearchCV, StratifiedKFold

from pipeline.heads import search as head_search
from pipeline.heads.registry import HEADS, build_head


def _reference(name: str, X, y):
    ((key, values),) = HEADS[name].grid.items()
    return GridSearchCV(
        build_head(name),
        {f"{name}__{key}": list(values)},
        cv=StratifiedKFold(3, shuffle=True, random_state=0),
        scoring="accuracy",
    ).fit(X, y)


@pytest.mark.parametrize("name", ["svm", "rbf_svm", "logreg", "knn", "ridge"])
def test_a_search_reports_what_grid_search_chose_and_scored(name):
    """Same folds, per-value scores, choice and refitted head as GridSearchCV, in the
    manifest's form."""
    X, y = blobs(30, 3, 24, separation=0.8, seed=1)
    spec = HEADS[name]
    # The grid given, as GRID= gives it: searched as it is (a head's own grid may move).
    fitted, params, info = head_search.search(spec, build_head(name), X, y, 3, 0, 1, grid=spec.grid)
    reference = _reference(name, X, y)
    ((key, values),) = spec.grid.items()
    expected = {
        f'{{"{key}": {v}}}': s
        for v, s in zip(values, reference.cv_results_["mean_test_score"], strict=True)
    }
    assert params == reference.best_params_
    assert info["scores"] == pytest.approx(expected, abs=1e-12)
    assert info["score"] == pytest.approx(reference.best_score_, abs=1e-12)
    assert info["folds"] == 3 and info["scheme"] == "3-fold" and info["refit_seconds"] > 0
    assert np.array_equal(fitted.predict(X), reference.best_estimator_.predict(X))


def test_k_beyond_a_training_fold_is_left_out_of_the_grid():
    X, y = blobs(4, 2, 6, separation=3.0, seed=2)  # 8 images: folds train on 5 or 6
    _, params, info = head_search.search(HEADS["knn"], build_head("knn"), X, y, 3, 0, 1)
    assert set(info["scores"]) == {'{"n_neighbors": 1}', '{"n_neighbors": 5}'}
    assert params["knn__n_neighbors"] in (1, 5)


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


def test_the_final_fits_convergence_warning_reaches_the_caller_with_parallel_folds():
    """The folds' fits warn in worker processes; the final fit, the saved head, warns here,
    where fit_heads records it in the manifest."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    X, y = blobs(20, 2, 10, separation=0.5, seed=11)
    pipe = build_head("svm").set_params(svm__max_iter=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        head_search.search(HEADS["svm"], pipe, X, y, 3, 0, 2)
    assert any(issubclass(w.category, ConvergenceWarning) for w in caught)


class Peaked(ClassifierMixin, BaseEstimator):
    """Right on a share of rows that peaks at C = ``peak`` (column 0 holds the label,
    column 1 a uniform draw): a search whose best C is known, without a real model."""

    def __init__(self, C=1.0, peak=100.0):
        self.C, self.peak = C, peak

    def fit(self, X, y):
        self.classes_ = np.unique(y)
        return self

    def predict(self, X):
        right = X[:, 1] < 1.0 - 0.1 * abs(np.log10(self.C) - np.log10(self.peak))
        return np.where(right, X[:, 0], 1 - X[:, 0]).astype(int)


def _peaked(peak, high=1e4):
    from sklearn.pipeline import Pipeline

    from pipeline.heads.registry import HeadSpec

    spec = HeadSpec(
        "peak", "test", lambda seed: Peaked(peak=peak), "none", {"C": (0.1, 1.0, 10.0)},
        extend={"C": (1e-4, high, 10.0)},
    )  # fmt: skip
    pipe = Pipeline([("norm", "passthrough"), ("pca", "passthrough"), ("peak", spec.estimator(0))])
    rng = np.random.default_rng(0)
    y = np.arange(600) % 2
    return spec, pipe, np.c_[y, rng.uniform(size=600)], y


def test_a_grid_whose_best_sits_at_its_edge_moves_until_the_best_is_inside():
    spec, pipe, X, y = _peaked(peak=100.0)
    fitted, params, info = head_search.search(spec, pipe, X, y, 3, 0, 1)
    assert params == {"peak__C": 100.0} and fitted.named_steps["peak"].C == 100.0
    assert info["grid_moves"] == {
        "C": {"from": [0.1, 1.0, 10.0], "searched": [0.1, 1.0, 10.0, 100.0, 1000.0],
              "direction": "up", "stopped": "inside"}
    }  # fmt: skip
    assert info["grid"] == {"C": [0.1, 1.0, 10.0, 100.0, 1000.0]} and len(info["scores"]) == 5
    assert info["score"] == max(info["scores"].values()) == info["scores"]['{"C": 100.0}']


@pytest.mark.parametrize(
    ("peak", "high", "stopped", "last"), [(1e8, 1e8, "limit", 1e4), (1e8, 1e3, "bound", 1e3)]
)
def test_a_grid_moves_at_most_three_steps_and_never_past_its_bound(peak, high, stopped, last):
    spec, pipe, X, y = _peaked(peak, high)
    _, params, info = head_search.search(spec, pipe, X, y, 3, 0, 1)
    move = info["grid_moves"]["C"]
    assert move["stopped"] == stopped and move["searched"][-1] == last == params["peak__C"]


def test_a_given_grid_does_not_move_and_a_flat_edge_moves_nothing():
    spec, pipe, X, y = _peaked(peak=100.0)
    _, params, info = head_search.search(spec, pipe, X, y, 3, 0, 1, grid={"C": (0.1, 1.0)})
    assert params == {"peak__C": 1.0} and info["grid_moves"] == {}
    spec, pipe, X, y = _peaked(peak=1.0)  # best inside: nothing moves
    _, params, info = head_search.search(spec, pipe, X, y, 3, 0, 1)
    assert params == {"peak__C": 1.0} and info["grid_moves"] == {} and len(info["scores"]) == 3


def test_a_search_counts_its_fits_as_they_finish_moved_grid_included():
    spec, pipe, X, y = _peaked(peak=100.0)

    class Count(head_search.Progress):
        planned_more, done = 0, 0

        def planned(self, fits):
            self.planned_more += fits

        def fitted(self):
            self.done += 1

    count = Count()
    head_search.search(spec, pipe, X, y, 3, 0, 1, progress=count)
    assert count.planned_more == 2 * 3 and count.done == 5 * 3 + 1  # 5 values, 3 folds, 1 refit


@pytest.mark.parametrize(("rise", "moved"), [(8e-6, False), (2e-3, True)])
def test_a_rise_smaller_than_an_image_does_not_move_the_grid(rise, moved):
    """Digits' svm scored C=100 8e-6 above C=10: an image traded between folds of unequal
    size, not a better C; a grid moves for a rise worth an image (1 / 1,000 rows here)."""
    values = {"C": [0.1, 1.0, 10.0]}
    scores = {'{"C": 0.1}': 0.86, '{"C": 1.0}': 0.93, '{"C": 10.0}': 0.93 + rise}
    grid_scored = []

    def score(points):
        grid_scored.append(points)
        return {'{"C": 100.0}': 0.5}

    spec = HEADS["svm"]
    moves = head_search._extend(
        spec, values, scores, score, (3, 666, 0.5 / 1000), head_search.Progress()
    )
    assert bool(moves) is moved and len(grid_scored) == int(moved)


def test_a_grid_that_stops_rising_at_its_new_edge_says_flat():
    values = {"C": [0.1, 1.0, 10.0]}
    scores = {'{"C": 0.1}': 0.86, '{"C": 1.0}': 0.93, '{"C": 10.0}': 0.957}
    moves = head_search._extend(
        HEADS["svm"], values, scores, lambda points: {'{"C": 100.0}': 0.957008},
        (3, 666, 0.5 / 1000), head_search.Progress(),
    )  # fmt: skip
    assert moves["C"]["stopped"] == "flat" and moves["C"]["searched"][-1] == 100.0


def test_a_parallel_search_counts_its_fits_and_scores_as_a_serial_one():
    X, y = blobs(30, 3, 24, separation=0.8, seed=1)
    counts = []
    for jobs in (1, 2):
        progress = _Counter()
        _, params, info = head_search.search(
            HEADS["svm"], build_head("svm"), X, y, 3, 0, jobs, grid={"C": (0.1, 1.0)},
            progress=progress,
        )  # fmt: skip
        counts.append((progress.count, params, info["scores"]))
    assert counts[0] == counts[1] and counts[0][0] == 2 * 3 + 1  # two values x three folds, refit


class _Counter(head_search.Progress):
    def __init__(self) -> None:
        self.count = 0

    def fitted(self) -> None:
        self.count += 1


@pytest.mark.parametrize("norm", ["l2", "standard"])
def test_knn_scores_every_k_from_one_query_per_fold_as_grid_search_does(norm, monkeypatch):
    from sklearn.neighbors import KNeighborsClassifier

    X, y = blobs(40, 4, 16, separation=0.5, seed=3)
    ks = (1, 2, 3, 7, 20, 60)
    pipe = build_head("knn", norm=norm)
    reference = GridSearchCV(
        pipe, {"knn__n_neighbors": list(ks)}, cv=StratifiedKFold(3, shuffle=True, random_state=0)
    ).fit(X, y)
    queries = []
    real = KNeighborsClassifier.kneighbors
    monkeypatch.setattr(
        KNeighborsClassifier,
        "kneighbors",
        lambda self, *a, **k: queries.append(1) or real(self, *a, **k),
    )
    fitted, params, info = head_search.search(
        HEADS["knn"], build_head("knn", norm=norm), X, y, 3, 0, 1, grid={"n_neighbors": ks}
    )
    expected = {
        f'{{"n_neighbors": {k}}}': s
        for k, s in zip(ks, reference.cv_results_["mean_test_score"], strict=True)
    }
    assert info["scores"] == pytest.approx(expected, abs=1e-12)
    assert params == reference.best_params_
    assert len(queries) == 3  # one per fold, whatever the number of k (the refit predicts nothing)


def test_knn_grid_that_moves_asks_no_fold_again(monkeypatch):
    from sklearn.neighbors import KNeighborsClassifier

    X, y = blobs(60, 2, 8, separation=0.3, seed=4)  # noisy: more neighbours score better
    calls = []
    real = KNeighborsClassifier.kneighbors
    monkeypatch.setattr(
        KNeighborsClassifier,
        "kneighbors",
        lambda self, *a, **k: calls.append(1) or real(self, *a, **k),
    )
    _, _, info = head_search.search(HEADS["knn"], build_head("knn"), X, y, 3, 0, 1)
    assert info["grid_moves"]["n_neighbors"]["direction"] == "up"
    assert len(calls) == 3


@pytest.mark.parametrize("norm", ["l2", "standard"])
def test_rbf_svm_scores_every_c_from_one_kernel_per_fold_as_grid_search_does(norm, monkeypatch):
    from pipeline.heads import kernels

    X, y = blobs(30, 4, 16, separation=0.6, seed=5)
    Cs = (0.1, 1.0, 10.0, 100.0)
    reference = GridSearchCV(
        build_head("rbf_svm", norm=norm),
        {"rbf_svm__C": list(Cs)},
        cv=StratifiedKFold(3, shuffle=True, random_state=0),
    ).fit(X, y)
    computed = []
    real = kernels.rbf_kernel
    monkeypatch.setattr(kernels, "rbf_kernel", lambda *a, **k: computed.append(1) or real(*a, **k))
    fitted, params, info = head_search.search(
        HEADS["rbf_svm"], build_head("rbf_svm", norm=norm), X, y, 3, 0, 1, grid={"C": Cs}
    )
    expected = {
        f'{{"C": {c}}}': s
        for c, s in zip(Cs, reference.cv_results_["mean_test_score"], strict=True)
    }
    assert info["scores"] == pytest.approx(expected, abs=1e-12)
    assert params == reference.best_params_
    assert len(computed) == 3 * 2  # per fold: its train kernel and its held-out rows', once
    assert fitted.named_steps["rbf_svm"].kernel == "rbf"  # the saved head is the usual SVC


def test_kernels_too_big_to_keep_leave_the_search_to_grid_search():
    from pipeline.heads.kernels import KernelPath

    pipe = build_head("rbf_svm")
    assert KernelPath.applies(pipe, {"C": [1.0]}, 3000, 3)  # 144 MB of kernels
    assert not KernelPath.applies(pipe, {"C": [1.0]}, 10_000, 3)  # 1.6 GB
    assert not KernelPath.applies(build_head("svm"), {"C": [1.0]}, 300, 3)


@pytest.mark.parametrize(
    ("name", "jobs", "rows", "classes", "expected"),
    [
        ("svm", 0, 1000, 10, -1),  # 10,000 images x classes: a one-core solver on every core
        ("rbf_svm", 0, 3000, 100, -1),
        ("svm", 0, 999, 10, 1),  # smaller: starting the workers would cost more
        ("logreg", 0, 3000, 100, 1),  # BLAS already uses the cores
        ("ridge", 0, 3000, 100, 1),
        ("svm", 1, 3000, 100, 1),  # JOBS= given: as given
        ("logreg", 2, 30, 2, 2),
        ("knn", -1, 30, 2, -1),
    ],
)
def test_jobs_zero_runs_only_big_searches_of_one_core_solvers_in_parallel(
    name, jobs, rows, classes, expected
):
    from pipeline.heads.registry import search_jobs

    y = np.arange(rows) % classes
    assert search_jobs(HEADS[name], jobs, y) == expected
