"""Predicting new images with a head (backbone + head) or a fine-tuned model.

``MODEL`` is one of:

- a head of stage two: its manifest ``<head>.json``, its ``<head>.joblib`` or,
  for the softmax head, ``softmax.keras``. The backbone is rebuilt from the
  manifest (backbone, weights source, input size, pooling, layer), its features
  are checked against the head's (:meth:`pipeline.head_store.Head.check_features`)
  and the head is applied;
- a fine-tuned model of stage three: ``<name>.keras`` with ``<name>.json``
  beside it whose ``"kind"`` is ``"finetuned"``. The model takes float32 RGB
  images in 0..255 of ``manifest["input_size"]`` pixels (preprocessing inside
  the model) and outputs class probabilities (one sigmoid unit for two classes
  is read as the probability of class 1); ``manifest["class_names"]`` names
  the outputs.

Images are decoded by :mod:`pipeline.images` exactly as in stage one;
unreadable files are skipped and reported, like stage one does.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError, PredictError
from pipeline.files import write_bytes_atomic
from pipeline.images import IMAGE_EXTENSIONS, images_under, iter_batches


@dataclass
class PredictionSummary:
    """What :func:`predict_images` did."""

    out_csv: Path
    model: str
    predicted: int
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def format(self) -> str:
        lines = [
            f"wrote {self.out_csv}: {self.predicted} images predicted with {self.model}, "
            f"{len(self.skipped)} skipped"
        ]
        lines += [f"  skipped {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


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


def _head_predictor(
    model_path: Path,
) -> tuple[str, int, Callable[[np.ndarray], np.ndarray], Callable, tuple]:
    """Preprocess, size and a function from a preprocessed batch to ``(pred, scores, is_proba)``."""
    from pipeline import backbones
    from pipeline.head_store import load_head

    head = load_head(model_path)
    m = head.manifest
    source = m.get("weights_source") or "imagenet"
    if source == "none":
        raise PredictError(
            f"head {head.path} was fit on features of a randomly initialised backbone "
            "(WEIGHTS=none), which cannot be rebuilt; fit it on imagenet or file weights"
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

    label = f"{spec.name} + {head.name} head"
    return label, int(m["input_size"]), spec.preprocess, run, head.class_names


def _finetuned_predictor(model_path: Path, manifest: dict[str, Any]):
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
    from pipeline.finetune_model import load_finetuned

    try:
        model = load_finetuned(keras_path)
    except Exception as exc:
        raise PredictError(f"fine-tuned model {keras_path} cannot be loaded: {exc}") from None
    k = len(class_names)

    def run(x: np.ndarray):
        p = np.asarray(model.predict_on_batch(x), dtype=np.float64)
        if p.ndim == 2 and p.shape[1] == 1 and k == 2:
            p = np.hstack([1.0 - p, p])
        if p.ndim != 2 or p.shape[1] != k:
            raise PredictError(
                f"{keras_path} outputs shape {p.shape}, expected (n, {k}) for {k} classes"
            )
        return np.argmax(p, axis=1), p, True

    def as_float(batch: np.ndarray) -> np.ndarray:
        return batch.astype(np.float32)

    return f"fine-tuned {keras_path.name}", size, as_float, run, class_names


def predict_images(
    model_path: str | Path,
    images: str | Path,
    out_csv: str | Path,
    *,
    batch_size: int = 32,
    log: Callable[[str], Any] | None = None,
) -> PredictionSummary:
    """Classify new images and write a CSV of ``path, class, probability, score``.

    Parameters
    ----------
    model_path : path
        A head (manifest, ``.joblib`` or ``softmax.keras``) or a fine-tuned
        ``.keras`` model with its ``"finetuned"`` manifest beside it.
    images : path
        An image file or a folder (searched recursively).
    out_csv : path
        Output CSV, written atomically. ``probability`` is filled for models
        with probabilities, ``score`` (the decision score of the predicted
        class) for the others.
    batch_size : int
        Images per forward pass.
    log : callable, optional
        Called with a line for each skipped image.

    Returns
    -------
    PredictionSummary
        Output path, counts, skipped images with reasons.

    Raises
    ------
    PredictError, HeadError
        Unusable model or input; nothing is written then.

    Examples
    --------
    >>> predict_images("artifacts/heads/hymenoptera_data/mobilenet_v2_224_avg_imagenet/svm.json",
    ...                "new_images/", "predictions.csv")
    """
    from pipeline.head_store import find_manifest

    if not isinstance(batch_size, int) or batch_size < 1:
        raise PredictError(f"batch size must be a positive integer; got {batch_size!r}")
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
        label, size, preprocess, run, class_names = _head_predictor(model_path)
    elif kind == "finetuned":
        label, size, preprocess, run, class_names = _finetuned_predictor(model_path, manifest)
    else:
        raise PredictError(
            f"MODEL={model_path}: manifest kind {kind!r} is neither 'head' nor 'finetuned'"
        )
    root, paths = list_images(images)

    rows, skipped = [], []
    for batch in iter_batches(root, paths, size=size, batch_size=batch_size, preprocess=preprocess):
        for offset, reason in batch.errors.items():
            skipped.append((paths[batch.start + offset], reason))
            if log is not None:
                log(f"skipped {paths[batch.start + offset]}: {reason}")
        if not len(batch.x):
            continue
        pred, scores, is_proba = run(batch.x)
        ok_paths = [paths[batch.start + i] for i in np.flatnonzero(batch.ok)]
        for rel, p, row in zip(ok_paths, pred, scores, strict=True):
            value = f"{float(row[int(p)]):.6f}"
            rows.append(
                [rel, class_names[int(p)], value if is_proba else "", "" if is_proba else value]
            )

    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "class", "probability", "score"])
    writer.writerows(rows)
    write_bytes_atomic(out_csv, buffer.getvalue())
    return PredictionSummary(out_csv, label, len(rows), skipped)
