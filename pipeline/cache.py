"""The HDF5 feature cache: its format, its atomic writer, its reader.

This is the only module that imports h5py. The format (version 1) is described
in the README; in short, one file per data set and backbone configuration::

    /features        (n, d) float32 or float16, chunked by rows
    /labels          (n,)   int32 class index
    /paths           (n,)   utf-8, relative to the data root
    /split           (n,)   utf-8, "train" | "val" | "test"
    /skipped/{paths,reasons,labels,split}   images that could not be read
    attributes       format_version, backbone, weights, input_size, pooling, layer,
                     preprocessing, class_names, created, fingerprint, config_json ...

Crash safety. While a run is in progress it writes a *work file*
(``<name>.partial.h5``) whose datasets are allocated in full when it is created
(HDF5 early allocation), so writing a batch only overwrites raw bytes and never
changes HDF5 metadata; progress (next record, skipped records) is kept in a
small JSON sidecar replaced atomically after each batch is flushed. A ``kill -9``
at any moment therefore loses at most the batch in flight. The finished file is
written under a temporary name and renamed into place, so it is never seen half
written. A lock (``filelock``: ``flock`` on Linux and macOS) refuses a second
concurrent run. A write that fails (read-only folder, full disk) raises a
:class:`~pipeline.files.WriteError` and leaves the work file and its progress as
they were after the last finished batch, so the next run resumes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.artifacts import safe_name
from pipeline.errors import CacheError
from pipeline.files import WriteError, cannot_write, run_lock, write_bytes_atomic

FORMAT_VERSION = 1
_STR = h5py.string_dtype("utf-8")
_CHUNK_BYTES = 1 << 20  # about 1 MiB of features per chunk


@dataclass
class FeatureSet:
    """Features read from a cache, with their labels, paths and splits.

    Examples
    --------
    >>> fs = load_features("artifacts/features/digits/mobilenet_v2_224_avg_imagenet.h5")
    >>> X_train, y_train = fs.select("train")
    """

    path: Path
    features: np.ndarray
    labels: np.ndarray
    paths: np.ndarray
    split: np.ndarray
    class_names: tuple[str, ...]
    attrs: dict[str, Any]

    @property
    def splits(self) -> tuple[str, ...]:
        """Splits present, in train, val, test order."""
        return tuple(s for s in ("train", "val", "test") if np.any(self.split == s))

    def select(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """``(features, labels)`` of one split."""
        mask = self.split == split
        if not mask.any():
            raise CacheError(
                f"cache {self.path} has no {split!r} images (splits: {', '.join(self.splits)})"
            )
        return self.features[mask], self.labels[mask]


def read_attrs(path: str | Path) -> dict[str, Any]:
    """The attributes of a finished cache, as plain Python values."""
    with _open_for_reading(path) as f:
        return _attrs_of(f)


def load_features(path: str | Path) -> FeatureSet:
    """Read a finished feature cache into memory.

    Raises
    ------
    CacheError
        Missing file, not a feature cache, or a format version this code
        does not read.
    """
    with _open_for_reading(path) as f:
        attrs = _attrs_of(f)
        try:
            return FeatureSet(
                path=Path(path),
                features=f["features"][...],
                labels=f["labels"][...].astype(np.int64),
                paths=np.array(f["paths"].asstr()[...], dtype=object),
                split=np.array(f["split"].asstr()[...], dtype=object),
                class_names=tuple(attrs["class_names"]),
                attrs=attrs,
            )
        except KeyError as exc:
            raise CacheError(f"{path} is not a complete feature cache (missing {exc})") from None


class FeatureRows:
    """A finished cache opened for reading rows on demand: its features are never loaded whole.

    For caches too large for memory (stage three's cut activations). ``paths``,
    ``labels`` and ``split`` are read at once (they are small); :meth:`read`
    reads the rows it is given. Close it (or use it as a context manager).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with _open_for_reading(self.path) as f:
            self.attrs = _attrs_of(f)
            try:
                self.shape = tuple(f["features"].shape)
                self.labels = f["labels"][...].astype(np.int64)
                self.paths = np.array(f["paths"].asstr()[...], dtype=object)
                self.split = np.array(f["split"].asstr()[...], dtype=object)
            except KeyError as exc:
                raise CacheError(
                    f"{path} is not a complete feature cache (missing {exc})"
                ) from None
        self._file = h5py.File(self.path, "r")

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Features of ``rows`` (any order, repeats allowed) as float32."""
        rows = np.asarray(rows, dtype=np.int64)
        unique, inverse = np.unique(rows, return_inverse=True)  # h5py wants increasing rows
        return np.asarray(self._file["features"][unique], dtype=np.float32)[inverse]

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> FeatureRows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_skipped(path: str | Path) -> list[tuple[str, str]]:
    """``(path, reason)`` of every image a cache skipped."""
    with _open_for_reading(path) as f:
        group = f["skipped"]
        return list(zip(group["paths"].asstr()[...], group["reasons"].asstr()[...], strict=True))


@contextlib.contextmanager
def _open_for_reading(path: str | Path) -> Iterator[h5py.File]:
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"no feature cache at {path}; run `make features` first")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise CacheError(
            f"{path} is not a readable HDF5 file ({exc}); delete it and re-run"
        ) from None
    with f:
        version = f.attrs.get("format_version")
        if version is None:
            raise CacheError(f"{path} is not a feature cache (no format_version attribute)")
        if int(version) > FORMAT_VERSION:
            raise CacheError(
                f"{path} has cache format {int(version)}; this version reads up to "
                f"{FORMAT_VERSION}: upgrade the pipeline or rebuild the cache"
            )
        yield f


def _attrs_of(f: h5py.File) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in f.attrs.items():
        if isinstance(value, np.ndarray):
            value = [v.decode() if isinstance(v, bytes) else v for v in value.tolist()]
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    if "dtype" not in out and "features" in f:  # caches written before the attribute existed
        out["dtype"] = str(f["features"].dtype)
    return _checked_attrs(out, f.filename)


# What a reader may rely on: attribute -> (accepted types, what it must be). A cache is a
# file anyone can edit or send, so its attributes are checked before anything uses them.
_ATTR_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "class_names": ((list,), "a list of at least two class names"),
    "backbone": ((str,), "a backbone name"),
    "weights": ((str,), "a weights identity"),
    "weights_source": ((str,), "a string"),
    "input_size": ((int,), "a positive whole number"),
    "pooling": ((str,), "a string"),
    "layer": ((str,), "a string"),
    "dataset": ((str,), "a string"),
    "data_root": ((str,), "an absolute path"),
    "n_images": ((int,), "a whole number"),
    "seconds": ((int, float), "a number"),
}


def _checked_attrs(attrs: dict[str, Any], path: str) -> dict[str, Any]:
    """``attrs`` after checking their types; ``dataset`` made a safe file-name component."""
    for key, (types, meaning) in _ATTR_TYPES.items():
        value = attrs.get(key)
        if value is None:
            continue
        ok = isinstance(value, types) and not isinstance(value, bool)
        if key == "class_names":
            ok = ok and len(value) >= 2 and all(isinstance(c, str) and c for c in value)
        elif key == "input_size":
            ok = ok and value > 0
        elif key == "data_root":
            ok = ok and Path(value).is_absolute() and "\x00" not in value
        if not ok:
            raise CacheError(
                f"{path}: attribute {key!r} must be {meaning}, got {value!r:.80}; "
                "the cache was edited or damaged: delete it and re-run `make features`"
            )
    if isinstance(attrs.get("dataset"), str):
        # Later stages name folders after it: never a path, never '..'.
        attrs["dataset"] = safe_name(attrs["dataset"])
    return attrs


def cache_matches(path: str | Path, config_json: str, fingerprint: str) -> bool | None:
    """Whether a finished cache was made with this configuration and these inputs.

    Returns ``None`` when there is no file, ``False`` when it differs (or cannot
    be read).
    """
    if not Path(path).is_file():
        return None
    try:
        attrs = read_attrs(path)
    except CacheError:
        return False
    return attrs.get("config_json") == config_json and attrs.get("fingerprint") == fingerprint


@contextlib.contextmanager
def cache_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on a cache for the duration of a run.

    A lock on ``<path>.lock`` (:func:`pipeline.files.run_lock`), released by
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
    return np.array(list(values), dtype=_STR)


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
            step = max(1, _CHUNK_BYTES * 16 // max(1, width * dtype.itemsize))
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


def work_path_of(path: Path) -> Path:
    return path.with_name(path.stem + ".partial.h5")


def progress_path_of(path: Path) -> Path:
    return path.with_name(path.stem + ".partial.json")


def _chunk_rows(n: int, width: int, dtype: str | np.dtype) -> tuple[int, int]:
    rows = max(1, _CHUNK_BYTES // max(1, width * np.dtype(dtype).itemsize))
    return (max(1, min(n, rows)), width)
