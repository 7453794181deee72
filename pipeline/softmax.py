"""The seed documents' softmax head, shared by stage two and stage three.

``Flatten -> Dense(64, relu) -> Dropout(0.25) -> Dense(k, softmax)`` (a single
sigmoid unit for two classes when asked), as in seed ``000_3437c29d2f3bb78b``.
Stage two fits it on cached features; stage three puts the same head on top of
the backbone and starts from the stage-two weights, so the layer names here
are a contract: do not rename them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras

HEAD_LAYERS = ("head_flatten", "head_dense", "head_dropout", "head_output")


def build_softmax_head(
    width: int, n_classes: int, *, hidden: int = 64, dropout: float = 0.25, sigmoid: bool = False
) -> keras.Model:
    """A Keras model mapping a ``(width,)`` feature vector to class probabilities.

    With ``sigmoid=True`` (two classes only) the output is one unit, the
    probability of class 1.
    """
    import keras

    if sigmoid and n_classes != 2:
        raise ValueError(f"a sigmoid head needs exactly two classes; got {n_classes}")
    inputs = keras.Input(shape=(width,), name="features")
    x = keras.layers.Flatten(name="head_flatten")(inputs)
    x = keras.layers.Dense(hidden, activation="relu", name="head_dense")(x)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    units, activation = (1, "sigmoid") if sigmoid else (n_classes, "softmax")
    # float32 output even under a mixed-precision policy: stable losses and probabilities.
    outputs = keras.layers.Dense(units, activation=activation, dtype="float32", name="head_output")(
        x
    )
    return keras.Model(inputs, outputs, name="softmax_head")
