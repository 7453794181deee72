"""A command owns the processes it starts: killed or interrupted, it takes them with it (Linux).

What a command may start: joblib's worker processes (``JOBS=2`` and more) with their
two resource trackers, a local Ray cluster (``ENGINE=ray``: GCS, raylet, workers,
agents). Killed with ``SIGTERM``, ``SIGHUP`` or ``kill -9``, Python runs no clean-up,
and those processes lived on for minutes (joblib's workers wait out their 300 s idle
timeout). :func:`own_processes`, called once as the command line starts, gives the
command ownership of them:

* every process started from then on inherits :data:`OWNER_VARIABLE`, a value unique
  to this command (a nested command sets its own for its children);
* a small watcher process (this file run as a script, standard library only, about
  10 MB) polls its parent four times a second and lists the command's processes every
  second; once the command has ended, however it ended, it sends ``SIGTERM`` to every process carrying the value, and ``SIGKILL``
  to those still alive :data:`GRACE_SECONDS` later;
* under ``make``, the command asks the kernel for ``SIGTERM`` when make dies
  (``PR_SET_PDEATHSIG``), so ``kill -9`` of make ends Python too. Started from a
  shell or ``nohup``, the command outlives its parent as usual.

Elsewhere than Linux (no ``/proc``, no ``prctl``) nothing is done.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import uuid

OWNER_VARIABLE = "PIPELINE_RUN_OWNER"
GRACE_SECONDS = 2.0  # between SIGTERM and SIGKILL of what a command left behind
POLL_SECONDS = 0.25
_PR_SET_PDEATHSIG = 1
_MAKES = ("make", "gmake")


def own_processes() -> None:
    """Give this command ownership of every process it starts (see the module's docstring).

    Call once, at the start of a command-line run, before anything is started.
    """
    if not sys.platform.startswith("linux") or not os.path.isdir("/proc/self"):
        return
    _follow_make()
    tag = uuid.uuid4().hex
    os.environ[OWNER_VARIABLE] = tag
    import subprocess

    with contextlib.suppress(OSError):  # no watcher (out of processes): runs as before
        subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__), str(os.getpid()), tag],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # never holds make's or a pipe's output open
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C and a hang-up reach the command, not its watcher
            close_fds=True,
        )


def _follow_make() -> None:
    """Under make, die with make (``SIGTERM`` when it dies, ``kill -9`` included)."""
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/comm") as handle:
            if handle.read().strip() not in _MAKES:
                return
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # make died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def owned_processes(tag: str) -> dict[int, bytes]:
    """The live processes started with ``OWNER_VARIABLE=tag`` (this user's): pid -> start time."""
    wanted = f"{OWNER_VARIABLE}={tag}".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if wanted not in handle.read().split(b"\0"):
                    continue
        except OSError:  # gone, or another user's
            continue
        started = _start_time(int(entry))
        if started is not None:
            found[int(entry)] = started
    return found


def _start_time(pid: int) -> bytes | None:
    """When ``pid`` started (clock ticks since boot), or ``None`` once it has ended.

    A process whose main thread has ended while others run reads as a zombie with an
    empty environment: alive, found only by its start time.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        if fields[0] == b"Z" and len(os.listdir(f"/proc/{pid}/task")) <= 1:
            return None  # ended, its parent has yet to reap it
        return fields[19]
    except (OSError, IndexError):
        return None


def end_owned(
    tag: str, *, known: dict[int, bytes] | None = None, grace: float = GRACE_SECONDS
) -> list[int]:
    """``SIGTERM`` every process of ``tag`` and of ``known`` (pid -> start time) once, those
    started meanwhile too, then ``SIGKILL`` those still alive ``grace`` seconds later.

    Returns the pids signalled, once none has been seen for half a second (a stopping
    Ray node can start a process after the others have gone).
    """
    known = dict(known or {})
    signalled: set[int] = set()
    deadline, quiet = time.monotonic() + grace, 0
    while quiet < 5 and time.monotonic() < deadline + 10:  # 10 s: a stubborn respawner
        known.update(owned_processes(tag))
        alive = [pid for pid, started in known.items() if _start_time(pid) == started]
        quiet = 0 if alive else quiet + 1
        late = time.monotonic() >= deadline
        for pid in alive:
            if late or pid not in signalled:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL if late else signal.SIGTERM)
                    signalled.add(pid)
        time.sleep(0.1)
    return sorted(signalled)


def _watch(parent: int, tag: str) -> None:
    """The watcher: wait for ``parent`` to end, then end what it left behind.

    What the command runs is listed every second too, so a process whose environment
    can no longer be read when the command ends is still found.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    known: dict[int, bytes] = {}
    polls = 0
    while os.getppid() == parent:
        time.sleep(POLL_SECONDS)
        polls += 1
        if polls % 4 == 0:
            known = {pid: t for pid, t in known.items() if _start_time(pid) == t}
            known.update(owned_processes(tag))
    end_owned(tag, known=known)


if __name__ == "__main__":  # python -I -S processes.py <parent pid> <tag>
    _watch(int(sys.argv[1]), sys.argv[2])
