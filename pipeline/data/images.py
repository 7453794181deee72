"""Reading image folders: layout, splits, decoding, and batches for the backbone.

Pure NumPy and Pillow, no TensorFlow: the same input pipeline serves every Keras
backend. Decoding and preprocessing run on a thread pool (Pillow and NumPy
release the GIL), a few batches ahead of the forward pass, so memory stays
bounded by ``prefetch * batch_size`` images whatever the data set's size.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import os
import sys
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.core.errors import PipelineError
from pipeline.data.folders import shown

# The most pixels an image may have once decoded (after JPEG's reduced-scale decoding):
# Pillow's default bomb limit, about 256 MiB of RGB. Larger images are skipped with a
# reason. Pillow's own guard (``PIL.Image.MAX_IMAGE_PIXELS``) applies as well when set lower.
MAX_IMAGE_PIXELS = 89_478_485
# Decode JPEGs at the smallest DCT scale (1/2, 1/4, 1/8) whose sides stay at least
# JPEG_DRAFT times the target side (Pillow's draft mode); 0 turns it off (to measure it).
JPEG_DRAFT = 1.0


class ImageError(ValueError):
    """An image that cannot be used; the message is the reason it was skipped."""


def load_image(path: str | Path, size: int) -> np.ndarray:
    """Decode one image to a ``(size, size, 3)`` uint8 RGB array.

    EXIF orientation is applied; grayscale, palette, CMYK and 16-bit images are
    converted to RGB; transparent pixels are composited onto white. The image is
    resized to a square without keeping its aspect ratio, as Keras's loaders do
    (:func:`resize_square`: bilinear without antialiasing, as ``tf.image.resize``).

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
            with Image.open(path) as image:  # the header only, so far
                jpeg, full = _plain_jpeg(image), image.size
                if image.format == "JPEG" and JPEG_DRAFT:
                    # Decode at a reduced DCT scale when the file is large enough.
                    side = max(1, math.ceil(size * JPEG_DRAFT))
                    image.draft("RGB", (side, side))
                _check_pixels(image)
                if jpeg is not None:
                    return _opencv_jpeg(jpeg, image, size, _draft_scale(full, image.size))
                image.load()
                return _to_rgb_array(_oriented(image), size)
    except (ImageError, PipelineError):  # PipelineError: not this image's fault (no OpenCV)
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image Pillow can read (unknown or corrupt format)") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"too large to decode safely: {exc}") from None
    except OSError as exc:
        if exc.errno is not None:  # the system refused the read (permissions, I/O): not the bytes
            raise ImageError(f"cannot read the file: {exc.strerror or exc}") from None
        raise ImageError(f"corrupt or truncated image: {exc}") from None
    except (ValueError, SyntaxError) as exc:
        raise ImageError(f"corrupt or truncated image: {exc}") from None


def _plain_jpeg(image: Image.Image) -> np.ndarray | None:
    """The file's bytes when OpenCV may decode it instead of Pillow: a whole
    baseline-or-progressive RGB or grayscale JPEG that needs no EXIF rotation; ``None`` for
    everything else, which Pillow decodes. Read from the file Pillow opened, once."""
    if image.format != "JPEG" or image.mode not in ("RGB", "L"):
        return None
    if image.getexif().get(0x0112, 1) != 1:  # orientation: Pillow's transpose does it
        return None
    image.fp.seek(0)  # Pillow seeks to each tile itself if it decodes after all
    data = np.frombuffer(image.fp.read(), np.uint8)
    # a truncated file lacks its end marker: Pillow decodes it, and says what is wrong
    return data if data[-2:].tobytes() == b"\xff\xd9" else None


def _draft_scale(full: tuple[int, int], drafted: tuple[int, int]) -> int:
    """The DCT scale (1, 2, 4 or 8) that turned ``full`` into ``drafted`` (sides rounded up)."""
    for scale in (8, 4, 2):
        if all(-(-side // scale) == got for side, got in zip(full, drafted, strict=True)):
            return scale
    return 1


def _opencv_jpeg(data: np.ndarray, image: Image.Image, size: int, scale: int) -> np.ndarray:
    """Decode with OpenCV at the DCT ``scale`` (1, 2, 4, 8) Pillow's draft chose (the same
    libjpeg-turbo decoding, without Pillow's copies), then resize."""
    cv2 = _opencv()
    grey = image.mode == "L"
    flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
             8: cv2.IMREAD_REDUCED_COLOR_8}  # fmt: skip
    if grey:
        flags = {1: cv2.IMREAD_GRAYSCALE, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
                 4: cv2.IMREAD_REDUCED_GRAYSCALE_4, 8: cv2.IMREAD_REDUCED_GRAYSCALE_8}  # fmt: skip
    array = cv2.imdecode(data, flags.get(scale, flags[1]) | cv2.IMREAD_IGNORE_ORIENTATION)
    if array is None:
        raise ImageError("corrupt or truncated image: OpenCV cannot decode it")
    array = resize_square(array, size)
    if grey:
        return np.repeat(array[:, :, None], 3, axis=2)
    return np.ascontiguousarray(array[:, :, ::-1])  # OpenCV's BGR to RGB


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
            f"the limit of {limit} (pipeline.data.images.MAX_IMAGE_PIXELS)"
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
    array = resize_square(np.asarray(image), size)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return array


@functools.cache
def _opencv() -> Any:
    try:
        import cv2  # opencv-python-headless, a dependency
    except ImportError:
        raise PipelineError(
            "decoding images needs OpenCV, which is not installed: "
            "pip install opencv-python-headless (or make install)"
        ) from None

    cv2.setNumThreads(1)  # the decoding threads are the parallelism; no pool inside each
    return cv2


# How :func:`resize_square` resizes, in every cache's identity: caches written before it
# (no ``resize`` there) resized with Pillow's antialiased bilinear, other features.
RESIZE = "bilinear"


def resize_square(array: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 ``(H, W)`` or ``(H, W, C)`` array to ``(size, size[, C])``: bilinear
    with half-pixel centres and no antialiasing (OpenCV's ``INTER_LINEAR``).

    This is ``tf.image.resize``'s default, Keras's loaders' and the ImageNet training
    pipelines': on cats_and_dogs it gave every head 0 to 6 more right val images of 1,000
    than Pillow's antialiased bilinear, in a fifth to a third of the time (docs/benchmarks.md).
    """
    if array.shape[0] == size and array.shape[1] == size:
        return np.ascontiguousarray(array)
    cv2 = _opencv()
    return cv2.resize(np.ascontiguousarray(array), (size, size), interpolation=cv2.INTER_LINEAR)


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
    ``errors``: :func:`iter_batches`'s, or :func:`pipeline.features.views.iter_view_batches`')."""
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
