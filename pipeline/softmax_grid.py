"""The softmax head's learning-rate grid trained as one Keras model
(:meth:`pipeline.softmax.SoftmaxClassifier.fit_grid`).

One head per learning rate sits beside the others on one input. Each head's dense
weights are ``scale * variable`` (:func:`_grid_heads_class`): Adam's step does not
depend on the gradient's scale, so with ``scale = rate / max(rates)`` and the
optimizer at ``max(rates)`` that head moves at its own rate. Every head starts from
the weights and dropout seed of the single fit it stands for; the loss is the sum of
the heads' cross-entropies from their logits (:func:`grid_loss`), so each head's
gradient is its own; early stopping runs per head (:class:`GridStopping`); the kept
head is exported into the standard ``softmax_head`` (:func:`export_head`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.special import expit

from pipeline.softmax_training import Patience, cross_entropy, two_columns

if TYPE_CHECKING:
    import keras


def grid_model(fresh: keras.Model, scales: Sequence[float]) -> keras.Model:
    """``len(scales)`` copies of ``fresh`` side by side on one input, each with its weights
    reparametrised as ``scale * variable`` (:func:`_grid_heads_class`).

    Every copy starts as ``fresh`` starts a single fit: the same weights and the same
    dropout seed, so on the same batches each copy follows the fit of its learning rate
    (the same masks; only rounding differs where the scale is not 1).
    """
    import keras

    dense, output = fresh.get_layer("head_dense"), fresh.get_layer("head_output")
    dropout = fresh.get_layer("head_dropout")
    inputs = keras.Input(shape=fresh.input_shape[1:], name="features")
    # The head's input is one feature vector per image: its Flatten is the identity there.
    flat = inputs if len(inputs.shape) == 2 else keras.layers.Flatten()(inputs)
    heads = _grid_heads_class()(dense.units, output.units, scales, dropout.rate, name="heads")
    logits = heads(flat)
    h, k = dense.units, output.units
    kernel, bias = np.asarray(dense.kernel), np.asarray(dense.bias)
    out_kernel, out_bias = np.asarray(output.kernel), np.asarray(output.bias)
    blocks = np.zeros(tuple(heads.out_kernel.shape), np.float32)  # zero off the diagonal blocks
    for g, scale in enumerate(scales):
        blocks[g * h : (g + 1) * h, g * k : (g + 1) * k] = out_kernel / scale
    heads.kernel.assign(np.concatenate([kernel / scale for scale in scales], axis=1))
    heads.bias.assign(np.concatenate([bias / scale for scale in scales]))
    heads.out_kernel.assign(blocks)
    heads.out_bias.assign(np.concatenate([out_bias / scale for scale in scales]))
    for target, source in zip(heads.dropout.variables, dropout.variables, strict=True):
        target.assign(source)  # the dropout seed's state
    return keras.Model(inputs, logits, name="softmax_grid")


def grid_loss(sigmoid: bool) -> Callable[[Any, Any], Any]:
    """The heads' cross-entropies from their logits, summed: each head's gradient is its own.

    From logits, as Keras computes its own cross-entropies after a softmax or sigmoid
    layer on TensorFlow (no clipping of the probabilities).
    """
    from keras import ops

    def grid_loss(y_true: Any, y_pred: Any) -> Any:
        # Shapes fixed here, whatever ranks Keras's loss wrapper passes (it squeezes a
        # trailing 1, so a sigmoid grid's (n, heads, 1) may come as (n, heads)).
        if sigmoid:  # per head, the logit of class 1; y_true n values of 0.0 / 1.0
            z = ops.reshape(y_pred, (ops.shape(y_pred)[0], -1))
            t = ops.reshape(ops.cast(y_true, z.dtype), (-1, 1))
            # -(t log s(z) + (1 - t) log(1 - s(z))), written stably
            per_head = ops.maximum(z, 0.0) - z * t + ops.log1p(ops.exp(-ops.abs(z)))
        else:  # y_pred (n, heads, k) logits, y_true n class indices
            labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
            t = ops.expand_dims(ops.one_hot(labels, ops.shape(y_pred)[-1], dtype=y_pred.dtype), 1)
            per_head = -ops.sum(t * ops.log_softmax(y_pred, axis=-1), axis=-1)
        return ops.sum(per_head, axis=-1)

    return grid_loss


@functools.cache
def _grid_heads_class() -> type:
    import keras
    from keras import ops

    class GridHeads(keras.layers.Layer):
        """The grid's heads as one layer: ``(n, width)`` features -> ``(n, heads, units)``
        logits, head ``g``'s weights ``scales[g] * variable``.

        Four variables whatever the number of heads: the hidden layers' kernels side by
        side in one, their biases in another, the output kernels as the diagonal blocks of
        one block-diagonal matrix (its other entries start at zero and their gradient is
        masked to zero, so they stay zero), the output biases in a fourth. Adam's update
        costs ops per variable, so tracing the training step of two heads costs about what
        one head's costs, and a step stays as cheap as the heads as separate layers. One
        dropout mask of ``(n, 1, hidden)`` serves every head: a single fit draws the same
        ``(n, hidden)`` mask from the same seed.
        """

        def __init__(
            self, hidden: int, units: int, scales: Sequence[float], rate: float, **kwargs: Any
        ) -> None:
            super().__init__(dtype="float32", **kwargs)
            self.hidden, self.units = int(hidden), int(units)
            self.scales = [float(scale) for scale in scales]
            self.dropout = keras.layers.Dropout(rate, noise_shape=(None, 1, self.hidden))
            per_head = np.asarray(self.scales, np.float32)
            self._hidden_scale = np.repeat(per_head, self.hidden)
            self._units_scale = np.repeat(per_head, self.units)
            mask = np.kron(np.eye(len(per_head), dtype=np.float32), np.ones((hidden, units)))
            self._block_scale = (mask * self._units_scale).astype(np.float32)

        def build(self, input_shape: tuple) -> None:
            width, g = int(input_shape[-1]), len(self.scales)
            gh, gk = g * self.hidden, g * self.units
            self.kernel = self.add_weight(shape=(width, gh), name="kernel")
            self.bias = self.add_weight(shape=(gh,), name="bias", initializer="zeros")
            self.out_kernel = self.add_weight(shape=(gh, gk), name="out_kernel")
            self.out_bias = self.add_weight(shape=(gk,), name="out_bias", initializer="zeros")
            self.dropout.build((None, g, self.hidden))

        def call(self, x: Any, training: Any = None) -> Any:
            g, h, k = len(self.scales), self.hidden, self.units
            z = ops.matmul(x, self.kernel * self._hidden_scale) + self.bias * self._hidden_scale
            hidden = self.dropout(ops.reshape(ops.relu(z), (-1, g, h)), training=training)
            logits = ops.matmul(
                ops.reshape(hidden, (-1, g * h)), self.out_kernel * self._block_scale
            )
            return ops.reshape(logits + self.out_bias * self._units_scale, (-1, g, k))

        def compute_output_shape(self, input_shape: tuple) -> tuple:
            # Given, Keras need not trace ``call`` in a scratch graph to learn it.
            return (input_shape[0], len(self.scales), self.units)

    return GridHeads


def _grid_weights(grid: keras.Model, g: int) -> list[np.ndarray]:
    """Head ``g``'s effective weights: dense kernel, bias, output kernel, bias."""
    heads = grid.get_layer("heads")
    h, k, scale = heads.hidden, heads.units, heads.scales[g]
    hidden, units = slice(g * h, (g + 1) * h), slice(g * k, (g + 1) * k)
    return [
        np.asarray(heads.kernel)[:, hidden] * scale,
        np.asarray(heads.bias)[hidden] * scale,
        np.asarray(heads.out_kernel)[hidden, units] * scale,
        np.asarray(heads.out_bias)[units] * scale,
    ]


def export_head(
    grid: keras.Model, g: int, weights: list[np.ndarray] | None, head: keras.Model
) -> None:
    """Head ``g`` of a grid model (its kept weights, else its last) into a standard head."""
    kernel, bias, out_kernel, out_bias = weights if weights is not None else _grid_weights(grid, g)
    head.get_layer("head_dense").set_weights([kernel, bias])
    head.get_layer("head_output").set_weights([out_kernel, out_bias])


class GridStopping:
    """Early stopping per head of a grid model, on one forward pass of the held-out data.

    Each head follows :class:`pipeline.softmax_training.Patience` on its held-out loss and keeps
    the weights of its lowest one (as ``EarlyStopping(restore_best_weights=True)`` does
    for one model); :meth:`end_epoch` says stop once every head is out of patience.
    """

    def __init__(self, X_held: Any, y_held: Any, n_heads: int, patience: int, sigmoid: bool):
        self.X_held, self.y_held, self.sigmoid = X_held, y_held, sigmoid
        self.heads = [Patience(patience) for _ in range(n_heads)]
        self.best_weights: list[Any] = [None] * n_heads
        self.best_accuracy = [0.0] * n_heads
        self.history: list[list[float]] = [[] for _ in range(n_heads)]

    @property
    def best_loss(self) -> list[float]:
        return [head.best_loss for head in self.heads]

    @property
    def best_epoch(self) -> list[int]:
        return [head.best_epoch for head in self.heads]

    def end_epoch(self, grid: keras.Model, epoch: int) -> bool:
        for g, head in enumerate(self.heads):
            if head.done:  # its result is fixed; it trains on only beside the others
                continue
            weights = _grid_weights(grid, g)
            proba = head_proba(weights, self.X_held, self.sigmoid)
            loss = cross_entropy(proba, self.y_held)
            self.history[g].append(loss)
            if head.improved(loss, epoch):
                self.best_weights[g] = weights
                self.best_accuracy[g] = float(np.mean(np.argmax(proba, 1) == self.y_held))
        return all(head.done for head in self.heads)


def head_proba(weights: Sequence[np.ndarray], X: np.ndarray, sigmoid: bool) -> np.ndarray:
    """``(n, k)`` probabilities of the softmax head with these effective weights (dense
    kernel, bias, output kernel, bias), as the head infers them (no dropout), in NumPy.

    A forward call of the grid model per epoch cost about 15 ms on 2 cores, the held-out
    evaluation's whole cost; this is well under 1 ms. ``tests/test_softmax_grid.py``
    checks it against the Keras head.
    """
    kernel, bias, out_kernel, out_bias = weights
    hidden = np.maximum(X @ kernel + bias, 0.0)
    z = (hidden @ out_kernel + out_bias).astype(np.float64)
    if sigmoid:
        return two_columns(expit(z))
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
