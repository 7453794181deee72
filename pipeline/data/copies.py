"""Exact copies (the same bytes) among image files, found cheaply: files are grouped by
size and only those whose size another file shares are read and hashed."""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from pathlib import Path


def content_hash(path: Path) -> str | None:
    """sha256 of the file's bytes; ``None`` when it cannot be read (stage one says why)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def copy_groups(root: Path, paths: list[str]) -> list[list[str]]:
    """Groups (two or more, in ``paths`` order) of ``paths`` under ``root`` with the same bytes.

    Unreadable files are in no group. A folder without same-size files reads no file.
    """
    by_size: dict[int, list[str]] = defaultdict(list)
    for path in paths:
        try:
            by_size[os.stat(root / path).st_size].append(path)
        except OSError:
            continue
    by_hash: dict[str, list[str]] = defaultdict(list)
    for same_size in by_size.values():
        if len(same_size) > 1:
            for path in same_size:
                digest = content_hash(root / path)
                if digest is not None:
                    by_hash[digest].append(path)
    order = {path: i for i, path in enumerate(paths)}
    groups = [sorted(g, key=order.__getitem__) for g in by_hash.values() if len(g) > 1]
    return sorted(groups, key=lambda g: order[g[0]])
