"""Research protocols' splits of one feature cache: N per class, or a shipped split list.

A protocol re-splits the cache's rows when they are loaded; the cache, its recorded
split and its identity are never touched, so a protocol costs head fits only.
Both functions here are pure: they take the cache's labels or paths and return one
split name per row, ``"train"``, ``"test"`` or ``""`` (a row the protocol leaves out).
Running the heads on those splits is :mod:`pipeline.heads.protocol_run`.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.core.errors import HeadError

TRAIN, TEST, UNUSED = "train", "test", ""
# A split list may say val: it is pooled into train, as the N-per-class draw pools the
# cache's own train and val (protocols train on one pool and test on the rest).
_LIST_SPLITS = {"train": TRAIN, "val": TRAIN, "validation": TRAIN, "test": TEST}


def per_class_split(
    labels: np.ndarray,
    n: int,
    seed: int,
    class_names: Sequence[str] | None = None,
) -> np.ndarray:
    """``n`` training rows per class drawn at random (by ``seed``), every other row test.

    The draw is over ALL of a class's rows: the cache's own train, val and test are
    pooled. Returns an object array of ``"train"`` / ``"test"``, one per row.

    Raises
    ------
    HeadError
        ``n`` below 1, or a class with fewer than ``n + 1`` rows (one is needed to test).
    """
    labels = np.asarray(labels)
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise HeadError(f"TRAIN_PER_CLASS={n!r} must be a whole number of at least 1")
    rng = np.random.default_rng(seed)
    split = np.full(len(labels), TEST, dtype=object)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        if len(rows) < n + 1:
            name = class_names[int(label)] if class_names is not None else str(label)
            raise HeadError(
                f"class {name!r} has {len(rows)} images, fewer than TRAIN_PER_CLASS={n} "
                f"plus one to test; lower TRAIN_PER_CLASS to at most {len(rows) - 1} "
                "or add images of it"
            )
        split[rng.choice(rows, size=n, replace=False)] = TRAIN
    return split


def split_file(
    path: str | Path,
    cache_paths: Sequence[str],
    data_root: str | Path,
    *,
    labels: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
) -> np.ndarray:
    """The split a shipped list gives each cache row (``""`` for a row it does not list).

    ``path`` is a CSV with the header ``path,split`` and optionally ``label`` (``split``:
    train, val (pooled into train) or test), or ``train=a.txt,test=b.txt``: one text list
    per split, a path a line. A listed path is relative to ``data_root`` or absolute
    inside it; ``cache_paths`` are the cache's paths (relative to the data root).

    Raises
    ------
    HeadError
        A missing or unreadable list, a path outside the data root or not in the cache,
        a path listed twice, an unknown split, a label unlike the cache's: one line each,
        naming the file and line.
    """
    entries = _read_lists(str(path))
    root = Path(data_root).expanduser().resolve()
    row_of = {str(p): i for i, p in enumerate(cache_paths)}
    split = np.full(len(cache_paths), UNUSED, dtype=object)
    seen: dict[int, str] = {}
    for where, name, split_name, label in entries:
        if split_name.strip().lower() not in _LIST_SPLITS:
            raise HeadError(
                f"{where}: unknown split {split_name!r}; use train, val (pooled into train) or test"
            )
        row = _row_for(where, name, root, row_of)
        if row in seen:
            raise HeadError(
                f"{where}: {name!r} is listed twice (first at {seen[row]}); list it once"
            )
        seen[row] = where
        if label is not None and labels is not None and class_names is not None:
            _check_label(where, name, label, class_names, int(labels[row]))
        split[row] = _LIST_SPLITS[split_name.strip().lower()]
    for needed in (TRAIN, TEST):
        if not np.any(split == needed):
            raise HeadError(f"split list {path} names no {needed} image; a protocol needs both")
    return split


def _read_lists(spec: str) -> list[tuple[str, str, str, str | None]]:
    """``(where, path, split, label or None)`` per listed image, ``where`` as ``file:line``."""
    if "=" in spec and not Path(spec).is_file():
        entries = []
        for part in (p for p in spec.split(",") if p.strip()):
            split_name, _, list_path = part.partition("=")
            for number, line in enumerate(_text(list_path.strip()).splitlines(), 1):
                if line.strip():
                    entries.append(
                        (f"{list_path.strip()}:{number}", line.strip(), split_name, None)
                    )
        return entries
    rows = list(csv.reader(_text(spec).splitlines()))
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if header[:2] != ["path", "split"] or len(header) > 3 or header[2:] not in ([], ["label"]):
        raise HeadError(
            f"{spec}: the first line must be the header path,split (or path,split,label), "
            f"not {','.join(header) or 'empty'}"
        )
    entries = []
    for number, row in enumerate(rows[1:], 2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise HeadError(
                f"{spec}:{number}: {len(row)} fields where the header has {len(header)}"
            )
        label = row[2].strip() if len(row) == 3 else None
        entries.append((f"{spec}:{number}", row[0].strip(), row[1], label))
    return entries


def _text(path: str) -> str:
    try:
        return Path(path).expanduser().read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise HeadError(f"cannot read split list {path}: {reason}") from None


def _row_for(where: str, name: str, root: Path, row_of: dict[str, int]) -> int:
    """The cache row of a listed path, resolved inside the data root."""
    given = Path(name).expanduser()
    full = (given if given.is_absolute() else root / given).resolve()
    try:
        relative = full.relative_to(root).as_posix()
    except ValueError:
        raise HeadError(
            f"{where}: {name!r} is outside the data folder {root}; list paths relative to it"
        ) from None
    if relative not in row_of:
        raise HeadError(
            f"{where}: {name!r} is not an image of the feature cache (missing, skipped or "
            "not under the data folder); remove it from the list or re-run `make features`"
        )
    return row_of[relative]


def _check_label(
    where: str, name: str, label: str, class_names: Sequence[str], row_label: int
) -> None:
    if label not in class_names:
        raise HeadError(
            f"{where}: unknown label {label!r} for {name!r}; the cache's classes are "
            f"{', '.join(class_names)}"
        )
    if label != class_names[row_label]:
        raise HeadError(
            f"{where}: {name!r} is labelled {label!r} in the list but "
            f"{class_names[row_label]!r} in the cache (its class folder); fix the list"
        )
