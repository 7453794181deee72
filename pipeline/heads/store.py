"""Saving and loading stage-two heads: the files of one head and their manifest.

Files, in the folder :meth:`pipeline.core.artifacts.Artifacts.heads_dir` names
(``artifacts/heads/<dataset>/<cache stem>/``)::

    <head>.skops               the fitted Pipeline (softmax: without its Keras model), skops.io
    softmax.keras              the Keras model of the softmax head
    <head>.joblib              an export of the same Pipeline for joblib users (runs code when
                               loaded; this module never reads it for a head saved as .skops)
    <head>.predictions.json    per-image predictions on val/test (pipeline.core.artifacts format)
    <head>.json                the manifest (pipeline.core.artifacts schema): cache, fingerprint,
                               features, classes, chosen hyper-parameters, timings, sha256

Manifest ``files`` roles: ``model`` (the ``.skops`` file), ``keras``,
``joblib`` (the export) and ``predictions``. Heads saved before the skops
format name a ``.joblib`` file as ``model`` and have no ``joblib`` role; they
are loaded as before.

Every file is written under a temporary name and renamed into place, the
manifest last, all under the lock of the heads folder (``.lock`` in it), so two
runs on the same cache never leave one head's manifest beside the other run's
files: each checksum is of the bytes this run wrote, taken before the rename,
and a run waits for another's write rather than interleave with it. Loading reads the manifest through
:func:`pipeline.core.artifacts.read_manifest` (so it cannot name a file outside its
folder) and checks the sha256 of each file against it before reading it, so a
truncated, corrupt or swapped file is refused with one line.

A ``.skops`` file is a zip of JSON and ``.npy`` arrays that names the type of
every object in it. :func:`load_head` lists those types before anything is
built and refuses the file, with one line, when one is neither trusted by
skops itself (builtins, NumPy arrays and dtypes, SciPy sparse matrices,
scikit-learn's public estimators) nor in :data:`TRUSTED_TYPES`; so loading a
head never imports or calls code the file chooses. The two trusted native
structures whose contents scikit-learn indexes without bounds checks are not
used as read: random-forest trees are bounds-checked after loading, and a
nearest-neighbour index is rebuilt from the training features it indexes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.pipeline import Pipeline

from pipeline.core import artifacts
from pipeline.core.errors import HeadError
from pipeline.core.files import run_lock, sha256_file, write_atomic
from pipeline.heads.softmax import SoftmaxClassifier
from pipeline.heads.trust import check_skops_head, one_line

# Types a head's .skops file may hold beyond those skops trusts by default, as
# skops.io.get_untrusted_types reports them for the registered heads. Listed by
# name, never trusted=True: anything else in a file is refused unbuilt.
# How long a run waits for another run's write in the same heads folder (a write takes
# about a second; far longer means that run is stuck).
LOCK_SECONDS = 120.0

TRUSTED_TYPES: tuple[str, ...] = (
    # This project's Keras head; its state is its parameters, classes_ and history_
    # (the Keras model is not in it: it is softmax.keras, loaded by Keras).
    "pipeline.heads.softmax.SoftmaxClassifier",
    # The trees of the forest head; their node arrays are bounds-checked on loading.
    "sklearn.tree._tree.Tree",
    # The knn head's index (algorithm="auto" picks a tree on narrow features) and its
    # metric; the index is rebuilt from the stored training features on loading.
    "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.neighbors._ball_tree.BallTree",
    "sklearn.metrics._dist_metrics.EuclideanDistance64",
)


def _file_names(name: str) -> dict[str, str]:
    """Role -> file name of the head ``name`` in its folder (``keras``: softmax heads only)."""
    return {
        "model": f"{name}.skops",
        "joblib": f"{name}.joblib",
        "keras": f"{name}.keras",
        "predictions": f"{name}.predictions.json",
    }


@contextmanager
def _without_keras_model(estimator: Pipeline) -> Iterator[None]:
    """The softmax head without its Keras model while it is saved (softmax.keras holds it)."""
    last = estimator.steps[-1][1]
    if not isinstance(last, SoftmaxClassifier):
        yield
        return
    model, last.model_ = last.model_, None
    try:
        yield
    finally:
        last.model_ = model


def save_head(
    estimator: Pipeline,
    manifest: Mapping[str, Any],
    out_dir: str | Path,
    *,
    predictions: Mapping[str, artifacts.SplitPredictions] | None = None,
    export_joblib: bool = True,
) -> Path:
    """Save a fitted head, its predictions and its manifest (written last).

    Parameters
    ----------
    estimator : Pipeline
        The fitted head.
    manifest : mapping
        From :func:`pipeline.core.artifacts.new_manifest`; ``files`` and ``sha256``
        are added here.
    out_dir : path
        The heads folder of the cache.
    predictions : mapping, optional
        Split -> :class:`~pipeline.core.artifacts.SplitPredictions`; no predictions
        file when empty.
    export_joblib : bool
        Also write ``<head>.joblib`` (what heads were saved as before the
        skops format), for users who load heads with joblib themselves.

    Returns
    -------
    Path
        The manifest, ``<out_dir>/<name>.json``.
    """
    import joblib
    import skops.io

    out_dir = Path(out_dir)
    names = _file_names(manifest["name"])
    files: dict[str, str] = {}
    digests: dict[str, str] = {}

    def write(role: str, dump: Callable[[Path], object]) -> None:
        """Write one file; its checksum is of the bytes this run wrote, taken before the rename."""

        def dump_and_hash(tmp: Path) -> None:
            dump(tmp)
            digests[role] = sha256_file(tmp)

        write_atomic(out_dir / names[role], dump_and_hash)
        files[role] = names[role]

    last = estimator.steps[-1][1]
    with heads_lock(out_dir):  # another run's files never mix with this one's
        if isinstance(last, SoftmaxClassifier):
            write("keras", lambda tmp: last.model_.save(tmp))
        with _without_keras_model(estimator):
            write("model", lambda tmp: skops.io.dump(estimator, tmp))
            if export_joblib:
                write("joblib", lambda tmp: joblib.dump(estimator, tmp))
        if predictions:
            path = _write_predictions(
                out_dir / names["predictions"], manifest["class_names"], predictions
            )
            files["predictions"], digests["predictions"] = path.name, sha256_file(path)
        complete = {**manifest, "files": files, "sha256": digests}
        return artifacts.write_manifest(out_dir / f"{manifest['name']}.json", complete)


@contextmanager
def heads_lock(folder: str | Path, *, timeout: float = LOCK_SECONDS) -> Iterator[None]:
    """Hold ``<folder>/.lock`` while one head's files are written; wait for another run's.

    A head's write takes about a second, so runs on the same cache wait their turn
    rather than fail, and each head's files and manifest come from one run.
    """

    def busy(owner: str) -> HeadError:
        return HeadError(
            f"heads folder {folder} has been locked by another run ({owner}) for {timeout:.0f} s;"
            " wait for it to finish or stop it, then run again"
        )

    with run_lock(Path(folder) / ".lock", busy, timeout=timeout):
        yield


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
    :class:`~pipeline.features.cache.FeatureSet`.
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

        A :class:`~pipeline.features.cache.FeatureSet` is checked with
        :meth:`check_features` first; a plain array only for its width.
        """

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
    """The manifest beside a model file: its ``.json``, ``.skops``, ``.joblib`` or ``.keras`` path.

    A head's manifest is read and checked in full by
    :func:`pipeline.core.artifacts.read_manifest` (schema, files inside its folder);
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
    """Load a head saved by :func:`pipeline.heads.fit.fit_heads` from its ``.json``,
    ``.skops``, ``.joblib`` or ``.keras`` path.

    Every file's sha256 is checked against the manifest before it is read, so a
    corrupt, truncated or swapped head is refused unread. The pipeline is read
    from the ``.skops`` file the manifest names as ``model``, with
    :data:`TRUSTED_TYPES` as the only types trusted beyond skops's own: a file
    holding any other type is refused before anything in it is built. Heads
    saved before the skops format (``model`` is a ``.joblib`` file) are
    unpickled as before, which runs code: load those only if you made them.

    Raises
    ------
    HeadError
        Missing, corrupt or mismatched files, a type that is not trusted, or a
        manifest of another kind.
    """
    manifest, manifest_path = find_manifest(path)
    if manifest["kind"] != "head":
        raise HeadError(
            f"{manifest_path} describes a {manifest['kind']!r} model, not a head; "
            "use `make predict MODEL=...` for it"
        )
    name = manifest.get("name")
    named = manifest.get("files", {})
    roles = ["model", *(role for role in ("keras", "joblib") if role in named)]
    files = {role: artifacts.manifest_file(manifest, manifest_path, role) for role in roles}
    for role, file in files.items():
        if role == "joblib" and file is not None and not file.exists():
            continue  # an export the user removed; nothing reads it
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
    model_file = files["model"]
    if model_file.suffix == ".skops":
        estimator = _read_skops(model_file, name)
    elif model_file.suffix == ".joblib":  # saved before the skops format
        estimator = _read_joblib(model_file)
    else:
        raise HeadError(
            f"{manifest_path} names {model_file.name} as its model; a head's model is a .skops "
            f"file (or .joblib before it): re-run `make head HEAD={name}`"
        )
    if not isinstance(estimator, Pipeline):
        raise HeadError(f"{model_file} holds a {type(estimator).__name__}, not a head pipeline")
    if model_file.suffix == ".skops":
        check_skops_head(estimator, model_file)
    last = estimator.steps[-1][1]
    if isinstance(last, SoftmaxClassifier):
        import keras

        if "keras" not in files:
            raise HeadError(f"{manifest_path} names no .keras file for its Keras head")
        try:
            last.model_ = keras.saving.load_model(files["keras"], compile=False)
        except Exception as exc:
            raise HeadError(f"Keras head {files['keras']} cannot be loaded: {exc}") from None
    _check_unchanged(files, manifest, manifest_path)
    return Head(manifest, estimator, manifest_path)


def _check_unchanged(files: Mapping[str, Path], manifest: Mapping[str, Any], path: Path) -> None:
    """Refuse files another run replaced after they were checked and before they were read."""
    for role, file in files.items():
        if role != "joblib" and sha256_file(file) != manifest.get("sha256", {}).get(role):
            raise HeadError(
                f"head {path} was replaced while it was read (another `make head` saved it); "
                "run the command again"
            )


def _read_skops(file: Path, name: Any) -> Any:
    """The object in a ``.skops`` file, refused unbuilt if it holds an untrusted type."""
    import skops.io

    try:
        untrusted = sorted(set(skops.io.get_untrusted_types(file=file)) - set(TRUSTED_TYPES))
    except Exception as exc:  # not a zip, no schema, a malformed schema
        raise HeadError(
            f"head file {file} is not a readable skops file ({one_line(exc)})"
        ) from None
    if untrusted:
        shown = ", ".join(repr(t) for t in untrusted[:3])
        more = f" and {len(untrusted) - 3} more" if len(untrusted) > 3 else ""
        raise HeadError(
            f"head file {file} holds types a head never holds ({shown}{more}); refused without "
            f"building or running any of it: re-run `make head HEAD={name}` rather than use a "
            "head from elsewhere"
        )
    try:
        return skops.io.load(file, trusted=list(TRUSTED_TYPES))
    except Exception as exc:  # a trusted type with state it cannot take
        raise HeadError(f"head file {file} cannot be loaded: {one_line(exc)}") from None


def _read_joblib(file: Path) -> Any:
    import joblib

    try:
        return joblib.load(file)
    except Exception as exc:  # unpickling raises anything
        raise HeadError(f"head file {file} cannot be loaded: {exc}") from None


def head_outputs(
    estimator: Any, X: np.ndarray, n_classes: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(predicted class index, per-class scores (n, n_classes), scores are probabilities)``.

    Heads without probabilities give their decision function (a binary one as
    ``[-s, s]``); columns of classes the head never saw are ``0`` (or ``-inf``).
    """
    classes = np.asarray(estimator.classes_, dtype=np.int64)
    pred = np.asarray(estimator.predict(X), dtype=np.int64)
    if hasattr(estimator, "predict_proba"):
        raw, fill, is_proba = estimator.predict_proba(X), 0.0, True
    else:
        raw, fill, is_proba = estimator.decision_function(X), -np.inf, False
        if raw.ndim == 1:
            raw = np.column_stack([-raw, raw])
    scores = np.full((len(X), n_classes), fill, dtype=np.float64)
    scores[:, classes] = raw
    return pred, scores, is_proba
