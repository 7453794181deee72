"""Stage three's two training phases, each one ``fit`` with Keras callbacks.

* Phase one (:func:`train_head`): the head on cached features,
  ``EarlyStopping(restore_best_weights=True)`` on validation accuracy.
* Phase two (:func:`fit_phase_two`): the model on images, one
  ``fit(initial_epoch=...)`` with :class:`EpochLog` (one pipeline line per
  epoch, Keras's own output off), a ``LambdaCallback`` that shuffles each
  epoch the same way on a resume, and :class:`CheckpointedEarlyStopping`
  (Keras's ``EarlyStopping`` whose state lives in the run's checkpoint).

This module imports Keras at import time; :mod:`pipeline.finetuning.run` imports it
only when a run starts.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from pipeline.core.files import write_bytes_atomic, write_json_atomic
from pipeline.finetuning.checkpoints import Checkpoint

HISTORY_COLUMNS = (
    "phase", "epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds", "learning_rate",
)  # fmt: skip
# A better epoch must beat the best by more than float noise: float32 metrics
# are compared with a float64 phase-one accuracy.
_MIN_DELTA = 1e-6


class EpochLog(keras.callbacks.Callback):
    """Collects one history row per epoch and prints one line for it.

    ``echo=None`` prints nothing; ``progress`` shows a bar over the epoch's
    batches that disappears when the epoch ends.
    """

    def __init__(
        self,
        phase: int,
        rows: list[dict[str, Any]],
        *,
        epochs: int,
        learning_rate: float,
        echo: Callable[[str], None] | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__()
        self.phase, self.rows, self.epochs = phase, rows, epochs
        self.learning_rate, self.echo, self.progress = learning_rate, echo, progress
        self._tick, self._bar = 0.0, None

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self._tick = time.perf_counter()
        if self.progress:
            from pipeline.core.console import progress_bar  # lines printed meanwhile end it

            self._bar = progress_bar(
                self.params.get("steps"), desc=f"epoch {epoch + 1}/{self.epochs}", unit="batch"
            )

    def on_train_batch_end(self, batch: int, logs=None) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        logs = logs or {}
        row = {
            "phase": self.phase,
            "epoch": epoch + 1,
            **{key: _float(logs.get(key)) for key in HISTORY_COLUMNS[2:6]},
            "seconds": round(time.perf_counter() - self._tick, 2),
            "learning_rate": self.learning_rate,
        }
        self.rows.append(row)
        if self.echo is not None:
            self.echo(format_row(row, self.epochs))


class CheckpointedEarlyStopping(keras.callbacks.EarlyStopping):
    """``EarlyStopping`` on validation accuracy, best weights kept, its state in a checkpoint.

    The state starts from the checkpoint: after phase one the phase-one model
    is the best candidate (so fine-tuning never ends below the head on the
    validation split); after a resume, the best weights and the patience count
    are the interrupted run's. After every epoch the checkpoint is saved.
    Unlike Keras's, it may stop after the first epoch of a ``fit``: a resumed
    ``fit`` starts in the middle of the run.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        state: dict[str, Any],
        history: list[dict[str, Any]],
        *,
        patience: int,
        elapsed: Callable[[], float],
        echo: Callable[[str], None],
    ) -> None:
        super().__init__(
            monitor="val_accuracy", mode="max", patience=patience, min_delta=_MIN_DELTA,
            restore_best_weights=True,
        )  # fmt: skip
        self.checkpoint, self.state, self.history = checkpoint, state, history
        self.elapsed, self.echo = elapsed, echo

    def on_train_begin(self, logs=None) -> None:
        super().on_train_begin(logs)  # resets; then take the checkpoint's state
        self.best = float(self.state["best_val_accuracy"])
        self.best_epoch = int(self.state["best_epoch"]) - 1  # Keras counts epochs from 0
        self.wait = int(self.state["wait"])
        self.best_weights = self.checkpoint.best_weights(self.model, self.state)

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        super().on_epoch_end(epoch, logs)
        if self.wait >= self.patience and not self.model.stop_training:
            self.stopped_epoch, self.model.stop_training = epoch, True
        self.state = self.checkpoint.save(
            self.model, self.state, epoch=epoch + 1, improved=self.best_epoch == epoch,
            wait=self.wait, best_val_accuracy=float(self.best), history=list(self.history),
            seconds=self.elapsed(),
        )  # fmt: skip
        if self.model.stop_training:
            self.echo(f"early stopping: no better val accuracy for {self.patience} epochs")


def train_head(
    head: keras.Model,
    data: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    validation: tuple[np.ndarray, np.ndarray],
    *,
    epochs: int,
    batch_size: int,
    patience: int,
    learning_rate: float,
) -> list[dict[str, Any]]:
    """Phase one from scratch: fit ``head`` (compiled at ``learning_rate``); the log rows.

    ``data`` is ``(x, y, sample_weight)``. Early stopping on validation
    accuracy keeps the best epoch's weights.
    """
    rows: list[dict[str, Any]] = []
    if epochs <= 0:
        return rows
    x, y, sample_weight = data
    head.fit(
        x, y, sample_weight=sample_weight, batch_size=batch_size, validation_data=validation,
        epochs=epochs, shuffle=True, verbose=0,
        callbacks=[
            EpochLog(1, rows, epochs=epochs, learning_rate=learning_rate),
            keras.callbacks.EarlyStopping(
                monitor="val_accuracy", mode="max", patience=patience, restore_best_weights=True
            ),
        ],
    )  # fmt: skip
    return rows


def fit_phase_two(
    model: keras.Model,
    train: Any,
    validation: Any,
    *,
    epochs: int,
    stopping: CheckpointedEarlyStopping,
    log: EpochLog,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    validator: keras.callbacks.Callback | None = None,
) -> None:
    """Train from the checkpoint's epoch to ``epochs`` (or early stopping); keep the best.

    ``train`` has ``set_epoch`` (:func:`pipeline.finetuning.image_feed.image_sequence`):
    epoch ``e`` is shuffled the same way whether the run was resumed or not.
    ``validation`` is Keras's validation data, or ``None`` when ``validator`` adds
    ``val_loss`` and ``val_accuracy`` to each epoch's logs
    (:meth:`pipeline.finetuning.validation.CutEvaluation.callback`), before the
    callbacks that read them.
    """
    state = stopping.state
    done = int(state["epoch"])
    if done >= epochs or int(state["wait"]) >= stopping.patience:
        stopping.checkpoint.load_best(model, state)  # nothing left to train
        return
    shuffle = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs=None: train.set_epoch(epoch + 1)
    )
    model.fit(
        train, validation_data=validation, epochs=epochs, initial_epoch=done, verbose=0,
        shuffle=False,  # `train` shuffles itself, by epoch; Keras would draw from `random`
        callbacks=[shuffle, *([validator] if validator else []), log, stopping, *callbacks],
    )  # fmt: skip


def format_row(row: dict, epochs: int) -> str:
    """The pipeline's line for one epoch."""
    return (
        f"phase {row['phase']} epoch {row['epoch']}/{epochs}: loss {row['loss']:.4f}, "
        f"accuracy {row['accuracy']:.4f}, val accuracy {row['val_accuracy']:.4f}, "
        f"{row['seconds']:.1f} s"
    )


def write_history(json_path: Path, csv_path: Path, rows: list[dict[str, Any]]) -> None:
    """The per-epoch log of both phases as JSON and as CSV (columns :data:`HISTORY_COLUMNS`)."""
    write_json_atomic(json_path, rows)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=HISTORY_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(csv_path, table.getvalue())


def _float(value: Any) -> float | None:
    return None if value is None else float(value)
