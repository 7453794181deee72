"""Nearest neighbours by cosine similarity, and the duplicate groups they reveal.

One pass over the features (in row blocks, so memory stays bounded) gives every
image's ``k`` most similar other images; near-duplicate groups (:func:`near_groups`) and
the outlier scores (:mod:`pipeline.audit.outliers`) both read it. Exact duplicates are
found by the files' content hash (:func:`exact_groups`), not by features.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BLOCK_CELLS = 50_000_000  # similarities computed at once (200 MB of float32), whatever n is


@dataclass
class Neighbours:
    """``index[i]``: the ``k`` images most similar to image ``i`` (itself excluded), most
    similar first; ``similarity[i]``: their cosine similarities."""

    index: np.ndarray
    similarity: np.ndarray


def unit_rows(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (all-zero rows stay zero), as float32."""
    x = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def nearest(features: np.ndarray, k: int = 10) -> Neighbours:
    """The ``k`` nearest neighbours of every row by cosine similarity."""
    x = unit_rows(features)
    n = len(x)
    k = max(1, min(k, n - 1))
    index = np.zeros((n, k), dtype=np.int64)
    similarity = np.zeros((n, k), dtype=np.float32)
    block = max(1, min(2048, BLOCK_CELLS // n))
    for start in range(0, n, block):
        sims = x[start : start + block] @ x.T
        rows = np.arange(len(sims))
        sims[rows, start + rows] = -np.inf  # never one's own neighbour
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        part_sims = np.take_along_axis(sims, part, axis=1)
        order = np.argsort(-part_sims, axis=1, kind="stable")
        index[start : start + block] = np.take_along_axis(part, order, axis=1)
        similarity[start : start + block] = np.take_along_axis(part_sims, order, axis=1)
    return Neighbours(index, similarity)


def content_hashes(root: Path | None, paths: Sequence[str]) -> list[str | None]:
    """sha256 of each file's bytes (``None`` where it cannot be read); paths stay inside ``root``."""
    if root is None:
        return [None] * len(paths)
    root = root.resolve()
    out: list[str | None] = []
    for rel in paths:
        path = (root / rel).resolve()
        if not path.is_relative_to(root):
            out.append(None)
            continue
        try:
            out.append(hashlib.sha256(path.read_bytes()).hexdigest())
        except OSError:
            out.append(None)
    return out


def exact_groups(hashes: Sequence[str | None]) -> list[list[int]]:
    """Indices of files with the same content hash, groups of two or more, largest first."""
    by_hash: dict[str, list[int]] = {}
    for i, digest in enumerate(hashes):
        if digest is not None:
            by_hash.setdefault(digest, []).append(i)
    groups = [g for g in by_hash.values() if len(g) > 1]
    return sorted(groups, key=lambda g: (-len(g), g[0]))


def near_groups(
    neighbours: Neighbours, threshold: float, exact: Sequence[Sequence[int]] = ()
) -> list[list[int]]:
    """Connected groups of images whose features' cosine is at least ``threshold``.

    A group that is exactly one exact-duplicate group is left out (it is reported as
    exact); a group that joins exact copies to other images is kept whole.
    """
    n = len(neighbours.index)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return int(i)

    rows, cols = np.nonzero(neighbours.similarity >= threshold)
    for i, j in zip(rows, neighbours.index[rows, cols], strict=True):
        a, b = find(int(i)), find(int(j))
        if a != b:
            parent[max(a, b)] = min(a, b)
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(find(i), []).append(i)
    exact_sets = {frozenset(g) for g in exact}
    groups = [g for g in members.values() if len(g) > 1 and frozenset(g) not in exact_sets]
    return sorted(groups, key=lambda g: (-len(g), g[0]))


def neighbour_threshold(neighbours: Neighbours) -> float:
    """The nearest-neighbour rule: the upper fence ``Q3 + 3 IQR`` of every image's
    similarity to its nearest other image, capped at 0.999.

    Copies of one photo sit far above the similarities distinct photos reach; the
    fence is where a value stops belonging to that bulk.
    """
    first = neighbours.similarity[:, 0]
    q1, q3 = np.percentile(first, [25, 75])
    return float(min(0.999, q3 + 3.0 * (q3 - q1)))
