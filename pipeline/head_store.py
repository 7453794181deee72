"""Saving and loading stage-two heads: the files of one head and their manifest.

Files, in the folder :meth:`pipeline.artifacts.Artifacts.heads_dir` names
(``artifacts/heads/<dataset>/<cache stem>/``)::

    <head>.joblib              the fitted Pipeline (softmax: without its Keras model)
    softmax.keras              the Keras model of the softmax head
    <head>.predictions.json    per-image predictions on val/test (pipeline.artifacts format)
    <head>.json                the manifest (pipeline.artifacts schema): cache, fingerprint,
                               features, classes, chosen hyper-parameters, timings, sha256

Every file is written under a temporary name and renamed into place, the
manifest last. Loading reads the manifest through
:func:`pipeline.artifacts.read_manifest` (so it cannot name a file outside its
folder) and checks the sha256 of each file against it *before* unpickling, so
a truncated, corrupt or swapped file is refused with one line. joblib files
still run code when loaded: load only heads you made.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.pipeline import Pipeline

from pipeline import artifacts
from pipeline.errors import HeadError
from pipeline.files import sha256_file, write_atomic
from pipeline.softmax import SoftmaxClassifier


def _file_names(name: str) -> dict[str, str]:
    """Role -> file name of the head ``name`` in its folder (``keras``: softmax heads only)."""
    return {
        "model": f"{name}.joblib",
        "keras": f"{name}.keras",
        "predictions": f"{name}.predictions.json",
    }


def save_head(
    estimator: Pipeline,
    manifest: Mapping[str, Any],
    out_dir: str | Path,
    *,
    predictions: Mapping[str, artifacts.SplitPredictions] | None = None,
) -> Path:
    """Save a fitted head, its predictions and its manifest (written last).

    Parameters
    ----------
    estimator : Pipeline
        The fitted head.
    manifest : mapping
        From :func:`pipeline.artifacts.new_manifest`; ``files`` and ``sha256``
        are added here.
    out_dir : path
        The heads folder of the cache.
    predictions : mapping, optional
        Split -> :class:`~pipeline.artifacts.SplitPredictions`; no predictions
        file when empty.

    Returns
    -------
    Path
        The manifest, ``<out_dir>/<name>.json``.
    """
    import joblib

    out_dir = Path(out_dir)
    names = _file_names(manifest["name"])
    files: dict[str, str] = {}
    last = estimator.steps[-1][1]
    if isinstance(last, SoftmaxClassifier):
        write_atomic(out_dir / names["keras"], lambda tmp: last.model_.save(tmp))
        files["keras"] = names["keras"]
        model, last.model_ = last.model_, None  # the .keras file holds it
        try:
            write_atomic(out_dir / names["model"], lambda tmp: joblib.dump(estimator, tmp))
        finally:
            last.model_ = model
    else:
        write_atomic(out_dir / names["model"], lambda tmp: joblib.dump(estimator, tmp))
    files["model"] = names["model"]
    if predictions:
        files["predictions"] = names["predictions"]
        _write_predictions(out_dir / names["predictions"], manifest["class_names"], predictions)
    complete = {
        **manifest,
        "files": files,
        "sha256": {role: sha256_file(out_dir / file) for role, file in files.items()},
    }
    return artifacts.write_manifest(out_dir / f"{manifest['name']}.json", complete)


def _write_predictions(
    path: Path, class_names: Sequence[str], predictions: Mapping[str, artifacts.SplitPredictions]
) -> Path:
    splits = list(predictions.values())
    return artifacts.write_predictions(
        path,
        class_names,
        paths=np.concatenate([p.paths for p in splits]),
        split=[s for s, p in predictions.items() for _ in range(len(p.paths))],
        labels=np.concatenate([p.labels for p in splits]),
        pred=np.concatenate([p.pred for p in splits]),
        scores=np.concatenate([p.scores for p in splits]),
        is_proba=splits[0].is_proba,
    )


@dataclass
class Head:
    """A loaded head: its manifest and its fitted pipeline.

    Use :meth:`check_features` before scoring features that did not come from
    the head's own cache; :meth:`predict` does it for a
    :class:`~pipeline.cache.FeatureSet`.
    """

    manifest: dict[str, Any]
    estimator: Pipeline
    path: Path

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.manifest["class_names"])

    def check_features(
        self, attrs: Mapping[str, Any], width: int, class_names: Sequence[str] | None = None
    ) -> None:
        """Refuse features of another backbone, configuration, width or class list.

        Raises
        ------
        HeadError
            Naming what differs and how to get a matching head.
        """
        m = self.manifest
        differs = [
            f"{key} {attrs.get(key)!r} (head: {m.get(key)!r})"
            for key in artifacts.FEATURE_IDENTITY
            if str(attrs.get(key, "")) != str(m.get(key, ""))
        ]
        if differs:
            raise HeadError(
                f"head {self.path} was fit on other features: {'; '.join(differs)}; fit a head on "
                f"this cache (make head BACKBONE={attrs.get('backbone')} ...)"
            )
        if int(width) != int(m["feature_width"]):
            raise HeadError(
                f"X has {width} features, but the head {self.path} expects {m['feature_width']}"
            )
        if class_names is not None and tuple(class_names) != self.class_names:
            raise HeadError(
                f"head {self.path} knows classes {list(self.class_names)}; these features are "
                f"labelled {list(class_names)}: fit a head on this data set"
            )

    def predict(self, features: Any) -> tuple[np.ndarray, np.ndarray, bool]:
        """``(class index, scores, scores are probabilities)`` of a FeatureSet or an array.

        A :class:`~pipeline.cache.FeatureSet` is checked with
        :meth:`check_features` first; a plain array only for its width.
        """
        from pipeline.heads import head_outputs  # heads saves through this module

        if hasattr(features, "attrs"):
            self.check_features(features.attrs, features.features.shape[1], features.class_names)
            X = features.features
        else:
            X = np.asarray(features, dtype=np.float32)
            if X.ndim != 2 or X.shape[1] != int(self.manifest["feature_width"]):
                raise HeadError(
                    f"X has {X.shape[-1] if X.ndim else 0} features, but the head {self.path} "
                    f"expects {self.manifest['feature_width']}"
                )
        return head_outputs(self.estimator, X, len(self.class_names))


def find_manifest(path: str | Path) -> tuple[dict[str, Any], Path]:
    """The manifest beside a model file: its ``.json``, ``.joblib`` or ``.keras`` path.

    A head's manifest is read and checked in full by
    :func:`pipeline.artifacts.read_manifest` (schema, files inside its folder);
    any other kind (a fine-tuned model's) is returned as written, for its own
    reader to check.

    Returns
    -------
    (dict, Path)
        The manifest and its path.

    Raises
    ------
    HeadError
        A missing file, no manifest beside it, or a manifest that cannot be used.
    """
    path = Path(path)
    manifest_path = path if path.suffix == ".json" else path.with_suffix(".json")
    if not path.exists():
        raise HeadError(f"no such file: {path}")
    if not manifest_path.is_file():
        raise HeadError(
            f"no manifest {manifest_path.name} beside {path}; a head needs the manifest written "
            "with it (re-run `make head`)"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise HeadError(
            f"manifest {manifest_path} is not readable JSON ({exc}); re-run `make head`"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("kind") not in artifacts.KINDS:
        raise HeadError(f"{manifest_path} is not a head or model manifest (no valid 'kind')")
    if manifest["kind"] == "head":
        try:
            manifest = artifacts.read_manifest(manifest_path, kind="head")
        except artifacts.ArtifactError as exc:
            raise HeadError(f"{exc}; re-run `make head`") from None
    return manifest, manifest_path


def load_head(path: str | Path) -> Head:
    """Load a head saved by :func:`pipeline.heads.fit_heads` from its ``.json``,
    ``.joblib`` or ``.keras`` path.

    Every file's sha256 is checked against the manifest before it is read, so a
    corrupt, truncated or swapped head is refused without being unpickled.
    joblib files run code when loaded: load only heads you made.

    Raises
    ------
    HeadError
        Missing, corrupt or mismatched files, or a manifest of another kind.
    """
    import joblib

    manifest, manifest_path = find_manifest(path)
    if manifest["kind"] != "head":
        raise HeadError(
            f"{manifest_path} describes a {manifest['kind']!r} model, not a head; "
            "use `make predict MODEL=...` for it"
        )
    name = manifest.get("name")
    roles = ("model", *(["keras"] if "keras" in manifest.get("files", {}) else []))
    files = {role: artifacts.manifest_file(manifest, manifest_path, role) for role in roles}
    for role, file in files.items():
        if file is None or not file.is_file():
            raise HeadError(
                f"head file {file or role} of {manifest_path} is missing; "
                f"re-run `make head HEAD={name}`"
            )
        if sha256_file(file) != manifest.get("sha256", {}).get(role):
            raise HeadError(
                f"head file {file} is corrupt, truncated or from another run (its checksum differs "
                f"from {manifest_path.name}); re-run `make head HEAD={name}`"
            )
    try:
        estimator = joblib.load(files["model"])
    except Exception as exc:  # unpickling raises anything
        raise HeadError(f"head file {files['model']} cannot be loaded: {exc}") from None
    if not isinstance(estimator, Pipeline):
        raise HeadError(f"{files['model']} holds a {type(estimator).__name__}, not a head pipeline")
    last = estimator.steps[-1][1]
    if isinstance(last, SoftmaxClassifier):
        import keras

        if "keras" not in files:
            raise HeadError(f"{manifest_path} names no .keras file for its Keras head")
        try:
            last.model_ = keras.saving.load_model(files["keras"], compile=False)
        except Exception as exc:
            raise HeadError(f"Keras head {files['keras']} cannot be loaded: {exc}") from None
    return Head(manifest, estimator, manifest_path)
