"""The softmax head: its Keras model and SoftmaxClassifier, the estimator around it."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from heads_helpers import blobs
from sklearn.base import clone
from sklearn.utils.estimator_checks import parametrize_with_checks

from pipeline.heads.softmax import HEAD_LAYERS, SoftmaxClassifier, build_softmax_head


def test_the_head_keeps_its_layer_names():
    model = build_softmax_head(16, 3)
    assert [layer.name for layer in model.layers[1:]] == list(HEAD_LAYERS)
    assert model.output_shape == (None, 3)
    with pytest.raises(ValueError, match="exactly two classes"):
        build_softmax_head(16, 3, sigmoid=True)


def test_sigmoid_option_and_parameter_errors():
    X, y = blobs(30, 2, 6, separation=3.0)
    clf = SoftmaxClassifier(sigmoid=True, max_epochs=40).fit(X, y)
    assert clf.model_.output_shape == (None, 1)
    proba = clf.predict_proba(X)
    assert proba.shape == (60, 2) and np.allclose(proba.sum(axis=1), 1)
    assert clf.score(X, y) >= 0.9
    assert [layer.name for layer in clf.model_.layers[1:]] == list(HEAD_LAYERS)
    with pytest.raises(ValueError, match="'sigmoid' parameter .* needs exactly two classes"):
        SoftmaxClassifier(sigmoid=True).fit(*blobs(5, 3, 4, separation=1.0))
    with pytest.raises(ValueError, match="'learning_rate' parameter of SoftmaxClassifier must be"):
        SoftmaxClassifier(learning_rate=-1.0).fit(X, y)
    with pytest.raises(ValueError, match="'batch_size' parameter .* Got 0 instead"):
        SoftmaxClassifier(batch_size=0).fit(X, y)


@pytest.fixture(scope="module")
def early_stopped():
    """Labels unrelated to the features: the held-out loss rises soon, so training stops early."""
    X, y = blobs(40, 3, 8, separation=0.0, seed=5)
    clf = SoftmaxClassifier(max_epochs=60, patience=3, learning_rate=3e-2, random_state=1)
    return X, y, clf.fit(X, y)


def test_early_stopping_keeps_the_best_epoch(early_stopped):
    X, y, clf = early_stopped
    history = clf.history_
    ran = len(history["loss"])
    assert len(history["val_loss"]) == ran < 60  # stopped early ...
    assert ran == clf.n_epochs_ + 3  # ... patience epochs after the best one
    assert clf.n_epochs_ == int(np.argmin(history["val_loss"])) + 1
    # The kept weights are the best epoch's: their held-out loss is the smallest logged.
    _, encoded = np.unique(y, return_inverse=True)
    _, _, X_held, y_held = clf._hold_out(X.astype(np.float32), encoded.astype(np.int64))
    proba = clf.predict_proba(X_held)
    held_loss = -np.mean(np.log(proba[np.arange(len(y_held)), y_held]))
    assert held_loss == pytest.approx(min(history["val_loss"]), rel=1e-4)


def test_a_fit_is_repeatable_for_a_seed(early_stopped):
    X, y, clf = early_stopped
    again = clone(clf).fit(X, y)
    assert again.history_ == clf.history_ and again.n_epochs_ == clf.n_epochs_
    assert np.array_equal(again.predict_proba(X), clf.predict_proba(X))


def test_the_held_out_score_is_the_kept_weights_accuracy_on_the_hold_out(early_stopped):
    X, y, clf = early_stopped
    _, encoded = np.unique(y, return_inverse=True)
    _, _, X_held, y_held = clf._hold_out(X.astype(np.float32), encoded.astype(np.int64))
    assert clf.n_held_out_ == len(y_held) == 18
    assert clf.held_out_score_ == np.mean(clf.predict(X_held) == clf.classes_[y_held])


def test_without_a_hold_out_it_trains_every_epoch():
    X, y = blobs(10, 2, 4, separation=3.0)
    clf = SoftmaxClassifier(max_epochs=4, validation_fraction=0.0).fit(X, y)
    assert clf.n_epochs_ == 4 and len(clf.history_["loss"]) == 4 and clf.history_["val_loss"] == []
    assert clf.n_held_out_ == 0 and clf.held_out_score_ is None


def test_pickling_keeps_the_keras_model(early_stopped):
    X, _, clf = early_stopped
    copy = pickle.loads(pickle.dumps(clf))
    assert copy is not clf and copy.model_ is not clf.model_
    assert np.allclose(copy.predict_proba(X), clf.predict_proba(X), atol=1e-6)
    assert copy.get_params() == clf.get_params()


# The checks that fit many times cost several seconds each with Keras; run them with
# FULL_ESTIMATOR_CHECKS=1 (all pass with this configuration).
_SLOW_CHECKS = {
    "check_fit_score_takes_y",
    "check_estimators_dtypes",
    "check_classifiers_classes",
    "check_classifiers_train",
    "check_fit_idempotent",
    "check_supervised_y_2d",
    "check_pipeline_consistency",
    "check_fit2d_1feature",
    "check_estimators_nan_inf",
    "check_fit_check_is_fitted",
    "check_n_features_in",
    "check_methods_subset_invariance",
    "check_classifier_data_not_an_array",
    "check_f_contiguous_array_estimator",
}


@parametrize_with_checks([SoftmaxClassifier(max_epochs=10, patience=3)])
def test_estimator_contract(estimator, check):
    name = getattr(check, "func", check).__name__
    if name in _SLOW_CHECKS and not os.environ.get("FULL_ESTIMATOR_CHECKS"):
        pytest.skip("slow with Keras; set FULL_ESTIMATOR_CHECKS=1")
    check(estimator)
