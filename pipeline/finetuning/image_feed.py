"""Decoded images for Keras training: a ``keras.utils.PyDataset`` and class weights.

Batches come from :func:`pipeline.data.images.load_image`, the reader of stage
one, as NumPy arrays (no ``tf.data``), so the same feed serves every Keras
backend. Images stay float32 RGB 0..255: preprocessing is inside the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import FinetuneError
from pipeline.data.images import ImageError, load_image


def image_sequence(
    root: Path,
    paths: Sequence[str],
    labels: np.ndarray,
    *,
    size: int,
    batch_size: int,
    sigmoid: bool = False,
    sample_weights: np.ndarray | None = None,
    shuffle_seed: int | None = None,
    workers: int = 1,
    decoded: dict[str, np.ndarray] | None = None,
):
    """A ``keras.utils.PyDataset`` of NumPy batches decoded by :mod:`pipeline.data.images`.

    Yields ``(x, y)`` or ``(x, y, sample_weight)``; ``x`` is float32 RGB 0..255
    (preprocessing happens inside the model). ``set_epoch(e)`` shuffles, the
    same way for the same epoch, so a resumed run sees the order it would have.
    ``decoded`` (path -> uint8 image), when given, keeps every image decoded
    once: later epochs and feeds sharing it skip the decoding (augmentation is
    inside the model, so the decoded image is the same every epoch).
    """
    import keras

    class _Sequence(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=4)
            self.order = np.arange(len(paths))

        def set_epoch(self, epoch: int) -> None:
            """Shuffle for ``epoch`` (the same order when a run resumes)."""
            if shuffle_seed is not None:
                self.order = np.random.default_rng([shuffle_seed, epoch]).permutation(len(paths))

        def __len__(self) -> int:
            return math.ceil(len(paths) / batch_size)

        def __getitem__(self, index: int):
            rows = self.order[index * batch_size : (index + 1) * batch_size]
            images = []
            for row in rows:
                image = None if decoded is None else decoded.get(paths[row])
                if image is None:
                    image = _decode(root, paths[row], size)
                    if decoded is not None:
                        decoded[paths[row]] = image
                images.append(image)
            x = np.stack(images).astype(np.float32)
            return training_batch(x, labels, rows, sigmoid=sigmoid, sample_weights=sample_weights)

    return _Sequence()


def _decode(root: Path, path: str, size: int) -> np.ndarray:
    try:
        return load_image(root / path, size)
    except ImageError as exc:  # readable when stage one ran: it changed since
        raise FinetuneError(
            f"{path} can no longer be read ({exc}); re-run `make features`"
        ) from None


def training_batch(
    x: np.ndarray,
    labels: np.ndarray,
    rows: np.ndarray,
    *,
    sigmoid: bool,
    sample_weights: np.ndarray | None,
) -> tuple:
    """``(x, y)`` or ``(x, y, sample_weight)`` for Keras, the labels and weights of ``rows``.

    ``y`` is a float column for a sigmoid head, class indices otherwise.
    """
    y = labels[rows]
    y = y.astype(np.float32).reshape(-1, 1) if sigmoid else y.astype(np.int32)
    if sample_weights is None:
        return x, y
    return x, y, sample_weights[rows].astype(np.float32)


def class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """``n / (k * n_c)`` per class over ``labels`` (1 for a class with no image)."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.ones(n_classes)
    weights[present] = len(labels) / (present.sum() * counts[present])
    return weights


def check_readable(batch: Any, paths: Sequence[str]) -> None:
    """Stop at the first image of a loaded batch that failed to decode: stage one read it,
    so it changed since (one line: which, and to re-run ``make features``)."""
    if batch.errors:
        offset, reason = next(iter(batch.errors.items()))
        raise FinetuneError(
            f"{paths[batch.start + offset]} can no longer be read ({reason}); "
            "re-run `make features`"
        )
