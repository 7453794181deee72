"""What the terminal shows: native start-up chatter of TensorFlow filtered out.

TensorFlow's C++ libraries log through absl straight to file descriptor 2 while
Keras imports them ("All log messages before absl::InitializeLog() ...",
"oneDNN custom operations are on ...", "Could not find cuda drivers ..."),
twice per command, and ``TF_CPP_MIN_LOG_LEVEL`` does not reach those lines.
:func:`filter_native_logs` puts a pipe in front of descriptor 2 and a thread
that forwards everything except lines in absl's log format, so progress bars,
warnings and errors pass unchanged. The command-line entry points install it;
library use (notebooks, tests) is left alone. ``PIPELINE_NATIVE_LOGS=1`` turns
the filter off.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import sys
import threading

# absl's line format: "I0000 00:00:1795473214.864178   11383 port.cc:153] ...".
_ABSL_LINE = re.compile(rb"^[IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [^\]\s]+:\d+\] ")
_CHATTER = (
    b"WARNING: All log messages before absl::InitializeLog()",
    b"To enable the following instructions:",  # the second line of cpu_feature_guard's note
)
_MAYBE_CHATTER = re.compile(rb"^(?:[IWEF]\d{0,4}(?: [\d:. ]*)?|W[A-Z: ]*|T[a-z ]*)$")
# Written by :func:`filter_native_logs`'s exit handler: the filter's last input. Child
# processes (the heads' background worker, loky's resource tracker, Ray) inherit
# descriptor 2, so the pipe may not reach its end while they live.
END_OF_FILTER = b"\0pipeline: end of the stderr filter\0"


def is_chatter(line: bytes) -> bool:
    """Whether a complete stderr line is native TensorFlow/absl start-up logging."""
    return bool(_ABSL_LINE.match(line)) or line.startswith(_CHATTER)


def filter_native_logs() -> None:
    """Route descriptor 2 through a filter thread that drops :func:`is_chatter` lines."""
    if os.environ.get("PIPELINE_NATIVE_LOGS") == "1" or not hasattr(os, "pipe"):
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # what the level does reach
    try:
        sys.stderr.flush()
        original = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
    except OSError:  # no usable descriptor 2: nothing to filter
        return
    thread = threading.Thread(
        target=_forward, args=(read_end, original), name="stderr-filter", daemon=True
    )
    thread.start()

    owner = os.getpid()

    def restore() -> None:
        if os.getpid() != owner:  # a forked child exiting: the filter is its parent's
            return
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os.dup2(original, 2)
        with contextlib.suppress(OSError):
            # One write, under PIPE_BUF: never split. Not blocking: if the thread has died
            # (its output closed) and the pipe is full, exit all the same.
            os.set_blocking(write_end, False)
            _write_all(write_end, END_OF_FILTER)
        with contextlib.suppress(OSError):
            os.close(write_end)
        thread.join(timeout=2)

    atexit.register(restore)


def _forward(read_end: int, out: int) -> None:
    pending = b""
    while chunk := os.read(read_end, 65536):
        pending += chunk
        ended = END_OF_FILTER in pending
        if ended:
            pending = pending[: pending.index(END_OF_FILTER)]
        *lines, pending = pending.split(b"\n")
        kept = [line + b"\n" for line in lines if not is_chatter(line)]
        # A partial line (a progress bar's "\r..." update) goes out at once unless it
        # may still become a chatter line, or the end mark (a NUL: none in text).
        partial = pending and b"\0" not in pending and not _MAYBE_CHATTER.match(pending)
        if partial and not is_chatter(pending):
            kept.append(pending)
            pending = b""
        if kept:
            _write_all(out, b"".join(kept))
        if ended:
            break
    if pending and not is_chatter(pending):
        _write_all(out, pending)
    os.close(read_end)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]
