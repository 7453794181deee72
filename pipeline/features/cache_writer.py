"""Writing a feature cache: the crash-safe, resumable writer and the lock of a run.

While a run is in progress it writes a *work file* (``<name>.partial.h5``) whose datasets
are allocated in full when it is created (HDF5 early allocation), so writing a batch only
overwrites raw bytes and never changes HDF5 metadata; progress (next record, skipped
records) is kept in a small JSON sidecar replaced atomically after each batch is flushed.
A ``kill -9`` at any moment therefore loses at most the batch in flight. The finished
file is written under a temporary name and renamed into place, so it is never seen half
written. A lock (``filelock``: ``flock`` on Linux and macOS) refuses a second concurrent
run. A write that fails (read-only folder, full disk) raises a
:class:`~pipeline.core.files.WriteError` and leaves the work file and its progress as
they were after the last finished batch, so the next run resumes. The format itself is
:mod:`pipeline.features.cache`'s.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.core.errors import CacheError
from pipeline.core.files import WriteError, cannot_write, run_lock, write_bytes_atomic
from pipeline.features.cache import CHUNK_BYTES, FORMAT_VERSION, STRING_DTYPE


@contextlib.contextmanager
def cache_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on a cache for the duration of a run.

    A lock on ``<path>.lock`` (:func:`pipeline.core.files.run_lock`), released by
    the OS even when the process is killed, so a crash never leaves a stale
    lock behind. Take it only to write: reading a finished cache needs no lock
    (it is replaced atomically), so read-only folders can be read.
    """

    def busy(owner: str) -> CacheError:
        return CacheError(
            f"cache {path} is being written by another run ({owner}); "
            "wait for it to finish or stop it"
        )

    with run_lock(f"{path}.lock", busy):
        yield


@contextlib.contextmanager
def _writing(path: Path, *cleanup: Path) -> Iterator[None]:
    """h5py's write failures as one :class:`WriteError` naming the folder; remove ``cleanup``.

    h5py's ``OSError`` rarely carries an errno (a full disk reads "Can't write
    data"), so every ``OSError`` while writing is reported as a failed write.
    """
    try:
        yield
    except OSError as exc:
        for leftover in cleanup:
            with contextlib.suppress(OSError):
                leftover.unlink(missing_ok=True)
        if isinstance(exc, WriteError):
            raise
        found = re.search(r"error message = '([^']+)'", str(exc))
        if found:
            exc = OSError(exc.errno, found.group(1))
        raise cannot_write(path.parent, exc) from None


def _string_array(values: Sequence[str]) -> np.ndarray:
    return np.array(list(values), dtype=STRING_DTYPE)


class CacheWriter:
    """Writes one feature cache batch by batch, resumably.

    Use :meth:`open` (under :func:`cache_lock`), then :meth:`write_batch` for
    each batch from :attr:`next_index` on, then :meth:`finalize`.
    """

    def __init__(self, path: Path, file: h5py.File, progress: dict[str, Any]) -> None:
        self.path = path
        self._file = file
        self._progress = progress

    @property
    def work_path(self) -> Path:
        return work_path_of(self.path)

    @property
    def next_index(self) -> int:
        """The first record not yet written."""
        return int(self._progress["next_index"])

    @property
    def skipped(self) -> dict[int, str]:
        return {int(i): reason for i, reason in self._progress["skipped"]}

    @property
    def seconds(self) -> float:
        """Extraction time spent so far, across resumed runs."""
        return float(self._progress["seconds"])

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        config_json: str,
        fingerprint: str,
        paths: Sequence[str],
        labels: Sequence[int],
        splits: Sequence[str],
        width: int,
        dtype: str,
    ) -> tuple[CacheWriter, str]:
        """Resume the work file of ``path`` if it belongs to this run, else start one.

        Returns the writer and a note for the user (``""``, or why earlier work
        was resumed or discarded).
        """
        path = Path(path)
        work, progress_file = work_path_of(path), progress_path_of(path)
        for stale in (work.with_name(work.name + ".tmp"), path.with_name(path.name + ".tmp")):
            stale.unlink(missing_ok=True)
        note = ""
        if work.exists():
            resumed = cls._try_resume(path, config_json, fingerprint, width)
            if isinstance(resumed, CacheWriter):
                return resumed, f"resuming at image {resumed.next_index} of {len(paths)}"
            note = f"discarded an unfinished run ({resumed}); starting over"
            work.unlink(missing_ok=True)
            progress_file.unlink(missing_ok=True)

        tmp = work.with_name(work.name + ".tmp")
        with _writing(path, tmp), h5py.File(tmp, "w") as f:
            n = len(paths)
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(
                h5py.h5d.ALLOC_TIME_EARLY
            )  # all space now: no metadata writes later
            f.create_dataset(
                "features",
                shape=(n, width),
                dtype=dtype,
                chunks=_chunk_rows(n, width, dtype),
                dcpl=dcpl,
            )
            f.create_dataset("labels", data=np.asarray(labels, dtype=np.int32))
            f.create_dataset("paths", data=_string_array(paths))
            f.create_dataset("split", data=_string_array(splits))
            f.attrs["config_json"] = config_json
            f.attrs["fingerprint"] = fingerprint
        with _writing(path, tmp):
            os.replace(tmp, work)
        progress = {"next_index": 0, "skipped": [], "seconds": 0.0}
        write_bytes_atomic(progress_file, json.dumps(progress))
        with _writing(path):
            return cls(path, h5py.File(work, "r+"), progress), note

    @classmethod
    def _try_resume(
        cls, path: Path, config_json: str, fingerprint: str, width: int
    ) -> CacheWriter | str:
        try:
            progress = json.loads(progress_path_of(path).read_text())
            f = h5py.File(work_path_of(path), "r+")
        except (OSError, ValueError) as exc:
            return f"its files are unreadable: {exc}"
        if f.attrs.get("config_json") != config_json:
            f.close()
            return "it used other options or weights"
        if f.attrs.get("fingerprint") != fingerprint:
            f.close()
            return "the images have changed since"
        if f["features"].shape[1] != width:
            f.close()
            return "its feature width differs"
        return cls(path, f, progress)

    def write_batch(
        self,
        start: int,
        features: np.ndarray,
        ok: np.ndarray,
        errors: dict[int, str],
        seconds: float,
    ) -> None:
        """Store the features of records ``start .. start + len(ok)``.

        ``features`` holds one row per ``True`` in ``ok``; ``errors`` maps the
        offsets of unreadable records to the reason.
        """
        if start != self.next_index:
            raise CacheError(f"internal: batch starts at {start}, cache expects {self.next_index}")
        rows = start + np.flatnonzero(ok)
        with _writing(self.path):
            self._write_rows(rows, features)
        self._progress["next_index"] = start + len(ok)
        self._progress["skipped"].extend(
            [start + offset, reason] for offset, reason in errors.items()
        )
        self._progress["seconds"] = self.seconds + seconds
        write_bytes_atomic(progress_path_of(self.path), json.dumps(self._progress))

    def _write_rows(self, rows: np.ndarray, features: np.ndarray) -> None:
        if len(rows):
            # Consecutive rows in one write; skipped rows stay zero and are dropped at finalize.
            if rows[-1] - rows[0] + 1 == len(rows):
                self._file["features"][rows[0] : rows[-1] + 1] = features
            else:
                for row, values in zip(rows, features, strict=True):
                    self._file["features"][row] = values
        self._file.flush()  # the rows reach the OS before the progress says they exist

    def finalize(self, attrs: dict[str, Any]) -> Path:
        """Write the finished cache (readable images only) and remove the work files."""
        work = self._file
        n = work["features"].shape[0]
        if self.next_index != n:
            raise CacheError(f"internal: finalize at {self.next_index} of {n} records")
        skipped = self.skipped
        keep = np.ones(n, dtype=bool)
        keep[list(skipped)] = False
        kept = np.flatnonzero(keep)
        if len(kept) == 0:
            raise CacheError(
                "no image could be read; see the reasons above and check the data folder"
            )
        tmp = self.path.with_name(self.path.name + ".tmp")
        with _writing(self.path, tmp):
            self._write_finished(tmp, kept, keep, skipped, attrs)
            os.replace(tmp, self.path)
        self.close()
        work_path_of(self.path).unlink(missing_ok=True)
        progress_path_of(self.path).unlink(missing_ok=True)
        return self.path

    def _write_finished(self, tmp: Path, kept, keep, skipped: dict[int, str], attrs) -> None:
        work = self._file
        width, dtype = work["features"].shape[1], work["features"].dtype
        with h5py.File(tmp, "w") as out:
            features = out.create_dataset(
                "features",
                shape=(len(kept), width),
                dtype=dtype,
                chunks=_chunk_rows(len(kept), width, dtype),
            )
            step = max(1, CHUNK_BYTES * 16 // max(1, width * dtype.itemsize))
            for begin in range(0, len(kept), step):  # bounded memory, whatever the size
                rows = kept[begin : begin + step]
                block = work["features"][rows[0] : rows[-1] + 1]
                features[begin : begin + len(rows)] = block[rows - rows[0]]
            for name in ("labels", "paths", "split"):
                out.create_dataset(name, data=work[name][...][keep])
            group = out.create_group("skipped")
            order = sorted(skipped)
            group.create_dataset(
                "paths", data=_string_array(work["paths"].asstr()[order] if order else [])
            )
            group.create_dataset("reasons", data=_string_array([skipped[i] for i in order]))
            group.create_dataset("labels", data=work["labels"][...][order].astype(np.int32))
            group.create_dataset(
                "split", data=_string_array(work["split"].asstr()[order] if order else [])
            )
            for key, value in attrs.items():
                out.attrs[key] = _string_array(value) if isinstance(value, list | tuple) else value
            out.attrs["format_version"] = FORMAT_VERSION
            out.attrs["config_json"] = work.attrs["config_json"]
            out.attrs["fingerprint"] = work.attrs["fingerprint"]

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()


def rewrite_split(path: str | Path, split_of: Mapping[str, str], attrs: Mapping[str, Any]) -> int:
    """Give a finished cache another split: its ``split`` columns (rows and skipped images)
    from ``split_of`` (path -> split) and ``attrs`` over its attributes; every other dataset
    (the features above all) is copied as it is. Take :func:`cache_lock` first.

    The new file is written under a temporary name and renamed over the cache, as a finished
    cache always is: a crash at any moment leaves the old cache whole (and a ``.tmp`` file
    the next run removes). Returns how many images changed split.

    Raises
    ------
    CacheError
        An image of the cache has no split in ``split_of`` (the images changed).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    moved = 0
    with _writing(path, tmp), _removed_unless_done(tmp):
        with h5py.File(path, "r") as src, h5py.File(tmp, "w") as out:
            for group in (src, src["skipped"]) if "skipped" in src else (src,):
                target = out if group is src else out.create_group("skipped")
                for name in group:
                    if name not in ("split", "skipped"):
                        group.copy(group[name], target, name=name)  # raw chunks, never decoded
                old = group["split"].asstr()[...].tolist()
                paths = group["paths"].asstr()[...].tolist()
                missing = [p for p in paths if p not in split_of]
                if missing:
                    raise CacheError(
                        f"{path} holds {missing[0]}, which the folder no longer has; "
                        "re-run `make features`"
                    )
                new = [split_of[p] for p in paths]
                moved += sum(a != b for a, b in zip(old, new, strict=True))
                target.create_dataset("split", data=_string_array(new))
            for key in src.attrs:  # as stored: types and string lists kept
                out.attrs.create(key, src.attrs[key], dtype=src.attrs.get_id(key).dtype)
            for key, value in attrs.items():
                out.attrs[key] = _string_array(value) if isinstance(value, list | tuple) else value
        os.replace(tmp, path)
    return moved


@contextlib.contextmanager
def _removed_unless_done(tmp: Path) -> Iterator[None]:
    """Remove ``tmp`` when the block fails in any way (an interrupt too), then re-raise."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def work_path_of(path: Path) -> Path:
    return path.with_name(path.stem + ".partial.h5")


def progress_path_of(path: Path) -> Path:
    return path.with_name(path.stem + ".partial.json")


def _chunk_rows(n: int, width: int, dtype: str | np.dtype) -> tuple[int, int]:
    rows = max(1, CHUNK_BYTES // max(1, width * np.dtype(dtype).itemsize))
    return (max(1, min(n, rows)), width)
