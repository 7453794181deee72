"""Files: content hashes and atomic writes, for every module that saves something.

Every output of the pipeline is written under a temporary name in the same
folder and renamed into place (``os.replace`` is atomic on POSIX and Windows),
so a reader never sees a half-written file and a crash leaves the previous
version intact. The temporary name ends with the real name, so writers that
check suffixes (``.keras``, ``.weights.h5``) accept it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)``, then rename the result to ``path``.

    A failure (or a crash) leaves ``path`` as it was; the temporary file is
    removed whatever happens.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{os.getpid()}.tmp.{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
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
