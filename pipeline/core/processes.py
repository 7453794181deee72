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
  10 MB) polls its parent four times a second; once the command has ended, however it
  ended, it sends ``SIGTERM`` to every process carrying the value, and ``SIGKILL``
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


def owned_processes(tag: str, *, exclude: int | None = None) -> list[int]:
    """Pids of the live processes started with ``OWNER_VARIABLE=tag`` (this user's)."""
    wanted = f"{OWNER_VARIABLE}={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in (exclude, os.getpid()):
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if wanted not in handle.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat", "rb") as handle:
                if handle.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue  # already dead, its parent has yet to reap it
        except (OSError, IndexError):  # gone, or another user's
            continue
        found.append(int(entry))
    return found


def end_owned(tag: str, *, grace: float = GRACE_SECONDS) -> list[int]:
    """``SIGTERM`` every process of ``tag`` (once each, those started meanwhile too), then
    ``SIGKILL`` those still alive ``grace`` seconds later. Returns the pids signalled."""
    signalled: list[int] = []
    deadline = time.monotonic() + grace
    while alive := owned_processes(tag):
        last = time.monotonic() >= deadline
        for pid in alive:
            if last or pid not in signalled:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL if last else signal.SIGTERM)
                    signalled.append(pid)
        if last:
            break
        time.sleep(0.1)
    return sorted(set(signalled))


def _watch(parent: int, tag: str) -> None:
    """The watcher: wait for ``parent`` to end, then end what it left behind."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    while os.getppid() == parent:
        time.sleep(POLL_SECONDS)
    end_owned(tag)


if __name__ == "__main__":  # python -I -S processes.py <parent pid> <tag>
    _watch(int(sys.argv[1]), sys.argv[2])
