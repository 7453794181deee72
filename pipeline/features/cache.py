"""The HDF5 feature cache: its format and its reader.

The format (version 1) is described in the docs (``docs/cache-format.md``);
in short, one file per data set and backbone configuration::

    /features        (n, d) float32 or float16, chunked by rows
    /labels          (n,)   int32 class index
    /paths           (n,)   utf-8, relative to the data root
    /split           (n,)   utf-8, "train" | "val" | "test" | "unused" (not in a split file)
    /skipped/{paths,reasons,labels,split}   images that could not be read
    attributes       format_version, backbone, weights, input_size, pooling, layer,
                     preprocessing, class_names, created, fingerprint, config_json ...

Writing (crash-safe, resumable, locked) is :mod:`pipeline.features.cache_writer`; these two
are the only modules that import h5py.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.core.artifacts import safe_name
from pipeline.core.errors import CacheError

FORMAT_VERSION = 1
STRING_DTYPE = h5py.string_dtype("utf-8")
CHUNK_BYTES = 1 << 20  # about 1 MiB of features per chunk


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
            fs = FeatureSet(
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
    _check_rows(fs.path, fs.features.shape, fs.labels, fs.paths, fs.split, len(fs.class_names))
    _check_finite(fs.path, fs.features, fs.paths, attrs)
    return fs


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
        n_classes = len(self.attrs.get("class_names") or ())
        _check_rows(self.path, self.shape, self.labels, self.paths, self.split, n_classes)
        self._file = h5py.File(self.path, "r")

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Features of ``rows`` (any order, repeats allowed) as float32.

        Raises
        ------
        CacheError
            A row read holds a NaN or infinite value (the features are never loaded
            whole, so each read is checked).
        """
        rows = np.asarray(rows, dtype=np.int64)
        unique, inverse = np.unique(rows, return_inverse=True)  # h5py wants increasing rows
        block = np.asarray(self._file["features"][unique], dtype=np.float32)
        _check_finite(self.path, block, self.paths[unique], self.attrs)
        return block[inverse]

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> FeatureRows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_DAMAGED = "the cache was edited or damaged: delete it and re-run `make features`"


def _check_rows(
    path: Path,
    shape: tuple[int, ...],
    labels: np.ndarray,
    paths: np.ndarray,
    split: np.ndarray,
    n_classes: int,
) -> None:
    """One line for a cache whose arrays cannot belong together (before any stage uses them)."""
    lengths = {"features": shape[0] if shape else 0, "labels": len(labels)}
    lengths.update(paths=len(paths), split=len(split))
    if len(shape) != 2 or len(set(lengths.values())) > 1:
        shown = ", ".join(f"{name} {n}" for name, n in lengths.items())
        raise CacheError(
            f"{path}: its arrays do not line up (rows: {shown}; features of shape "
            f"{tuple(shape)}); {_DAMAGED}"
        )
    # Caches of activations may record no class names: their labels are not checked here.
    bad = np.flatnonzero((labels < 0) | (labels >= n_classes)) if n_classes else []
    if len(bad):
        first = int(bad[0])
        raise CacheError(
            f"{path}: {len(bad)} label(s) outside the {n_classes} classes (first: {labels[first]} "
            f"of {paths[first]}); {_DAMAGED}"
        )
    unknown = sorted(set(split.tolist()) - {"train", "val", "test", "unused"})
    if unknown:
        raise CacheError(
            f"{path}: split value(s) {', '.join(map(repr, unknown))} are not train, val, test "
            f"or unused; {_DAMAGED}"
        )


def _check_finite(path: Path, features: np.ndarray, paths: np.ndarray, attrs: dict) -> None:
    """One line for NaN or infinite features: no head can fit on them."""
    finite = np.isfinite(features)
    if finite.all():
        return
    rows = np.flatnonzero(~finite.all(axis=1))
    reduced = attrs.get("precision", "fp32") not in ("fp32", "float32") or (
        attrs.get("dtype") == "float16"
    )
    how = (
        "re-run `make features PRECISION=float32 STORAGE=float32` (a reduced precision overflowed)"
        if reduced
        else "delete it and re-run `make features`"
    )
    raise CacheError(
        f"{path}: {len(rows)} image(s) have NaN or infinite features (first: {paths[rows[0]]}); "
        f"{how}"
    )


def read_paths(path: str | Path) -> dict[str, tuple[str, str]]:
    """Every image a cache was made from, read or skipped: path -> (class name, split)."""
    with _open_for_reading(path) as f:
        names = _attrs_of(f).get("class_names") or []
        out = {}
        for group in (f, f["skipped"]) if "skipped" in f else (f,):
            labels = group["labels"][...].tolist()
            for p, label, split in zip(
                group["paths"].asstr()[...], labels, group["split"].asstr()[...], strict=False
            ):
                out[p] = (names[label] if 0 <= label < len(names) else str(label), split)
        return out


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


def cache_matches(
    path: str | Path,
    config_json: str,
    fingerprint: str,
    *,
    data_root: str | None = None,
    dataset: str | None = None,
) -> bool | None:
    """Whether a finished cache was made with this configuration and these inputs
    (and, when given, from the folder ``data_root`` for the data set ``dataset``: a cache
    copied from another folder of the same images is not this folder's).

    Returns ``None`` when there is no file, ``False`` when it differs (or cannot
    be read).
    """
    if not Path(path).is_file():
        return None
    try:
        attrs = read_attrs(path)
    except CacheError:
        return False
    where = all(
        value is None or attrs.get(key) == value
        for key, value in (("data_root", data_root), ("dataset", dataset))
    )
    return (
        where
        and same_features(attrs.get("config_json"), config_json)
        and attrs.get("fingerprint") == fingerprint
    )


# Caches written before the split left the identity recorded it in ``config_json``; the
# split is not what makes the features (:mod:`pipeline.features.resplit`), so it is dropped.
LEGACY_SPLIT_KEYS = ("split_source", "split")


def same_features(recorded: Any, config_json: str) -> bool:
    """Whether a cache's ``config_json`` (``recorded``) names the features ``config_json``
    names, a split recorded in it by earlier versions left out."""
    if recorded == config_json:
        return True
    identities = [_features_identity(text) for text in (recorded, config_json)]
    return identities[0] is not None and identities[0] == identities[1]


def _features_identity(text: Any) -> dict[str, Any] | None:
    try:
        identity = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None
    if not isinstance(identity, dict):
        return None
    return {k: v for k, v in identity.items() if k not in LEGACY_SPLIT_KEYS}
