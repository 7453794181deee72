"""Stage three at cache speed: the frozen part of the backbone run once, its output cached.

When the last layers of a backbone train, the layers before them give the same
output every epoch for the same input. This module cuts the backbone where
the trained part starts and caches the activations there, with stage one's
machinery: its cut at a named layer, its HDF5 format, its resumable writer,
lock and fingerprint (:mod:`pipeline.features.cache`). Phase two then trains the top of
the network on the cache.

* :func:`find_cut`: the cut. The latest layer before the first trainable one
  whose output is the only tensor flowing past it (a residual connection that
  crosses a layer rules it out): MobileNetV2 with ``UNFREEZE=block`` cuts at
  ``block_15_add``.
* :func:`cut_config`: the stage-one configuration of the cut
  (``layer=<cut>, pooling="flatten"``), so :func:`pipeline.features.extract.extract_features`
  caches the unaugmented activations of every image (validation, test, and
  training when augmentation is off).
* :func:`write_views`: ``views`` augmented views of each training image
  (random flip, rotation and zoom, drawn once), one cache row per view, image
  by image. Each view of a batch is one compiled call of :func:`view_model`
  (augmentation, preprocessing and the frozen part); its draws depend on the
  seed, the batch and the view only (:func:`seed_views`), so a resumed cache
  equals an uninterrupted one.
* :func:`build_top_model`: the trained part as a model on the cache, sharing
  its layers with the backbone, so the whole network (the exported model) holds
  the trained weights without copying.
* :func:`activation_sequence`: the cache as a ``keras.utils.PyDataset``, read
  batch by batch (never loaded whole), one view per image per epoch.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.data.images import iter_batches, load_image
from pipeline.features import cache, cache_writer
from pipeline.finetuning.freezing import backbone_layers
from pipeline.finetuning.image_feed import check_readable, training_batch

if TYPE_CHECKING:
    import keras

    from pipeline.features.cache import FeatureRows
    from pipeline.features.config import FeatureConfig

VIEWS_FORMAT = 1  # the layout of a views cache: image-major rows, `views` rows per image


@dataclass(frozen=True)
class Cut:
    """Where the backbone is cut: the cached layer and the shape of its output.

    Attributes
    ----------
    layer : str
        Name of the last frozen layer whose output is cached.
    index : int
        Its position among :func:`pipeline.finetuning.freezing.backbone_layers`.
    shape : tuple of int
        Its output for one image, ``(height, width, channels)``.
    """

    layer: str
    index: int
    shape: tuple[int, ...]

    @property
    def width(self) -> int:
        """Values per image in the cache (the flattened map)."""
        return int(np.prod(self.shape))


def find_cut(base: keras.Model, layers: int) -> Cut | None:
    """The cut for training the last ``layers`` layers of ``base``; ``None`` when nothing is frozen.

    The cut is the latest layer before the first trainable one such that every
    later layer reads only tensors made after it or by it: its output is then
    all the top of the network needs. Layers between the cut and the first
    trainable one stay frozen and run in the top model (they are cheap).

    Examples
    --------
    >>> from pipeline.features.backbones import build_base, get_backbone
    >>> base = build_base(get_backbone("mobilenet_v2"), weights="none", input_size=32)
    >>> find_cut(base, 11).layer
    'block_15_add'
    """

    all_layers = backbone_layers(base)
    position = {id(layer): index for index, layer in enumerate(all_layers)}
    lowest = []  # per layer: the earliest layer one of its inputs comes from (-1: the input)
    for layer in all_layers:
        tensors = layer.input if isinstance(layer.input, list | tuple) else [layer.input]
        # `_keras_history` is how Keras 3 records a tensor's producing layer.
        producers = [position.get(id(t._keras_history[0]), -1) for t in tensors]
        lowest.append(min(producers))
    first_trainable = len(all_layers) - layers
    reach = len(all_layers)  # min of `lowest` over the layers after the candidate
    for index in range(len(all_layers) - 1, -1, -1):
        if index < first_trainable and reach >= index:
            shape = tuple(int(d) for d in all_layers[index].output.shape[1:])
            if len(shape) == 3:
                return Cut(all_layers[index].name, index, shape)
        reach = min(reach, lowest[index])
    return None


def cut_config(features: FeatureConfig, cut: Cut) -> FeatureConfig:
    """The stage-one configuration that caches the activations at ``cut`` (flattened maps).

    Keras runs it, as it runs the views and the exported model: the top trains
    on exactly what the whole network computes.
    """
    return replace(features, layer=cut.layer, pooling="flatten", runtime="keras")


def cut_cache_problem(
    reader: FeatureRows, frozen: keras.Model, root: Path, *, preprocess, size: int, count: int = 4
) -> str:
    """Why the cut cache of ``reader`` is not ``frozen``'s output (``""`` when it is).

    Runs ``frozen`` on the first ``count`` images and compares: a cache made by
    other weights (``WEIGHTS=none`` draws them at random) is caught here.
    """

    count = min(count, reader.shape[0])
    images = np.stack([load_image(root / p, size) for p in reader.paths[:count]])
    expected = np.asarray(frozen.predict_on_batch(preprocess(images)), np.float32)
    expected = expected.reshape(count, -1)
    got = reader.read(np.arange(count))
    error = float(np.max(np.abs(got - expected)) / (np.max(np.abs(expected)) + 1e-6))
    return f"relative difference {error:.2g}" if error > 1e-3 else ""


def frozen_part(base: keras.Model, cut: Cut) -> keras.Model:
    """``base`` up to ``cut``: preprocessed images to the cut's activations (shared layers)."""
    import keras

    return keras.Model(base.input, base.get_layer(cut.layer).output, name=f"{base.name}_frozen")


def build_top_model(base: keras.Model, head: keras.Model, cut: Cut) -> keras.Model:
    """Flattened activations at ``cut`` -> the rest of ``base`` -> average pooling -> ``head``.

    The layers are ``base``'s and ``head``'s own (not copies): training this
    model trains the whole network's top. The base part runs with
    ``training=False`` (BatchNormalization in inference mode), as in
    :func:`pipeline.finetuning.model.build_finetune_model`.
    """
    import keras

    inputs = keras.Input(shape=(cut.width,), dtype="float32", name="activations")
    x = keras.layers.Reshape(cut.shape, name="activation_map")(inputs)
    if base.get_layer(cut.layer) is not base.layers[-1]:
        top = keras.Model(base.get_layer(cut.layer).output, base.output, name=f"{base.name}_top")
        x = top(x, training=False)
    x = keras.layers.GlobalAveragePooling2D(name="features_avg")(x)
    return keras.Model(inputs, head(x), name=f"{base.name}_top_on_activations")


# --- the views cache -------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewsSpec:
    """What a views cache holds; two equal specs give the same cache, row for row.

    ``stage_one`` is the ``config_json`` of the stage-one cut cache (backbone,
    weights, size, cut, dtype, precision, split), ``augmentation`` the flip,
    rotation and zoom settings.
    """

    stage_one: str
    views: int
    seed: int
    augmentation: dict[str, Any]

    def config_json(self, paths: list[str]) -> str:
        identity = {
            "views_format": VIEWS_FORMAT,
            "stage_one": json.loads(self.stage_one),
            "views": self.views,
            "seed": self.seed,
            "augmentation": self.augmentation,
            "paths_sha256": hashlib.sha256("\n".join(paths).encode()).hexdigest(),
        }
        return json.dumps(identity, sort_keys=True)

    def tag(self) -> str:
        """A short name part: ``views-8-<hash of the augmentation and seed>``."""
        text = json.dumps([self.augmentation, self.seed], sort_keys=True)
        return f"views-{self.views}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def write_views(
    path: Path,
    root: Path,
    paths: list[str],
    labels: np.ndarray,
    *,
    spec: ViewsSpec,
    fingerprint: str,
    frozen: keras.Model,
    augmentation: keras.layers.Layer,
    preprocessing: str,
    size: int,
    batch_size: int,
    dtype: str = "float32",
    attrs: dict[str, Any] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> tuple[str, float]:
    """Cache ``spec.views`` augmented views of every image at the cut; resume an unfinished run.

    Row ``i * views + v`` holds view ``v`` of image ``i``. The file is a
    stage-one cache (:mod:`pipeline.features.cache`: same format, lock, work file and
    progress sidecar), rebuilt when ``spec`` or ``fingerprint`` change.

    Returns
    -------
    status, seconds
        ``"up to date"``, ``"built"`` or ``"resumed"``, and the seconds spent
        writing it (in all runs that wrote it).
    """

    config_json = spec.config_json(list(paths))
    if cache.cache_matches(path, config_json, fingerprint):
        return "up to date", float(cache.read_attrs(path)["seconds"])
    views = spec.views
    rows = np.repeat(np.arange(len(paths)), views)
    model = view_model(frozen, augmentation, preprocessing)
    with cache_writer.cache_lock(path):
        writer, _ = cache_writer.CacheWriter.open(
            path, config_json=config_json, fingerprint=fingerprint,
            paths=[paths[i] for i in rows], labels=[int(labels[i]) for i in rows],
            splits=["train"] * len(rows), width=int(np.prod(frozen.output_shape[1:])),
            dtype=dtype,
        )  # fmt: skip
        status = "resumed" if writer.next_index else "built"
        try:
            batches = iter_batches(
                root, paths, size=size, batch_size=batch_size, start=writer.next_index // views,
                preprocess=lambda batch: batch.astype(np.float32), workers=workers,
            )  # fmt: skip
            from pipeline.core.console import progress_bar  # lines printed meanwhile end it

            bar = progress_bar(
                len(rows), initial=writer.next_index, unit="view", enabled=progress,
                desc=f"{views} augmented views",
            )  # fmt: skip
            with bar:
                for batch in batches:
                    check_readable(batch, paths)
                    tick = time.perf_counter()
                    out = _views_of(batch.x, batch.start, spec, model, augmentation, batch_size)
                    ok = np.ones(len(out), dtype=bool)
                    writer.write_batch(batch.start * views, out, ok, {}, time.perf_counter() - tick)
                    bar.update(len(out))
            writer.finalize(
                {
                    **(attrs or {}), "views": views, "n_images": len(rows),
                    "seconds": writer.seconds,
                }
            )  # fmt: skip
        finally:
            writer.close()
    return status, float(cache.read_attrs(path)["seconds"])


def view_model(
    frozen: keras.Model, augmentation: keras.layers.Layer, preprocessing: str
) -> keras.Model:
    """Images (0..255) -> ``augmentation`` (always in training mode) -> preprocessing -> ``frozen``.

    One model, so ``predict_on_batch`` runs a batch's view as one compiled
    function, as stage one runs its batches; it computes what the layers run
    one by one compute (the tests check it). Its random draws come from
    ``augmentation``'s seed generators, which :func:`seed_views` sets before
    each call. The frozen part costs most of a view; the augmentation about
    a quarter (rotation and zoom each resample the image).
    """
    import keras

    from pipeline.finetuning.layers import ImagePreprocessing

    class Augmenting(keras.layers.Layer):
        """``augmentation`` in training mode whatever ``predict`` asks.

        ``call`` takes no ``training`` argument, so Keras passes none down.
        """

        def call(self, inputs):
            return augmentation(inputs, training=True)

        def compute_output_shape(self, input_shape):
            return input_shape

    inputs = keras.Input(shape=frozen.input_shape[1:], dtype="float32", name="image")
    x = Augmenting(name="augmenting")(inputs)
    x = ImagePreprocessing(preprocessing, name="preprocessing")(x)
    return keras.Model(inputs, frozen(x, training=False), name=f"{frozen.name}_views")


def seed_views(augmentation: keras.layers.Layer, seed: int, start: int, view: int) -> None:
    """Set ``augmentation``'s draws for view ``view`` of the batch at image ``start``.

    One seed per (seed, batch start, view, generator): a resumed run draws
    the same views, and the batches of a run are independent of each other.
    """
    for number, variable in enumerate(_random_state(augmentation)):
        drawn = np.random.default_rng([seed, start, view, number]).integers(2**31)
        variable.assign(np.asarray([drawn, 0], dtype=variable.dtype))


def _views_of(
    x: np.ndarray,
    start: int,
    spec: ViewsSpec,
    model: keras.Model,
    augmentation: keras.layers.Layer,
    batch_size: int,
) -> np.ndarray:
    """The activations of every view of the images ``x`` (rows image-major).

    ``model`` is :func:`view_model` of ``augmentation``; one compiled call per view.
    """
    n, views = len(x), spec.views
    if n < batch_size:  # the compiled shape never changes (as in stage one)
        x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), x.dtype)])
    out = np.empty((n, views, int(np.prod(model.output_shape[1:]))), np.float32)
    for view in range(views):
        seed_views(augmentation, spec.seed, start, view)
        activations = np.asarray(model.predict_on_batch(x), dtype=np.float32)[:n]
        out[:, view] = activations.reshape(n, -1)
    return out.reshape(n * views, -1)


def _random_state(layer: keras.layers.Layer) -> list:
    """The seed-generator states of ``layer``: its variables that are not weights."""
    weights = {id(v) for v in layer.weights}
    return [v for v in layer.variables if id(v) not in weights]


# --- the feed --------------------------------------------------------------------------------


def activation_sequence(
    reader: FeatureRows,
    rows: np.ndarray,
    labels: np.ndarray,
    *,
    views: int = 1,
    batch_size: int,
    sigmoid: bool = False,
    sample_weights: np.ndarray | None = None,
    shuffle_seed: int | None = None,
):
    """A ``keras.utils.PyDataset`` of cached activations, read batch by batch.

    Image ``j`` is cache row ``rows[j] * views + v``; ``set_epoch(e)`` shuffles
    the images and draws one view ``v`` per image, the same way for the same
    epoch (a resumed run sees what it would have). Without ``shuffle_seed``
    the order is fixed and every image is its view 0.
    """
    import keras

    rows, labels = np.asarray(rows, dtype=np.int64), np.asarray(labels)

    class _Activations(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__(workers=1, use_multiprocessing=False)
            self.order = np.arange(len(rows))
            self.view = np.zeros(len(rows), dtype=np.int64)

        def set_epoch(self, epoch: int) -> None:
            """Shuffle and draw the views of ``epoch``."""
            if shuffle_seed is not None:
                rng = np.random.default_rng([shuffle_seed, epoch])
                self.order = rng.permutation(len(rows))
                self.view = rng.integers(views, size=len(rows))

        def __len__(self) -> int:
            return math.ceil(len(rows) / batch_size)

        def __getitem__(self, index: int):
            batch = self.order[index * batch_size : (index + 1) * batch_size]
            x = reader.read(rows[batch] * views + self.view[batch])
            return training_batch(x, labels, batch, sigmoid=sigmoid, sample_weights=sample_weights)

    return _Activations()
