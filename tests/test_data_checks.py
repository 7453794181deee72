"""What the folder scan and the decoder say instead of dropping images silently (issue 23)."""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import COLOURS, make_folder, make_image
from PIL import Image

from pipeline.core.errors import DataError
from pipeline.data import folders
from pipeline.data.folders import scan_folder
from pipeline.data.images import ImageError, load_image


@contextlib.contextmanager
def denied(monkeypatch, path: Path) -> Iterator[None]:
    """``path`` unreadable: chmod, or as root (whom chmod does not stop) refused on opening."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    refused = os.fspath(path)

    def refuse(real):
        def call(target, *args, **kwargs):
            if os.fspath(target) == refused:
                raise PermissionError(errno.EACCES, "Permission denied", refused)
            return real(target, *args, **kwargs)

        return call

    for module, name in ((os, "scandir"), (os, "listdir"), (builtins, "open")):
        monkeypatch.setattr(module, name, refuse(getattr(module, name)))
    yield


def test_jfif_is_a_jpeg_and_is_scanned(tmp_path):
    root = make_folder(tmp_path / "data", per_class=3)
    make_image(root / "red" / "extra.jfif", COLOURS["red"], seed=9)
    Image.open(root / "red" / "extra.jfif").convert("RGB").save(root / "red" / "x.jfif", "JPEG")
    folder = scan_folder(root)
    assert "red/extra.jfif" in {r.path for r in folder.records}
    assert load_image(root / "red" / "x.jfif", 16).shape == (16, 16, 3)


def test_avif_is_scanned_where_pillow_reads_it_else_named(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data", per_class=3)
    (root / "red" / "photo.avif").write_bytes(b"not decoded by the scan")
    monkeypatch.setattr(folders, "pillow_reads_avif", lambda: True)
    assert "red/photo.avif" in {r.path for r in scan_folder(root).records}
    monkeypatch.setattr(folders, "pillow_reads_avif", lambda: False)
    folder = scan_folder(root)
    assert "red/photo.avif" not in {r.path for r in folder.records}
    assert any("skipped 1 .avif file(s)" in w and "cannot read AVIF" in w for w in folder.warnings)


@pytest.mark.skipif(
    not getattr(folders, "pillow_reads_avif", lambda: True)(), reason="this Pillow has no AVIF"
)
def test_a_real_avif_file_is_decoded(tmp_path):
    root = make_folder(tmp_path / "data", per_class=3)
    Image.new("RGB", (20, 20), (200, 40, 40)).save(root / "red" / "real.avif")
    assert "red/real.avif" in {r.path for r in scan_folder(root).records}
    assert load_image(root / "red" / "real.avif", 8).shape == (8, 8, 3)


def test_an_unreadable_class_subfolder_is_an_error_not_dropped_images(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data", per_class=3)
    sub = root / "red" / "more"
    make_image(sub / "a.png", COLOURS["red"], seed=5)
    refused = r"cannot read folder .*more \(Permission denied\)"
    with denied(monkeypatch, sub), pytest.raises(DataError, match=refused):
        scan_folder(root)


def test_an_unreadable_file_is_not_called_corrupt(tmp_path, monkeypatch):
    path = make_image(tmp_path / "a.png", COLOURS["red"], seed=1)
    refused = "^cannot read the file: Permission denied$"
    with denied(monkeypatch, path), pytest.raises(ImageError, match=refused):
        load_image(path, 8)


def test_a_class_folder_beside_the_split_folders_is_named(split_folder):
    make_image(split_folder / "orange" / "1.jpg", COLOURS["red"], seed=3)
    make_image(split_folder / "test" / "red" / "1.jpg", COLOURS["red"], seed=4)
    folder = scan_folder(split_folder)
    assert "orange" not in folder.class_names
    (line,) = [w for w in folder.warnings if w.startswith("ignored")]
    assert "orange (1 images) beside test/, train/, val/" in line and "move it into train/" in line


def test_many_classes_of_two_images_say_val_and_test_are_empty(tmp_path):
    for c in range(30):  # the scan does not decode: empty files stand in for images
        for i in range(2):
            (tmp_path / "d" / f"c{c:03d}").mkdir(parents=True, exist_ok=True)
            (tmp_path / "d" / f"c{c:03d}" / f"{i}.png").write_bytes(b"")
    folder = scan_folder(tmp_path / "d")
    assert folder.counts() == {"train": 60}
    assert [w.split(":")[0] for w in folder.warnings] == [
        "the val split is empty",
        "the test split is empty",
    ]
    assert "VAL_FRACTION=0.2 of at most 2 images per class rounds to 0" in folder.warnings[0]


def test_some_classes_without_val_images_are_counted(tmp_path):
    make_folder(tmp_path / "d", per_class=10, classes=("red", "blue"))
    make_folder(tmp_path / "d", per_class=2, classes=("green",))
    warnings = scan_folder(tmp_path / "d").warnings
    assert "1 of 3 classes have no val image" in warnings[0]


def test_exact_copies_across_splits_are_found_by_content(split_folder):
    from pipeline.data.folders import cross_split_copies

    shutil.copy(split_folder / "train" / "red" / "0.jpg", split_folder / "val" / "red" / "copy.jpg")
    line = cross_split_copies(scan_folder(split_folder))
    assert line is not None and line.startswith("1 image(s) are exact copies")
    assert "(train-val 1; e.g. val/red/copy.jpg = train/red/0.jpg)" in line


def test_no_copies_means_no_line(split_folder):
    from pipeline.data.folders import cross_split_copies

    assert cross_split_copies(scan_folder(split_folder)) is None
