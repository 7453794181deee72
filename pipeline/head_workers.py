"""The scikit-learn heads' searches in a background process while Keras trains here.

A default sweep fits Keras's softmax head and five scikit-learn heads. The softmax
head's fit is one core's work (tracing its training step is Python, its steps are
small), and threads cannot overlap it with the other heads' searches: both hold
Python's interpreter lock most of the time. One worker process can. It gets the
train split once, then searches the scikit-learn heads one after another, in the
order given, on half the cores' BLAS threads (:func:`blas_threads`; the other half
is Keras's), while this process trains the Keras heads. When those are done, this process takes the searches the worker
has not started from the back of the list (:meth:`BackgroundSearches.take_last`) and runs
them itself, so neither core waits for the other.

The worker is started once per process and kept (:func:`warm_up` starts it ahead);
its first start costs about a second on 2 cores, spent while this process imports
Keras (about 4 s) on a fresh ``make head``. A search the worker cannot deliver (the
worker died, or the search raised) is run again here, so errors are what a sweep
without the worker gives. Results are the same searches on the same folds and seeds; a
different number of BLAS threads can only change rounding (so, at most, a near tie). The worker process is made by loky (joblib's
process executor): no fork of this process, whose TensorFlow threads a fork would
not carry safely.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from pipeline.head_search import Searched

#: Largest train split (bytes of features) sent to the worker: it holds a copy of it.
OVERLAP_MAX_BYTES = 512 * 2**20

_lock = threading.Lock()
_executor: Any = None


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity where the system tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def blas_threads() -> int:
    """BLAS and OpenMP threads for a search that runs beside another process's work: half
    the cores (one on 2 cores, where the other is Keras's or the worker's)."""
    return max(1, usable_cores() // 2)


def warm_up() -> None:
    """Start the worker now and let it import the searches' modules (blocks until it has).

    ``make bench-heads`` calls it before timing, as it imports Keras before timing: a
    fresh ``make head`` pays both while it starts, side by side.
    """
    _worker().submit(_import_searches).result()  # started with its import already queued


def shut_down() -> None:
    """Stop the worker (the next sweep that needs it starts a new one)."""
    global _executor
    with _lock:
        executor, _executor = _executor, None
    if executor is not None:
        executor.shutdown(wait=True)


class BackgroundSearches:
    """Heads' searches for the worker, on one train split: it takes them from the front,
    one at a time; this process may take them from the back (:meth:`take_last`).

    A search is sent when the worker's previous one ends (a callback of its future), so
    none waits in the executor's queue, where it could no longer be taken back.

    Parameters
    ----------
    X, y : arrays
        The train split, as the heads' searches in this process see it.
    names : sequence of str
        Registered scikit-learn heads, searched in this order.
    norm, pca, cv, seed
        As :func:`pipeline.heads.fit_heads` takes them (the search's ``jobs`` is 1).
    """

    def __init__(
        self,
        X: np.ndarray,
        y: np.ndarray,
        names: Sequence[str],
        *,
        norm: str | None,
        pca: int | None,
        cv: int,
        seed: int,
    ) -> None:
        if len(set(names)) != len(names):
            raise ValueError(f"each head once: {list(names)}")
        self._worker, self._token = _worker(), uuid.uuid4().hex
        self._options = {"norm": norm, "pca": pca, "cv": cv, "seed": seed}
        self._sent = threading.Condition()  # guards what follows; notified when one is sent
        self._waiting = list(names)  # not sent yet, in order
        self._futures: dict[str, Future] = {}  # sent
        self._closed = False
        self.failures: dict[str, str] = {}  # head -> why the worker did not deliver it
        self._submit(_hold, self._token, X, y)
        self._send_next()

    @property
    def names(self) -> tuple[str, ...]:
        """The heads the worker has or will have (none taken back), in order."""
        with self._sent:
            return (*self._futures, *self._waiting)

    def take_last(self) -> str | None:
        """The last search not sent yet, now this process's to run; ``None`` when none is left."""
        with self._sent:
            name = self._waiting.pop() if self._waiting else None
            self._sent.notify_all()
            return name

    def result(self, name: str) -> Searched | None:
        """Wait for a head's search; ``None`` when the worker could not deliver it.

        The reason is kept in :attr:`failures`; a dead worker is replaced on the next sweep.
        """
        from concurrent.futures.process import BrokenProcessPool

        with self._sent:
            self._sent.wait_for(lambda: name not in self._waiting)  # sent when the last ends
            future = self._futures.get(name)
        if future is None:
            raise KeyError(f"{name} was not sent to the worker (taken back, or not asked)")
        try:
            return future.result()
        except BrokenProcessPool as exc:  # the worker died: every later search fails too
            _forget(self._worker)
            self.failures[name] = f"the background process stopped ({_first_line(exc)})"
        except Exception as exc:
            self.failures[name] = f"{type(exc).__name__}: {_first_line(exc)}"
        return None

    def close(self) -> None:
        """Send nothing more and let the worker drop the train split; a search still running
        (the sweep stopped on an error or Ctrl-C) is stopped with its worker."""
        with self._sent:
            self._closed = True
            self._waiting.clear()
            self._sent.notify_all()
            unfinished = any(not future.done() for future in self._futures.values())
        if unfinished:  # nobody will read it: do not make the command wait for it
            _forget(self._worker, kill=True)
            return
        with contextlib.suppress(Exception):  # a dead or shut-down worker holds nothing
            self._worker.submit(_release, self._token)

    def _send_next(self, _previous: Future | None = None) -> None:
        with self._sent:
            if self._closed or not self._waiting:
                return
            name = self._waiting.pop(0)
            future = self._submit(_search_held, self._token, name, **self._options)
            self._futures[name] = future
            self._sent.notify_all()
        future.add_done_callback(self._send_next)  # runs now if it is done already

    def _submit(self, fn: Any, *args: Any, **kwargs: Any) -> Future:
        try:
            return self._worker.submit(fn, *args, **kwargs)
        except Exception as exc:  # a broken or shut-down executor: the future carries it
            failed: Future = Future()
            failed.set_exception(exc)
            return failed


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _worker() -> Any:
    global _executor
    with _lock:
        if _executor is None:
            from joblib.externals.loky import ProcessPoolExecutor

            executor = ProcessPoolExecutor(max_workers=1)
            with _ctrl_c_ignored():
                # The worker starts now, with Ctrl-C ignored for its whole life: it shares
                # the terminal's process group, and Ctrl-C during its start-up would print
                # its import traceback; this process stops it (:meth:`BackgroundSearches.close`).
                executor.submit(_import_searches)
            _executor = executor
        return _executor


@contextlib.contextmanager
def _ctrl_c_ignored() -> Any:
    """SIGINT ignored while a child process starts (it keeps the disposition across exec)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may change signal handlers
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _forget(executor: Any, *, kill: bool = False) -> None:
    global _executor
    with _lock:
        if _executor is executor:
            _executor = None
    if kill:
        # The worker process itself: loky then fails what it still holds as a dead worker's.
        # Its own shutdown(kill_workers=True) with calls still queued trips its manager
        # thread on a KeyError, a traceback on stderr (joblib 1.6's loky).
        for process in list(getattr(executor, "_processes", {}).values()):
            with contextlib.suppress(Exception):
                process.kill()
    with contextlib.suppress(Exception):
        executor.shutdown(wait=False)


# --------------------------------------------------------------------------- in the worker

_held: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _import_searches() -> None:
    import pipeline.heads  # noqa: F401  (scikit-learn and the searches)


def _hold(token: str, X: np.ndarray, y: np.ndarray) -> None:
    # One sweep's data at a time: a sweep run beside another in the same process finds its
    # split gone, and its searches run again in that process.
    _held.clear()
    _held[token] = (X, y)


def _release(token: str) -> None:
    _held.pop(token, None)


def _search_held(
    token: str, name: str, *, norm: str | None, pca: int | None, cv: int, seed: int
) -> Searched:
    from threadpoolctl import threadpool_limits

    from pipeline.head_search import timed_search
    from pipeline.heads import HEADS, build_head

    X, y = _held[token]
    with threadpool_limits(blas_threads()):  # the other cores train Keras
        return timed_search(
            HEADS[name], build_head(name, norm=norm, pca=pca, seed=seed), X, y, cv, seed, 1
        )
