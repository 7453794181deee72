"""pipeline.features.ray_shards without Ray: blocks, shards written and read back, reuse, collection."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.features.ray_shards import Block, BlockCollector, Shards, plan_blocks, shard_dir_of

WIDTH = 3


def _shards(folder: Path, n: int, fingerprint: str = "images-a") -> Shards:
    return Shards(
        folder=folder,
        config_json='{"options": 1}',
        fingerprint=fingerprint,
        paths=[f"red/{i}.png" for i in range(n)],
        labels=[i % 2 for i in range(n)],
        splits=["train"] * n,
        width=WIDTH,
        dtype="float32",
        class_names=["red", "blue"],
    )


def test_blocks_cover_the_records_and_each_has_its_own_fingerprint():
    blocks = plan_blocks(22, 8)
    assert [(b.start, b.stop) for b in blocks] == [(0, 8), (8, 16), (16, 22)]
    assert blocks[0].name == "0000000000-0000000008"
    assert len({b.fingerprint("same images") for b in blocks}) == 3
    assert shard_dir_of(Path("f/vgg16_224_avg.h5")) == Path("f/vgg16_224_avg.shards")


def test_the_collector_writes_a_block_once_whole_and_the_shard_reads_back(tmp_path):
    shards = _shards(tmp_path / "x.shards", n=6)
    shards.folder.mkdir()
    blocks = plan_blocks(6, 3)
    collector = BlockCollector(blocks, shards, WIDTH)
    row = np.arange(WIDTH, dtype=np.float32)

    # out of order, one unreadable image, one batch delivered twice (a retried task)
    assert collector.add(2, row + 2, True, "") is None
    assert collector.add(0, row, True, "") is None
    assert collector.add(0, row + 100, True, "") is None  # the duplicate is ignored
    assert not shards.is_done(blocks[0])
    assert collector.add(1, row, False, "cannot decode") == blocks[0]
    assert shards.is_done(blocks[0]) and not shards.is_done(blocks[1])

    rows, ok, errors, seconds = shards.read(blocks[0])
    np.testing.assert_array_equal(rows, [row, row + 2])
    assert ok.tolist() == [True, False, True]
    assert errors == {1: "cannot decode"} and seconds >= 0

    # a block with no readable image is recorded too, and reads back as such
    for i in (3, 4, 5):
        done = collector.add(i, row, False, f"bad {i}")
    assert done == blocks[1] and shards.is_done(blocks[1])
    rows, ok, errors, _ = shards.read(blocks[1])
    assert rows.shape == (0, WIDTH) and not ok.any()
    assert errors == {0: "bad 3", 1: "bad 4", 2: "bad 5"}


def test_shards_of_other_images_are_not_reused_and_are_removed(tmp_path):
    folder = tmp_path / "x.shards"
    folder.mkdir()
    block = Block(0, 2)
    _shards(folder, n=2).write(block, np.ones((2, WIDTH), np.float32), np.ones(2, bool), {}, 0.1)

    other = _shards(folder, n=2, fingerprint="images-b")
    assert not other.is_done(block)
    assert other.remove_others(keep=set()) == 1
    assert list(folder.iterdir()) == []
