"""Runs that own their outputs and processes: concurrent head writes, kills, leftovers."""

from __future__ import annotations

import threading

import joblib
import numpy as np
from heads_helpers import BASE_ATTRS, blobs

from pipeline.core import artifacts
from pipeline.heads.registry import build_head
from pipeline.heads.store import load_head, save_head

CLASSES = ("a", "b", "c")


def _logreg(run: str, seed: int):
    """A fitted logreg head and its manifest, both marked with ``run``."""
    X, y = blobs(10, len(CLASSES), 8, separation=3.0, seed=seed)
    pipe = build_head("logreg").fit(X, y)
    manifest = artifacts.new_manifest(
        "head",
        name="logreg",
        dataset="synthetic",
        class_names=CLASSES,
        features=artifacts.feature_identity(BASE_ATTRS),
        fingerprint="f" * 64,
        feature_width=8,
        run=run,
    )
    return pipe, manifest


def test_two_runs_saving_one_head_at_once_leave_one_runs_files(tmp_path, monkeypatch):
    """Run A is held after writing its model until run B has saved (or for 0.5 s, while B waits
    for A's lock); the manifest left must describe the model file beside it."""
    heads = {run: _logreg(run, seed) for run, seed in (("A", 0), ("B", 1))}
    a_paused, b_done = threading.Event(), threading.Event()
    dump = joblib.dump

    def slow_dump(value, filename, *args, **kwargs):  # the .joblib export, after the model
        if threading.current_thread().name == "A":
            a_paused.set()
            b_done.wait(timeout=0.5)
        return dump(value, filename, *args, **kwargs)

    monkeypatch.setattr(joblib, "dump", slow_dump)

    def save(run: str) -> None:
        save_head(*heads[run], tmp_path)
        if run == "B":
            b_done.set()

    a = threading.Thread(target=save, args=("A",), name="A")
    a.start()
    assert a_paused.wait(timeout=30)
    b = threading.Thread(target=save, args=("B",), name="B")
    b.start()
    a.join(timeout=60)
    b.join(timeout=60)

    head = load_head(tmp_path / "logreg.json")  # checksums pass either way
    run = head.manifest["run"]
    coef = head.estimator.steps[-1][1].coef_
    np.testing.assert_array_equal(coef, heads[run][0].steps[-1][1].coef_)
