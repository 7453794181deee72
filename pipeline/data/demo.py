"""Data sets made here as folders of images: the demo's digits, and two unlike ImageNet.

- :func:`write_digits`: 1797 real 8x8 grayscale scans of handwritten digits, 10
  classes, shipped inside scikit-learn (no download). Writing them out as
  ``<out>/<digit>/<n>.png`` lets the demo run exactly the folder-reading code a
  user's own data goes through.
- :func:`write_textures`: patches of the real texture photographs scikit-image
  ships (brick, grass, gravel, the moon's surface), train and val cut from
  opposite halves of each photograph so no pixel is in both.
- :func:`write_small_blurred`: a folder's images shrunk to a few dozen pixels and
  blurred, split folders kept.

The last two are the "data the project has never seen" of ``make check-unseen``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.core.artifacts import Artifacts
from pipeline.core.errors import PipelineError
from pipeline.core.files import write_atomic
from pipeline.data.folders import images_under


def write_digits(out_dir: str | Path | None = None) -> Path:
    """Write the digits data set as class folders of PNG images; return the folder.

    Existing identical files are left alone (their modification times stay), so
    a second call does not invalidate feature caches built from the first.

    Examples
    --------
    >>> folder = write_digits("artifacts/data/digits")
    >>> sorted(p.name for p in folder.iterdir())[:3]
    ['0', '1', '2']
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = Path(out_dir) if out_dir is not None else Artifacts().data_dir("digits")
    # Pixel values are 0..16; stretch them to the full 8-bit range.
    pixels = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    for index, (image, label) in enumerate(zip(pixels, digits.target, strict=True)):
        _save_png(image, out / str(label) / f"digit_{index:04d}.png")
    return out


TEXTURES = ("brick", "grass", "gravel", "moon")  # scikit-image's bundled photographs


def write_textures(
    out_dir: str | Path | None = None,
    *,
    size: int = 96,
    train_per_class: int = 40,
    val_per_class: int = 20,
    seed: int = 0,
) -> Path:
    """Write ``<out>/{train,val}/<texture>/<n>.png``: random ``size`` crops, turned by a
    random right angle, of scikit-image's texture photographs (:data:`TEXTURES`).

    Train crops come from the left half of each 512 x 512 photograph, val crops from
    the right half. Needs scikit-image (``pip install -e '.[unseen]'``).
    """
    try:
        import skimage.data
    except ImportError:
        raise PipelineError(
            "the textures come from scikit-image: pip install -e '.[unseen]' (or scikit-image)"
        ) from None
    rng = np.random.default_rng(seed)
    out = Path(out_dir) if out_dir is not None else Artifacts().data_dir("textures")
    for name in TEXTURES:
        photo = np.asarray(getattr(skimage.data, name)(), dtype=np.uint8)
        half = photo.shape[1] // 2
        for split, count, left in (("train", train_per_class, 0), ("val", val_per_class, half)):
            for index in range(count):
                top = int(rng.integers(0, photo.shape[0] - size + 1))
                x0 = left + int(rng.integers(0, half - size + 1))
                patch = np.rot90(photo[top : top + size, x0 : x0 + size], int(rng.integers(4)))
                _save_png(patch, out / split / name / f"{name}_{index:03d}.png")
    return out


def write_small_blurred(
    source: str | Path, out_dir: str | Path, *, side: int = 48, radius: float = 1.0
) -> tuple[Path, list[tuple[str, str]]]:
    """Every image under ``source`` shrunk to ``side`` pixels on its long side and blurred
    (Gaussian, ``radius`` pixels), as PNG at the same relative path; unreadable files are
    skipped and returned with the reason. Returns ``(out folder, skipped)``."""
    from PIL import ImageFilter, ImageOps, UnidentifiedImageError

    source, out = Path(source).resolve(), Path(out_dir).resolve()
    if out == source or source in out.parents:
        raise PipelineError(f"write the small blurred copies outside {source}, not in {out}")
    skipped, written = [], set()
    for path in images_under(source):
        relative = path.relative_to(source)
        target = (out / relative).with_suffix(".png")
        if target in written:  # a.jpg and a.png: one PNG name
            skipped.append((str(relative), f"another image there is also written as {target.name}"))
            continue
        try:
            with Image.open(path) as image:
                image = ImageOps.exif_transpose(image).convert("RGB")  # as stage one turns it
                image.thumbnail((side, side), Image.Resampling.LANCZOS)
                small = image.filter(ImageFilter.GaussianBlur(radius))
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
            skipped.append((str(relative), str(exc).splitlines()[0][:120]))
            continue
        _save_png(np.asarray(small), target)
        written.add(target)
    return out, skipped


def _save_png(pixels: np.ndarray, path: Path) -> None:
    if path.exists():  # identical inputs give identical files: keep caches valid
        return
    image = Image.fromarray(np.ascontiguousarray(pixels))
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))
