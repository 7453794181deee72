"""Stage two: classifier heads fitted on cached features, saved with a manifest.

Every head is a scikit-learn :class:`~sklearn.pipeline.Pipeline` of three named
steps, ``("norm", ...)``, ``("pca", ...)`` and the classifier, so one
cross-validation, one evaluation and one save routine serve them all:

========  ==================================  ==============  ===========================
name      classifier                          default norm    grid (chosen by CV)
========  ==================================  ==============  ===========================
svm       ``LinearSVC``                        l2 per sample   C
rbf_svm   ``SVC(kernel="rbf")``                l2 per sample   C
logreg    ``LogisticRegression``               none            C
knn       ``KNeighborsClassifier``             l2 per sample   n_neighbors
ridge     ``RidgeClassifier``                  standard        alpha
softmax   :class:`SoftmaxClassifier` (Keras)   none            learning_rate (epochs:
                                                               early stopping)
forest    ``RandomForestClassifier``           none            min_samples_leaf
========  ==================================  ==============  ===========================

``HEAD=all`` fits the default heads (every one but ``forest``, which is slow on
wide features and must be named). L2 normalisation before a linear SVM is the
"CNN features off-the-shelf" recipe of Razavian et al. (2014). The softmax head
takes the raw features (no normalisation step), so its ``.keras`` file maps
backbone features straight to probabilities and stage three can put it on top
of the backbone as it is.

Files, under ``artifacts/heads/<dataset>/<cache stem>/``::

    <head>.joblib              the fitted Pipeline (softmax: without its Keras model)
    softmax.keras              the Keras model of the softmax head
    <head>.predictions.json    per-image predictions on val/test (see pipeline.report)
    <head>.json                the manifest: cache, fingerprint, features, classes,
                               chosen hyper-parameters, timings, sha256 of each file

Every file is written under a temporary name and renamed into place, the
manifest last. Loading checks the sha256 of each file against the manifest
*before* unpickling, so a truncated, corrupt or swapped file is refused with one
line. joblib files still run code when loaded: load only heads you made.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.pipeline import Pipeline
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from pipeline.errors import HeadError, did_you_mean
from pipeline.files import sha256_file, write_atomic, write_json_atomic

MANIFEST_VERSION = 1
NORMS = ("l2", "standard", "none")
# What makes two caches' features interchangeable for a head (not the images, not the split).
FEATURE_IDENTITY = ("backbone", "weights", "input_size", "pooling", "layer", "preprocessing")


# --------------------------------------------------------------------------- softmax wrapper


class SoftmaxClassifier(ClassifierMixin, BaseEstimator):
    """The seed documents' Keras softmax head as a scikit-learn classifier.

    ``Flatten -> Dense(hidden, relu) -> Dropout(dropout) -> Dense(k, softmax)``
    (:func:`pipeline.softmax.build_softmax_head`), trained with Adam on sparse
    categorical cross-entropy. A stratified ``validation_fraction`` of the
    training data is held out for early stopping: training stops after
    ``patience`` epochs without a lower held-out loss and keeps the best
    epoch's weights.

    Parameters
    ----------
    hidden : int
        Units of the hidden dense layer.
    dropout : float
        Dropout rate in [0, 1).
    learning_rate : float
        Adam's learning rate.
    max_epochs : int
        Upper bound on epochs.
    batch_size : int
        Mini-batch size.
    patience : int
        Epochs without improvement of the held-out loss before stopping.
    validation_fraction : float
        Share of the training data held out for early stopping, in [0, 1);
        0 (or too few images per class) trains ``max_epochs`` on everything.
    sigmoid : bool
        Two classes only: one sigmoid unit and binary cross-entropy.
    random_state : int
        Seeds weight initialisation, dropout, the hold-out split and shuffling.

    Attributes
    ----------
    classes_ : ndarray
        Class labels seen in ``fit``.
    n_features_in_ : int
        Feature width seen in ``fit``.
    model_ : keras.Model
        The trained Keras model.
    n_epochs_ : int
        Epochs of the kept weights (the best held-out loss).
    history_ : dict
        ``{"loss": [...], "val_loss": [...]}`` per epoch.

    Notes
    -----
    Training uses ``train_on_batch`` in a plain loop: on CPU, ``Model.fit``
    spends several times longer in per-epoch overhead than in arithmetic for a
    head this small. Each epoch reshuffles and drops its incomplete last batch,
    so the training step is traced for one batch shape only. ``fit`` calls ``keras.utils.set_random_seed`` (the global
    Python, NumPy and backend seeds), which is how Keras makes a run repeatable.
    """

    def __init__(
        self,
        hidden: int = 64,
        dropout: float = 0.25,
        *,
        learning_rate: float = 1e-3,
        max_epochs: int = 100,
        batch_size: int = 32,
        patience: int = 5,
        validation_fraction: float = 0.15,
        sigmoid: bool = False,
        random_state: int = 0,
    ) -> None:
        self.hidden = hidden
        self.dropout = dropout
        self.learning_rate = learning_rate
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.sigmoid = sigmoid
        self.random_state = random_state

    def _check_params(self) -> None:
        def bad(name: str, what: str) -> ValueError:
            return ValueError(
                f"The {name!r} parameter of SoftmaxClassifier must be {what}. "
                f"Got {getattr(self, name)!r} instead."
            )

        for name in ("hidden", "max_epochs", "batch_size", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise bad(name, "an int in [1, inf)")
        if not isinstance(self.learning_rate, float | int) or not self.learning_rate > 0:
            raise bad("learning_rate", "a float in (0, inf)")
        if not isinstance(self.dropout, float | int) or not 0 <= self.dropout < 1:
            raise bad("dropout", "a float in [0, 1)")
        if not isinstance(self.validation_fraction, float | int) or not (
            0 <= self.validation_fraction < 1
        ):
            raise bad("validation_fraction", "a float in [0, 1)")

    def fit(self, X: Any, y: Any) -> SoftmaxClassifier:
        """Train on ``X`` (n, d) and labels ``y`` (n,); returns ``self``."""
        import keras

        from pipeline.softmax import build_softmax_head

        self._check_params()
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_, encoded = np.unique(y, return_inverse=True)
        k = len(self.classes_)
        if k < 2:
            raise ValueError(
                f"SoftmaxClassifier needs samples of at least two classes; got one class: "
                f"{self.classes_[0]!r}"
            )
        if self.sigmoid and k != 2:
            raise ValueError(
                f"The 'sigmoid' parameter of SoftmaxClassifier needs exactly two classes. "
                f"Got {k} classes instead."
            )
        encoded = encoded.astype(np.int64)
        keras.utils.set_random_seed(int(self.random_state))
        X_fit, y_fit, X_held, y_held = self._hold_out(X, encoded)

        model = build_softmax_head(
            X.shape[1],
            k,
            hidden=int(self.hidden),
            dropout=float(self.dropout),
            sigmoid=bool(self.sigmoid),
        )
        loss = "binary_crossentropy" if self.sigmoid else "sparse_categorical_crossentropy"
        model.compile(optimizer=keras.optimizers.Adam(float(self.learning_rate)), loss=loss)
        y_train = y_fit.astype(np.float32)[:, None] if self.sigmoid else y_fit

        rng = np.random.default_rng(self.random_state)
        history: dict[str, list[float]] = {"loss": [], "val_loss": []}
        best_loss, best_epoch, best_weights = np.inf, 0, None
        for epoch in range(1, int(self.max_epochs) + 1):
            order = rng.permutation(len(X_fit))
            losses = []
            # Full batches only (the order changes every epoch): one batch shape, one trace.
            size = min(int(self.batch_size), len(order))
            for start in range(0, len(order) - size + 1, size):
                rows = order[start : start + size]
                losses.append(float(np.asarray(model.train_on_batch(X_fit[rows], y_train[rows]))))
            history["loss"].append(float(np.mean(losses)))
            if X_held is None:
                continue
            held_loss = _cross_entropy(self._proba(model, X_held), y_held)
            history["val_loss"].append(held_loss)
            if held_loss < best_loss - 1e-6:
                best_loss, best_epoch, best_weights = held_loss, epoch, model.get_weights()
            elif epoch - best_epoch >= int(self.patience):
                break
        if best_weights is not None:
            model.set_weights(best_weights)
        self.n_epochs_ = best_epoch if X_held is not None else int(self.max_epochs)
        self.history_ = history
        self.model_ = model
        return self

    def _hold_out(self, X: np.ndarray, y: np.ndarray):
        """Split off the early-stopping data, or ``None`` when it is too small to be useful."""
        from sklearn.model_selection import train_test_split

        k = int(y.max()) + 1
        n_held = int(round(len(y) * self.validation_fraction))
        if self.validation_fraction == 0 or n_held < k or np.bincount(y, minlength=k).min() < 2:
            return X, y, None, None
        X_fit, X_held, y_fit, y_held = train_test_split(
            X, y, test_size=n_held, stratify=y, random_state=self.random_state
        )
        return X_fit, y_fit, X_held, y_held

    def _proba(self, model: Any, X: np.ndarray) -> np.ndarray:
        parts = [
            np.asarray(model(X[start : start + 4096], training=False), dtype=np.float64)
            for start in range(0, len(X), 4096)
        ]
        p = np.concatenate(parts) if parts else np.zeros((0, 1 if self.sigmoid else 2))
        if self.sigmoid:
            p = np.hstack([1.0 - p, p])
        return p

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, shape (n, n_classes), columns in ``classes_`` order."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, reset=False)
        return self._proba(self.model_, X)

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class of each row."""
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        model = state.pop("model_", None)
        if model is not None:  # pickle (joblib, clone of fitted copies) via the .keras format
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.keras"
                model.save(path)
                state["_model_bytes"] = path.read_bytes()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        data = state.pop("_model_bytes", None)
        self.__dict__.update(state)
        if data is not None:
            import keras

            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.keras"
                path.write_bytes(data)
                self.model_ = keras.saving.load_model(path, compile=False)


def _cross_entropy(proba: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(proba[np.arange(len(y)), y], 1e-12, 1.0))))


# --------------------------------------------------------------------------- the head registry


@dataclass(frozen=True)
class HeadSpec:
    """One registered head: its classifier, default normalisation and CV grid."""

    name: str
    description: str
    norm: str
    grid: Mapping[str, tuple]
    default: bool = True  # part of HEAD=all
    # Search on one stratified 25% hold-out of train instead of k folds: for the Keras head,
    # whose fits cost a hundred times a linear model's.
    holdout: bool = False

    def estimator(self, seed: int) -> BaseEstimator:
        """A fresh, unfitted classifier (the last step of the head's pipeline)."""
        from sklearn.ensemble import RandomForestClassifier
        from sklearn.linear_model import LogisticRegression, RidgeClassifier
        from sklearn.neighbors import KNeighborsClassifier
        from sklearn.svm import SVC, LinearSVC

        if self.name == "svm":
            return LinearSVC(C=1.0, max_iter=10_000, random_state=seed)
        if self.name == "rbf_svm":
            return SVC(kernel="rbf", C=10.0, gamma="scale", random_state=seed)
        if self.name == "logreg":
            return LogisticRegression(C=1.0, max_iter=2000, random_state=seed)
        if self.name == "knn":
            return KNeighborsClassifier(n_neighbors=5)
        if self.name == "ridge":
            return RidgeClassifier(alpha=100.0)
        if self.name == "forest":
            return RandomForestClassifier(n_estimators=200, random_state=seed, n_jobs=1)
        if self.name == "softmax":
            return SoftmaxClassifier(random_state=seed)
        raise HeadError(f"internal: no estimator for head {self.name!r}")


_REGISTRY: tuple[HeadSpec, ...] = (
    HeadSpec("svm", "linear SVM (LinearSVC)", "l2", {"C": (0.1, 1.0, 10.0)}),
    HeadSpec("rbf_svm", "RBF-kernel SVM (SVC)", "l2", {"C": (1.0, 10.0)}),
    # Raw features: cross-validation on both real data sets prefers them to l2 or standard.
    HeadSpec("logreg", "logistic regression", "none", {"C": (0.1, 1.0, 10.0)}),
    HeadSpec("knn", "k nearest neighbours", "l2", {"n_neighbors": (1, 5, 15)}),
    HeadSpec("ridge", "ridge classifier", "standard", {"alpha": (10.0, 100.0, 1000.0)}),
    HeadSpec(
        "softmax",
        "Keras softmax head (Dense 64, dropout, softmax)",
        "none",
        {"learning_rate": (1e-3, 3e-3)},
        holdout=True,
    ),
    HeadSpec(
        "forest", "random forest (200 trees)", "none", {"min_samples_leaf": (1, 3)}, default=False
    ),
)
HEADS: dict[str, HeadSpec] = {spec.name: spec for spec in _REGISTRY}
DEFAULT_HEADS: tuple[str, ...] = tuple(spec.name for spec in _REGISTRY if spec.default)


def resolve_heads(names: str | Iterable[str]) -> tuple[str, ...]:
    """Head names from user input: ``"all"``, ``"svm,logreg"`` or a list.

    Raises
    ------
    HeadError
        An unknown name, with the closest registered names suggested.
    """
    if isinstance(names, str):
        names = [names]
    out: list[str] = []
    for item in names:
        for name in str(item).replace(",", " ").split():
            key = name.strip().lower().replace("-", "_")
            chosen = DEFAULT_HEADS if key in ("all", "default") else (key,)
            for head in chosen:
                if head not in HEADS:
                    raise HeadError(
                        f"unknown head {name!r}{did_you_mean(key, [*HEADS, 'all'])} "
                        f"(heads: {', '.join(HEADS)}, or all)"
                    )
                if head not in out:
                    out.append(head)
    if not out:
        raise HeadError(f"no head given; pick from {', '.join(HEADS)}, or all")
    return tuple(out)


def build_head(
    name: str, *, norm: str | None = None, pca: int | None = None, seed: int = 0
) -> Pipeline:
    """An unfitted head: ``Pipeline([("norm", ...), ("pca", ...), (name, classifier)])``.

    Parameters
    ----------
    name : str
        A registered head (see :data:`HEADS`).
    norm : {"l2", "standard", "none"}, optional
        Normalisation step; the head's default when omitted.
    pca : int, optional
        Keep this many principal components after normalisation.
    seed : int
        Seed of every random step.

    Examples
    --------
    >>> head = build_head("svm")
    >>> [step for step, _ in head.steps]
    ['norm', 'pca', 'svm']
    """
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import Normalizer, StandardScaler

    spec = HEADS[resolve_heads(name)[0]]
    norm = spec.norm if norm is None else norm
    if norm not in NORMS:
        raise HeadError(
            f"NORM must be one of {', '.join(NORMS)}; got {norm!r}{did_you_mean(norm, NORMS)}"
        )
    if pca is not None and (isinstance(pca, bool) or not isinstance(pca, int) or pca < 1):
        raise HeadError(f"PCA must be a positive number of components; got {pca!r}")
    norm_step = {"l2": Normalizer("l2"), "standard": StandardScaler(), "none": "passthrough"}[norm]
    pca_step = PCA(n_components=pca, random_state=seed) if pca else "passthrough"
    return Pipeline([("norm", norm_step), ("pca", pca_step), (spec.name, spec.estimator(seed))])


# --------------------------------------------------------------------------- fitting


@dataclass
class HeadResult:
    """One fitted and saved head (what :func:`fit_heads` returns per head)."""

    head: str
    manifest_path: Path
    manifest: dict[str, Any] = field(repr=False)

    def format(self) -> str:
        """One line for the CLI: head, chosen values, CV and held-out accuracy, timing."""
        m = self.manifest
        params = ", ".join(f"{k}={_short(v)}" for k, v in m["params"].items())
        scores = [f"cv {m['cv']['score']:.3f}" if m["cv"]["score"] is not None else "cv -"]
        scores += [f"{s} {v['accuracy']:.3f}" for s, v in m["metrics"].items()]
        return (
            f"{self.head:<8} {params:<24} {'  '.join(scores):<32} "
            f"fit {m['fit_seconds']:6.2f} s  -> {self.manifest_path}"
        )


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def fit_heads(
    cache_path: str | Path,
    heads: str | Sequence[str] = ("all",),
    *,
    artifacts_dir: str | Path = "artifacts",
    norm: str | None = None,
    pca: int | None = None,
    cv: int = 3,
    seed: int = 0,
    jobs: int = 1,
    log: Any = None,
) -> list[HeadResult]:
    """Fit heads on the train split of a feature cache and save them with manifests.

    Hyper-parameters are chosen by stratified ``cv``-fold cross-validation
    (accuracy) on the train split (the softmax head: one stratified 25% hold-out
    of train, its fits being the costly ones), then the head is refitted on the
    whole train split and evaluated on ``val`` and ``test`` when the cache has
    them.

    Parameters
    ----------
    cache_path : path
        A stage-one feature cache (``artifacts/features/<dataset>/<config>.h5``).
    heads : str or sequence of str
        Head names (:data:`HEADS`), comma-separated names, or ``"all"``.
    artifacts_dir : path
        Output root; heads go under ``heads/<dataset>/<cache stem>/``.
    norm : {"l2", "standard", "none"}, optional
        Override every head's normalisation step.
    pca : int, optional
        Keep this many principal components.
    cv : int
        Folds of the hyper-parameter search (fewer when a class is smaller).
    seed : int
        Seed of the folds and of every random step.
    jobs : int
        Parallel fits of the search (Keras heads always use one).
    log : callable, optional
        Called with one line per fitted head (e.g. ``print``).

    Returns
    -------
    list of HeadResult
        One per head, in the order given.

    Raises
    ------
    HeadError
        Unknown head, a train split with one class, a val/test class absent
        from train. Nothing is written in these cases.
    CacheError
        A missing or unreadable cache.

    Examples
    --------
    >>> results = fit_heads("artifacts/features/digits/mobilenet_v2_224_avg_imagenet.h5", "svm,softmax")
    >>> print(results[0].format())
    """
    from pipeline.cache import load_features

    names = resolve_heads(heads)
    for name in names:  # every option checked before any fit or write
        build_head(name, norm=norm, pca=pca, seed=seed)
    if isinstance(cv, bool) or not isinstance(cv, int) or cv < 2:
        raise HeadError(f"CV must be a whole number of folds, at least 2; got {cv!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs == 0 or jobs < -1:
        raise HeadError(
            f"JOBS must be a positive number of processes, or -1 for all cores; got {jobs!r}"
        )
    fs = load_features(cache_path)
    X_train, y_train = _check_cache(fs, pca)
    out_dir = head_dir(fs.attrs, fs.path, artifacts_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        result = _fit_one(
            fs, name, X_train, y_train, out_dir, norm=norm, pca=pca, cv=cv, seed=seed, jobs=jobs
        )
        results.append(result)
        if log is not None:
            log(result.format())
    return results


def head_dir(attrs: Mapping[str, Any], cache_path: str | Path, artifacts_dir: str | Path) -> Path:
    """``<artifacts>/heads/<dataset>/<cache stem>/``: where the heads of one cache live."""
    return (
        Path(artifacts_dir) / "heads" / str(attrs.get("dataset", "unknown")) / Path(cache_path).stem
    )


def _check_cache(fs: Any, pca: int | None) -> tuple[np.ndarray, np.ndarray]:
    if "train" not in fs.splits:
        raise HeadError(
            f"cache {fs.path} has no train split (splits: {', '.join(fs.splits)}); heads fit on train"
        )
    X_train, y_train = fs.select("train")
    present = np.unique(y_train)
    if len(present) < 2:
        only = fs.class_names[int(present[0])] if len(present) else "none"
        raise HeadError(
            f"cache {fs.path} has only one class in train ({only!r}); a classifier needs at least "
            "two: add images of another class and re-run `make features`"
        )
    for split in ("val", "test"):
        if split in fs.splits:
            missing = sorted(set(np.unique(fs.select(split)[1]).tolist()) - set(present.tolist()))
            if missing:
                names = ", ".join(repr(fs.class_names[i]) for i in missing)
                raise HeadError(
                    f"class {names} appears in {split} but not in train of {fs.path}; "
                    f"add training images of it or remove it from {split}"
                )
    if pca is not None and pca > min(X_train.shape):
        raise HeadError(
            f"PCA={pca} exceeds what the train split supports (at most {min(X_train.shape)} "
            f"components: {X_train.shape[0]} images of width {X_train.shape[1]})"
        )
    return X_train, y_train


def _search(name: str, pipe: Pipeline, X: np.ndarray, y: np.ndarray, cv: int, seed: int, jobs: int):
    """Grid search on the train split; returns the refitted pipeline and what was chosen."""
    from sklearn.model_selection import GridSearchCV, StratifiedKFold, StratifiedShuffleSplit

    spec = HEADS[name]
    counts = np.bincount(y)
    folds = min(cv, int(counts[counts > 0].min()))
    searchable = folds >= 2  # a class with one image: no fold can hold it out
    n_classes = int(np.sum(counts > 0))
    held = max(n_classes, int(round(0.25 * len(y))))
    if spec.holdout and searchable and len(y) - held >= n_classes:
        splitter, folds, scheme = (
            StratifiedShuffleSplit(n_splits=1, test_size=held, random_state=seed),
            1,
            f"stratified hold-out of {held} train images",
        )
    elif searchable:
        splitter, scheme = StratifiedKFold(folds, shuffle=True, random_state=seed), f"{folds}-fold"
    grid = {f"{name}__{key}": list(values) for key, values in spec.grid.items()}
    if name == "knn":  # k cannot exceed the images of a training fold
        fold_size = len(y) * (folds - 1) // folds if searchable else len(y)
        grid["knn__n_neighbors"] = [k for k in grid["knn__n_neighbors"] if k <= fold_size] or [1]
    if not searchable:  # take the grid's middle
        params = {key: values[len(values) // 2] for key, values in grid.items()}
        pipe.set_params(**params)
        started = time.perf_counter()
        pipe.fit(X, y)
        return (
            pipe,
            params,
            {
                "folds": 0,
                "scheme": "none (a class has one train image): middle of the grid",
                "score": None,
                "scores": {},
                "refit_seconds": time.perf_counter() - started,
            },
        )
    search = GridSearchCV(
        pipe,
        grid,
        cv=splitter,
        scoring="accuracy",
        n_jobs=1 if name == "softmax" else jobs,
        refit=True,
        error_score="raise",
    )
    search.fit(X, y)
    scores = {
        json.dumps({k.split("__", 1)[1]: _plain(v) for k, v in p.items()}, sort_keys=True): float(s)
        for p, s in zip(
            search.cv_results_["params"], search.cv_results_["mean_test_score"], strict=True
        )
    }
    return (
        search.best_estimator_,
        search.best_params_,
        {
            "folds": folds,
            "scheme": scheme,
            "score": float(search.best_score_),
            "scores": scores,
            "refit_seconds": float(search.refit_time_),
        },
    )


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _fit_one(fs, name, X_train, y_train, out_dir, *, norm, pca, cv, seed, jobs) -> HeadResult:
    from sklearn.exceptions import ConvergenceWarning

    spec = HEADS[name]
    pipe = build_head(name, norm=norm, pca=pca, seed=seed)
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        fitted, params, cv_info = _search(name, pipe, X_train, y_train, cv, seed, jobs)
    fit_seconds = time.perf_counter() - started
    notes = sorted(
        {str(w.message).split(".")[0] for w in caught if issubclass(w.category, ConvergenceWarning)}
    )

    predictions, metrics, predict_seconds, n_predicted = {}, {}, 0.0, 0
    k = len(fs.class_names)
    for split in ("val", "test"):
        if split not in fs.splits:
            continue
        mask = fs.split == split
        X, y = fs.features[mask], fs.labels[mask]
        t0 = time.perf_counter()
        pred, scores, is_proba = head_outputs(fitted, X, k)
        predict_seconds += time.perf_counter() - t0
        n_predicted += len(y)
        metrics[split] = {"accuracy": float(np.mean(pred == y)), "n": int(len(y))}
        for path, label, p, row in zip(fs.paths[mask], y, pred, scores, strict=True):
            entry = {
                "split": split,
                "label": fs.class_names[int(label)],
                "pred": fs.class_names[int(p)],
            }
            entry["proba" if is_proba else "scores"] = [round(float(v), 6) for v in row]
            predictions[str(path)] = entry

    attrs = fs.attrs
    norm_used = spec.norm if norm is None else norm
    last = fitted.steps[-1][1]
    manifest: dict[str, Any] = {
        "kind": "head",
        "manifest_version": MANIFEST_VERSION,
        "head": name,
        "description": spec.description,
        "cache": str(Path(fs.path).resolve()),
        "cache_stem": Path(fs.path).stem,
        "dataset": attrs.get("dataset"),
        "fingerprint": attrs.get("fingerprint"),
        "config_json": attrs.get("config_json"),
        **{key: attrs.get(key) for key in FEATURE_IDENTITY},
        "weights_source": attrs.get("weights_source"),
        "feature_width": int(fs.features.shape[1]),
        "class_names": list(fs.class_names),
        "n_train": int(len(y_train)),
        "norm": norm_used,
        "pca": pca,
        "seed": seed,
        "params": {key.split("__", 1)[1]: _plain(v) for key, v in params.items()},
        "grid": {key: list(values) for key, values in spec.grid.items()},
        "cv": cv_info,
        "estimator": repr(last),
        "has_proba": hasattr(last, "predict_proba"),
        "fit_seconds": fit_seconds,  # search and final fit
        "refit_seconds": cv_info["refit_seconds"],  # the final fit alone
        "predict_seconds_per_image": predict_seconds / n_predicted if n_predicted else None,
        "extraction_seconds": attrs.get("seconds"),
        "metrics": metrics,
        "warnings": notes,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
    }
    if name == "softmax":
        manifest["n_epochs"] = int(last.n_epochs_)
        manifest["sigmoid"] = bool(last.sigmoid)
    manifest_path = save_head(fitted, manifest, predictions, out_dir)
    return HeadResult(name, manifest_path, json.loads(manifest_path.read_text()))


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


def _versions() -> dict[str, str]:
    import importlib.metadata

    return {pkg: importlib.metadata.version(pkg) for pkg in ("scikit-learn", "keras", "numpy")}


# --------------------------------------------------------------------------- saving and loading


def save_head(
    estimator: Pipeline,
    manifest: dict[str, Any],
    predictions: Mapping[str, Any],
    out_dir: str | Path,
) -> Path:
    """Save a fitted head, its predictions and its manifest (written last); return the manifest path."""
    import joblib

    out_dir = Path(out_dir)
    name = manifest["head"]
    files: dict[str, str] = {}
    last = estimator.steps[-1][1]
    if isinstance(last, SoftmaxClassifier):
        keras_path = out_dir / f"{name}.keras"
        write_atomic(keras_path, lambda tmp: last.model_.save(tmp))
        files["keras"] = keras_path.name
        model, last.model_ = last.model_, None  # the .keras file holds it
        try:
            write_atomic(out_dir / f"{name}.joblib", lambda tmp: joblib.dump(estimator, tmp))
        finally:
            last.model_ = model
    else:
        write_atomic(out_dir / f"{name}.joblib", lambda tmp: joblib.dump(estimator, tmp))
    files["model"] = f"{name}.joblib"
    if predictions:
        files["predictions"] = f"{name}.predictions.json"
        write_json_atomic(
            out_dir / files["predictions"],
            {"class_names": manifest["class_names"], "predictions": dict(predictions)},
        )
    manifest = {
        **manifest,
        "files": files,
        "sha256": {key: sha256_file(out_dir / f) for key, f in files.items()},
    }
    return write_json_atomic(out_dir / f"{name}.json", manifest)


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
        return str(self.manifest["head"])

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
            for key in FEATURE_IDENTITY
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


def read_manifest(path: str | Path) -> tuple[dict[str, Any], Path]:
    """The manifest of a head or model given by its ``.json``, ``.joblib`` or ``.keras`` path."""
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
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise HeadError(
            f"manifest {manifest_path} is not readable JSON ({exc}); re-run `make head`"
        ) from None
    if not isinstance(manifest, dict) or "kind" not in manifest:
        raise HeadError(f"{manifest_path} is not a head or model manifest (no 'kind')")
    return manifest, manifest_path


def load_head(path: str | Path) -> Head:
    """Load a head saved by :func:`fit_heads` from its manifest, ``.joblib`` or ``.keras`` path.

    Every file's sha256 is checked against the manifest before it is read, so a
    corrupt, truncated or swapped head is refused without being unpickled.
    joblib files run code when loaded: load only heads you made.

    Raises
    ------
    HeadError
        Missing, corrupt or mismatched files, or a manifest of another kind.
    """
    import joblib

    manifest, manifest_path = read_manifest(path)
    if manifest.get("kind") != "head":
        raise HeadError(
            f"{manifest_path} describes a {manifest.get('kind')!r} model, not a head; "
            "use `make predict MODEL=...` for it"
        )
    folder = manifest_path.parent
    files, hashes = manifest.get("files", {}), manifest.get("sha256", {})
    for key in ("model", *(["keras"] if "keras" in files else [])):
        file = folder / files.get(key, "")
        if not file.is_file():
            raise HeadError(
                f"head file {file} is missing; re-run `make head HEAD={manifest.get('head')}`"
            )
        if sha256_file(file) != hashes.get(key):
            raise HeadError(
                f"head file {file} is corrupt, truncated or from another run (its checksum differs "
                f"from {manifest_path.name}); re-run `make head HEAD={manifest.get('head')}`"
            )
    try:
        estimator = joblib.load(folder / files["model"])
    except Exception as exc:  # unpickling raises anything
        raise HeadError(f"head file {folder / files['model']} cannot be loaded: {exc}") from None
    if not isinstance(estimator, Pipeline):
        raise HeadError(
            f"{folder / files['model']} holds a {type(estimator).__name__}, not a head pipeline"
        )
    last = estimator.steps[-1][1]
    if isinstance(last, SoftmaxClassifier):
        import keras

        try:
            last.model_ = keras.saving.load_model(folder / files["keras"], compile=False)
        except Exception as exc:
            raise HeadError(
                f"Keras head {folder / files['keras']} cannot be loaded: {exc}"
            ) from None
    return Head(manifest, estimator, manifest_path)


# --------------------------------------------------------------------------- benchmark


def _ratio(value: float | None) -> str:
    return "n/a (no extraction time in the cache)" if value is None else f"{value:.3f}"


def bench_heads(
    cache_paths: Sequence[str | Path],
    *,
    out: str | Path | None = None,
    cv: int = 3,
    seed: int = 0,
    log: Any = None,
) -> dict[str, Any]:
    """Fit time of the default heads over stage-one extraction time, per cache.

    The heads are fitted into a temporary folder (the user's heads are not
    touched); Keras is warmed up first, as stage one's time excludes start-up
    too. ``ratio`` is the sum of the heads' fit times, hyper-parameter
    search included, divided by the cache's ``seconds`` attribute (stage one's
    extraction time); ``ratio_final_fit`` counts only the final fit of each
    head with its chosen hyper-parameters.

    Returns
    -------
    dict
        ``{"target": 0.1, "caches": [{"cache", "dataset", "extraction_seconds",
        "fit_seconds": {head: s}, "refit_seconds": {head: s}, "total_fit_seconds",
        "ratio", "ratio_final_fit", "accuracy": {...}}]}``, also written to
        ``out`` as JSON when given.
    """
    from pipeline.cache import read_attrs

    # Stage one's seconds exclude start-up (TensorFlow initialisation, model building);
    # a one-epoch fit on noise pays the Keras start-up here, outside the timing.
    X, y = np.random.default_rng(seed).normal(size=(8, 4)), np.arange(8) % 2
    SoftmaxClassifier(max_epochs=1, validation_fraction=0.0).fit(X, y)
    rows = []
    for cache_path in cache_paths:
        attrs = read_attrs(cache_path)
        with tempfile.TemporaryDirectory() as tmp:
            results = fit_heads(cache_path, DEFAULT_HEADS, artifacts_dir=tmp, cv=cv, seed=seed)
        fit = {r.head: r.manifest["fit_seconds"] for r in results}
        refit = {r.head: r.manifest["refit_seconds"] for r in results}
        total, total_refit = float(sum(fit.values())), float(sum(refit.values()))
        extraction = float(attrs["seconds"])
        row = {
            "cache": str(cache_path),
            "dataset": attrs.get("dataset"),
            "n_images": attrs.get("n_images"),
            "extraction_seconds": extraction,
            "fit_seconds": fit,
            "refit_seconds": refit,
            "total_fit_seconds": total,
            "total_refit_seconds": total_refit,
            "ratio": total / extraction if extraction > 0 else None,
            "ratio_final_fit": total_refit / extraction if extraction > 0 else None,
            "accuracy": {r.head: r.manifest["metrics"] for r in results},
        }
        rows.append(row)
        if log is not None:
            log(
                f"{row['dataset']}: heads {total:.1f} s with search ({total_refit:.1f} s final fits) / "
                f"extraction {extraction:.1f} s = ratio {_ratio(row['ratio'])} "
                f"({_ratio(row['ratio_final_fit'])} final fits; target <= 0.1); "
                + ", ".join(f"{h} {s:.2f} s" for h, s in fit.items())
            )
    summary = {
        "target": 0.1,
        "heads": list(DEFAULT_HEADS),
        "cv": cv,
        "caches": rows,
        "cpu_count": os.cpu_count(),
    }
    if out is not None:
        write_json_atomic(out, summary)
    return summary
