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

import csv
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from pipeline.core.artifacts import Artifacts, dataset_name
from pipeline.core.errors import PipelineError, PredictError
from pipeline.core.files import write_bytes_atomic
from pipeline.data.folders import IMAGE_EXTENSIONS, images_under
from pipeline.data.images import iter_batches, skipped_images
from pipeline.features import backbones, rebuild
from pipeline.finetuning.model import load_finetuned
from pipeline.heads.softmax import two_columns
from pipeline.heads.store import find_manifest, load_head

# Leading characters that make Excel, LibreOffice or Sheets read a cell as a formula (OWASP).
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
TABLE_LIMIT = 20  # print every prediction when there are at most this many images


def spreadsheet_safe(text: str) -> str:
    """``text`` with a ``'`` in front when a spreadsheet would evaluate it as a formula.

    Examples
    --------
    >>> spreadsheet_safe("=HYPERLINK(...)"), spreadsheet_safe("ants/1.jpg")
    ("'=HYPERLINK(...)", 'ants/1.jpg')
    """
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text


@dataclass
class Predictions:
    """What :func:`predict_images` predicted, and where it wrote it.

    Attributes
    ----------
    out_csv : Path
        The CSV written.
    model : str
        The model, in words.
    class_names : tuple of str
        Column order of ``scores``.
    paths : list of str
        Image paths relative to ``IMAGES`` (a folder) or the file's name.
    pred : ndarray of int64
        Predicted class index of each image.
    scores : ndarray of float64, shape (n, n_classes)
        Probabilities (``is_proba``) or decision scores of every class.
    is_proba : bool
        Whether ``scores`` are probabilities.
    labels : ndarray of int64
        True class index from the image's class folder, ``-1`` outside class folders.
    skipped : list of (path, reason)
        Images that could not be read.
    """

    out_csv: Path
    model: str
    class_names: tuple[str, ...]
    paths: list[str]
    pred: np.ndarray
    scores: np.ndarray
    is_proba: bool
    labels: np.ndarray
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def n_predicted(self) -> int:
        return len(self.paths)

    @property
    def n_labelled(self) -> int:
        """Images inside a class folder (they have a true label)."""
        return int(np.sum(self.labels >= 0))

    @property
    def accuracy(self) -> float | None:
        """Accuracy on the images inside class folders; ``None`` when there are none."""
        known = self.labels >= 0
        return float(np.mean(self.pred[known] == self.labels[known])) if known.any() else None

    @property
    def value_column(self) -> str:
        return "probability" if self.is_proba else "score"

    def columns(self) -> list[str]:
        """CSV header: ``path, [true_label,] predicted, probability|score, p_<class>|score_<class>...``."""
        prefix = "p_" if self.is_proba else "score_"
        label = ["true_label"] if self.n_labelled else []
        return ["path", *label, "predicted", self.value_column] + [
            prefix + c for c in self.class_names
        ]

    def records(self) -> list[dict[str, Any]]:
        """One dict per image, keyed by :meth:`columns` (values as Python objects, not text)."""
        names, columns = self.class_names, self.columns()
        out = []
        for i, path in enumerate(self.paths):
            p = int(self.pred[i])
            row: dict[str, Any] = {"path": path}
            if self.n_labelled:
                row["true_label"] = names[self.labels[i]] if self.labels[i] >= 0 else None
            row["predicted"] = names[p]
            row[self.value_column] = float(self.scores[i, p])
            row.update(zip(columns[-len(names) :], map(float, self.scores[i]), strict=True))
            out.append(row)
        return out

    def to_csv(self) -> str:
        """The CSV text; text cells that a spreadsheet would evaluate are prefixed with ``'``."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([spreadsheet_safe(c) for c in self.columns()])
        for record in self.records():
            writer.writerow(
                [
                    f"{v:.6f}" if isinstance(v, float) else spreadsheet_safe(v or "")
                    for v in record.values()
                ]
            )
        return buffer.getvalue()

    def format(self, table_limit: int = TABLE_LIMIT) -> str:
        """What ``make predict`` prints: the file, skipped images, a table when few, accuracy."""
        lines = [
            f"wrote {self.out_csv}: {self.n_predicted} images predicted with {self.model}, "
            f"{len(self.skipped)} skipped"
        ]
        lines += [f"  skipped {path}: {reason}" for path, reason in self.skipped]
        if 0 < self.n_predicted <= table_limit:
            lines += self._table()
        accuracy = self.accuracy
        if accuracy is not None:
            correct = int(round(accuracy * self.n_labelled))
            outside = self.n_predicted - self.n_labelled
            rest = f"; {outside} outside class folders not scored" if outside else ""
            lines.append(
                f"accuracy {accuracy:.3f} ({correct}/{self.n_labelled} images in class "
                f"folders{rest})"
            )
        return "\n".join(lines)

    def _table(self) -> list[str]:
        labelled = bool(self.n_labelled)
        header = ["path", *(["true"] if labelled else []), "predicted", self.value_column]
        rows = [header]
        for record in self.records():
            row = [_shorten(record["path"], 48)]
            if labelled:
                row.append(record["true_label"] or "-")
            value = record[self.value_column]
            row += [record["predicted"], f"{value:.3f}"]
            if labelled and record["true_label"] not in (None, record["predicted"]):
                row[-1] += "  wrong"
            rows.append(row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        return [
            "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in rows
        ]


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3) :]


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
    """``artifacts/predictions/<dataset>/<model id>/<images name>.csv`` (see :mod:`pipeline.core.artifacts`)."""

    images = Path(images).expanduser()
    name = images.stem if images.is_file() else dataset_name(images)
    return Artifacts(artifacts_dir).predictions_csv(predictor.dataset, predictor.model_id, name)


def predict_images(
    model_path: str | Path,
    images: str | Path,
    out_csv: str | Path | None = None,
    *,
    batch_size: int = 32,
    artifacts_dir: str | Path = "artifacts",
    log: Callable[[str], Any] | None = None,
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
        Output CSV, written atomically. Default
        ``<artifacts_dir>/predictions/<dataset>/<model id>/<images name>.csv``,
        where the model id is ``<cache stem>_<head>`` for a head and the run's
        name for a fine-tuned model. Columns: ``path``, ``true_label`` (only
        when some image is in a class folder), ``predicted``, then
        ``probability`` and ``p_<class>`` for every class for models with
        probabilities, ``score`` and ``score_<class>`` (decision values) for the
        others. Text cells starting with ``= + - @`` get a leading ``'``.
    batch_size : int
        Images per forward pass.
    artifacts_dir : path
        Root of the default output.
    log : callable, optional
        Called with a line for each skipped image.

    Returns
    -------
    Predictions
        Paths, predicted classes, every class's scores, true labels, the
        accuracy on images in class folders, skipped images, the CSV's path.

    Raises
    ------
    PredictError, HeadError
        Unusable model or input; nothing is written then.

    Examples
    --------
    >>> result = predict_images(
    ...     "artifacts/heads/hymenoptera_data/mobilenet_v2_224_avg_imagenet/svm.json", "new/"
    ... )
    >>> result.records()[0]["predicted"], result.accuracy
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PredictError(f"batch size must be a positive integer; got {batch_size!r}")
    predictor = load_predictor(model_path, artifacts_dir)
    root, paths = list_images(images)
    k = len(predictor.class_names)
    kept, pred, scores, is_proba, skipped = predictor.score(root, paths, batch_size, log)

    result = Predictions(
        out_csv=Path(out_csv) if out_csv else default_output(predictor, images, artifacts_dir),
        model=predictor.label,
        class_names=predictor.class_names,
        paths=kept,
        pred=pred if pred is not None else np.zeros(0, np.int64),
        scores=scores if scores is not None else np.zeros((0, k)),
        is_proba=is_proba,
        labels=true_labels(root, kept, predictor.class_names),
        skipped=skipped,
    )
    result.out_csv.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(result.out_csv, result.to_csv())
    return result
