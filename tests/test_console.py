"""The stderr filter of the command-line entry points (pipeline.console)."""

from __future__ import annotations

import os
import threading

from pipeline.console import END_OF_FILTER, _forward, is_chatter

TF_START_UP = (
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    b"I0000 00:00:1795473214.864178   11383 port.cc:153] oneDNN custom operations are on.\n"
    b"I0000 00:00:1795473214.912797   11383 cpu_feature_guard.cc:227] This TensorFlow binary\n"
    b"To enable the following instructions: AVX2 AVX512F, in other operations, rebuild\n"
    b"E0000 00:00:1795473217.752595   11383 cuda_platform.cc:52] failed call to cuInit\n"
)


def _filtered(*chunks: bytes) -> bytes:
    source_read, source_write = os.pipe()
    sink_read, sink_write = os.pipe()
    thread = threading.Thread(target=_forward, args=(source_read, sink_write))
    thread.start()
    for chunk in chunks:
        os.write(source_write, chunk)
    os.close(source_write)
    thread.join(timeout=5)
    os.close(sink_write)
    with os.fdopen(sink_read, "rb") as sink:
        return sink.read()


def test_absl_start_up_lines_are_chatter_and_user_lines_are_not():
    assert all(is_chatter(line) for line in TF_START_UP.splitlines())
    for line in (b"error: unknown backbone 'x'", b"Traceback (most recent call last):",
                 b"I like images", b"WARNING: the split has one image"):  # fmt: skip
        assert not is_chatter(line)


def test_filter_drops_chatter_and_keeps_everything_else_in_order():
    out = _filtered(
        TF_START_UP,
        b"\rfeatures:  50%|##   | 6/12",  # a progress bar update: no newline
        b"\rfeatures: 100%|#####| 12/12\n",
        b"error: cache is locked\n",
    )
    assert (
        out
        == b"\rfeatures:  50%|##   | 6/12\rfeatures: 100%|#####| 12/12\nerror: cache is locked\n"
    )


def test_a_chatter_line_split_across_writes_is_still_dropped():
    line = TF_START_UP.splitlines(keepends=True)[1]
    assert _filtered(line[:3], line[3:20], line[20:], b"kept\n") == b"kept\n"


def test_the_end_mark_stops_the_filter_while_a_child_still_holds_the_pipe():
    """A child process that inherited descriptor 2 keeps the pipe open: the exit handler's
    end mark, not the pipe's end, stops the thread, and what came before it is kept."""
    source_read, source_write = os.pipe()
    sink_read, sink_write = os.pipe()
    held_by_a_child = os.dup(source_write)
    thread = threading.Thread(target=_forward, args=(source_read, sink_write))
    thread.start()
    os.write(source_write, b"last line\n")
    os.write(source_write, b"\rbar 9/10" + END_OF_FILTER + b"after the end\n")
    thread.join(timeout=5)
    assert not thread.is_alive()
    os.close(sink_write)
    with os.fdopen(sink_read, "rb") as sink:
        assert sink.read() == b"last line\n\rbar 9/10"
    for fd in (source_write, held_by_a_child):
        os.close(fd)
