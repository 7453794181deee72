"""Reading image folders: layout, splits, decoding, and batches for the backbone.

Pure NumPy and Pillow, no TensorFlow: the same input pipeline serves every Keras
backend. Decoding and preprocessing run on a thread pool (Pillow and NumPy
release the GIL), a few batches ahead of the forward pass, so memory stays
bounded by ``prefetch * batch_size`` images whatever the data set's size.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import sys
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.artifacts import dataset_name
from pipeline.errors import DataError
from pipeline.options import check_options, option_label

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
# Split folder names as users spell them -> the split name stored in caches.
SPLIT_FOLDERS = {"train": "train", "val": "val", "validation": "val", "test": "test"}
SPLITS = ("train", "val", "test")
# The most pixels an image may have once decoded (after JPEG's reduced-scale decoding):
# Pillow's default bomb limit, about 256 MiB of RGB. Larger images are skipped with a
# reason. Pillow's own guard (``PIL.Image.MAX_IMAGE_PIXELS``) applies as well when set lower.
MAX_IMAGE_PIXELS = 89_478_485


@dataclass(frozen=True)
class SplitConfig:
    """How to split a folder that has no ``train/``, ``val/``, ``test/`` folders.

    The split is stratified by class and fixed by ``seed``; both are recorded in
    the cache, so later stages see exactly the same images in each split.
    """

    seed: int = 0
    val_fraction: float = 0.2
    test_fraction: float = 0.2

    def __post_init__(self) -> None:
        check_options(asdict(self), error=DataError)
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


@dataclass(frozen=True)
class ImageFolder:
    """A scanned data folder: classes, images and the split of each image."""

    root: Path
    class_names: tuple[str, ...]
    records: tuple[ImageRecord, ...]
    split_source: str  # "folders" or "stratified"
    split: SplitConfig | None = None  # set when split_source == "stratified"
    warnings: tuple[str, ...] = field(default=())

    @property
    def name(self) -> str:
        """The data set's name (the resolved folder name: ``.`` and its full path agree)."""
        return dataset_name(self.root)

    def counts(self) -> dict[str, int]:
        """Number of images per split."""
        out = {s: 0 for s in SPLITS}
        for record in self.records:
            out[record.split] += 1
        return {s: n for s, n in out.items() if n}

    def fingerprint(self) -> str:
        """sha256 of every image's path, size, modification time, class and split.

        Any added, removed, edited or relabelled image changes it.
        """
        digest = hashlib.sha256()
        digest.update("\x1f".join(self.class_names).encode())
        for record in self.records:
            stat = _stat_line(self.root / record.path)
            line = f"{record.path}\x1f{stat}\x1f{record.label}\x1f{record.split}\n"
            digest.update(line.encode())
        return digest.hexdigest()


def _stat_line(path: Path) -> str:
    """Size and modification time; a dangling link or a link loop says so instead."""
    try:
        stat = os.stat(path)
    except OSError as exc:  # skipped at decoding, with the reason; fixing it changes this
        return f"unreadable\x1f{exc.errno}"
    return f"{stat.st_size}\x1f{stat.st_mtime_ns}"


def shown(path: str | Path) -> str:
    """``path`` printable on one line: bytes that are not UTF-8 as ``\\xff`` escapes."""
    text = str(path)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # lone surrogates of a Windows name
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _check_name(path: Path) -> None:
    """Refuse a name that is not valid UTF-8: caches, heads and reports store names as UTF-8."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(
            f"name is not valid UTF-8: {shown(path)}; rename it (for example "
            "`convmv -f latin1 -t utf-8 -r --notest <data folder>`) and run again"
        ) from None


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def images_under(folder: Path, notes: list[str] | None = None) -> list[Path]:
    """Image files under ``folder`` (recursively, hidden entries skipped), sorted.

    Symbolic links to folders are followed, each folder once: a link back to a
    folder already scanned (a loop) is skipped, with a line added to ``notes``.
    Links to files are listed even when dangling or looping; decoding skips
    them with the reason.

    Raises
    ------
    DataError
        A file or folder name that is not valid UTF-8 (the message names it).
    """
    found = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        try:
            stat = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (stat.st_dev, stat.st_ino) in seen:
            dirnames[:] = []
            if notes is not None:
                notes.append(f"skipped {shown(dirpath)}: symbolic link to a folder already scanned")
            continue
        seen.add((stat.st_dev, stat.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in dirnames:
            _check_name(Path(dirpath) / name)
        for name in filenames:
            if _is_image_name(name):
                _check_name(Path(dirpath) / name)
                found.append(Path(dirpath) / name)
    return sorted(found)


def _class_folders(folder: Path) -> list[Path]:
    found = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    for path in found:
        _check_name(path)
    return found


def scan_folder(root: str | Path, split: SplitConfig | None = None) -> ImageFolder:
    """Scan a folder of class subfolders into an :class:`ImageFolder`.

    Two layouts are understood::

        root/<class>/<image>                 stratified split by ``split``
        root/train/<class>/<image>           splits from the folders
        root/val|validation/<class>/<image>  (optional)
        root/test/<class>/<image>            (optional)

    Raises
    ------
    DataError
        Missing or empty folder, no class folders, a class folder without
        images, or fewer than two classes.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(
            f"data folder {root} does not exist; pass DATA=<folder of class subfolders>"
        )
    if not root.is_dir():
        raise DataError(f"DATA={root} is a file; pass a folder of class subfolders")
    _check_name(root.resolve())
    split = split or SplitConfig()
    subfolders = _class_folders(root)
    split_folders = [p for p in subfolders if p.name.lower() in SPLIT_FOLDERS]
    if split_folders:
        return _scan_split_folders(root, split_folders)

    notes: list[str] = []
    by_class = _scan_classes(root, subfolders, where=str(root), notes=notes)
    records = _stratified_split(by_class, split)
    return ImageFolder(root, tuple(by_class), tuple(records), "stratified", split, tuple(notes))


def _scan_classes(
    root: Path, class_dirs: list[Path], where: str, notes: list[str]
) -> dict[str, list[str]]:
    if not class_dirs:
        loose = [p.name for p in root.iterdir() if p.is_file() and _is_image_name(p.name)]
        hint = (
            f" (found {len(loose)} loose images: move them into one folder per class)"
            if loose
            else ""
        )
        raise DataError(f"no class folders in {where}: expected {where}/<class>/<image>{hint}")
    by_class: dict[str, list[str]] = {}
    for class_dir in class_dirs:
        images = images_under(class_dir, notes)
        if not images:
            raise DataError(
                f"class folder {class_dir} holds no images "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove the folder"
            )
        by_class[class_dir.name] = [p.relative_to(root).as_posix() for p in images]
    if len(by_class) < 2:
        only = next(iter(by_class))
        raise DataError(
            f"found only one class folder ({only!r}) in {where}; a classifier needs at least two"
        )
    return by_class


def _scan_split_folders(root: Path, split_folders: list[Path]) -> ImageFolder:
    names = {}
    for folder in split_folders:
        split_name = SPLIT_FOLDERS[folder.name.lower()]
        if split_name in names:
            raise DataError(
                f"{root} has both {names[split_name].name}/ and {folder.name}/; keep one of them"
            )
        names[split_name] = folder
    if "train" not in names:
        raise DataError(
            f"{root} has {', '.join(f.name + '/' for f in split_folders)} but no train/ folder"
        )
    scan_notes: list[str] = []
    per_split = {
        s: _scan_classes(root, _class_folders(f), where=str(f), notes=scan_notes)
        if s == "train"
        else _scan_optional_split(root, f, scan_notes)
        for s, f in names.items()
    }
    class_names = sorted(set().union(*per_split.values()))
    index = {name: i for i, name in enumerate(class_names)}
    notes = scan_notes + [
        f"class {c!r} appears in {s}/ but not in train/"
        for s in ("val", "test")
        if s in per_split
        for c in sorted(set(per_split[s]) - set(per_split["train"]))
    ]
    records = [
        ImageRecord(path, index[c], s)
        for s in SPLITS
        if s in per_split
        for c, paths in sorted(per_split[s].items())
        for path in paths
    ]
    return ImageFolder(root, tuple(class_names), tuple(records), "folders", None, tuple(notes))


def _scan_optional_split(root: Path, folder: Path, notes: list[str]) -> dict[str, list[str]]:
    by_class = {}
    for class_dir in _class_folders(folder):
        images = images_under(class_dir, notes)
        if not images:
            raise DataError(f"class folder {class_dir} holds no images; add images or remove it")
        by_class[class_dir.name] = [p.relative_to(root).as_posix() for p in images]
    if not by_class:
        raise DataError(f"split folder {folder} has no class folders; remove it or fill it")
    return by_class


def _stratified_split(by_class: dict[str, list[str]], split: SplitConfig) -> list[ImageRecord]:
    rng = np.random.default_rng(split.seed)
    records = []
    for label, (_, paths) in enumerate(by_class.items()):
        order = rng.permutation(len(paths))
        n_test = int(round(len(paths) * split.test_fraction))
        n_val = int(round(len(paths) * split.val_fraction))
        for rank, i in enumerate(order):
            name = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
            records.append(ImageRecord(paths[i], label, name))
    records.sort(key=lambda r: r.path)
    return records


class ImageError(ValueError):
    """An image that cannot be used; the message is the reason it was skipped."""


def load_image(path: str | Path, size: int) -> np.ndarray:
    """Decode one image to a ``(size, size, 3)`` uint8 RGB array.

    EXIF orientation is applied; grayscale, palette, CMYK and 16-bit images are
    converted to RGB; transparent pixels are composited onto white. The image is
    resized (bilinear, antialiased) to a square without keeping its aspect
    ratio, as Keras's loaders do.

    Decoding is bounded: an image of more than :data:`MAX_IMAGE_PIXELS` pixels
    (counted after JPEG's reduced-scale decoding) is refused before its pixels
    are read, whatever ``PIL.Image.MAX_IMAGE_PIXELS`` says.

    Raises
    ------
    ImageError
        Empty, truncated, corrupt, too large or non-image file, a dangling
        symbolic link or a link loop (the message says which).
    """
    try:
        if _file_size(path) == 0:
            raise ImageError("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's palette/EXIF chatter
            with Image.open(path) as image:
                if image.format == "JPEG":
                    # Decode at a reduced DCT scale when the file is >= 2x the target.
                    image.draft("RGB", (size, size))
                _check_pixels(image)
                image.load()
                return _to_rgb_array(_oriented(image), size)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image Pillow can read (unknown or corrupt format)") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"too large to decode safely: {exc}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"corrupt or truncated image: {exc}") from None


def _file_size(path: str | Path) -> int:
    try:
        return os.path.getsize(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageError("symbolic link loop (the link leads back to itself)") from None
        if os.path.islink(path) and isinstance(exc, FileNotFoundError):
            target = shown(os.readlink(path))
            raise ImageError(
                f"dangling symbolic link (its target {target} does not exist)"
            ) from None
        raise ImageError(f"cannot read the file: {exc.strerror or exc}") from None


def _check_pixels(image: Image.Image) -> None:
    limit = MAX_IMAGE_PIXELS
    if Image.MAX_IMAGE_PIXELS is not None:  # Pillow's guard, when someone set it lower
        limit = min(limit, int(Image.MAX_IMAGE_PIXELS))
    width, height = image.size
    if width * height > limit:
        raise ImageError(
            f"too large to decode safely: {width}x{height} = {width * height} pixels, above "
            f"the limit of {limit} (pipeline.images.MAX_IMAGE_PIXELS)"
        )


def _oriented(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block should not cost a readable image
        return image


def _to_rgb_array(image: Image.Image, size: int) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float32)
        scale = (
            255.0 / 65535.0 if mode.startswith("I;16") else 255.0 / max(float(values.max()), 255.0)
        )
        image = Image.fromarray(np.clip(values * scale + 0.5, 0, 255).astype(np.uint8), "L")
    elif mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba).convert("RGB")
    elif mode not in ("RGB", "L"):
        image = image.convert("RGB")  # P, CMYK, YCbCr, 1, LAB, HSV
    # Resize before widening grayscale to three channels: a third of the work.
    image = image.resize((size, size), Image.BILINEAR)
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return array


@dataclass
class Batch:
    """A decoded, preprocessed batch of consecutive records.

    ``x`` holds the readable images only, in order; ``ok[i]`` says whether
    record ``start + i`` is among them; ``errors`` maps a record's offset in the
    batch to the reason it was skipped.
    """

    start: int
    x: np.ndarray
    ok: np.ndarray
    errors: dict[int, str]

    @property
    def size(self) -> int:
        return len(self.ok)


def _load_batch(
    root: Path,
    paths: Sequence[str],
    start: int,
    size: int,
    preprocess: Callable[[np.ndarray], np.ndarray],
) -> Batch:
    images, ok, errors = [], np.zeros(len(paths), dtype=bool), {}
    for offset, rel in enumerate(paths):
        try:
            images.append(load_image(root / rel, size))
            ok[offset] = True
        except ImageError as exc:
            errors[offset] = str(exc)
    raw = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return Batch(start, preprocess(raw), ok, errors)


def _lower_thread_priority() -> None:
    """Run this decoding thread at the lowest CPU priority (Linux: nice 19).

    On a CPU-bound machine the backbone's thread pool waits for its slowest
    shard, so a decoder competing at equal priority stalls every op. At nice 19
    decoders use the forward pass's idle gaps, and still get the whole CPU
    whenever the prefetch queue runs dry, so they cannot starve. Measured on
    2 cores (MobileNetV2, 224): 0.87 of the pure forward pass at equal
    priority, 0.98 to 1.0 at nice 19.
    """
    if sys.platform.startswith("linux"):  # elsewhere the id is not a thread's
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def default_workers() -> int:
    """Decoding threads: one per core, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def skipped_images(
    batch: Any, paths: Sequence[str], log: Callable[[str], Any] | None = None
) -> list[tuple[str, str]]:
    """A batch's unreadable images as ``(path, reason)`` pairs, each also logged as one
    ``skipped <path>: <reason>`` line when ``log`` is given (any batch with ``start`` and
    ``errors``: :func:`iter_batches`'s, or :func:`pipeline.views.iter_view_batches`')."""
    found = [(paths[batch.start + offset], reason) for offset, reason in batch.errors.items()]
    if log is not None:
        for path, reason in found:
            log(f"skipped {path}: {reason}")
    return found


def iter_batches(
    root: str | Path,
    paths: Sequence[str],
    *,
    size: int,
    batch_size: int,
    preprocess: Callable[[np.ndarray], np.ndarray],
    start: int = 0,
    workers: int | None = None,
    prefetch: int | None = None,
) -> Iterator[Batch]:
    """Yield preprocessed batches of ``paths[start:]``, in order, decoded ahead.

    Parameters
    ----------
    root : path
        Folder the relative ``paths`` start from.
    paths : sequence of str
        Image paths relative to ``root``.
    size : int
        Square side images are resized to.
    batch_size : int
        Records per batch (the last one may be shorter).
    preprocess : callable
        Maps a uint8 ``(n, size, size, 3)`` batch to the model's float input.
    start : int
        First record to load (resuming a run).
    workers : int, optional
        Decoding threads (default: one per core, at most 8).
    prefetch : int, optional
        Batches decoded ahead of the consumer (default ``workers + 1``).
    """
    root = Path(root)
    workers = workers or default_workers()
    prefetch = prefetch or workers + 1
    starts = iter(range(start, len(paths), batch_size))
    pending: deque[Future[Batch]] = deque()
    with ThreadPoolExecutor(
        max_workers=workers, thread_name_prefix="decode", initializer=_lower_thread_priority
    ) as pool:

        def submit_next() -> None:
            first = next(starts, None)
            if first is not None:
                chunk = paths[first : first + batch_size]
                pending.append(pool.submit(_load_batch, root, chunk, first, size, preprocess))

        for _ in range(prefetch):
            submit_next()
        try:
            while pending:
                batch = pending.popleft().result()
                submit_next()
                yield batch
        finally:
            for future in pending:
                future.cancel()
