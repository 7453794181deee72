"""Small Keras layers that saved models carry, registered so they load by name.

:class:`ImagePreprocessing` puts a backbone's ImageNet preprocessing inside a
model, so a saved fine-tuned model takes plain RGB images with values 0..255
and nobody has to remember means or channel order. It is registered with
``keras.saving.register_keras_serializable``, so ``keras.saving.load_model``
reads it with the default ``safe_mode=True`` once this module is imported
(``pipeline.finetuning.run.load_finetuned`` does that for you).

This module imports Keras at import time; the rest of the package imports it
lazily.
"""

from __future__ import annotations

import keras
import numpy as np

from pipeline.core.errors import BackboneError
from pipeline.features.preprocessing import MODES, normalise


@keras.saving.register_keras_serializable(package="pipeline")
class ImagePreprocessing(keras.layers.Layer):
    """Keras ImageNet preprocessing as a layer (no weights).

    The arithmetic of :func:`pipeline.features.preprocessing.normalise`, which the
    image reader applies to NumPy batches: ``caffe`` (RGB to BGR, minus the BGR means), ``tf`` (scale
    to [-1, 1]), ``torch`` (scale to [0, 1], ImageNet mean and std) or
    ``none`` (identity: the backbone rescales inside itself).

    Parameters
    ----------
    mode : str
        One of ``"caffe"``, ``"tf"``, ``"torch"``, ``"none"``.
    """

    def __init__(self, mode: str, **kwargs) -> None:
        super().__init__(**kwargs)
        if mode not in MODES:
            raise BackboneError(
                f"unknown preprocessing mode {mode!r}; expected one of {', '.join(MODES)}"
            )
        self.mode = mode
        self.supports_masking = True

    def call(self, inputs):
        dtype = self.compute_dtype
        return normalise(
            keras.ops.cast(inputs, dtype),
            self.mode,
            flip=lambda x, axis: keras.ops.flip(x, axis=axis),
            constant=lambda values: keras.ops.convert_to_tensor(
                np.asarray(values, dtype=np.float32), dtype=dtype
            ),
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "mode": self.mode}
