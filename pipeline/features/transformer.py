"""Stage one as a scikit-learn transformer: :class:`ImageFeatures` turns images into features.

Images are file paths or uint8 arrays held in memory; the backbone is stage one's own
(:func:`pipeline.features.extractor.build_extractor`, :func:`~pipeline.features.extractor.forward_batch`,
the registry's preprocessing), so ``make_pipeline(ImageFeatures(), LinearSVC())`` computes
the features ``make features`` would. With ``cache=`` a folder, each image's features are
kept there under a key of its content and the feature identity
(:func:`pipeline.features.records.extractor_identity`), so clones, CV folds and later
sessions compute each image once.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse
from PIL import Image
from sklearn.base import BaseEstimator, TransformerMixin

from pipeline.core.errors import DataError
from pipeline.core.files import write_atomic
from pipeline.data.images import ImageError, default_workers, load_image, resize_square
from pipeline.features import extractor, runtimes
from pipeline.features.config import FeatureConfig, ResolvedFeatures, resolve_features
from pipeline.features.records import extractor_identity

KEY_VERSION = 1  # bump when the key or the stored vectors change meaning
_MODELS: dict[str, Any] = {}  # built backbones by identity: clones share one per process
_MAX_MODELS = 2
_PROCESS_TOKEN = os.urandom(8).hex()


class ImageFeatures(TransformerMixin, BaseEstimator):
    """A frozen ImageNet backbone as a scikit-learn transformer: images in, features out.

    ``transform`` takes image file paths (a list, or a 1-D array of them) or uint8 RGB
    images in memory: one ``(H, W, 3)`` array, a list of them (sizes may differ;
    ``(H, W)`` is grayscale) or an ``(N, H, W, 3)`` array. Each image is resized to
    the backbone's input size as stage one resizes files, so an image and its PNG get
    the same features. It returns a float32 array ``(n_images, feature_width)``.

    Nothing is learnt: ``fit`` checks the options and ``transform`` works unfitted too.

    Parameters
    ----------
    backbone : str
        Registry name (``python -m pipeline backbones``).
    weights : str
        ``"imagenet"``, ``"none"`` (random init) or a local weights file.
    input_size : int, optional
        Square input side; the backbone's default when omitted.
    pooling : {"avg", "max", "flatten"}
        How the last feature map becomes a vector.
    layer : str, optional
        Cut the backbone at this named layer.
    batch_size : int
        Images per forward pass.
    precision : {"auto", "float32", "bfloat16", "float16"}
        The backbone's compute precision (as :class:`~pipeline.features.config.FeatureConfig`).
    runtime : {"keras", "auto", "openvino"}
        Who runs the backbone. ``auto`` and ``openvino`` convert it to OpenVINO once and
        keep it under ``cache`` (else under ``artifacts/``), as ``make features`` does.
    cache : path, optional
        A folder for computed features, one file per image keyed by the image's content
        and the feature identity: each image is computed once across clones, CV folds
        and sessions. ``None``: nothing is kept.

    Attributes
    ----------
    identity_ : dict
        Set by ``fit``: what makes the features what they are (backbone, weights,
        input size, pooling, layer, precision), as a stage-one cache records it.
    """

    def __init__(
        self,
        backbone: str = "mobilenet_v2",
        *,
        weights: str = "imagenet",
        input_size: int | None = None,
        pooling: str = "avg",
        layer: str | None = None,
        batch_size: int = 32,
        precision: str = "auto",
        runtime: str = "keras",
        cache: str | Path | None = None,
    ) -> None:
        self.backbone = backbone
        self.weights = weights
        self.input_size = input_size
        self.pooling = pooling
        self.layer = layer
        self.batch_size = batch_size
        self.precision = precision
        self.runtime = runtime
        self.cache = cache

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.requires_fit = False  # stateless: the backbone is fixed
        tags.input_tags.string = True  # file paths
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags

    def fit(self, X: Any, y: Any = None) -> ImageFeatures:
        """Check the options and the images' form (nothing is learnt); return ``self``.

        Raises
        ------
        PipelineError
            A bad option, or ``X`` in a form that is not images (one line saying which).
        """
        _as_images(X)
        self.identity_ = extractor_identity(self._resolved())
        return self

    def transform(self, X: Any) -> np.ndarray:
        """Features of the images ``X`` (float32, one row per image, in order).

        Raises
        ------
        PipelineError
            A bad option, ``X`` not images, or an image that cannot be read (named).
        """
        images = _as_images(X)
        resolved = self._settled(self._resolved(), images)
        folder = self._cache_folder(extractor_identity(resolved))
        keys = [_content_key(image) for image in images] if folder else []
        rows = [_read_cached(folder, key) for key in keys] if folder else [None] * len(images)
        missing = [i for i, row in enumerate(rows) if row is None]
        batch = int(self.batch_size)
        for start, vectors in self._compute(resolved, [images[i] for i in missing]):
            for i, vector in zip(missing[start : start + batch], vectors, strict=True):
                rows[i] = vector
                if folder is not None:  # batch by batch: a stopped run keeps what it did
                    _write_cached(folder, keys[i], vector)
        return np.stack(rows).astype(np.float32, copy=False)

    # ----------------------------------------------------------------- internals

    def _config(self) -> FeatureConfig:
        return FeatureConfig(
            backbone=self.backbone,
            weights=self.weights,
            input_size=self.input_size,
            pooling=self.pooling,
            layer=self.layer,
            batch_size=self.batch_size,
            precision=self.precision,
            runtime=self.runtime,
        )

    def _artifacts_dir(self) -> Path:
        # The converted model lands in <this>/runtimes/, beside the cached features.
        return Path(self.cache) if self.cache is not None else Path("artifacts")

    def _resolved(self) -> ResolvedFeatures:
        """The options resolved (checked) once per setting; hashing a weights file is not free."""
        params = json.dumps(self.get_params(), sort_keys=True, default=str)
        memo = getattr(self, "_resolved_memo", None)
        if memo is None or memo[0] != params:
            resolved = resolve_features(self._config(), artifacts_dir=self._artifacts_dir())
            memo = (params, resolved)
            self._resolved_memo = memo
        return memo[1]

    def _settled(self, resolved: ResolvedFeatures, images: list[Any]) -> ResolvedFeatures:
        """A runtime other than Keras converted and checked on a few of ``images`` (once,
        recorded in its store), so the precision in the cache key is the one that runs."""
        if resolved.store is None or resolved.runtime.runtime == "keras" or not images:
            return resolved
        size = resolved.input_size
        few = images[: runtimes.CHECK_IMAGES]
        keras = replace(resolved, runtime=runtimes.RuntimeChoice())
        choice = runtimes.settle(
            self.runtime,
            self.precision,
            store=resolved.store,
            random_weights=self.weights == "none",
            build_keras=lambda: extractor.build_extractor(keras),
            sample=lambda: (
                resolved.spec.preprocess(np.stack([_pixels(i, size) for i in few])),
                [],
            ),
            data="python-api",
        )
        for note in choice.notes:  # a check that failed but was insisted on, say
            if note.startswith("warning: "):
                warnings.warn(note.removeprefix("warning: "), UserWarning, stacklevel=3)
        settled = replace(resolved, runtime=choice)
        self._resolved_memo = (self._resolved_memo[0], settled)
        return settled

    def _cache_folder(self, identity: dict[str, Any]) -> Path | None:
        if self.cache is None:
            return None
        identity = {"key_version": KEY_VERSION, **identity}
        if self.weights == "none":  # random weights differ per process: so do their features
            identity["random_weights_of"] = _PROCESS_TOKEN
        text = json.dumps(identity, sort_keys=True)
        folder = Path(self.cache) / "images" / hashlib.sha256(text.encode()).hexdigest()[:16]
        identity_file = folder / "identity.json"
        if not identity_file.is_file():  # what the folder's features are, for a reader
            write_atomic(identity_file, lambda tmp: tmp.write_text(text + "\n"))
        return folder

    def _compute(
        self, resolved: ResolvedFeatures, images: list[Any]
    ) -> Iterator[tuple[int, np.ndarray]]:
        """``(offset, features)`` of each batch of ``images``, decoded a few batches ahead on
        threads (as stage one's loader), so memory stays bounded by a few batches."""
        if not images:
            return
        size, batch = resolved.input_size, int(self.batch_size)
        model = _model(resolved)
        decode = lambda chunk: np.stack([_pixels(image, size) for image in chunk])  # noqa: E731
        workers = default_workers()
        with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
            starts = range(0, len(images), batch)
            pending = deque(pool.submit(decode, images[s : s + batch]) for s in starts[:workers])
            for n, start in enumerate(starts):
                x = pending.popleft().result()
                if n + workers < len(starts):
                    first = starts[n + workers]
                    pending.append(pool.submit(decode, images[first : first + batch]))
                yield start, extractor.forward_batch(model, resolved.spec.preprocess(x), batch)


# --------------------------------------------------------------------------- the images


def _as_images(X: Any) -> list[Any]:
    """``X`` as a list of images (``Path`` or uint8 array), each checked for its form."""
    images = _listed(X)
    if not images:
        raise DataError("ImageFeatures got no images (an empty list or array)")
    return images


def _listed(X: Any) -> list[Any]:
    if isinstance(X, str | os.PathLike):
        return [Path(X)]
    if isinstance(X, np.ndarray):
        if X.dtype.kind in "OUS" and X.ndim == 1:
            return [_one(item) for item in X.tolist()]
        if X.ndim == 4:
            return [_one(image) for image in X]
        if X.ndim == 3:
            return [_one(X)]
        raise DataError(
            f"ImageFeatures takes image file paths or uint8 images ((H, W, 3) each, a list of "
            f"them or an (N, H, W, 3) array); got a {X.ndim}-D {X.dtype} array of shape "
            f"{X.shape}. Features already? Pass them to the head without ImageFeatures"
        )
    if scipy.sparse.issparse(X):
        raise DataError(
            "ImageFeatures takes image file paths or uint8 images, not sparse matrices "
            "(sparse input is not supported)"
        )
    if hasattr(X, "__array__") and not isinstance(X, list):  # a pandas Series of paths
        return _listed(np.asarray(X))
    if isinstance(X, Sequence):
        return [_one(item) for item in X]
    raise DataError(f"ImageFeatures takes image file paths or uint8 images; got {type(X).__name__}")


def _one(item: Any) -> Any:
    if isinstance(item, str | os.PathLike):
        return Path(item)
    array = np.asarray(item)
    if (
        array.dtype != np.uint8
        or array.ndim not in (2, 3)
        or (array.ndim == 3 and array.shape[-1] not in (3, 4))
    ):
        raise DataError(
            f"an image must be a file path or a uint8 array of shape (H, W, 3), (H, W, 4) or "
            f"(H, W); got a {array.dtype} array of shape {array.shape} (floats in 0..1: "
            "pass (x * 255).round().astype('uint8'))"
        )
    if min(array.shape[:2]) == 0:
        raise DataError(f"an image of shape {array.shape} has no pixels")
    return array


def _pixels(image: Any, size: int) -> np.ndarray:
    """One image as ``(size, size, 3)`` uint8, resized as stage one resizes files."""
    if isinstance(image, Path):
        try:
            return load_image(image, size)
        except ImageError as exc:
            raise DataError(f"image {image}: {exc}; remove it from the list") from None
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[image.shape[-1] if image.ndim == 3 else 2]
    picture = Image.fromarray(np.ascontiguousarray(image), mode)
    if mode == "RGBA":  # transparent pixels onto white, as files are read
        white = Image.new("RGBA", picture.size, (255, 255, 255, 255))
        picture = Image.alpha_composite(white, picture)
    return resize_square(np.asarray(picture.convert("RGB")), size)


def _content_key(image: Any) -> str:
    """The sha256 of an image's bytes: a file's, or an array's shape and pixels."""
    digest = hashlib.sha256()
    if isinstance(image, Path):
        try:
            with open(image, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        except OSError as exc:
            raise DataError(f"image {image}: cannot read it ({exc.strerror or exc})") from None
        return "file-" + digest.hexdigest()
    digest.update(repr(image.shape).encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return "array-" + digest.hexdigest()


# --------------------------------------------------------------------------- the cache


def _cached_path(folder: Path, key: str) -> Path:
    return folder / key.split("-", 1)[1][:2] / f"{key}.npy"


def _read_cached(folder: Path | None, key: str) -> np.ndarray | None:
    if folder is None:
        return None
    try:
        return np.load(_cached_path(folder, key), allow_pickle=False)
    except (OSError, ValueError):  # absent, or a torn file: computed again
        return None


def _write_cached(folder: Path, key: str, vector: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, np.asarray(vector, np.float32), allow_pickle=False)

    write_atomic(_cached_path(folder, key), write)


# --------------------------------------------------------------------------- the model


def _model(resolved: ResolvedFeatures) -> Any:
    """The backbone of ``resolved``, built once per process (every clone shares it)."""
    key = json.dumps(
        {**extractor_identity(resolved), "runtime": resolved.runtime.runtime}, sort_keys=True
    )
    if key not in _MODELS:
        while len(_MODELS) >= _MAX_MODELS:  # a notebook trying backbones keeps two
            _MODELS.pop(next(iter(_MODELS)))
        _MODELS[key] = extractor.build_extractor(resolved)
    return _MODELS[key]
