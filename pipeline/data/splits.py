"""A folder's split: its options (:class:`SplitConfig`), the stratified split of a folder
without split folders (seeded, stratified by class, each group of exact copies in one split),
the lines about splits the fractions leave thin, and the two other sources of a split: N
training images per class (:func:`per_class_split`) and a shipped split list
(:func:`split_file`). A cache's split can be drawn again without extracting
(:mod:`pipeline.features.resplit`); the research protocols apply the same two functions to a
cache's rows when they load them (:mod:`pipeline.heads.protocols`).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.core.errors import DataError, PipelineError
from pipeline.core.options import check_options, option_label

SPLITS = ("train", "val", "test")
# The split of an image a split file does not list: in the cache, in no split.
UNUSED = "unused"


@dataclass(frozen=True)
class SplitConfig:
    """How to split a folder that has no ``train/``, ``val/``, ``test/`` folders.

    The split is stratified by class and fixed by ``seed``; both are recorded in
    the cache, so later stages see exactly the same images in each split. They are not
    part of the cache's identity: another split re-splits the cache's rows, nothing is
    extracted again (:mod:`pipeline.features.resplit`).
    """

    seed: int = 0
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    # Another source than the stratified split (at most one; any layout, split folders
    # pooled): N training images per class drawn by ``seed``, the rest test, no val; or a
    # split file (:func:`split_file`), which gives train, val and test itself.
    train_per_class: int | None = None
    split_file: str | None = None

    @property
    def source(self) -> str:
        """``"per_class"``, ``"split_file"`` or ``"stratified"`` (the cache's ``split_source``)."""
        if self.train_per_class is not None:
            return "per_class"
        return "split_file" if self.split_file is not None else "stratified"

    def words(self, sha256: str = "") -> str:
        """The split as a user sets it: ``SEED=1, VAL_FRACTION=0.2, TEST_FRACTION=0.2``,
        ``TRAIN_PER_CLASS=30, SEED=1`` or ``SPLIT_FILE=a.csv (sha256 1a2b3c4d5e6f)``."""
        if self.source == "per_class":
            return f"TRAIN_PER_CLASS={self.train_per_class}, SEED={self.seed}"
        if self.source == "split_file":
            digest = f" (sha256 {sha256[:12]})" if sha256 else ""
            return f"SPLIT_FILE={Path(str(self.split_file)).name}{digest}"
        return (
            f"SEED={self.seed}, VAL_FRACTION={self.val_fraction:g}, "
            f"TEST_FRACTION={self.test_fraction:g}"
        )

    def __post_init__(self) -> None:
        check_options(asdict(self), error=DataError)
        if self.train_per_class is not None and self.split_file is not None:
            raise DataError(
                "give one of TRAIN_PER_CLASS= (N per class) and SPLIT_FILE= (a split list), "
                "not both"
            )
        if self.val_fraction + self.test_fraction >= 1.0:
            raise DataError(
                f"{option_label('val_fraction')} + {option_label('test_fraction')} must leave images for "
                f"training; got {self.val_fraction} + {self.test_fraction}"
            )


@dataclass(frozen=True)
class ImageRecord:
    """One image: its path relative to the data root, class index and split."""

    path: str
    label: int
    split: str


def stratified_split(
    by_class: dict[str, list[str]], split: SplitConfig, groups: list[list[str]]
) -> list[ImageRecord]:
    """Per class, a seeded permutation of units filled into test, then val, then train.

    A unit is one image, or a class's members of a group of copies: it goes whole into
    one split, and a group spread over classes takes the split its first class gave it.
    Without copies every unit is one image: the split of caches made before groups.
    """
    rng = np.random.default_rng(split.seed)
    group_of = {path: tuple(group) for group in groups for path in group}
    placed: dict[tuple[str, ...], str] = {}
    records = []
    for label, paths in enumerate(by_class.values()):
        units: dict[object, list[str]] = {}
        for path in paths:
            units.setdefault(group_of.get(path, path), []).append(path)
        keys = list(units)
        n_test = int(round(len(paths) * split.test_fraction))
        n_val = int(round(len(paths) * split.val_fraction))
        taken = {"test": 0, "val": 0, "train": 0}
        for i in rng.permutation(len(keys)):
            key = keys[i]
            name = placed.get(key) if isinstance(key, tuple) else None
            if name is None:
                name = (
                    "test" if taken["test"] < n_test else "val" if taken["val"] < n_val else "train"
                )
                if isinstance(key, tuple):
                    placed[key] = name
            taken[name] += len(units[key])
            records += [ImageRecord(path, label, name) for path in units[key]]
    records.sort(key=lambda r: r.path)
    return records


def thin_splits(
    by_class: dict[str, list[str]], records: list[ImageRecord], split: SplitConfig
) -> list[str]:
    """A line per split the fractions ask for that some classes (or all) get no image of."""
    notes = []
    for name, fraction in (("val", split.val_fraction), ("test", split.test_fraction)):
        if fraction <= 0:
            continue
        present = {r.label for r in records if r.split == name}
        missing = len(by_class) - len(present)
        if not missing:
            continue
        largest = max(len(paths) for paths in by_class.values())
        option = f"{name.upper()}_FRACTION={fraction:g}"
        if not present:
            notes.append(
                f"the {name} split is empty: {option} of at most {largest} images per class "
                f"rounds to 0; add images per class, raise {option.split('=')[0]}, or make "
                f"train/ and {name}/ folders"
            )
        else:
            notes.append(
                f"{missing} of {len(by_class)} classes have no {name} image ({option} of their "
                f"images rounds to 0); {name} accuracy leaves them out"
            )
    return notes


# ------------------------------------------------------------ N per class, or a split file

# A split file's split names. ``pool_val``: val joins train (the protocols train on one
# pool); otherwise (stage one's split) val stays val.
_LIST_SPLITS = {"train": "train", "val": "val", "validation": "val", "test": "test"}


def per_class_split(
    labels: np.ndarray,
    n: int,
    seed: int,
    class_names: Sequence[str] | None = None,
    *,
    error: type[PipelineError] = DataError,
) -> np.ndarray:
    """``n`` training rows per class drawn at random (by ``seed``), every other row test.

    The draw is over ALL of a class's rows (split folders, or a cache's train, val and
    test, pooled). Returns an object array of ``"train"`` / ``"test"``, one per row.

    Raises
    ------
    PipelineError
        (``error``) ``n`` below 1, or a class with fewer than ``n + 1`` rows (one is needed
        to test), naming the class.
    """
    labels = np.asarray(labels)
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise error(f"TRAIN_PER_CLASS={n!r} must be a whole number of at least 1")
    rng = np.random.default_rng(seed)
    split = np.full(len(labels), "test", dtype=object)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        if len(rows) < n + 1:
            name = class_names[int(label)] if class_names is not None else str(label)
            raise error(
                f"class {name!r} has {len(rows)} images, fewer than TRAIN_PER_CLASS={n} "
                f"plus one to test; lower TRAIN_PER_CLASS to at most {len(rows) - 1} "
                "or add images of it"
            )
        split[rng.choice(rows, size=n, replace=False)] = "train"
    return split


def split_file(
    path: str | Path,
    paths: Sequence[str],
    data_root: str | Path,
    *,
    labels: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    pool_val: bool = False,
    needed: Sequence[str] = ("train",),
    error: type[PipelineError] = DataError,
    of: str = "the data folder",
) -> np.ndarray:
    """The split a shipped list gives each image (``""`` for an image it does not list).

    ``path`` is a CSV with the header ``path,split`` and optionally ``label`` (``split``:
    train, val or validation, test), or ``train=a.txt,test=b.txt``: one text list per
    split, a path a line. A listed path is relative to ``data_root`` or absolute inside
    it; ``paths`` are the images' paths relative to the data root (``of`` names them in
    messages). ``pool_val``: val becomes train; ``needed``: splits the list must name.

    Raises
    ------
    PipelineError
        (``error``) A missing or unreadable list, a path outside the data root or not among
        ``paths``, a path listed twice, an unknown split, a label unlike the image's class:
        one line each, naming the file and line.
    """
    entries = _read_lists(str(path), error)
    root = Path(data_root).expanduser().resolve()
    row_of = {str(p): i for i, p in enumerate(paths)}
    split = np.full(len(paths), "", dtype=object)
    seen: dict[int, str] = {}
    for where, name, split_name, label in entries:
        word = split_name.strip().lower()
        if word not in _LIST_SPLITS:
            pooled = " (pooled into train)" if pool_val else ""
            raise error(f"{where}: unknown split {split_name!r}; use train, val{pooled} or test")
        row = _row_for(where, name, root, row_of, error, of)
        if row in seen:
            raise error(f"{where}: {name!r} is listed twice (first at {seen[row]}); list it once")
        seen[row] = where
        if label is not None and labels is not None and class_names is not None:
            _check_label(where, name, label, class_names, int(labels[row]), error)
        split[row] = "train" if pool_val and word != "test" else _LIST_SPLITS[word]
    for name in needed:
        if not np.any(split == name):
            raise error(f"split list {path} names no {name} image; list some as {name}")
    return split


def _read_lists(spec: str, error: type[PipelineError]) -> list[tuple[str, str, str, str | None]]:
    """``(where, path, split, label or None)`` per listed image, ``where`` as ``file:line``."""
    if "=" in spec and not Path(spec).is_file():
        entries = []
        for part in (p for p in spec.split(",") if p.strip()):
            split_name, _, list_path = part.partition("=")
            for number, line in enumerate(_text(list_path.strip(), error).splitlines(), 1):
                if line.strip():
                    entries.append(
                        (f"{list_path.strip()}:{number}", line.strip(), split_name, None)
                    )
        return entries
    rows = list(csv.reader(_text(spec, error).splitlines()))
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if header[:2] != ["path", "split"] or len(header) > 3 or header[2:] not in ([], ["label"]):
        raise error(
            f"{spec}: the first line must be the header path,split (or path,split,label), "
            f"not {','.join(header) or 'empty'}"
        )
    entries = []
    for number, row in enumerate(rows[1:], 2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise error(f"{spec}:{number}: {len(row)} fields where the header has {len(header)}")
        label = row[2].strip() if len(row) == 3 else None
        entries.append((f"{spec}:{number}", row[0].strip(), row[1], label))
    return entries


def split_file_bytes(spec: str | Path, error: type[PipelineError] = DataError) -> bytes:
    """The bytes of a split file (a ``train=a.txt,test=b.txt`` spec: its lists, in order):
    what a cache's ``split_file_sha256`` is the digest of."""
    spec = str(spec)
    if "=" in spec and not Path(spec).is_file():
        parts = [p.partition("=") for p in spec.split(",") if p.strip()]
        return b"".join(
            f"{s.strip()}=\n".encode() + _text(f.strip(), error).encode() for s, _, f in parts
        )
    return _text(spec, error).encode()


def _text(path: str, error: type[PipelineError]) -> str:
    try:
        return Path(path).expanduser().read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise error(f"cannot read split list {path}: {reason}") from None


def _row_for(
    where: str, name: str, root: Path, row_of: dict[str, int], error: type[PipelineError], of: str
) -> int:
    """The row of a listed path, resolved inside the data root."""
    given = Path(name).expanduser()
    full = (given if given.is_absolute() else root / given).resolve()
    try:
        relative = full.relative_to(root).as_posix()
    except ValueError:
        raise error(
            f"{where}: {name!r} is outside the data folder {root}; list paths relative to it"
        ) from None
    if relative not in row_of:
        cache = of == "the feature cache"
        why = "missing, skipped or not under the data folder" if cache else "no such image"
        hint = "re-run `make features`" if cache else "fix its path (relative to DATA=)"
        raise error(f"{where}: {name!r} is not an image of {of} ({why}); remove it from the "
                    f"list or {hint}")  # fmt: skip
    return row_of[relative]


def _check_label(
    where: str,
    name: str,
    label: str,
    class_names: Sequence[str],
    row_label: int,
    error: type[PipelineError],
) -> None:
    if label not in class_names:
        raise error(
            f"{where}: unknown label {label!r} for {name!r}; the classes are "
            f"{', '.join(class_names)}"
        )
    if label != class_names[row_label]:
        raise error(
            f"{where}: {name!r} is labelled {label!r} in the list but "
            f"{class_names[row_label]!r} in the data (its class folder); fix the list"
        )
