"""The learning-rate grid as one Keras model: its loss, its start, its export."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.softmax import build_softmax_head
from pipeline.softmax_grid import export_head, grid_loss, grid_model


@pytest.mark.parametrize("sigmoid", [False, True])
def test_the_grid_loss_is_the_sum_of_each_heads_keras_cross_entropy(sigmoid):
    import keras

    rng = np.random.default_rng(0)
    units = 1 if sigmoid else 3
    logits = rng.normal(0, 3, size=(16, 2, units)).astype("float32")
    if sigmoid:
        y = rng.integers(0, 2, size=(16, 1)).astype("float32")
        per_head = [
            keras.losses.binary_crossentropy(y, logits[:, g], from_logits=True) for g in range(2)
        ]
    else:
        y = rng.integers(0, 3, size=16)
        per_head = [
            keras.losses.sparse_categorical_crossentropy(y, logits[:, g], from_logits=True)
            for g in range(2)
        ]
    expected = np.asarray(per_head[0]) + np.asarray(per_head[1])
    got = np.asarray(grid_loss(sigmoid)(y, logits))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_every_grid_head_starts_as_the_fresh_head_and_exports_back_into_it():
    from keras import ops

    fresh = build_softmax_head(6, 3)
    grid = grid_model(fresh, [1.0, 1 / 3, 1 / 10])
    X = np.random.default_rng(1).normal(size=(5, 6)).astype("float32")
    expected = np.asarray(fresh(X, training=False))
    logits = grid(X, training=False)
    for g in range(3):
        proba = np.asarray(ops.softmax(logits[:, g], axis=-1))
        np.testing.assert_allclose(proba, expected, atol=1e-6)  # scale * (w / scale) = w
    other = build_softmax_head(6, 3)
    export_head(grid, 2, None, other)
    np.testing.assert_allclose(np.asarray(other(X, training=False)), expected, atol=1e-6)


@pytest.mark.parametrize("sigmoid", [False, True])
def test_head_proba_is_the_keras_heads_inference(sigmoid):
    """The held-out evaluation's NumPy forward pass equals the Keras head's (no dropout)."""
    from pipeline.softmax import two_columns
    from pipeline.softmax_grid import head_proba

    head = build_softmax_head(6, 2 if sigmoid else 3, sigmoid=sigmoid)
    rng = np.random.default_rng(2)
    for layer in ("head_dense", "head_output"):  # non-zero biases, so every term counts
        kernel, bias = head.get_layer(layer).get_weights()
        head.get_layer(layer).set_weights([kernel, rng.normal(size=bias.shape).astype("float32")])
    X = rng.normal(size=(7, 6)).astype("float32")
    weights = [
        w for name in ("head_dense", "head_output") for w in head.get_layer(name).get_weights()
    ]
    expected = two_columns(np.asarray(head(X, training=False)))
    np.testing.assert_allclose(head_proba(weights, X, sigmoid), expected, atol=1e-6)
