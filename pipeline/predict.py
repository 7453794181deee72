"""Predicting new images with a head (backbone + head) or a fine-tuned model.

``MODEL`` is one of:

- a head of stage two: its manifest ``<head>.json``, its ``<head>.skops``, its
  ``<head>.joblib`` export or, for the softmax head, ``softmax.keras`` (any of
  them loads the head through its manifest, from the ``.skops`` file:
  :func:`pipeline.heads.store.load_head`). The backbone is rebuilt from the
  manifest (backbone, weights source, input size, pooling, layer), its features
  are checked against the head's (:meth:`pipeline.heads.store.Head.check_features`)
  and the head is applied. A head on joined or multi-view features rebuilds every
  part from its recorded configuration and joins them as :mod:`pipeline.features.joins`
  did (:mod:`pipeline.features.rebuild`);
- a fine-tuned model of stage three: ``<name>.keras`` with ``<name>.json``
  beside it whose ``"kind"`` is ``"finetuned"``. The model takes float32 RGB
  images in 0..255 of ``manifest["input_size"]`` pixels (preprocessing inside
  the model) and outputs class probabilities (one sigmoid unit for two classes
  is read as the probability of class 1); ``manifest["class_names"]`` names
  the outputs.

Images are decoded by :mod:`pipeline.data.images` exactly as in stage one;
unreadable files are skipped and reported, like stage one does. An image's
true label is the name of the nearest folder above it (``IMAGES`` itself
included) that is one of the model's classes, so ``IMAGES=data/test`` or
``IMAGES=data/test/ants`` are scored against their class folders.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from pipeline.core.console import progress_bar
from pipeline.core.errors import PipelineError, PredictError
from pipeline.core.files import write_bytes_atomic
from pipeline.data.folders import IMAGE_EXTENSIONS, images_under
from pipeline.data.images import iter_batches, skipped_images
from pipeline.features import backbones, rebuild
from pipeline.finetuning.model import load_finetuned
from pipeline.heads.softmax import two_columns
from pipeline.heads.store import find_manifest, load_head
from pipeline.predictions import (  # noqa: F401  (public here too)
    FORMULA_PREFIXES,
    TABLE_LIMIT,
    Predictions,
    check_out,
    default_csv,
    output_path,
    spreadsheet_safe,
)


def list_images(images: str | Path) -> tuple[Path, list[str]]:
    """``(root, paths relative to root)`` of a folder (recursively) or a single file."""
    images = Path(images).expanduser()
    if images.is_file():
        return images.parent, [images.name]
    if not images.is_dir():
        raise PredictError(
            f"IMAGES={images} does not exist; give an image file or a folder of images"
        )
    found = [p.relative_to(images).as_posix() for p in images_under(images)]
    if not found:
        raise PredictError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {images}")
    return images, found


def true_labels(root: Path, paths: Sequence[str], class_names: Sequence[str]) -> np.ndarray:
    """Class index of the nearest folder above each image named like a class, else ``-1``.

    The folders searched are those of the relative path and ``root`` itself.
    """
    index = {name: i for i, name in enumerate(class_names)}
    top = root.resolve().name
    labels = np.full(len(paths), -1, dtype=np.int64)
    for i, rel in enumerate(paths):
        for folder in reversed((top, *PurePosixPath(rel).parts[:-1])):
            if folder in index:
                labels[i] = index[folder]
                break
    return labels


#: ``(root, paths, batch_size, log) -> (kept paths, class index, scores, are probabilities,
#: skipped (path, reason) pairs)``: a model scoring a list of images.
Scorer = Callable[..., tuple[list[str], np.ndarray, np.ndarray, bool, list[tuple[str, str]]]]


@dataclass(frozen=True)
class Predictor:
    """A loaded model: how it scores images, and its names."""

    label: str  # in words, for messages
    dataset: str  # the data set it was trained on
    model_id: str  # unique among the models of that data set
    score: Scorer
    class_names: tuple[str, ...]


def batchwise(
    size: int,
    preprocess: Callable[[np.ndarray], np.ndarray],
    run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, bool]],
) -> Scorer:
    """A scorer that decodes images at ``size`` (as stage one) and runs ``run`` per batch."""

    def score(root: Path, paths: Sequence[str], batch_size: int, log: Any = None):
        kept, preds, scores, skipped, is_proba = [], [], [], [], True
        for batch in iter_batches(
            root, paths, size=size, batch_size=batch_size, preprocess=preprocess
        ):
            skipped += skipped_images(batch, paths, log)
            if not len(batch.x):
                continue
            pred, batch_scores, is_proba = run(batch.x)
            kept += [paths[batch.start + i] for i in np.flatnonzero(batch.ok)]
            preds.append(np.asarray(pred, dtype=np.int64))
            scores.append(np.asarray(batch_scores, dtype=np.float64))
        return kept, _stack(preds, np.int64), _stack(scores, np.float64), is_proba, skipped

    return score


def _stack(parts: list[np.ndarray], dtype: Any) -> np.ndarray | None:
    return np.concatenate(parts).astype(dtype) if parts else None


def _head_predictor(model_path: Path, artifacts_dir: str | Path) -> Predictor:

    head = load_head(model_path)
    m = head.manifest
    source = str(m.get("weights_source") or "imagenet")
    if source == "none" or "none" in source.split("+"):
        raise PredictError(
            f"head {head.path} was fit on features of a randomly initialised backbone "
            "(WEIGHTS=none), which cannot be rebuilt; fit it on imagenet or file weights"
        )
    parts = rebuild.feature_parts(m)
    # heads/<dataset>/<cache stem>/<head>.json
    stem = m.get("cache_stem") or head.path.resolve().parent.name
    dataset = m.get("dataset") or head.path.resolve().parent.parent.name
    if not rebuild.is_plain(parts):
        extract = rebuild.parts_extractor(head, parts, source, artifacts_dir)

        def score(root: Path, paths: Sequence[str], batch_size: int, log: Any = None):
            kept, features, skipped = extract(root, paths, batch_size, log)
            if features is None:
                return kept, None, None, True, skipped
            return (kept, *head.predict(features), skipped)

        return Predictor(
            label=f"{m.get('backbone')} + {head.name} head",
            dataset=dataset,
            model_id=f"{stem}_{head.name}",
            score=score,
            class_names=head.class_names,
        )
    spec = backbones.get_backbone(m["backbone"])
    layer = m.get("layer") or None
    attrs = {
        "backbone": spec.name,
        "weights": backbones.weights_identity(source),
        "input_size": m["input_size"],
        "pooling": m["pooling"],
        "layer": m.get("layer") or "",
        "preprocessing": spec.preprocessing,
    }
    extractor = backbones.build_feature_extractor(
        spec, weights=source, input_size=int(m["input_size"]), pooling=m["pooling"], layer=layer
    )
    width = int(extractor.output_shape[-1])
    head.check_features(attrs, width)

    def run(x: np.ndarray):
        features = np.asarray(extractor.predict_on_batch(x), dtype=np.float32)
        return head.predict(features)

    return Predictor(
        label=f"{spec.name} + {head.name} head",
        dataset=dataset,
        model_id=f"{stem}_{head.name}",
        score=batchwise(int(m["input_size"]), spec.preprocess, run),
        class_names=head.class_names,
    )


def _finetuned_predictor(model_path: Path, manifest: Mapping[str, Any]) -> Predictor:

    keras_path = model_path if model_path.suffix == ".keras" else model_path.with_suffix(".keras")
    if not keras_path.is_file():
        raise PredictError(
            f"fine-tuned model {keras_path} is missing (the manifest is {model_path.with_suffix('.json')})"
        )
    try:
        class_names = tuple(manifest["class_names"])
        size = int(manifest["input_size"])
    except (KeyError, TypeError, ValueError):
        raise PredictError(
            f"manifest {keras_path.with_suffix('.json')} needs 'class_names' and 'input_size'"
        ) from None

    try:
        model = load_finetuned(keras_path)
    except Exception as exc:
        raise PredictError(f"fine-tuned model {keras_path} cannot be loaded: {exc}") from None
    k = len(class_names)

    def run(x: np.ndarray):
        raw = np.asarray(model.predict_on_batch(x), dtype=np.float64)
        p = two_columns(raw) if k == 2 else raw  # one sigmoid unit: P(class 1)
        if p.ndim != 2 or p.shape[1] != k:
            raise PredictError(
                f"{keras_path} outputs shape {raw.shape}, expected (n, {k}) for {k} classes"
            )
        return np.argmax(p, axis=1), p, True

    def as_float(batch: np.ndarray) -> np.ndarray:
        return batch.astype(np.float32)

    # finetune/<dataset>/<name>.keras
    return Predictor(
        label=f"fine-tuned {keras_path.name}",
        dataset=str(manifest.get("dataset") or keras_path.resolve().parent.name),
        model_id=str(manifest.get("name") or keras_path.stem),
        score=batchwise(size, as_float, run),
        class_names=class_names,
    )


def load_predictor(model_path: str | Path, artifacts_dir: str | Path = "artifacts") -> Predictor:
    """The model at ``model_path`` (a head or a fine-tuned model), ready to score images.

    A head fit on joined or multi-view features rebuilds every part; a
    ``JOIN_NORM=standard`` join reads its parts' caches under ``artifacts_dir``.

    Raises
    ------
    PredictError, HeadError
        Missing file or manifest, or a manifest of an unknown kind.
    """

    model_path = Path(model_path)
    if not model_path.is_file():
        raise PredictError(
            f"MODEL={model_path} is not a file; give a head manifest or a .keras model"
        )
    try:
        manifest, _ = find_manifest(model_path)
    except PipelineError as exc:
        raise PredictError(f"MODEL={model_path}: {exc}") from None
    kind = manifest.get("kind")
    if kind == "head":
        return _head_predictor(model_path, artifacts_dir)
    if kind == "finetuned":
        return _finetuned_predictor(model_path, manifest)
    raise PredictError(
        f"MODEL={model_path}: manifest kind {kind!r} is neither 'head' nor 'finetuned'"
    )


def default_output(
    predictor: Predictor, images: str | Path, artifacts_dir: str | Path = "artifacts"
) -> Path:
    """``artifacts/predictions/<dataset>/<model id>/<images>-<hash>.csv`` (see
    :func:`pipeline.predictions.images_label`)."""
    return default_csv(predictor.dataset, predictor.model_id, images, artifacts_dir)


def predict_images(
    model_path: str | Path,
    images: str | Path,
    out_csv: str | Path | None = None,
    *,
    batch_size: int = 32,
    artifacts_dir: str | Path = "artifacts",
    log: Callable[[str], Any] | None = None,
    progress: bool = False,
) -> Predictions:
    """Classify new images, write a CSV of every class's probability, return the predictions.

    Parameters
    ----------
    model_path : path
        A head (manifest, ``.skops``, ``.joblib`` or ``softmax.keras``) or a fine-tuned
        ``.keras`` model with its ``"finetuned"`` manifest beside it.
    images : path
        An image file or a folder (searched recursively). Images inside folders
        named like the model's classes get a true label (see :func:`true_labels`).
    out_csv : path, optional
        Output CSV (or a folder to write it in), written atomically; default
        ``<artifacts_dir>/predictions/<dataset>/<model id>/<images>-<hash>.csv``
        (:func:`pipeline.predictions.output_path` has the rules). Columns: ``path``,
        ``true_label`` (when some image is in a class folder), ``predicted``, then
        ``probability`` and ``p_<class>`` per class (models with probabilities) or
        ``score`` and ``score_<class>`` (decision values); text cells starting with
        ``= + - @`` get a leading ``'``.
    batch_size : int
        Images per forward pass.
    artifacts_dir : path
        Root of the default output.
    log : callable, optional
        Called with what is being loaded and a line for each skipped image.
    progress : bool
        Show a progress bar over the images.

    Returns
    -------
    Predictions
        Paths, predicted classes, scores, true labels, accuracy, skipped images, the CSV.

    Raises
    ------
    PredictError, HeadError
        Unusable model or input, ``out_csv`` an existing file that is not a
        predictions CSV, no image readable; nothing is written then.

    Examples
    --------
    >>> result = predict_images(
    ...     "artifacts/heads/hymenoptera_data/mobilenet_v2_224_avg_imagenet/svm.json", "new/"
    ... )
    >>> result.records()[0]["predicted"], result.accuracy
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PredictError(f"batch size must be a positive integer; got {batch_size!r}")
    root, paths = list_images(images)
    check_out(out_csv)  # before the model loads: a refusal costs nothing
    predictor = _load(model_path, artifacts_dir, log)
    kept, pred, scores, is_proba, skipped = _score_all(
        predictor, root, paths, batch_size, log, progress
    )
    if not kept:
        raise PredictError(_none_read(images, paths, skipped))
    default = default_output(predictor, images, artifacts_dir)
    result = Predictions(
        out_csv=output_path(out_csv, default, predictor.model_id),
        model=predictor.label,
        class_names=predictor.class_names,
        paths=kept,
        pred=pred,
        scores=scores,
        is_proba=is_proba,
        labels=true_labels(root, kept, predictor.class_names),
        skipped=skipped,
    )
    result.out_csv.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(result.out_csv, result.to_csv())
    return result


def _load(model_path: str | Path, artifacts_dir: str | Path, log: Any) -> Predictor:
    """:func:`load_predictor`, saying what loads (Keras and the backbone take seconds)."""
    say = log or (lambda line: None)
    say(f"loading {model_path} (Keras and the backbone: a few seconds)")
    started = time.perf_counter()
    predictor = load_predictor(model_path, artifacts_dir)
    say(f"loaded {predictor.label} in {time.perf_counter() - started:.1f} s")
    return predictor


def _none_read(images: str | Path, paths: list[str], skipped: list[tuple[str, str]]) -> str:
    first = f" ({skipped[0][0]}: {skipped[0][1]})" if skipped else ""
    return (
        f"none of the {len(paths)} image files under IMAGES={images} could be read{first}; "
        "nothing was written"
    )


def _score_all(
    predictor: Predictor,
    root: Path,
    paths: list[str],
    batch_size: int,
    log: Callable[[str], Any] | None,
    progress: bool,
) -> tuple[list[str], np.ndarray | None, np.ndarray | None, bool, list[tuple[str, str]]]:
    """:attr:`Predictor.score` over ``paths`` a few batches at a time, with a bar over images."""
    kept, preds, scores, skipped, is_proba = [], [], [], [], True
    step = batch_size * 4  # a few batches per call: decoding still runs ahead of the model
    with progress_bar(len(paths), desc="predicting", unit="img", enabled=progress) as bar:
        for start in range(0, len(paths), step):
            chunk = paths[start : start + step]
            got, pred, chunk_scores, chunk_proba, missed = predictor.score(
                root, chunk, batch_size, log
            )
            skipped += missed
            if got:
                kept += got
                preds.append(pred)
                scores.append(chunk_scores)
                is_proba = chunk_proba
            bar.update(len(chunk))
    return kept, _stack(preds, np.int64), _stack(scores, np.float64), is_proba, skipped
