"""The scikit-learn heads' searches in a background process beside Keras (pipeline.head_workers)."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
from heads_helpers import blobs, synthetic_cache

from pipeline import head_workers
from pipeline.head_search import timed_search
from pipeline.heads import HEADS, _background_heads, build_head, fit_heads

SKLEARN_HEADS = ("svm", "rbf_svm", "logreg", "knn", "ridge")


def _same_search(a, b) -> None:
    assert a.params == b.params
    assert a.cv_info["scores"] == b.cv_info["scores"] and a.cv_info["score"] == b.cv_info["score"]
    X = np.random.default_rng(5).normal(size=(7, 12)).astype(np.float32)
    np.testing.assert_array_equal(a.fitted.predict(X), b.fitted.predict(X))


def test_a_background_search_is_the_search_here():
    X, y = blobs(15, 3, 12, separation=1.5, seed=4)
    searches = head_workers.BackgroundSearches(
        X, y, SKLEARN_HEADS, norm=None, pca=None, cv=3, seed=1
    )
    try:
        for name in searches.names:
            there = searches.result(name)
            assert there is not None, searches.failures
            here = timed_search(HEADS[name], build_head(name, seed=1), X, y, 3, 1, 1)
            _same_search(there, here)
            assert there.seconds > 0 and there.finished_at > 0
    finally:
        searches.close()


def test_this_process_takes_searches_from_the_back_while_the_worker_takes_the_front():
    X, y = blobs(15, 2, 12, separation=1.5)
    head_workers._worker().submit(time.sleep, 1.0)  # busy: only the first search is sent
    searches = head_workers.BackgroundSearches(
        X, y, SKLEARN_HEADS, norm=None, pca=None, cv=3, seed=0
    )
    try:
        taken = []
        while (name := searches.take_last()) is not None:
            taken.append(name)
        assert taken == ["ridge", "knn", "logreg", "rbf_svm"]  # none of them was sent
        assert searches.names == ("svm",)
        assert searches.result("svm") is not None
        with pytest.raises(KeyError, match="not sent"):
            searches.result("ridge")
    finally:
        searches.close()


def test_the_worker_takes_the_next_search_when_one_ends():
    X, y = blobs(15, 2, 12, separation=1.5)
    searches = head_workers.BackgroundSearches(
        X, y, SKLEARN_HEADS, norm=None, pca=None, cv=3, seed=0
    )
    try:
        results = [searches.result(name) for name in SKLEARN_HEADS]  # waits on each in turn
        assert all(r is not None for r in results) and searches.take_last() is None
        ends = [r.finished_at for r in results]
        assert ends == sorted(ends)  # one after another, in the order given
    finally:
        searches.close()


def test_a_dead_worker_is_reported_and_replaced():
    X, y = blobs(10, 2, 12, separation=1.5)
    worker = head_workers._worker()
    pid = worker.submit(os.getpid).result()
    worker.submit(time.sleep, 5.0)  # killed while it waits
    searches = head_workers.BackgroundSearches(X, y, ["svm"], norm=None, pca=None, cv=3, seed=0)
    os.kill(pid, signal.SIGKILL)
    try:
        assert searches.result("svm") is None
        assert "background process stopped" in searches.failures["svm"]
    finally:
        searches.close()
    again = head_workers.BackgroundSearches(X, y, ["svm"], norm=None, pca=None, cv=3, seed=0)
    try:
        assert again.result("svm") is not None  # a new worker
    finally:
        again.close()


def test_an_overlapped_sweep_saves_what_a_sweep_in_one_process_saves(tmp_path):
    cache = synthetic_cache(tmp_path, n_classes=3, width=12, separation=1.5, per_class=20)
    runs = {}
    for overlap in (True, False):
        results = fit_heads(
            cache, "svm,knn,softmax,ridge", artifacts_dir=tmp_path / str(overlap), overlap=overlap
        )
        assert [r.head for r in results] == ["svm", "knn", "softmax", "ridge"]
        assert results.fits_seconds > 0
        runs[overlap] = results
    assert runs[True].background == ("svm", "knn", "ridge") and runs[False].background == ()
    for there, here in zip(runs[True], runs[False], strict=True):
        for key in ("params", "metrics", "warnings", "n_train"):
            assert there.manifest[key] == here.manifest[key], key
        for key in ("score", "scores", "folds", "scheme"):
            assert there.manifest["cv"][key] == here.manifest["cv"][key], key
        assert there.manifest["searched_in_background"] == (there.head in runs[True].background)
        assert not here.manifest["searched_in_background"]


def test_which_heads_go_to_the_background():
    X = np.zeros((10, 4), np.float32)
    both = ("svm", "softmax", "knn")
    assert _background_heads(both, X, 1, True) == ("svm", "knn")
    assert _background_heads(both, X, 1, False) == ()
    assert _background_heads(both, X, 2, True) == ()  # the folds are spread already
    assert _background_heads(("svm", "knn"), X, 1, True) == ()  # no Keras to overlap with
    assert _background_heads(("softmax",), X, 1, True) == ()
    expected = ("svm", "knn") if head_workers.usable_cores() >= 2 else ()
    assert _background_heads(both, X, 1, None) == expected


def test_a_train_split_too_large_stays_here(monkeypatch):
    monkeypatch.setattr(head_workers, "OVERLAP_MAX_BYTES", 100)
    X = np.zeros((10, 4), np.float32)  # 160 bytes
    assert _background_heads(("svm", "softmax"), X, 1, None) == ()
    assert _background_heads(("svm", "softmax"), X, 1, True) == ("svm",)  # asked for


@pytest.fixture(autouse=True, scope="module")
def _stop_the_worker():
    yield
    head_workers.shut_down()


def test_closing_with_a_search_running_stops_the_worker_at_once(monkeypatch):
    """A sweep stopped by an error or Ctrl-C does not make the command wait for a search
    nobody will read: the worker is stopped, and the next sweep starts a new one."""
    X, y = blobs(10, 2, 12, separation=1.5)
    errors: list = []
    monkeypatch.setattr(threading, "excepthook", errors.append)  # loky's threads included
    worker = head_workers._worker()
    worker.submit(time.sleep, 30.0)  # stands for a long search
    searches = head_workers.BackgroundSearches(X, y, ["svm"], norm=None, pca=None, cv=3, seed=0)
    started = time.monotonic()
    searches.close()
    head_workers.shut_down()
    assert time.monotonic() - started < 10  # not the 30 s the running task would take
    manager = getattr(worker, "_executor_manager_thread", None)
    if manager is not None:  # what loky does with the calls it still held
        manager.join(timeout=10)
    assert errors == []  # no traceback on stderr
    again = head_workers.BackgroundSearches(X, y, ["svm"], norm=None, pca=None, cv=3, seed=0)
    try:
        assert again.result("svm") is not None
    finally:
        again.close()


def test_a_background_process_that_cannot_start_leaves_every_search_here(tmp_path, monkeypatch):
    def cannot_start(*args, **kwargs):
        raise OSError("no usable /dev/shm")

    monkeypatch.setattr(head_workers, "BackgroundSearches", cannot_start)
    cache = synthetic_cache(tmp_path, n_classes=2, width=12, per_class=15)
    lines: list[str] = []
    results = fit_heads(
        cache, "svm,softmax", artifacts_dir=tmp_path / "a", overlap=True, log=lines.append
    )
    assert results.background == () and [r.head for r in results] == ["svm", "softmax"]
    assert any("no background process (OSError: no usable /dev/shm)" in line for line in lines)
