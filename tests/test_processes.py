"""Runs that own their outputs and processes: concurrent head writes, kills, leftovers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import joblib
import numpy as np
import pytest
from heads_helpers import BASE_ATTRS, blobs

from pipeline.core import artifacts
from pipeline.heads.registry import build_head
from pipeline.heads.store import load_head, save_head

CLASSES = ("a", "b", "c")


def _logreg(run: str, seed: int):
    """A fitted logreg head and its manifest, both marked with ``run``."""
    X, y = blobs(10, len(CLASSES), 8, separation=3.0, seed=seed)
    pipe = build_head("logreg").fit(X, y)
    manifest = artifacts.new_manifest(
        "head",
        name="logreg",
        dataset="synthetic",
        class_names=CLASSES,
        features=artifacts.feature_identity(BASE_ATTRS),
        fingerprint="f" * 64,
        feature_width=8,
        run=run,
    )
    return pipe, manifest


@pytest.mark.slow  # about 2 s on two shared cores: two fits, three saves, a load
def test_two_runs_saving_one_head_at_once_leave_one_runs_files(tmp_path, monkeypatch):
    """Run A is held after writing its model until run B has saved (or for 0.5 s, while B waits
    for A's lock); the manifest left must describe the model file beside it."""
    heads = {run: _logreg(run, seed) for run, seed in (("A", 0), ("B", 1))}
    a_paused, b_done = threading.Event(), threading.Event()
    dump = joblib.dump

    def slow_dump(value, filename, *args, **kwargs):  # the .joblib export, after the model
        if threading.current_thread().name == "A":
            a_paused.set()
            b_done.wait(timeout=0.5)
        return dump(value, filename, *args, **kwargs)

    monkeypatch.setattr(joblib, "dump", slow_dump)

    def save(run: str) -> None:
        save_head(*heads[run], tmp_path)
        if run == "B":
            b_done.set()

    a = threading.Thread(target=save, args=("A",), name="A")
    a.start()
    assert a_paused.wait(timeout=30)
    b = threading.Thread(target=save, args=("B",), name="B")
    b.start()
    a.join(timeout=60)
    b.join(timeout=60)

    head = load_head(tmp_path / "logreg.json")  # checksums pass either way
    run = head.manifest["run"]
    coef = head.estimator.steps[-1][1].coef_
    np.testing.assert_array_equal(coef, heads[run][0].steps[-1][1].coef_)


# --------------------------------------------------------------------------- processes

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="process ownership uses /proc and prctl"
)
TAG = "PIPELINE_KILL_TEST"  # the test's own mark on everything the command starts
REPO = Path(__file__).resolve().parents[1]


def _start_time(pid: int) -> bytes | None:
    """As pipeline.core.processes reads it: ``None`` once ``pid`` has ended."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
        if fields[0] == b"Z" and len(os.listdir(f"/proc/{pid}/task")) <= 1:
            return None
        return fields[19]
    except (OSError, IndexError):
        return None


def _marked(tag: str) -> dict[int, tuple[bytes, str]]:
    """pid -> (start time, command line) of the live processes carrying ``TAG=tag``."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if f"{TAG}={tag}".encode() not in Path(f"/proc/{entry}/environ").read_bytes().split(
                b"\0"
            ):
                continue
            line = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        started = _start_time(int(entry))
        if started is not None:
            found[int(entry)] = (started, line[:100])
    return found


@pytest.fixture(scope="module")
def long_cache(tmp_path_factory) -> Path:
    """Features on which the rbf_svm search with JOBS=2 runs for several seconds."""
    from heads_helpers import write_cache

    X, y = blobs(1500, len(CLASSES), 256, separation=0.05)
    rng = np.random.default_rng(0)
    splits = rng.choice(["train", "val", "test"], size=len(y), p=[0.7, 0.15, 0.15])
    path = tmp_path_factory.mktemp("long") / "long.h5"
    return write_cache(path, X, y, list(splits), CLASSES, **BASE_ATTRS)


KILLS = [  # (whom, how): the command, make in front of it, or make's process group
    ("python", signal.SIGTERM),
    ("python", signal.SIGHUP),
    ("python", signal.SIGKILL),
    ("make", signal.SIGTERM),
    ("make", signal.SIGKILL),
    ("make group", signal.SIGHUP),  # a closed terminal: the hang-up reaches every process
]


@linux_only
@pytest.mark.slow
@pytest.mark.parametrize(("whom", "how"), KILLS, ids=[f"{w}-{s.name}" for w, s in KILLS])
def test_a_killed_head_run_takes_its_processes_with_it(long_cache, tmp_path, whom, how):
    """make head JOBS=2, killed while joblib's workers fit: nothing it started lives 5 s on."""
    if whom != "python" and shutil.which("make") is None:
        pytest.skip("make is not installed")
    tag = os.urandom(8).hex()
    command = [sys.executable, "-m", "pipeline", "head", "--cache", str(long_cache)]
    command += ["--head", "rbf_svm,svm,logreg", "--jobs", "2", "--artifacts", str(tmp_path)]
    if whom != "python":
        (tmp_path / "Makefile").write_text(f"head:\n\t{' '.join(command)}\n")
        command = ["make", "-s", "-C", str(tmp_path), "head"]
    env = {**os.environ, TAG: tag, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    root = subprocess.Popen(
        command, cwd=REPO, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        # A test run under nohup ignores SIGHUP, and children inherit that: as a terminal's
        # command, the run under test starts with SIGHUP's default.
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
    )  # fmt: skip
    try:
        deadline, seen = time.monotonic() + 120, {}
        while time.monotonic() < deadline and not any("loky" in c for _, c in seen.values()):
            assert root.poll() is None, "the run ended before its workers started"
            seen.update(_marked(tag))
            time.sleep(0.2)
        assert any("loky" in c for _, c in seen.values()), "no joblib worker started"
        seen.update(_marked(tag))
        python = min(p for p, (_, c) in seen.items() if "-m pipeline head" in c)
        if whom == "make group":
            os.killpg(root.pid, how)
        else:
            os.kill(python if whom == "python" else root.pid, how)
        time.sleep(5)
        left = {p: c for p, (t, c) in {**seen, **_marked(tag)}.items() if _start_time(p) == t}
        assert not left, f"alive 5 s after {how.name} of {whom}: {sorted(left.values())}"
    finally:
        for pid, (started, _) in {**seen, **_marked(tag)}.items():
            if _start_time(pid) == started:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        root.wait(timeout=30)


@linux_only
def test_what_a_command_started_is_ended_with_it():
    from pipeline.core.processes import OWNER_VARIABLE, end_owned, owned_processes

    tag = os.urandom(8).hex()
    env = {**os.environ, OWNER_VARIABLE: tag}
    child = subprocess.Popen(["sleep", "30"], env=env)
    other = subprocess.Popen(["sleep", "30"])  # not the command's: left alone
    try:
        assert list(owned_processes(tag)) == [child.pid]
        assert end_owned(tag, grace=1.0) == [child.pid]
        assert child.wait(timeout=5) == -signal.SIGTERM
        assert other.poll() is None
    finally:
        for process in (child, other):
            process.kill()
            process.wait()


@pytest.mark.slow
def test_a_conversion_killed_midway_leaves_no_folder_after_the_next_run(tmp_path):
    """kill -9 while the backbone is exported: the next run removes the work folder."""
    from pipeline.features.runtimes import ConversionStore, convert

    store = ConversionStore(tmp_path / "runtimes" / "openvino" / "m", {"identity": 1})
    script = (
        "import sys, time; from pathlib import Path; "
        "from pipeline.features.runtimes import ConversionStore, convert; "
        "convert(ConversionStore(Path(sys.argv[1]), {'identity': 1}), lambda: time.sleep(60))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    killed = subprocess.Popen([sys.executable, "-c", script, str(store.directory)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not list(store.directory.parent.glob(".converting-*")):
            assert time.monotonic() < deadline and killed.poll() is None
            time.sleep(0.1)
    finally:
        killed.kill()
        killed.wait()
    # The next run finds the conversion recorded (as a failed one: no Keras needed here).
    store.directory.mkdir(parents=True)
    store.meta_path.write_text(json.dumps({"identity": store.identity, "converted": False}))
    assert convert(store, lambda: None)["converted"] is False
    assert list(store.directory.parent.glob(".converting-*")) == []


@pytest.mark.slow  # a fit, a save and a load: about 1.4 s on two shared cores
def test_a_head_replaced_while_it_is_read_is_refused(tmp_path, monkeypatch):
    """Another run renames its model into place between the checksum test and the read."""
    from pipeline.core.errors import HeadError
    from pipeline.heads import store

    save_head(*_logreg("A", 0), tmp_path)
    read = store._read_skops

    def read_then_replaced(file, name):
        estimator = read(file, name)
        file.write_bytes(file.read_bytes() + b"another run")
        return estimator

    monkeypatch.setattr(store, "_read_skops", read_then_replaced)
    with pytest.raises(HeadError, match="replaced while it was read"):
        load_head(tmp_path / "logreg.json")
