"""Files: content hashes, atomic writes and run locks, for every module that saves something.

Every output of the pipeline is written under a temporary name in the same
folder and renamed into place (``os.replace`` is atomic on POSIX and Windows),
so a reader never sees a half-written file and a crash leaves the previous
version intact. The temporary name ends with the real name, so writers that
check suffixes (``.keras``, ``.weights.h5``) accept it.

A process killed mid-write leaves its temporary file (``.<pid>.tmp.<name>``)
behind; the next write into the same folder removes those of processes that are
no longer alive on this machine. A write that fails because the folder is
read-only or the disk is full raises :class:`WriteError` (one line: the folder
and the cause); what was finished before stays, so the next run resumes.

Run locks (:func:`run_lock`) use the ``filelock`` package: ``flock`` on Linux
and macOS, Windows file locks, released by the OS when a process dies.
On network file systems they hold only where the server supports locks (NFS
with ``lockd``, SMB); where flock is missing, recent ``filelock`` versions fall back to a file
whose existence is the lock, which a killed process leaves behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import PipelineError

# The causes of a failed write that a user can fix (permissions, space, quota).
_CANNOT_WRITE = frozenset(
    getattr(errno, name)
    for name in ("EACCES", "EPERM", "EROFS", "ENOSPC", "EDQUOT", "EFBIG")
    if hasattr(errno, name)
)
_TMP_NAME = re.compile(r"^\.(\d+)\.tmp\..+")
_swept: set[Path] = set()  # folders whose dead temporary files this process has removed


class WriteError(PipelineError):
    """An output folder cannot be written (read-only, permission denied, disk full)."""


def cannot_write(folder: str | Path, exc: OSError) -> WriteError:
    """The one-line :class:`WriteError` for ``exc`` raised while writing into ``folder``."""
    cause = exc.strerror or str(exc)
    return WriteError(
        f"cannot write to {folder}: {cause}; free space or fix the folder's permissions "
        "and run again (finished work is kept and the run resumes)"
    )


def is_write_fault(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed write the user can fix (permissions, read-only, full disk)."""
    return isinstance(exc, OSError) and exc.errno in _CANNOT_WRITE


@contextlib.contextmanager
def writing_into(folder: str | Path) -> Iterator[None]:
    """Turn a permission, read-only or full-disk ``OSError`` into a :class:`WriteError`."""
    try:
        yield
    except OSError as exc:
        if is_write_fault(exc):
            raise cannot_write(folder, exc) from None
        raise


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (``True`` when that cannot be told)."""
    if sys.platform == "win32":  # os.kill(pid, 0) would terminate it there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def remove_dead_temporaries(folder: str | Path) -> list[Path]:
    """Remove ``.<pid>.tmp.<name>`` files in ``folder`` whose process is gone; return them."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            match = _TMP_NAME.match(entry.name)
            if match and int(match.group(1)) != os.getpid() and not pid_alive(int(match.group(1))):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def prepare_folder(folder: str | Path) -> Path:
    """Create ``folder`` and, once per process, remove dead writers' temporary files in it."""
    folder = Path(folder)
    with writing_into(folder):
        folder.mkdir(parents=True, exist_ok=True)
    if folder not in _swept:
        remove_dead_temporaries(folder)
        _swept.add(folder)
    return folder


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)``, then rename the result to ``path``.

    A failure (or a crash) leaves ``path`` as it was; the temporary file is
    removed whatever happens (a crash's, by the next write into the folder).

    Raises
    ------
    WriteError
        The folder is read-only, not writable by this user, or the disk is full.
    """
    path = Path(path)
    prepare_folder(path.parent)
    tmp = path.with_name(f".{os.getpid()}.tmp.{path.name}")
    try:
        with writing_into(path.parent):
            write(tmp)
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return path


def write_bytes_atomic(path: str | Path, payload: str | bytes) -> Path:
    """Write text (UTF-8) or bytes atomically."""
    data = payload.encode() if isinstance(payload, str) else payload
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def write_json_atomic(path: str | Path, data: Any, *, indent: int | None = 1) -> Path:
    """Write ``data`` as JSON atomically (NumPy scalars and arrays, paths allowed)."""
    return write_bytes_atomic(path, json.dumps(data, indent=indent, default=_json_default) + "\n")


@contextlib.contextmanager
def run_lock(
    lock_path: str | Path, busy: Callable[[str], PipelineError], *, timeout: float = 0
) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` for a run; refuse when another run holds it
    (after waiting ``timeout`` seconds for it).

    ``busy(owner)`` makes the error raised when the lock is taken (``owner`` is
    ``"pid 1234"`` when known). The OS releases the lock when the process dies,
    so a crash never leaves a stale lock; the (empty) lock file stays.
    """
    from filelock import FileLock, Timeout

    lock_path = Path(lock_path)
    prepare_folder(lock_path.parent)
    lock = FileLock(lock_path, timeout=timeout)
    try:
        with writing_into(lock_path.parent):
            lock.acquire()
    except Timeout:
        raise busy(_lock_owner(lock_path)) from None
    try:
        with contextlib.suppress(OSError):  # who holds it, for the message of the next run
            lock_path.write_text(f"pid {os.getpid()}")
        yield
    finally:
        lock.release()


def _lock_owner(lock_path: Path) -> str:
    try:
        text = lock_path.read_text(errors="replace").strip()
    except OSError:
        text = ""
    return text if re.fullmatch(r"pid \d+", text) else "another process"
