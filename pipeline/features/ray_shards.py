"""The block shards of a Ray stage-one run (:mod:`pipeline.features.ray_engine`); no Ray needed.

The records of the scan are cut into :class:`Block` s of consecutive records
(:func:`plan_blocks`). Each finished block is stored as a *shard*: an HDF5 file in
:mod:`pipeline.features.cache`'s format (or, for a block with no readable image, a JSON file of
its skipped images) in ``<cache stem>.shards/`` beside the cache (:func:`shard_dir_of`).
A shard records the cache's identity and the block's fingerprint, so a later run with
the same images and options reuses it and one of other blocks, images or options is
never mixed in (:class:`Shards`). :class:`BlockCollector` gathers the actors' rows,
which arrive in any order and possibly twice, and writes each block's shard once it
is whole.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.files import write_json_atomic
from pipeline.features import cache, cache_writer


def shard_dir_of(path: Path) -> Path:
    """The folder of a cache's block shards: ``<cache stem>.shards/`` beside it."""
    return path.with_name(path.stem + ".shards")


@dataclass(frozen=True)
class Block:
    """Records ``start .. stop`` of the scan; one shard."""

    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.start:010d}-{self.stop:010d}"

    def fingerprint(self, fingerprint: str) -> str:
        """The cache's fingerprint narrowed to this block: a shard of other blocks never matches."""
        return hashlib.sha256(f"{fingerprint}:{self.start}:{self.stop}".encode()).hexdigest()


@dataclass
class Shards:
    """The shards of one cache: where they live, what they must match, how to write and read them."""

    folder: Path
    config_json: str
    fingerprint: str
    paths: list[str]
    labels: list[int]
    splits: list[str]
    width: int
    dtype: str
    class_names: list[str]

    def h5(self, block: Block) -> Path:
        return self.folder / f"{block.name}.h5"

    def unreadable(self, block: Block) -> Path:  # a block with no readable image
        return self.folder / f"{block.name}.skipped.json"

    def is_done(self, block: Block) -> bool:
        """Whether a valid shard of ``block`` exists (same options, same images)."""
        if cache.cache_matches(
            self.h5(block), self.config_json, block.fingerprint(self.fingerprint)
        ):
            return True
        try:
            data = json.loads(self.unreadable(block).read_text())
        except (OSError, ValueError):
            return False
        return (
            isinstance(data, dict)
            and data.get("config_json") == self.config_json
            and data.get("fingerprint") == block.fingerprint(self.fingerprint)
        )

    def write(self, block: Block, rows: np.ndarray, ok: np.ndarray, errors: dict, seconds: float):
        """Store one finished block (``rows``: the readable images' features, in order)."""
        identity = {
            "config_json": self.config_json,
            "fingerprint": block.fingerprint(self.fingerprint),
        }
        if not ok.any():  # a cache needs one readable image; this block has none
            skipped = [[int(i), reason] for i, reason in sorted(errors.items())]
            write_json_atomic(
                self.unreadable(block), {**identity, "skipped": skipped, "seconds": seconds}
            )
            return
        sl = slice(block.start, block.stop)
        writer, _ = cache_writer.CacheWriter.open(
            self.h5(block),
            **identity,
            paths=self.paths[sl],
            labels=self.labels[sl],
            splits=self.splits[sl],
            width=self.width,
            dtype=self.dtype,
        )
        try:
            writer.write_batch(0, rows, ok, errors, seconds)
            attrs = {"class_names": self.class_names, "start": block.start, "stop": block.stop}
            writer.finalize({**attrs, "seconds": seconds, "engine": "ray"})
        finally:
            writer.close()

    def read(self, block: Block) -> tuple[np.ndarray, np.ndarray, dict[int, str], float]:
        """``(features of the readable images, ok mask, offset -> reason, seconds)``."""
        n = block.stop - block.start
        if not self.h5(block).is_file():
            data = json.loads(self.unreadable(block).read_text())
            errors = {int(i): str(reason) for i, reason in data["skipped"]}
            return (
                np.zeros((0, self.width), np.float32),
                np.zeros(n, bool),
                errors,
                float(data["seconds"]),
            )
        shard = cache.load_features(self.h5(block))
        offset = {p: i for i, p in enumerate(self.paths[block.start : block.stop])}
        ok = np.zeros(n, dtype=bool)
        ok[[offset[str(p)] for p in shard.paths]] = True
        errors = {offset[p]: reason for p, reason in cache.read_skipped(self.h5(block))}
        return shard.features, ok, errors, float(shard.attrs.get("seconds", 0.0))

    def remove_others(self, keep: set[str]) -> int:
        """Delete shards not of the blocks named in ``keep`` or not valid; return how many."""
        removed = 0
        for item in sorted(self.folder.glob("*")) if self.folder.is_dir() else []:
            if item.name.split(".", 1)[0] not in keep:
                item.unlink(missing_ok=True)
                removed += 1
        return removed


def plan_blocks(n: int, block_size: int) -> list[Block]:
    """Consecutive blocks of ``block_size`` records covering ``0 .. n``."""
    return [Block(start, min(n, start + block_size)) for start in range(0, n, block_size)]


class BlockCollector:
    """Gathers the actors' rows per block and writes each block's shard once it is whole."""

    def __init__(self, blocks: list[Block], shards: Shards, width: int) -> None:
        self._by_start = {b.start: b for b in blocks}
        self._starts = np.array(sorted(self._by_start), dtype=np.int64)
        self._shards = shards
        self._width = width
        self._open: dict[int, dict[str, Any]] = {}
        self._last = time.perf_counter()

    def block_of(self, index: int) -> Block:
        return self._by_start[int(self._starts[np.searchsorted(self._starts, index, "right") - 1])]

    def add(self, index: int, row: np.ndarray, ok: bool, error: str) -> Block | None:
        """Record one image; return its block when this completed it (its shard is written)."""
        block = self.block_of(index)
        n = block.stop - block.start
        state = self._open.get(block.start)
        if state is None:
            state = self._open[block.start] = {
                "rows": np.zeros((n, self._width), np.float32),
                "ok": np.zeros(n, bool),
                "seen": np.zeros(n, bool),
                "errors": {},
            }
        offset = index - block.start
        if state["seen"][offset]:  # a retried batch delivered twice: keep the first
            return None
        state["seen"][offset] = True
        if ok:
            state["rows"][offset] = row
            state["ok"][offset] = True
        else:
            state["errors"][offset] = error
        if not state["seen"].all():
            return None
        now = time.perf_counter()
        seconds, self._last = now - self._last, now  # wall time, so shards add up to the run's
        del self._open[block.start]
        self._shards.write(block, state["rows"][state["ok"]], state["ok"], state["errors"], seconds)
        return block
