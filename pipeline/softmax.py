"""The seed documents' softmax head, shared by stage two and stage three.

``Flatten -> Dense(64, relu) -> Dropout(0.25) -> Dense(k, softmax)`` (a single
sigmoid unit for two classes when asked), as in seed ``000_3437c29d2f3bb78b``.
Stage two fits it on cached features through :class:`SoftmaxClassifier` (the
head as a scikit-learn classifier); stage three puts the same head on top of
the backbone and starts from the stage-two weights, so the layer names here
are a contract: do not rename them.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from pipeline.softmax_training import Patience, cross_entropy, train_epochs, two_columns

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
        X_fit, y_fit, X_held, y_held = self._prepare(X, y)
        for stale in ("grid_scores_", "grid_losses_", "n_held_out_"):  # from an earlier fit_grid
            self.__dict__.pop(stale, None)
        # A fresh model (its initial weights and dropout seed are what this seed gives) and a
        # compiled model of the same architecture that trains it: built and traced once per
        # process, re-initialised from the fresh model's variables for every fit.
        model = self._fresh_model(X_fit.shape[1])
        with _trainers.borrow(
            model, sigmoid=bool(self.sigmoid), learning_rate=float(self.learning_rate)
        ) as trainer:
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
        self.model_ = model
        return self

    def fit_grid(self, X: Any, y: Any, learning_rates: Sequence[float]) -> SoftmaxClassifier:
        """Train one head per learning rate in one training loop; keep the best on held-out data.

        The heads of the grid sit side by side in one Keras model and see the same
        batches; each has its own effective learning rate (its weights are ``scale *
        variable``, and Adam's step does not depend on the gradient's scale, so a
        scale of ``rate / max(rates)`` is that head's learning rate) and its own early
        stopping on the held-out ``validation_fraction`` of ``X``, which keeps its best
        epoch; a head out of patience stops counting (its result is what a single fit
        would keep) and training ends when every head is. The loss is the sum of the
        heads' cross-entropies, from their logits. The kept head is the one with the
        best held-out accuracy (the first rate among equals, as GridSearchCV ranks);
        ``learning_rate`` is set to its rate and the estimator holds its model as
        ``fit`` does, with ``grid_scores_`` (rate -> held-out accuracy),
        ``grid_losses_`` (rate -> best held-out loss) and ``n_held_out_`` added;
        ``history_["loss"]`` stays empty (training yields the heads' summed loss only).
        Without held-out data (``validation_fraction=0`` or too few images) every
        head trains ``max_epochs`` and the middle rate is kept.

        One fit instead of one per rate: the search costs about what one fit costs.
        """
        import keras

        from pipeline.softmax_grid import GridStopping, export_head, grid_loss, grid_model

        rates = [float(rate) for rate in learning_rates]
        if not rates or min(rates) <= 0:
            raise ValueError(f"learning_rates must be positive numbers; got {learning_rates!r}")
        X_fit, y_fit, X_held, y_held = self._prepare(X, y)
        fresh = self._fresh_model(X_fit.shape[1])
        grid = grid_model(fresh, [rate / max(rates) for rate in rates])
        grid.compile(optimizer=keras.optimizers.Adam(max(rates)), loss=grid_loss(self.sigmoid))
        # Built here, not inside the first traced step: creating variables while tracing
        # makes TensorFlow trace twice (about half a second on 2 cores).
        grid.optimizer.build(grid.trainable_variables)
        stopping = GridStopping(X_held, y_held, len(rates), int(self.patience), bool(self.sigmoid))
        self._train(
            grid, X_fit, y_fit, lambda epoch: X_held is not None and stopping.end_epoch(grid, epoch)
        )
        self.n_held_out_ = 0 if X_held is None else len(X_held)
        if X_held is None:
            best = len(rates) // 2
            self.grid_scores_, self.grid_losses_ = {}, {}
            self.n_epochs_ = int(self.max_epochs)
            self.history_ = {"loss": [], "val_loss": []}
        else:
            accuracy = stopping.best_accuracy
            best = min(range(len(rates)), key=lambda g: (-accuracy[g], g))  # first among equals
            self.grid_scores_ = dict(zip(rates, accuracy, strict=True))
            self.grid_losses_ = dict(zip(rates, stopping.best_loss, strict=True))
            self.n_epochs_ = stopping.best_epoch[best] + 1
            # Training yields the heads' summed loss; the kept head's own is not separable.
            # Its held-out losses end where a single fit would have stopped.
            self.history_ = {"loss": [], "val_loss": stopping.history[best]}
        export_head(grid, best, stopping.best_weights[best] if X_held is not None else None, fresh)
        self.learning_rate = rates[best]
        self.model_ = fresh
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


class _TrainerPool:
    """Compiled softmax models kept between fits, one architecture per key.

    Tracing Keras's training step costs more than a whole fit of this small head on a
    few hundred images; a search fits the same architecture again and again (each
    grid point, then the final fit). A trainer is lent to one fit at a time (threads
    get their own) and reset before each: its variables, dropout seed included, are
    copied from the fitting estimator's fresh model, and its optimizer gets back the
    state it had when built, then the fit's learning rate. Compiling is not repeated,
    so the traced training step is kept.
    """

    _MAX_KEYS = 4  # architectures kept; the least recently used is dropped

    def __init__(self) -> None:
        self._idle: dict[tuple, list[tuple[Any, list[np.ndarray]]]] = {}
        self._lock = threading.Lock()

    @contextmanager
    def borrow(
        self, model: keras.Model, *, sigmoid: bool, learning_rate: float
    ) -> Iterator[keras.Model]:
        """A compiled twin of ``model``, reset to ``model``'s variables and a new optimizer."""
        import keras

        dropout = model.get_layer("head_dropout").rate
        key = (
            keras.backend.backend(),
            keras.config.dtype_policy().name,
            tuple(tuple(v.shape) for v in model.variables),
            float(dropout),
            sigmoid,
        )
        with self._lock:
            idle = self._idle.pop(key, [])
            entry = idle.pop() if idle else None
            if idle:
                self._idle[key] = idle
        if entry is None:
            entry = self._build(model, sigmoid=sigmoid, dropout=dropout)
        trainer, optimizer_state = entry
        _copy_variables(model, trainer)
        for variable, value in zip(trainer.optimizer.variables, optimizer_state, strict=True):
            variable.assign(value)
        trainer.optimizer.learning_rate = learning_rate
        try:
            yield trainer
        finally:
            with self._lock:
                self._idle.setdefault(key, []).append(entry)
                self._idle[key] = self._idle.pop(key)[-2:]  # most recent last, two at most
                while len(self._idle) > self._MAX_KEYS:
                    del self._idle[next(iter(self._idle))]

    @staticmethod
    def _build(model: keras.Model, *, sigmoid: bool, dropout: float) -> tuple[Any, list]:
        import keras

        width, hidden = model.get_layer("head_dense").kernel.shape
        k = 2 if sigmoid else model.get_layer("head_output").units
        trainer = build_softmax_head(
            int(width), int(k), hidden=int(hidden), dropout=dropout, sigmoid=sigmoid
        )
        loss = "binary_crossentropy" if sigmoid else "sparse_categorical_crossentropy"
        trainer.compile(optimizer=keras.optimizers.Adam(), loss=loss)
        trainer.optimizer.build(trainer.trainable_variables)
        return trainer, [np.array(v.numpy()) for v in trainer.optimizer.variables]

    def clear(self) -> None:
        """Drop every kept trainer (the next fit builds and traces its own)."""
        with self._lock:
            self._idle.clear()


_trainers = _TrainerPool()


def clear_trainers() -> None:
    """Forget the compiled models kept between fits, so the next fit pays for tracing.

    Benchmarks call it before each data set: a sweep is timed as a fresh process runs it.
    """
    _trainers.clear()


def _copy_variables(source: keras.Model, target: keras.Model) -> None:
    """Every variable of ``source`` into ``target`` (same architecture), seed states included."""
    for src, dst in zip(source.variables, target.variables, strict=True):
        dst.assign(src)
