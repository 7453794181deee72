"""Folder layouts, splits, decoding of awkward images, and the batch loader."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import COLOURS, make_folder, make_image
from PIL import Image

from pipeline.core.errors import DataError
from pipeline.data.folders import SplitConfig, scan_folder
from pipeline.data.images import ImageError, iter_batches, load_image, resize_square

# --- layouts and splits ---------------------------------------------------------


def test_flat_folder_gets_a_stratified_seeded_split(tmp_path):
    root = make_folder(tmp_path / "d", per_class=10, classes=("red", "blue"))
    folder = scan_folder(root, SplitConfig(seed=3, val_fraction=0.2, test_fraction=0.3))
    assert folder.class_names == ("blue", "red")
    assert folder.split_source == "stratified"
    for label in (0, 1):
        splits = [r.split for r in folder.records if r.label == label]
        assert (splits.count("train"), splits.count("val"), splits.count("test")) == (5, 2, 3)
    again = scan_folder(root, SplitConfig(seed=3, val_fraction=0.2, test_fraction=0.3))
    assert again.records == folder.records
    other = scan_folder(root, SplitConfig(seed=4, val_fraction=0.2, test_fraction=0.3))
    assert [r.split for r in other.records] != [r.split for r in folder.records]


def test_split_folders_and_validation_alias(tmp_path):
    root = tmp_path / "d"
    for split in ("train", "validation"):
        for name in ("red", "blue"):
            make_image(root / split / name / "a.png", COLOURS[name], seed=1)
    folder = scan_folder(root)
    assert folder.split_source == "folders"
    assert folder.counts() == {"train": 2, "val": 2}
    assert {r.path for r in folder.records} >= {"validation/red/a.png", "train/blue/a.png"}


def test_images_in_nested_subfolders_take_the_class_folder_label(tmp_path):
    root = make_folder(tmp_path / "d", per_class=2)
    make_image(root / "red" / "more" / "deep.png", COLOURS["red"], seed=9)
    (root / "red" / "notes.txt").write_text("not an image")
    (root / "red" / ".hidden.png").write_bytes(b"")
    folder = scan_folder(root)
    red = folder.class_names.index("red")
    assert sorted(r.path for r in folder.records if r.label == red) == [
        "red/img00.png",
        "red/img01.png",
        "red/more/deep.png",
    ]


def test_class_only_in_val_is_a_warning_not_an_error(tmp_path):
    root = tmp_path / "d"
    for name in ("red", "blue"):
        make_image(root / "train" / name / "a.png", COLOURS[name], seed=1)
    make_image(root / "val" / "green" / "a.png", COLOURS["green"], seed=1)
    folder = scan_folder(root)
    assert folder.class_names == ("blue", "green", "red")
    assert any("green" in w and "val" in w for w in folder.warnings)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing", "does not exist"),
        ("file", "is a file"),
        ("empty", "no class folders"),
        ("loose", "loose images"),
        ("empty_class", "holds no images"),
        ("one_class", "only one class"),
        ("no_train", "no train/ folder"),
        ("val_and_validation", "keep one of them"),
    ],
)
def test_bad_layouts_say_what_is_wrong(tmp_path, layout, message):
    root = tmp_path / "d"
    if layout == "file":
        root.write_text("x")
    elif layout == "empty":
        root.mkdir()
    elif layout == "loose":
        make_image(root / "a.png", COLOURS["red"], seed=0)
    elif layout == "empty_class":
        make_folder(root, per_class=2)
        (root / "green").mkdir()
    elif layout == "one_class":
        make_folder(root, per_class=2, classes=("red",))
    elif layout == "no_train":
        make_folder(root / "val", per_class=2)
    elif layout == "val_and_validation":
        make_folder(root / "train", per_class=2)
        make_folder(root / "val", per_class=2)
        make_folder(root / "validation", per_class=2)
    with pytest.raises(DataError, match=message):
        scan_folder(root)


def test_bad_split_fractions_are_refused():
    with pytest.raises(
        DataError, match=r"VAL_FRACTION= \(--val-fraction\) must be a number in \[0, 1\)"
    ):
        SplitConfig(val_fraction=1.5)
    with pytest.raises(DataError, match=r"SEED= \(--seed\) must be a whole number"):
        SplitConfig(seed=-1)
    with pytest.raises(DataError, match="leave images for training"):
        SplitConfig(val_fraction=0.5, test_fraction=0.5)


def test_fingerprint_changes_when_an_image_changes(image_folder):
    before = scan_folder(image_folder).fingerprint()
    assert scan_folder(image_folder).fingerprint() == before
    target = image_folder / "red" / "img00.png"
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert scan_folder(image_folder).fingerprint() != before


# --- decoding ---------------------------------------------------------------------


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def test_resize_is_bilinear_with_half_pixel_centres_and_no_antialiasing():
    # Halving samples each output pixel at the centre of a 2x2 block: its mean, exactly
    # (an antialiased filter, Pillow's, would blend in the neighbouring blocks too).
    x = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    blocks = x.reshape(4, 2, 4, 2, 3).astype(np.float64).mean(axis=(1, 3))
    got = resize_square(x, 4)
    assert got.shape == (4, 4, 3) and got.dtype == np.uint8
    assert np.abs(got - blocks).max() <= 0.5 + 1e-9
    pillow = np.asarray(Image.fromarray(x).resize((4, 4), Image.BILINEAR))
    assert np.abs(pillow.astype(np.float64) - blocks).max() > 1  # the difference is real
    assert resize_square(x[:, :, 0], 4).shape == (4, 4)  # grayscale stays one channel
    assert np.array_equal(resize_square(x, 8), x)


@pytest.mark.parametrize(
    ("mode", "shape", "size"),
    [("RGB", (90, 70), 32), ("L", (90, 70), 32), ("RGB", (600, 500), 64)],  # the last: draft 1/4
)
def test_opencv_decodes_plain_jpegs_as_pillow_does(tmp_path, monkeypatch, mode, shape, size):
    from pipeline.data import images

    rng = np.random.default_rng(1)
    smooth = rng.integers(0, 256, (shape[1] // 10 + 1, shape[0] // 10 + 1, 3)).astype(np.uint8)
    picture = Image.fromarray(smooth).resize(shape, Image.BICUBIC).convert(mode)
    path = _save(picture, tmp_path / "p.jpg")
    decoded = []
    real = images._opencv_jpeg
    monkeypatch.setattr(images, "_opencv_jpeg", lambda *a: decoded.append(1) or real(*a))
    fast = load_image(path, size)
    assert decoded == [1]  # OpenCV decoded it
    monkeypatch.setattr(images, "_plain_jpeg", lambda image: None)
    pillow = load_image(path, size)
    assert fast.shape == pillow.shape == (size, size, 3)
    assert np.abs(fast.astype(int) - pillow).max() <= 2  # the same libjpeg-turbo decoding


def test_draft_scale_is_read_back_from_the_sizes_pillow_gives():
    from pipeline.data.images import _draft_scale

    assert _draft_scale((450, 375), (450, 375)) == 1
    assert _draft_scale((449, 375), (225, 188)) == 2  # sides rounded up, as libjpeg does
    assert _draft_scale((600, 500), (150, 125)) == 4
    assert _draft_scale((9, 9), (2, 2)) == 8


def test_missing_opencv_is_one_line_saying_how_to_install_it(tmp_path, monkeypatch):
    import sys

    from pipeline.core.errors import PipelineError
    from pipeline.data import images

    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now fails
    images._opencv.cache_clear()
    try:
        with pytest.raises(PipelineError, match=r"pip install opencv-python-headless"):
            load_image(_save(Image.new("RGB", (40, 30), "red"), tmp_path / "r.png"), 8)
    finally:
        images._opencv.cache_clear()


def test_grayscale_becomes_three_equal_channels(tmp_path):
    path = _save(Image.new("L", (10, 6), 77), tmp_path / "g.png")
    x = load_image(path, 8)
    assert x.shape == (8, 8, 3) and x.dtype == np.uint8
    assert np.all(x == 77)


def test_transparent_pixels_are_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    x = load_image(_save(rgba, tmp_path / "t.png"), 8)
    assert np.all(x == 255)
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    palette.info["transparency"] = 0
    assert np.all(load_image(_save(palette, tmp_path / "p.png", transparency=0), 8) == 255)


def test_cmyk_and_16_bit_images(tmp_path):
    cmyk = _save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "c.jpg", quality=95)
    x = load_image(cmyk, 8)
    assert x[..., 0].mean() > 200 and x[..., 1].mean() < 60  # red
    deep = Image.fromarray(np.full((8, 8), 65535 // 2, dtype=np.uint16))
    assert deep.mode.startswith("I;16")
    x = load_image(_save(deep, tmp_path / "d.png"), 8)
    assert abs(int(x.mean()) - 128) <= 1


def test_exif_orientation_is_applied(tmp_path):
    # A 20x10 image stored landscape, with EXIF orientation 6 (rotate 90 degrees clockwise to view).
    pixels = np.zeros((10, 20, 3), np.uint8)
    pixels[:, :10] = (255, 0, 0)  # left half red
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    x = load_image(_save(image, tmp_path / "o.jpg", exif=exif, quality=95), 20)
    # After rotating clockwise, the red (left) half is on top.
    assert x[:8, :, 0].mean() > 200 and x[-8:, :, 0].mean() < 60


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file"),
        (b"hello, I am text pretending to be a JPEG", "not an image"),
    ],
)
def test_unreadable_files_raise_image_error(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=reason):
        load_image(path, 8)


def test_truncated_jpeg_raises_image_error(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        buffer, format="JPEG"
    )
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated"):
        load_image(path, 8)


# --- batches ------------------------------------------------------------------------


def test_batches_keep_order_skip_bad_files_and_resume(tmp_path):
    root = make_folder(tmp_path / "d", per_class=4)
    (root / "red" / "zz_bad.png").write_bytes(b"")
    paths = [r.path for r in scan_folder(root).records]
    expected = [load_image(root / p, 16) for p in paths if not p.endswith("zz_bad.png")]

    batches = list(
        iter_batches(root, paths, size=16, batch_size=3, preprocess=lambda b: b, workers=2)
    )
    assert [b.start for b in batches] == [0, 3, 6]
    assert sum(b.size for b in batches) == len(paths)
    bad = paths.index("red/zz_bad.png")
    errors = {b.start + k: v for b in batches for k, v in b.errors.items()}
    assert list(errors) == [bad] and "empty" in errors[bad]
    np.testing.assert_array_equal(np.concatenate([b.x for b in batches]), np.stack(expected))

    resumed = list(
        iter_batches(root, paths, size=16, batch_size=3, preprocess=lambda b: b, start=6)
    )
    assert [b.start for b in resumed] == [6]


def test_input_pipeline_and_cache_never_import_tensorflow():
    import subprocess
    import sys

    code = (
        "import sys, pipeline.data.images, pipeline.features.cache, pipeline.features.extract, pipeline.features.backbones, pipeline.cli.main;"
        "bad = [m for m in ('tensorflow', 'keras', 'torch', 'jax') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
