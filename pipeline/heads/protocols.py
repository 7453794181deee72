"""Research protocols' splits of one feature cache: N per class, or a shipped split list.

A protocol re-splits the cache's rows when they are loaded; the cache, its recorded
split and its identity are never touched, so a protocol costs head fits only.
Both functions here are pure: they take the cache's labels or paths and return one
split name per row, ``"train"``, ``"test"`` or ``""`` (a row the protocol leaves out).
They are stage one's (:mod:`pipeline.data.splits`, where ``make features TRAIN_PER_CLASS=``
and ``SPLIT_FILE=`` re-split the cache itself), with a protocol's choices: val pooled into
train, both train and test needed, :class:`HeadError`. Running the heads on those splits
is :mod:`pipeline.heads.protocol_run`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.core.errors import HeadError
from pipeline.data import splits

TRAIN, TEST, UNUSED = "train", "test", ""


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
    return splits.per_class_split(labels, n, seed, class_names, error=HeadError)


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
    per split, a path a line (:func:`pipeline.data.splits.split_file`). ``cache_paths``
    are the cache's paths (relative to the data root).

    Raises
    ------
    HeadError
        A missing or unreadable list, a path outside the data root or not in the cache,
        a path listed twice, an unknown split, a label unlike the cache's, a list without
        train or test: one line each, naming the file and line.
    """
    return splits.split_file(
        path, cache_paths, data_root, labels=labels, class_names=class_names, pool_val=True,
        needed=(TRAIN, TEST), error=HeadError, of="the feature cache",
    )  # fmt: skip
