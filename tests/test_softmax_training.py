"""How the softmax head trains: Keras's early-stopping rule, and the seeded epochs."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.heads.softmax import (
    Patience,
    build_softmax_head,
    cross_entropy,
    train_epochs,
    two_columns,
)


def _keras_stop(losses: list[float], patience: int, model) -> tuple[int, int]:
    """(epochs run, best epoch) under keras.callbacks.EarlyStopping itself."""
    import keras

    callback = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=patience, min_delta=1e-6, restore_best_weights=False
    )
    model.stop_training = False  # what Model.fit sets before the callbacks run
    callback.set_model(model)
    callback.on_train_begin()
    for epoch, loss in enumerate(losses):
        callback.on_epoch_end(epoch, {"val_loss": loss})
        if callback.model.stop_training:
            return epoch + 1, callback.best_epoch
    return len(losses), callback.best_epoch


def _ours(losses: list[float], patience: int) -> tuple[int, int]:
    stop = Patience(patience)
    for epoch, loss in enumerate(losses):
        stop.improved(loss, epoch)
        if stop.done:
            return epoch + 1, stop.best_epoch
    return len(losses), stop.best_epoch


@pytest.mark.parametrize("patience", [1, 3, 5])
def test_patience_stops_where_keras_early_stopping_stops(patience):
    """Random held-out losses, ties and plateaus included: the same stop and best epoch."""
    rng, model = np.random.default_rng(patience), build_softmax_head(2, 2)
    for _ in range(200):
        losses = np.round(rng.uniform(0.1, 1.0, size=12), 1).tolist()  # rounded: ties happen
        assert _ours(losses, patience) == _keras_stop(losses, patience, model), losses


def test_train_epochs_stops_when_asked_and_returns_one_loss_per_epoch():
    import keras

    head = build_softmax_head(4, 2)
    head.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    X = np.random.default_rng(0).normal(size=(40, 4)).astype("float32")
    y = (X[:, 0] > 0).astype(int)
    seen: list[int] = []
    losses = train_epochs(
        head,
        X,
        y,
        batch_size=16,
        max_epochs=10,
        seed=0,
        end_epoch=lambda e: seen.append(e) or e == 3,
    )
    assert seen == [0, 1, 2, 3] and len(losses) == 4 and all(np.isfinite(losses))


def test_the_held_out_loss_of_a_sigmoid_is_the_two_column_loss():
    p = np.array([[0.9], [0.2]])
    assert two_columns(p).tolist() == [[pytest.approx(0.1), 0.9], [0.8, 0.2]]
    assert cross_entropy(two_columns(p), np.array([1, 0])) == pytest.approx(
        -np.mean(np.log([0.9, 0.8]))
    )
