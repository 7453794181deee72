"""Phase two's validation and the final predictions, at the cut: the frozen part runs once.

The layers before the cut do not train and run in inference mode, so their
output for an unaugmented image is the same every epoch. Validating the whole
network on the images every epoch, and predicting the val and test images
once more at the end, ran them again each time. :class:`CutEvaluation` holds
their output for the val and test images, computed once (by the frozen part
on the images, or read from the cut cache when phase two trains on cached
activations), and runs only the top of the network on it: each epoch for
the validation accuracy and loss (:meth:`CutEvaluation.callback`), and at the
end for the predictions (:meth:`CutEvaluation.predict`). The top shares its
layers with the whole network, so this is the whole network's output, split
in two.

:func:`cut_evaluation` gives ``None`` (the whole network on the images, as
before) when nothing is frozen (``UNFREEZE=all``) or the activations would not
fit in :data:`ACTIVATION_BYTES`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.data.images import default_workers, iter_batches
from pipeline.features import backbones
from pipeline.features.cache import FeatureRows
from pipeline.finetuning.image_feed import check_readable

if TYPE_CHECKING:
    import keras

    from pipeline.finetuning.activations import Cut
    from pipeline.finetuning.config import FinetuneRun

# The val and test activations are kept in memory when they take at most this many bytes.
ACTIVATION_BYTES = 1 << 30


@dataclass
class CutEvaluation:
    """The top of the network on the frozen part's output for the val and test images.

    Attributes
    ----------
    top : keras.Model
        Flattened activations at the cut -> the rest of the network -> the head
        (:func:`pipeline.finetuning.activations.build_top_model`).
    rows : numpy.ndarray
        The cache rows held, increasing (the val and test images).
    activations : numpy.ndarray
        Their activations at the cut, float32, one flattened row per image.
    seconds : float
        What computing them cost (the frozen part on the images), for the
        manifest's seconds per image.
    source : str
        ``"images"`` or the cut cache they were read from.
    """

    top: Any
    rows: np.ndarray
    activations: np.ndarray
    seconds: float
    source: str
    batch_size: int = 32

    def predict(self, rows: np.ndarray) -> np.ndarray:
        """The network's output for cache ``rows`` (a subset of :attr:`rows`)."""
        index = np.searchsorted(self.rows, rows)
        if np.any(index >= len(self.rows)) or np.any(self.rows[index] != rows):
            raise ValueError("rows outside the val and test images")
        x = self.activations[index]
        return np.asarray(self.top.predict(x, batch_size=self.batch_size, verbose=0))

    def callback(self, rows: np.ndarray, labels: np.ndarray, *, sigmoid: bool):
        """A callback that adds ``val_loss`` and ``val_accuracy`` of ``rows`` to each epoch's logs.

        Put it before the callbacks that read them (the log, early stopping).
        """
        import keras

        evaluation = self

        class _Validation(keras.callbacks.Callback):
            def on_epoch_end(self, epoch: int, logs=None) -> None:
                if logs is not None:
                    loss, accuracy = scores(evaluation.predict(rows), labels, sigmoid)
                    logs.update(val_loss=loss, val_accuracy=accuracy)

        return _Validation()


def scores(proba: np.ndarray, labels: np.ndarray, sigmoid: bool) -> tuple[float, float]:
    """Cross-entropy and accuracy as Keras's ``fit`` reports them on validation data.

    Its loss functions, unweighted mean; accuracy as ``SparseCategoricalAccuracy``
    (arg max) or ``BinaryAccuracy`` (above 0.5), rounded to float32 as a metric is.
    """
    import keras

    labels = np.asarray(labels)
    if sigmoid:
        y = labels.astype(np.float32).reshape(-1, 1)
        loss = keras.losses.binary_crossentropy(y, proba)
        hits = (proba[:, 0] > 0.5) == (labels == 1)
    else:
        loss = keras.losses.sparse_categorical_crossentropy(labels.astype(np.int32), proba)
        hits = proba.argmax(axis=1) == labels
    mean_loss = float(np.mean(keras.ops.convert_to_numpy(loss)))
    return float(np.float32(mean_loss)), float(np.float32(np.mean(hits)))


def cut_evaluation(
    run: FinetuneRun, trainee: keras.Model, head: keras.Model
) -> CutEvaluation | None:
    """The val and test activations at the cut, with the top that runs on them.

    On cached activations the cut is phase two's and the top is ``trainee``;
    on the images the cut is :func:`pipeline.finetuning.activations.find_cut`'s
    for the layers that train, and the top is built on ``head`` (layers shared).
    The activations are read from the cut cache when phase two trains on it
    (and it stores float32), else made by the frozen part on the images: one
    pass over the val and test images instead of one per epoch and one more at
    the end. ``None`` when nothing is frozen or they would take more than
    :data:`ACTIVATION_BYTES`.
    """
    from pipeline.finetuning.activations import build_top_model, find_cut

    cut = run.cut or find_cut(run.base, run.layers)
    rows = np.flatnonzero(run.splits["val"] | run.splits["test"])
    if cut is None or len(rows) * cut.width * 4 > ACTIVATION_BYTES:
        return None
    top = trainee
    if run.cut is None:
        with backbones.dtype_policy(run.resolved.runtime.keras_policy):  # as the whole network
            top = build_top_model(run.base, head, cut)
    batch_size = run.config.features.batch_size
    if run.cut is not None:
        cached = run.activations["cut_cache"]
        with FeatureRows(cached) as reader:
            if str(reader.attrs.get("dtype", "float32")) == "float32":
                # What the frozen part cost for these rows when the cut cache was made.
                share = float(run.activations["cut_cache_seconds"]) * len(rows) / reader.shape[0]
                return CutEvaluation(top, rows, reader.read(rows), share, str(cached), batch_size)
    tick = time.perf_counter()
    x = _frozen_pass(run, cut, rows)
    return CutEvaluation(top, rows, x, time.perf_counter() - tick, "images", batch_size)


def _frozen_pass(run: FinetuneRun, cut: Cut, rows: np.ndarray) -> np.ndarray:
    """The frozen part's output for the images of cache ``rows`` (float32, flattened).

    The images go through the model's own preprocessing layer and the frozen
    layers, one compiled call per batch of a fixed shape (as stage one: no
    retracing for the last, shorter batch).
    """
    import keras

    from pipeline.finetuning.activations import frozen_part
    from pipeline.finetuning.layers import ImagePreprocessing

    size, batch_size = run.resolved.input_size, run.config.features.batch_size
    with backbones.dtype_policy(run.resolved.runtime.keras_policy):
        inputs = keras.Input(shape=(size, size, 3), dtype="float32", name="image")
        x = ImagePreprocessing(run.resolved.spec.preprocessing, name="preprocessing")(inputs)
        model = keras.Model(inputs, frozen_part(run.base, cut)(x, training=False))
    paths = list(run.features.paths[rows])
    out = np.empty((len(rows), cut.width), np.float32)
    batches = iter_batches(
        run.root, paths, size=size, batch_size=batch_size,
        preprocess=lambda batch: batch.astype(np.float32),
        workers=run.config.features.workers or default_workers(),
    )  # fmt: skip
    for batch in batches:
        check_readable(batch, paths)
        n, images = len(batch.x), batch.x
        if n < batch_size:
            images = np.concatenate([images, np.zeros((batch_size - n, *images.shape[1:]))])
        result = np.asarray(model.predict_on_batch(images.astype(np.float32)), np.float32)
        out[batch.start : batch.start + n] = result[:n].reshape(n, -1)
    return out
