"""What the terminal shows: progress bars that never glue onto other lines, and TensorFlow's
native start-up lines quieted at their source.

:func:`progress_bar` is the package's progress bar (tqdm, on stderr). While one is open,
``sys.stdout`` and ``sys.stderr`` are wrapped (:class:`_LineGuard`): every complete line
printed first clears the open bars, then the bars are drawn again below it, so a line
(an epoch's row, a note, a warning) never lands glued to the end of a bar.

Importing Keras loads TensorFlow's C++ libraries, and each of two of them logs
through absl straight to file descriptor 2 before anything can configure it::

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 00:00:1796293896.743674    3983 port.cc:153] oneDNN custom operations are on. ...
    I0000 00:00:1796293896.744059    3983 cudart_stub.cc:31] Could not find cuda drivers ...

Then come ``cpu_feature_guard.cc``'s two lines and, at the first operation on a
machine without a GPU, ``E0000 ... cuda_platform.cc:52] failed call to cuInit``;
``TF_CPP_MIN_LOG_LEVEL=3`` silences those two, not the first ones.
:func:`quiet_keras_import` quiets all of them at the first import of Keras (or
TensorFlow), wherever it happens: it sets the level and runs that import with
descriptor 2 in a temporary file (:func:`quiet_native_logs`), whose lines are then
written to the real descriptor 2, absl's left out (:func:`is_chatter`). Importing
:mod:`pipeline` installs it, so commands and notebooks get it alike; an error raised
by the import still reaches the caller. ``PIPELINE_NATIVE_LOGS=1`` leaves
TensorFlow's output as it is.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import Any, TextIO

# absl's line format: "I0000 00:00:1795473214.864178   11383 port.cc:153] ...".
_ABSL_LINE = re.compile(rb"^[IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [^\]\s]+:\d+\] ")
_CHATTER = (
    b"WARNING: All log messages before absl::InitializeLog()",
    b"To enable the following instructions:",  # the second line of cpu_feature_guard's note
)
_QUIETED = ("keras", "tensorflow")  # the first of them to be imported loads TensorFlow


def is_chatter(line: bytes) -> bool:
    """Whether a stderr line is native TensorFlow/absl start-up logging."""
    return bool(_ABSL_LINE.match(line)) or line.startswith(_CHATTER)


def quiet_keras_import() -> None:
    """Quiet TensorFlow's native start-up lines at this process's first import of Keras."""
    if any(name in sys.modules for name in _QUIETED):
        return  # imported already: too late
    if not any(isinstance(finder, _QuietFirstImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietFirstImport())


@contextlib.contextmanager
def quiet_native_logs() -> Iterator[None]:
    """Descriptor 2 into a temporary file for the block; afterwards its lines go to the real
    descriptor 2, absl's left out, even when the block raises."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no descriptor 2 to quiet
        saved = None
    if saved is None:
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().splitlines(keepends=True)
            kept = b"".join(line for line in lines if not is_chatter(line))
            while kept:
                kept = kept[os.write(2, kept) :]


class _QuietFirstImport:
    """A meta-path finder that finds nothing itself: it hands the first import of Keras or
    TensorFlow a loader that runs it quietly, then leaves."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name not in _QUIETED:
            return None
        import importlib.util

        sys.meta_path.remove(self)
        if os.environ.get("PIPELINE_NATIVE_LOGS") == "1":
            return None
        spec = importlib.util.find_spec(name)  # the other finders' answer
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader:
    """Runs one module's import inside :func:`quiet_native_logs`, at log level 3."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # the real one from now on
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        with quiet_native_logs():
            self.loader.exec_module(module)


# --- progress bars


_OPEN_BARS: list[Any] = []
_GUARDS: list[tuple[TextIO, TextIO]] = []  # (real stdout, real stderr) while bars are open
_BARS_LOCK = threading.RLock()


def progress_bar(
    total: int | None = None,
    *,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    leave: bool = False,
    initial: int = 0,
) -> Any:
    """A tqdm bar on stderr; use it as a context manager or call ``close()``.

    ``enabled=False`` gives a bar that shows nothing (``--quiet``). While the bar is
    open, lines printed through ``sys.stdout`` or ``sys.stderr`` end it first
    (see the module's docstring); ``leave=False`` erases it when it closes.
    """
    from tqdm.auto import tqdm

    class _Bar(tqdm):  # tqdm.auto picks the terminal's or the notebook's class
        def close(self) -> None:
            try:
                super().close()
            finally:
                _release(self)

    # The real stderr, not a guard of an open bar's (a bar's own line never ends).
    stderr = _GUARDS[-1][1] if _GUARDS else sys.stderr
    bar = _Bar(total=total, desc=desc, unit=unit, disable=not enabled, leave=leave,
               initial=initial, dynamic_ncols=True, file=stderr)  # fmt: skip
    if enabled:
        with _BARS_LOCK:
            if not _OPEN_BARS:
                real = (sys.stdout, sys.stderr)
                _GUARDS.append(real)
                sys.stdout, sys.stderr = _LineGuard(real[0]), _LineGuard(real[1])
            _OPEN_BARS.append(bar)
    return bar


def _release(bar: Any) -> None:
    with _BARS_LOCK:
        if bar in _OPEN_BARS:
            _OPEN_BARS.remove(bar)
            if not _OPEN_BARS and _GUARDS:
                stdout, stderr = _GUARDS.pop()
                for name, real in (("stdout", stdout), ("stderr", stderr)):
                    current = getattr(sys, name)
                    if isinstance(current, _LineGuard):
                        current.flush_pending()
                        setattr(sys, name, real)


class _LineGuard:
    """A text stream that writes whole lines, each after clearing the open bars, which it
    then draws again; a partial line waits for its end (or for the bars to close)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream, self._pending = stream, ""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def write(self, text: str) -> int:
        self._pending += text
        if "\n" in self._pending:
            lines, _, self._pending = self._pending.rpartition("\n")
            self._write_between_bars(lines + "\n")
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def flush_pending(self) -> None:
        if self._pending:
            self._stream.write(self._pending)
            self._pending = ""
        self._stream.flush()

    def _write_between_bars(self, text: str) -> None:
        with _BARS_LOCK:
            bars = [bar for bar in _OPEN_BARS if not getattr(bar, "disable", True)]
            for bar in bars:
                bar.clear()
            self._stream.write(text)
            self._stream.flush()
            for bar in bars:
                bar.refresh()
