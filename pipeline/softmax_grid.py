"""The softmax head's learning-rate grid trained as one Keras model
(:meth:`pipeline.softmax.SoftmaxClassifier.fit_grid`).

One head per learning rate sits beside the others on one input. Each head's dense
weights are ``scale * variable`` (:func:`_scaled_dense_class`): Adam's step does not
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
    reparametrised as ``scale * variable``.

    Every copy starts as ``fresh`` starts a single fit: the same weights and the same
    dropout seed, so on the same batches each copy follows the fit of its learning rate
    (the same masks; only rounding differs where the scale is not 1).
    """
    import keras

    scaled = _scaled_dense_class()
    inputs = keras.Input(shape=fresh.input_shape[1:], name="features")
    dense, output = fresh.get_layer("head_dense"), fresh.get_layer("head_output")
    dropout = fresh.get_layer("head_dropout")
    # The head's input is one feature vector per image: its Flatten is the identity there,
    # and each layer less is one less to trace.
    flat = inputs if len(inputs.shape) == 2 else keras.layers.Flatten()(inputs)
    outputs = []
    for g, scale in enumerate(scales):
        hidden = scaled(dense.units, "relu", scale, name=f"head_dense_{g}")
        drop = keras.layers.Dropout(dropout.rate, name=f"head_dropout_{g}")
        out = scaled(output.units, None, scale, name=f"head_output_{g}")  # logits
        outputs.append(out(drop(hidden(flat))))
        for layer, source in ((hidden, dense), (out, output)):
            layer.kernel.assign(np.asarray(source.kernel) / scale)
            layer.bias.assign(np.asarray(source.bias) / scale)
        for target, source in zip(drop.variables, dropout.variables, strict=True):
            target.assign(source)  # the dropout seed's state
    # One stacked output (n, heads, units) of logits and one loss: Keras then keeps one loss
    # tracker, and tracing the training step costs about half what one output per head costs.
    return keras.Model(inputs, keras.ops.stack(outputs, axis=1), name="softmax_grid")


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
def _scaled_dense_class() -> type:
    import keras

    class ScaledDense(keras.layers.Layer):
        """``activation(x @ (scale * kernel) + scale * bias)``: Adam moves this layer's
        effective weights ``scale`` times as fast (its step ignores the gradient's scale)."""

        def __init__(self, units: int, activation: Any, scale: float, **kwargs: Any) -> None:
            super().__init__(dtype="float32", **kwargs)
            self.units, self.scale = int(units), float(scale)
            self.activation = keras.activations.get(activation)

        def build(self, input_shape: tuple) -> None:
            self.kernel = self.add_weight(shape=(input_shape[-1], self.units), name="kernel")
            self.bias = self.add_weight(shape=(self.units,), name="bias", initializer="zeros")

        def call(self, x: Any) -> Any:
            return self.activation(
                keras.ops.matmul(x, self.kernel * self.scale) + self.bias * self.scale
            )

        def compute_output_shape(self, input_shape: tuple) -> tuple:
            # Given, Keras need not trace ``call`` in a scratch graph to learn it when the
            # grid model is built (about 10 ms a layer on TensorFlow).
            return (*input_shape[:-1], self.units)

    return ScaledDense


def _grid_weights(grid: keras.Model, g: int) -> list[np.ndarray]:
    """Head ``g``'s effective weights: dense kernel, bias, output kernel, bias."""
    weights = []
    for name in (f"head_dense_{g}", f"head_output_{g}"):
        layer = grid.get_layer(name)
        weights += [np.asarray(layer.kernel) * layer.scale, np.asarray(layer.bias) * layer.scale]
    return weights


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
