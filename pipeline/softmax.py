"""The seed documents' softmax head, shared by stage two and stage three.

``Flatten -> Dense(64, relu) -> Dropout(0.25) -> Dense(k, softmax)`` (a single
sigmoid unit for two classes when asked), as in seed ``000_3437c29d2f3bb78b``.
Stage two fits it on cached features through :class:`SoftmaxClassifier` (the
head as a scikit-learn classifier); stage three puts the same head on top of
the backbone and starts from the stage-two weights, so the layer names here
are a contract: do not rename them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from threadpoolctl import threadpool_limits

if TYPE_CHECKING:
    import keras

HEAD_LAYERS = ("head_flatten", "head_dense", "head_dropout", "head_output")
_CHUNK = 4096  # rows per forward call when predicting


def build_softmax_head(
    width: int, n_classes: int, *, hidden: int = 64, dropout: float = 0.25, sigmoid: bool = False
) -> keras.Model:
    """A Keras model mapping a ``(width,)`` feature vector to class probabilities.

    With ``sigmoid=True`` (two classes only) the output is one unit, the
    probability of class 1.
    """
    import keras

    if sigmoid and n_classes != 2:
        raise ValueError(f"a sigmoid head needs exactly two classes; got {n_classes}")
    inputs = keras.Input(shape=(width,), name="features")
    x = keras.layers.Flatten(name="head_flatten")(inputs)
    x = keras.layers.Dense(hidden, activation="relu", name="head_dense")(x)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    units, activation = (1, "sigmoid") if sigmoid else (n_classes, "softmax")
    # float32 output even under a mixed-precision policy: stable losses and probabilities.
    outputs = keras.layers.Dense(units, activation=activation, dtype="float32", name="head_output")(
        x
    )
    return keras.Model(inputs, outputs, name="softmax_head")


class SoftmaxClassifier(ClassifierMixin, BaseEstimator):
    """The seed documents' Keras softmax head as a scikit-learn classifier.

    ``Flatten -> Dense(hidden, relu) -> Dropout(dropout) -> Dense(k, softmax)``
    (:func:`build_softmax_head`), trained with Adam on sparse categorical
    cross-entropy. A stratified ``validation_fraction`` of the training data is
    held out for early stopping: training stops after ``patience`` epochs
    without a lower held-out loss and keeps the best epoch's weights.

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
    coefs_ : list of ndarray
        Kernels of the hidden and output layers, ``(d, hidden)`` and ``(hidden, units)``.
    intercepts_ : list of ndarray
        Their biases.
    model_ : keras.Model
        The trained head as a Keras model (:func:`build_softmax_head` holding
        ``coefs_`` and ``intercepts_``), built on first use; assigning a model of the
        same architecture (as :mod:`pipeline.head_store` does when loading) sets the
        weights from it.
    n_epochs_ : int
        Epochs of the kept weights (the best held-out loss).
    history_ : dict
        ``{"loss": [...], "val_loss": [...]}`` per epoch.

    Notes
    -----
    Training is the arithmetic of Keras's ``Model.fit`` on this model, in NumPy:
    Glorot-uniform kernels and zero biases, inverted dropout, Adam with Keras's
    defaults (``beta_1=0.9``, ``beta_2=0.999``, ``epsilon=1e-7``), the mean
    cross-entropy of each full mini-batch, reshuffled every epoch, and early
    stopping as ``EarlyStopping(monitor="val_loss", min_delta=1e-6,
    restore_best_weights=True)``. Through Keras each fit built a model and traced
    its training step, and every step paid the backend's call overhead: 0.5 to
    1 s a fit on a 2-core CPU for what is a few milliseconds of arithmetic on a
    few hundred images, so the search cost more than extracting the features
    (issue 10). One seed gives one result, whatever ran before in the process:
    every random draw comes from a generator seeded by ``random_state``.
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
        X_fit, y_fit, X_held, y_held = self._hold_out(X, encoded.astype(np.int64))
        net = _Network.initial(
            X.shape[1],
            1 if self.sigmoid else k,
            int(self.hidden),
            np.random.default_rng(int(self.random_state)),
        )
        # One BLAS thread: these matrices are small, and threads cost more than they save
        # (ten times slower fits on a busy 2-core CPU).
        with threadpool_limits(1, user_api="blas"):
            self.history_, self.n_epochs_ = _train(
                net,
                X_fit,
                y_fit,
                X_held,
                y_held,
                learning_rate=float(self.learning_rate),
                dropout=float(self.dropout),
                batch_size=int(self.batch_size),
                max_epochs=int(self.max_epochs),
                patience=int(self.patience),
                seed=int(self.random_state),
            )
        self.coefs_ = [net.W1.copy(), net.W2.copy()]
        self.intercepts_ = [net.b1.copy(), net.b2.copy()]
        self._model = None
        return self

    @property
    def model_(self) -> keras.Model:
        """The trained head as a Keras model (built from the weights on first use)."""
        check_is_fitted(self, "coefs_")
        if getattr(self, "_model", None) is None:
            model = build_softmax_head(
                self.coefs_[0].shape[0],
                len(self.classes_),
                hidden=self.coefs_[0].shape[1],
                dropout=float(self.dropout),
                sigmoid=bool(self.sigmoid),
            )
            model.set_weights(
                [self.coefs_[0], self.intercepts_[0], self.coefs_[1], self.intercepts_[1]]
            )
            self._model = model
        return self._model

    @model_.setter
    def model_(self, model: keras.Model | None) -> None:
        # ``None`` drops the built model (head_store saves it apart); a model brings its weights.
        self._model = model
        if model is not None:
            W1, b1, W2, b2 = (np.asarray(w, dtype=np.float32) for w in model.get_weights())
            self.coefs_, self.intercepts_ = [W1, W2], [b1, b2]

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

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, shape (n, n_classes), columns in ``classes_`` order."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, reset=False)
        net = _Network(self.coefs_[0], self.intercepts_[0], self.coefs_[1], self.intercepts_[1])
        parts = [net.proba(X[start : start + _CHUNK]) for start in range(0, len(X), _CHUNK)]
        proba = np.concatenate(parts) if parts else np.zeros((0, self.coefs_[1].shape[1]))
        return two_columns(proba)

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class of each row."""
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_model", None)  # rebuilt from coefs_ and intercepts_ when asked for
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Heads saved before the weights were attributes held a model (or None while saved).
        state = {k: v for k, v in state.items() if k not in ("model_", "_model_bytes")}
        self.__dict__.update(state)


@dataclass
class _Network:
    """The head's arithmetic in float32: ``relu(X W1 + b1) W2 + b2``, then softmax or sigmoid."""

    W1: np.ndarray
    b1: np.ndarray
    W2: np.ndarray
    b2: np.ndarray

    @classmethod
    def initial(cls, width: int, units: int, hidden: int, rng: np.random.Generator) -> _Network:
        """Keras's initialisation of the two Dense layers: Glorot-uniform kernels, zero biases."""

        def glorot(fan_in: int, fan_out: int) -> np.ndarray:
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            return rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype(np.float32)

        return cls(
            glorot(width, hidden),
            np.zeros(hidden, np.float32),
            glorot(hidden, units),
            np.zeros(units, np.float32),
        )

    def proba(self, X: np.ndarray) -> np.ndarray:
        """Output probabilities, ``(n, k)`` (a sigmoid head: ``(n, 1)``, P(class 1))."""
        return _activate(np.maximum(X @ self.W1 + self.b1, 0.0) @ self.W2 + self.b2)


def _activate(logits: np.ndarray) -> np.ndarray:
    if logits.shape[1] == 1:
        return 1.0 / (1.0 + np.exp(-logits))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _train(
    net: _Network,
    X: np.ndarray,
    y: np.ndarray,
    X_held: np.ndarray | None,
    y_held: np.ndarray | None,
    *,
    learning_rate: float,
    dropout: float,
    batch_size: int,
    max_epochs: int,
    patience: int,
    seed: int,
) -> tuple[dict[str, list[float]], int]:
    """Adam on the mean cross-entropy, early stopping on the held-out loss; trains ``net`` in place.

    Returns the history (``loss`` per epoch, mean over its batches as Keras logs it;
    ``val_loss``) and the epochs of the kept weights.
    """
    # Weights and gradients as views of one flat buffer each: Adam's update is a few
    # vector operations per step instead of a few per layer.
    shapes = [w.shape for w in (net.W1, net.b1, net.W2, net.b2)]
    flat, grads = _flat(shapes), _flat(shapes)
    for view, w in zip(flat.views, (net.W1, net.b1, net.W2, net.b2), strict=True):
        view[...] = w
    net.W1, net.b1, net.W2, net.b2 = flat.views
    g_W1, g_b1, g_W2, g_b2 = grads.views
    m, v = np.zeros_like(flat.data), np.zeros_like(flat.data)
    beta_1, beta_2, epsilon = 0.9, 0.999, 1e-7
    dropout_rng = np.random.default_rng([seed, 1])
    keep = 1.0 - dropout
    size = min(batch_size, len(X))
    steps_per_epoch = len(X) // size
    batches = _batches(X, y, size, seed)
    sigmoid = net.W2.shape[1] == 1
    history: dict[str, list[float]] = {"loss": [], "val_loss": []}
    best_loss, best_epoch, best, wait, step = np.inf, 0, None, 0, 0
    for epoch in range(max_epochs):
        losses = []
        for _ in range(steps_per_epoch):
            xb, yb = next(batches)
            pre = xb @ net.W1 + net.b1
            hidden = np.maximum(pre, 0.0)
            if dropout > 0:
                mask = (dropout_rng.random(hidden.shape, dtype=np.float32) < keep) / np.float32(
                    keep
                )
                hidden = hidden * mask
            proba = _activate(hidden @ net.W2 + net.b2)
            # d(mean cross-entropy)/d(logits): (p - onehot) / n, for softmax and sigmoid alike
            if sigmoid:
                target = yb.astype(np.float32)[:, None]
                p_true = np.where(target > 0.5, proba, 1.0 - proba)[:, 0]
                grad = (proba - target) / len(xb)
            else:
                p_true = proba[np.arange(len(yb)), yb]
                grad = proba.copy()
                grad[np.arange(len(yb)), yb] -= 1.0
                grad /= len(xb)
            losses.append(float(-np.mean(np.log(np.clip(p_true, 1e-7, 1.0)))))
            d_hidden = grad @ net.W2.T
            if dropout > 0:
                d_hidden *= mask
            d_hidden *= pre > 0
            np.matmul(xb.T, d_hidden, out=g_W1)
            np.sum(d_hidden, axis=0, out=g_b1)
            np.matmul(hidden.T, grad, out=g_W2)
            np.sum(grad, axis=0, out=g_b2)
            step += 1
            alpha = learning_rate * math.sqrt(1 - beta_2**step) / (1 - beta_1**step)
            g = grads.data
            m += (g - m) * (1 - beta_1)
            v += (g * g - v) * (1 - beta_2)
            flat.data -= alpha * m / (np.sqrt(v) + epsilon)
        history["loss"].append(float(np.mean(losses)))
        if X_held is None:
            continue
        val_loss = _cross_entropy(two_columns(net.proba(X_held)), y_held)
        history["val_loss"].append(val_loss)
        if val_loss + 1e-6 < best_loss:  # EarlyStopping's improvement, min_delta=1e-6
            best_loss, best_epoch, wait = val_loss, epoch, 0
            best = flat.data.copy()
        else:
            wait += 1
            if wait >= patience:
                break
    if best is None:
        return history, max_epochs
    flat.data[...] = best
    return history, best_epoch + 1


@dataclass
class _FlatBuffer:
    data: np.ndarray
    views: list[np.ndarray]


def _flat(shapes: list[tuple[int, ...]]) -> _FlatBuffer:
    """One float32 buffer and a view of it per shape, in order."""
    sizes = [int(np.prod(shape)) for shape in shapes]
    data = np.zeros(sum(sizes), np.float32)
    ends = np.cumsum(sizes)
    views = [
        data[end - size : end].reshape(shape)
        for shape, size, end in zip(shapes, sizes, ends, strict=True)
    ]
    return _FlatBuffer(data, views)


def two_columns(proba: Any) -> np.ndarray:
    """Probabilities as ``(n, k)`` float64; a sigmoid's ``(n, 1)`` P(class 1) -> ``[1 - p, p]``.

    Any other shape is returned as is (as float64), so callers need not check first.
    """
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] == 1:
        return np.hstack([1.0 - p, p])
    return p


def _cross_entropy(proba: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-probability of the true classes."""
    return float(-np.mean(np.log(np.clip(proba[np.arange(len(y)), y], 1e-12, 1.0))))


def _batches(X: np.ndarray, y: np.ndarray, size: int, seed: int) -> Iterator[tuple]:
    """Endless full mini-batches of ``(X, y)``, in a new seeded order every pass."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(X))
        for start in range(0, len(order) - size + 1, size):
            rows = order[start : start + size]
            yield X[rows], y[rows]
