"""Data sets made here: the demo's digits, texture patches, small blurred copies of a folder."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_image
from PIL import Image

from pipeline.core.errors import PipelineError
from pipeline.data.demo import TEXTURES, write_digits, write_small_blurred, write_textures


def test_digits_are_class_folders_of_png_and_a_second_write_touches_nothing(tmp_path):
    out = write_digits(tmp_path / "digits")
    files = sorted(out.rglob("*.png"))
    assert len(files) == 1797 and sorted(p.name for p in out.iterdir()) == [
        str(d) for d in range(10)
    ]
    first = files[0].stat().st_mtime_ns
    write_digits(tmp_path / "digits")
    assert files[0].stat().st_mtime_ns == first  # caches built on them stay valid


def test_small_blurred_copies_keep_the_folders_shrink_and_skip_the_unreadable(tmp_path):
    source = tmp_path / "src"
    make_image(source / "train" / "ants" / "a.jpg", (200, 30, 30), seed=1, size=(120, 90))
    make_image(source / "val" / "bees" / "b.png", (30, 30, 200), seed=2, size=(64, 64))
    (source / "val" / "bees" / "broken.jpg").write_bytes(b"not an image")
    out, skipped = write_small_blurred(source, tmp_path / "out", side=48, radius=1.0)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "train/ants/a.png",
        "val/bees/b.png",
    ]
    assert [path for path, _ in skipped] == ["val/bees/broken.jpg"]
    with pytest.raises(PipelineError, match="outside"):
        write_small_blurred(source, source / "inside")
    with Image.open(out / "train" / "ants" / "a.png") as small:
        assert small.size == (48, 36)  # the long side, aspect kept
        pixels = np.asarray(small, dtype=np.float32)
    with Image.open(source / "train" / "ants" / "a.jpg") as original:
        shrunk = np.asarray(original.resize((48, 36)), dtype=np.float32)
    assert pixels.std() < shrunk.std()  # blurred: the noise is smoothed away


def test_texture_patches_are_seeded_crops_in_split_and_class_folders(tmp_path):
    pytest.importorskip("skimage")
    out = write_textures(tmp_path / "textures", size=32, train_per_class=3, val_per_class=2)
    for split, count in (("train", 3), ("val", 2)):
        assert sorted(p.name for p in (out / split).iterdir()) == sorted(TEXTURES)
        for name in TEXTURES:
            files = sorted((out / split / name).glob("*.png"))
            assert len(files) == count
            with Image.open(files[0]) as patch:
                assert patch.size == (32, 32)
    again = write_textures(tmp_path / "again", size=32, train_per_class=3, val_per_class=2)
    a, b = (sorted(p.read_bytes() for p in root.rglob("*.png")) for root in (out, again))
    assert a == b  # seeded: the same patches every time
