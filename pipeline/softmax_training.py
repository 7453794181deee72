"""How the softmax head trains, shared by a single fit and the learning-rate grid.

:func:`train_epochs` runs Keras's own training step (``Model.train_on_batch``) on
seeded full mini-batches; :class:`Patience` is Keras's early-stopping rule on the
held-out loss; :func:`cross_entropy` and :func:`two_columns` compute that loss from
probabilities. :mod:`pipeline.softmax` (one fit) and :mod:`pipeline.softmax_grid`
(the grid) both build on them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import keras


def two_columns(proba: Any) -> np.ndarray:
    """Probabilities as ``(n, k)`` float64; a sigmoid's ``(n, 1)`` P(class 1) -> ``[1 - p, p]``.

    Any other shape is returned as is (as float64), so callers need not check first.
    """
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] == 1:
        return np.hstack([1.0 - p, p])
    return p


def cross_entropy(proba: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-probability of the true classes."""
    return float(-np.mean(np.log(np.clip(proba[np.arange(len(y)), y], 1e-12, 1.0))))


class Patience:
    """Keras's ``EarlyStopping(min_delta=1e-6)`` rule on a loss, for one model or one grid head.

    :meth:`improved` takes each epoch's held-out loss; ``done`` turns true once
    ``patience`` epochs have passed without a loss lower than the best by more than
    ``1e-6`` (``best_epoch`` is the epoch whose weights a restore keeps). One difference:
    a NaN loss never counts as the best (Keras takes the first epoch's, NaN or not).
    """

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best_loss, self.best_epoch, self.done = np.inf, 0, False

    def improved(self, loss: float, epoch: int) -> bool:
        if loss < self.best_loss - 1e-6:
            self.best_loss, self.best_epoch = loss, epoch
            return True
        if epoch - self.best_epoch >= self.patience:
            self.done = True
        return False


def train_epochs(
    model: keras.Model,
    X: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int,
    max_epochs: int,
    seed: int,
    end_epoch: Callable[[int], bool],
) -> list[float]:
    """Train a compiled ``model`` on full mini-batches, reshuffled each epoch from ``seed``.

    ``end_epoch(epoch)`` runs after every epoch and returns True to stop. Returns the
    mean training loss of each epoch. One ``train_on_batch`` per step: Keras's
    ``fit`` would feed the batches through an input pipeline (on TensorFlow,
    ``tf.data`` calling back into Python for every batch), which cost about 7 ms
    per step against under 3 for the step itself on this head (2-core CPU). Batches
    are full, so the training step has one shape and is traced once.
    """
    size = min(batch_size, len(X))
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    for epoch in range(max_epochs):
        order = rng.permutation(len(X))
        batch_losses = [
            model.train_on_batch(X[rows], y[rows], return_dict=True)["loss"]
            for rows in (order[i : i + size] for i in range(0, len(X) - size + 1, size))
        ]
        losses.append(float(np.mean(batch_losses)))
        if end_epoch(epoch):
            break
    return losses
