"""TensorFlow's native start-up lines quieted at the first import of Keras (pipeline.core.console)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from heads_helpers import synthetic_cache

from pipeline.core.console import is_chatter

ROOT = Path(__file__).resolve().parents[1]
TF_START_UP = (
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    b"I0000 00:00:1795473214.864178   11383 port.cc:153] oneDNN custom operations are on.\n"
    b"I0000 00:00:1795473214.912797   11383 cpu_feature_guard.cc:227] This TensorFlow binary\n"
    b"To enable the following instructions: AVX2 AVX512F, in other operations, rebuild\n"
    b"E0000 00:00:1795473217.752595   11383 cuda_platform.cc:52] failed call to cuInit\n"
)


def _python(*args: str, **env: str) -> subprocess.CompletedProcess:
    """A child Python in the repository, with TensorFlow's log level as a user's shell has it."""
    child_env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**child_env, **env},
        capture_output=True,
        timeout=300,
    )


def _absl_lines(stderr: bytes) -> list[bytes]:
    return [line for line in stderr.splitlines() if is_chatter(line)]


def test_absl_start_up_lines_are_chatter_and_user_lines_are_not():
    assert all(is_chatter(line) for line in TF_START_UP.splitlines())
    for line in (b"error: unknown backbone 'x'", b"Traceback (most recent call last):",
                 b"I like images", b"WARNING: the split has one image"):  # fmt: skip
        assert not is_chatter(line)


def test_quiet_native_logs_keeps_other_lines_and_restores_descriptor_2_on_an_error():
    code = f"""
import os, sys
from pipeline.core.console import quiet_native_logs
try:
    with quiet_native_logs():
        os.write(2, {TF_START_UP!r})
        os.write(2, b"a native error the user must see\\n")
        print("a Python warning", file=sys.stderr)
        raise ImportError("the import failed")
except ImportError as exc:
    print(f"caught: {{exc}}", file=sys.stderr)
os.write(2, b"after the block\\n")
"""
    done = _python("-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stderr.decode().splitlines() == [
        "a native error the user must see",
        "a Python warning",
        "caught: the import failed",
        "after the block",
    ]


def test_importing_keras_through_the_package_prints_no_absl_lines():
    """A notebook's case: the package first, then Keras and a first operation (where a
    machine without a GPU logs ``failed call to cuInit``)."""
    code = "import pipeline, keras; keras.ops.ones(1); print('done')"
    quiet = _python("-c", code)
    assert quiet.returncode == 0 and quiet.stdout.strip() == b"done", quiet.stderr
    assert _absl_lines(quiet.stderr) == [] and quiet.stderr.strip() == b""
    native = _python("-c", code, PIPELINE_NATIVE_LOGS="1")  # the quieting off: left as it is
    assert native.returncode == 0 and native.stdout.strip() == b"done", native.stderr
    if sys.platform == "linux":  # TensorFlow's Linux wheels print them: they were there
        assert _absl_lines(native.stderr), native.stderr


def test_a_command_that_loads_keras_prints_no_absl_lines(tmp_path):
    cache = synthetic_cache(tmp_path)
    done = _python(
        "-m", "pipeline", "head", "--cache", str(cache), "--head", "softmax",
        "--artifacts", str(tmp_path / "artifacts"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert b"softmax" in done.stdout and _absl_lines(done.stderr) == []


def test_an_error_raised_by_the_import_still_reaches_the_user():
    done = _python("-c", "import pipeline, keras", KERAS_BACKEND="no-such-backend")
    assert done.returncode == 1
    assert b"Unable to import backend : no-such-backend" in done.stderr
    assert b"Traceback (most recent call last)" in done.stderr


def test_a_line_printed_while_a_bar_is_open_starts_on_a_line_of_its_own(monkeypatch):
    """A terminal shows stdout and stderr on one screen: the bar must be cleared before the
    line, never left in front of it (the first epoch's row glued to a stale bar)."""
    import io
    import sys

    from pipeline.core.console import progress_bar

    screen = io.StringIO()
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setattr(sys, "stderr", screen)
    with progress_bar(4, desc="epoch 1/3", unit="batch") as bar:
        bar.update(2)
        print("phase 1: val accuracy 0.9000")
        print("epoch 1/3", end="")  # a line in two writes is written once whole
        print(" loss 0.1")
        print("a warning", file=sys.stderr)
        bar.update(2)
    print("after")
    assert sys.stdout is screen and sys.stderr is screen  # the streams are given back
    text = screen.getvalue()
    assert "epoch 1/3:  50%" in text  # the bar was drawn
    for line in ("phase 1: val accuracy 0.9000", "epoch 1/3 loss 0.1", "a warning", "after"):
        (before,) = [part for part in text.split("\n") if part.endswith(line)]
        assert before.split("\r")[-1] == line, repr(before)  # nothing of a bar before it
