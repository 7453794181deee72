"""The seed documents' softmax head, shared by stage two and stage three.

``Flatten -> Dense(64, relu) -> Dropout(0.25) -> Dense(k, softmax)`` (a single
sigmoid unit for two classes when asked), as in seed ``000_3437c29d2f3bb78b``.
Stage two fits it on cached features through :class:`SoftmaxClassifier` (the
head as a scikit-learn classifier); stage three puts the same head on top of
the backbone and starts from the stage-two weights, so the layer names here
are a contract: do not rename them.

Training is Keras's own step on seeded full mini-batches (:func:`train_epochs`),
with Keras's early-stopping rule on a held-out part of train (:class:`Patience`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

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
    model_ : keras.Model
        The trained Keras model.
    n_epochs_ : int
        Epochs of the kept weights (the best held-out loss).
    n_held_out_ : int
        Training images held out for early stopping (0: none).
    held_out_score_ : float or None
        Accuracy of the kept weights on those images (``None`` without them).
    held_out_y_, held_out_pred_ : ndarray or None
        Those images' labels and the kept weights' predictions (scored by ``METRIC=``).
    history_ : dict
        ``{"loss": [...], "val_loss": [...]}`` per epoch.

    Notes
    -----
    Training is Keras's own step, ``Model.train_on_batch``, one full mini-batch at
    a time, reshuffled every epoch (:func:`train_epochs`), so the step is traced
    once; early stopping follows Keras's ``EarlyStopping(monitor="val_loss",
    restore_best_weights=True)`` rule (:class:`Patience`) on the held-out
    split's loss. ``fit`` calls ``keras.utils.set_random_seed`` (the global Python, NumPy
    and backend seeds), which is how Keras makes a run repeatable.
    """

    def __init__(
        self,
        hidden: int = 64,
        dropout: float = 0.25,
        *,
        learning_rate: float = 1e-3,
        max_epochs: int = 100,
        batch_size: int = 32,
        patience: int = 3,
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

    def _prepare(self, X: Any, y: Any) -> tuple[np.ndarray, ...]:
        """Validate, encode the labels, seed Keras, split off the early-stopping data."""
        import keras

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
        keras.utils.set_random_seed(int(self.random_state))
        return self._hold_out(X, encoded.astype(np.int64))

    def _fresh_model(self, width: int) -> keras.Model:
        """The head with the initial weights and dropout seed that this seed gives."""
        return build_softmax_head(
            width,
            len(self.classes_),
            hidden=int(self.hidden),
            dropout=float(self.dropout),
            sigmoid=bool(self.sigmoid),
        )

    def fit(self, X: Any, y: Any) -> SoftmaxClassifier:
        """Train on ``X`` (n, d) and labels ``y`` (n,); returns ``self``."""
        import keras

        X_fit, y_fit, X_held, y_held = self._prepare(X, y)
        model = self._fresh_model(X_fit.shape[1])
        # A compiled twin trains, from the fresh model's variables (its dropout seed included):
        # the kept model stays uncompiled, so its .keras file holds no optimizer.
        trainer = self._fresh_model(X_fit.shape[1])
        _copy_variables(model, trainer)
        loss = "binary_crossentropy" if self.sigmoid else "sparse_categorical_crossentropy"
        trainer.compile(optimizer=keras.optimizers.Adam(float(self.learning_rate)), loss=loss)
        # Built here, not inside the first traced step: creating variables while tracing
        # makes TensorFlow trace twice (about half a second on 2 cores).
        trainer.optimizer.build(trainer.trainable_variables)
        stop = Patience(int(self.patience))
        held_losses: list[float] = []
        best_weights = None

        def end_epoch(epoch: int) -> bool:
            nonlocal best_weights
            if X_held is None:
                return False
            held_losses.append(cross_entropy(self._proba(trainer, X_held), y_held))
            if stop.improved(held_losses[-1], epoch):
                best_weights = trainer.get_weights()
            return stop.done

        losses = self._train(trainer, X_fit, y_fit, end_epoch)
        if best_weights is not None:  # as EarlyStopping(restore_best_weights=True)
            trainer.set_weights(best_weights)
        _copy_variables(trainer, model)
        self.history_ = {"loss": losses, "val_loss": held_losses}
        self.n_epochs_ = stop.best_epoch + 1 if X_held is not None else int(self.max_epochs)
        self.n_held_out_ = 0 if X_held is None else len(X_held)
        # The hold-out's labels and predictions: the search scores them by METRIC=.
        self.held_out_y_ = None if X_held is None else np.asarray(y_held)
        self.held_out_pred_ = (
            None if X_held is None else np.argmax(self._proba(model, X_held), axis=1)
        )
        self.held_out_score_ = (
            None if X_held is None else float(np.mean(self.held_out_pred_ == y_held))
        )
        self.model_ = model
        return self

    def _train(
        self, model: keras.Model, X: np.ndarray, y: np.ndarray, end_epoch: Callable[[int], bool]
    ) -> list[float]:
        """:func:`train_epochs` with this estimator's batch size, epochs and seed."""
        return train_epochs(
            model,
            X,
            self._target(y),
            batch_size=int(self.batch_size),
            max_epochs=int(self.max_epochs),
            seed=int(self.random_state),
            end_epoch=end_epoch,
        )

    def _target(self, y: np.ndarray) -> np.ndarray:
        """Labels as the loss takes them: class indices, or a float column for a sigmoid."""
        return y.astype(np.float32)[:, None] if self.sigmoid else y

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
            np.asarray(model(X[start : start + _CHUNK], training=False))
            for start in range(0, len(X), _CHUNK)
        ]
        return two_columns(np.concatenate(parts) if parts else np.zeros((0, len(self.classes_))))

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


def _copy_variables(source: keras.Model, target: keras.Model) -> None:
    """Every variable of ``source`` into ``target`` (same architecture), seed states included."""
    for src, dst in zip(source.variables, target.variables, strict=True):
        dst.assign(src)


# --------------------------------------------------------------------------- training


def two_columns(proba: Any) -> np.ndarray:
    """Probabilities as ``(n, k)`` float64; a sigmoid's ``(n, 1)`` P(class 1) -> ``[1 - p, p]``.

    Any other shape is returned as is (as float64), so callers need not check first.
    """
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] == 1:
        return np.hstack([1.0 - p, p])
    return p


def cross_entropy(proba: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-probability of the true classes."""
    return float(-np.mean(np.log(np.clip(proba[np.arange(len(y)), y], 1e-12, 1.0))))


class Patience:
    """Keras's ``EarlyStopping(min_delta=1e-6)`` rule on a held-out loss.

    :meth:`improved` takes each epoch's held-out loss; ``done`` turns true once
    ``patience`` epochs have passed without a loss lower than the best by more than
    ``1e-6`` (``best_epoch`` is the epoch whose weights a restore keeps). One difference:
    a NaN loss never counts as the best (Keras takes the first epoch's, NaN or not).
    """

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best_loss, self.best_epoch, self.done = np.inf, 0, False

    def improved(self, loss: float, epoch: int) -> bool:
        if loss < self.best_loss - 1e-6:
            self.best_loss, self.best_epoch = loss, epoch
            return True
        if epoch - self.best_epoch >= self.patience:
            self.done = True
        return False


def train_epochs(
    model: keras.Model,
    X: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int,
    max_epochs: int,
    seed: int,
    end_epoch: Callable[[int], bool],
) -> list[float]:
    """Train a compiled ``model`` on full mini-batches, reshuffled each epoch from ``seed``.

    ``end_epoch(epoch)`` runs after every epoch and returns True to stop. Returns the
    mean training loss of each epoch. One ``train_on_batch`` per step: Keras's
    ``fit`` would feed the batches through an input pipeline (on TensorFlow,
    ``tf.data`` calling back into Python for every batch), which cost about 7 ms
    per step against under 3 for the step itself on this head (2-core CPU). Batches
    are full, so the training step has one shape and is traced once.
    """
    size = min(batch_size, len(X))
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    for epoch in range(max_epochs):
        order = rng.permutation(len(X))
        batch_losses = [
            model.train_on_batch(X[rows], y[rows], return_dict=True)["loss"]
            for rows in (order[i : i + size] for i in range(0, len(X) - size + 1, size))
        ]
        losses.append(float(np.mean(batch_losses)))
        if end_epoch(epoch):
            break
    return losses
