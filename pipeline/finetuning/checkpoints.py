"""The checkpoint of an unfinished stage-three run, and its refusal to resume another one.

``<name>.checkpoint/`` holds the last epoch's weights, the best weights so far,
the optimizer state, the random state of the model's layers (dropout,
augmentation: so a resumed run draws what the uninterrupted one would) and
``state.json`` (the epoch, the early-stopping state and
the per-epoch log), each replaced atomically. ``state.json`` is written last
and names the files it belongs to, so a run killed mid-save resumes from the
previous complete epoch.

A run holds ``<name>.lock`` beside the folder from :meth:`Checkpoint.open` to
:meth:`Checkpoint.release`, so a second run of the same name refuses with one
line. ``state.json`` is checked against its schema (types, and file names that
stay inside the folder and exist) before anything it names is loaded.

Keras's ``BackupAndRestore`` keeps weights and the epoch only: not the best
weights and patience of early stopping, nor the log, and it resumes whatever
configuration it finds. :class:`Checkpoint` records the configuration that
made it and refuses to continue under another one; the training loop drives it
from a callback (:class:`pipeline.finetuning.training.CheckpointedEarlyStopping`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import FinetuneError
from pipeline.core.files import run_lock, write_atomic, write_json_atomic

# 2: the configuration is recorded as FinetuneConfig.identity(); 3: weights as .npz arrays
# (Keras's .weights.h5 took a second or more per save of a whole backbone, once per epoch).
CHECKPOINT_VERSION = 3


class Checkpoint:
    """A folder holding the state of an unfinished run, replaced file by file, atomically."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._lock = contextlib.ExitStack()

    @property
    def state_path(self) -> Path:
        return self.folder / "state.json"

    @property
    def lock_path(self) -> Path:
        return self.folder.with_name(self.folder.stem + ".lock")

    def release(self) -> None:
        """Give up the run's lock (taken by :meth:`open`)."""
        self._lock.close()

    def open(
        self, identity: dict[str, Any], *, restart: bool, note: Callable[[str], None]
    ) -> dict | None:
        """The saved state when it belongs to ``identity``; refuse one that does not.

        Takes the run's lock first: the caller calls :meth:`release` when the
        run ends, however it ends.

        Raises
        ------
        FinetuneError
            Another run of the same name holds the lock; an unreadable or
            malformed state, or one made with another configuration (the first
            differences named); the checkpoint is left untouched.
        """

        def busy(owner: str) -> FinetuneError:
            return FinetuneError(
                f"the run {self.folder.stem!r} is being trained by another process ({owner}); "
                "wait for it to finish, or pass NAME=other to start another run"
            )

        self._lock.enter_context(run_lock(self.lock_path, busy))
        try:
            return self._open(identity, restart=restart, note=note)
        except BaseException:
            self.release()
            raise

    def _open(
        self, identity: dict[str, Any], *, restart: bool, note: Callable[[str], None]
    ) -> dict | None:
        if not self.state_path.is_file():
            return None
        if restart:
            shutil.rmtree(self.folder)
            note(f"RESTART: discarded the unfinished run in {self.folder}")
            return None
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError) as exc:
            raise FinetuneError(
                f"checkpoint {self.state_path} is unreadable ({exc}); delete {self.folder} "
                "or pass RESTART=1 to start over"
            ) from None
        problem = _state_problem(state, self.folder)
        if problem:
            raise FinetuneError(
                f"checkpoint {self.state_path} is malformed ({problem}); pass RESTART=1 to "
                f"start over (or delete {self.folder})"
            )
        saved = state["identity"]
        differ = [
            f"{key} {saved.get(key)!r} (now {value!r})"
            for key, value in identity.items() if saved.get(key) != value
        ]  # fmt: skip
        if differ:
            raise FinetuneError(
                f"the unfinished run in {self.folder} used another configuration "
                f"({'; '.join(differ[:3])}); run it again with its options to finish it, "
                "or pass RESTART=1 (or NAME=other) to start a new one"
            )
        return state

    def start(
        self, model, identity: dict, history: list, val_accuracy: float, head_source: str
    ) -> dict:
        """Record the end of phase one: epoch 0 of phase two, the first best candidate."""
        self.folder.mkdir(parents=True, exist_ok=True)
        weights = self._save_weights(model, "epoch-0")
        random = self._save_arrays("random-0.npz", _random_state(model))
        state = {
            "identity": identity,
            "epoch": 0,
            "best_epoch": 0,
            "best_val_accuracy": val_accuracy,
            "phase_one_val_accuracy": val_accuracy,
            "wait": 0,
            "head_source": head_source,
            "history": history,
            "last": weights,
            "best": weights,
            "optimizer": None,
            "random": random,
            "seconds": 0.0,
        }
        self._write_state(state)
        return state

    def restore(self, model, state: dict) -> None:
        """Load the last epoch's weights, random state and (after phase two started) optimizer."""
        self._assign(model.weights, state["last"], "weights")
        if state.get("random"):
            self._assign(_random_state(model), state["random"], "random state")
        if state.get("optimizer"):
            model.optimizer.build(model.trainable_variables)
            self._assign(model.optimizer.variables, state["optimizer"], "optimizer state")

    def save(self, model, state: dict, *, epoch: int, improved: bool, **fields: Any) -> dict:
        """Checkpoint after phase-two ``epoch``; ``improved`` makes its weights the best.

        ``fields`` (``wait``, ``best_val_accuracy``, ``history``, ``seconds``)
        update the state as they are.
        """
        state = {**state, **fields}
        state["last"] = self._save_weights(model, f"epoch-{epoch}")
        if improved:
            state.update(best=state["last"], best_epoch=epoch)
        optimizer = self._save_arrays(f"optimizer-{epoch}.npz", model.optimizer.variables)
        random = self._save_arrays(f"random-{epoch}.npz", _random_state(model))
        state.update(epoch=epoch, optimizer=optimizer, random=random)
        self._write_state(state)
        return state

    def best_weights(self, model, state: dict) -> list[np.ndarray]:
        """The best weights so far as arrays (``model`` is left as it was)."""
        with np.load(self.folder / state["best"]) as saved:
            best = [saved[f"v{i}"] for i in range(len(saved.files))]
        if [tuple(w.shape) for w in model.weights] != [w.shape for w in best]:
            raise FinetuneError(
                f"the weights in {self.folder} do not fit this model; pass RESTART=1 to start over"
            )
        return best

    def load_best(self, model, state: dict) -> None:
        self._assign(model.weights, state["best"], "weights")

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def _save_weights(self, model, stem: str) -> str:
        return self._save_arrays(f"{stem}.weights.npz", model.weights)

    def _save_arrays(self, name: str, variables: list) -> str:
        from keras import ops

        values = {f"v{i}": ops.convert_to_numpy(v) for i, v in enumerate(variables)}
        write_atomic(self.folder / name, lambda tmp: np.savez(tmp, **values))
        return name

    def _assign(self, variables: list, name: str, what: str) -> None:
        with np.load(self.folder / name) as saved:
            values = [saved[f"v{i}"] for i in range(len(saved.files))]
        if len(values) != len(variables) or any(
            tuple(v.shape) != value.shape for v, value in zip(variables, values, strict=True)
        ):
            raise FinetuneError(
                f"the {what} in {self.folder} does not fit this model; pass RESTART=1 to start over"
            )
        for variable, value in zip(variables, values, strict=True):
            variable.assign(value)

    def _write_state(self, state: dict) -> None:
        write_json_atomic(self.state_path, state)
        keep = {state["last"], state["best"], state.get("optimizer"), state.get("random")}
        keep.add("state.json")
        for path in self.folder.iterdir():  # files of superseded epochs
            if path.name not in keep:
                path.unlink(missing_ok=True)


_COUNTS = ("epoch", "best_epoch", "wait")
_NUMBERS = ("best_val_accuracy", "phase_one_val_accuracy", "seconds")
_FILES = ("last", "best", "optimizer", "random")  # optimizer and random may be null


def _state_problem(state: Any, folder: Path) -> str:
    """What is wrong with a ``state.json`` (``""`` when it fits the schema)."""
    if not isinstance(state, dict):
        return "not a JSON object"
    if not isinstance(state.get("identity"), dict):
        return "'identity' must be an object"
    for key in _COUNTS:
        value = state.get(key)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return f"{key!r} must be a whole number >= 0, got {value!r:.40}"
    for key in _NUMBERS:
        value = state.get(key, 0.0)
        if not (isinstance(value, int | float) and not isinstance(value, bool)):
            return f"{key!r} must be a number, got {value!r:.40}"
    if not isinstance(state.get("head_source"), str):
        return "'head_source' must be a string"
    history = state.get("history")
    if not (isinstance(history, list) and all(isinstance(h, dict) for h in history)):
        return "'history' must be a list of objects"
    for key in _FILES:
        name = state.get(key)
        if name is None and key in ("optimizer", "random"):
            continue
        if not (isinstance(name, str) and name == Path(name).name and not name.startswith(".")):
            return f"{key!r} must name a file in the checkpoint folder, got {name!r:.60}"
        if not (folder / name).is_file():
            return f"{key!r} names {name}, which is missing"
    return ""


def _random_state(model) -> list:
    """The seed-generator states of the model's layers: its variables that are not weights."""
    weights = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in weights]
