"""The embedded demo data set: scikit-learn's digits as a folder of PNG files.

1797 real 8x8 grayscale scans of handwritten digits, 10 classes, shipped inside
scikit-learn (no download). Writing them out as ``<out>/<digit>/<n>.png`` lets
the demo run exactly the folder-reading code a user's own data goes through.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.artifacts import Artifacts


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
        path = out / str(label) / f"digit_{index:04d}.png"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        Image.fromarray(image, mode="L").save(tmp, format="PNG")
        tmp.replace(path)
    return out
