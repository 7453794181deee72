"""Synthetic stage-one features for timing the heads on many classes (``make bench-heads
CLASSES=100 ROWS=3000``): no images, no backbone.

The rows imitate a CNN's global-average-pooled features (MobileNetV2's on digits: a quarter
of the values exactly zero, the median a fifth of the mean, a long upper tail): each
feature has its own scale (log-normal), each class shifts every feature by a Gaussian
offset within a 64-dimensional subspace, and each image adds white noise and nuisance
variation inside that same subspace (lighting, pose) before a ReLU. ``separation`` sets the
class offsets against the noise; the default gives ridge about 0.94 and 5-nearest
neighbours about 0.33 on val for 100 classes of 30 training images: neither chance nor
perfect.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.features.cache_writer import CacheWriter

SEPARATION = 0.4  # class offsets' scale; calibrated on 100 classes x 30 images (docstring)
_RANK = 64  # the subspace the classes differ in; nuisance shares it, white noise does not
_NUISANCE = 0.08  # per direction of that subspace
_WHITE = 0.6  # noise in every feature


def synthetic_features(
    rows: int, classes: int, width: int = 1280, *, separation: float = SEPARATION, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` ReLU-like feature vectors (float32, non-negative) and their balanced labels.

    The class means (and the features' scales) depend only on ``classes``, ``width`` and
    ``seed``; the images drawn depend on ``rows`` too.
    """
    if rows < 2 * classes:
        raise ValueError(f"rows ({rows}) must be at least twice the classes ({classes})")
    model = np.random.default_rng(seed)
    scale = np.exp(model.normal(np.log(0.3), 1.0, size=width)).astype(np.float32)
    basis = model.normal(0.0, 1.0 / np.sqrt(_RANK), size=(_RANK, width))
    offsets = (model.normal(0.0, separation, size=(classes, _RANK)) @ basis).astype(np.float32)
    nuisance = (_NUISANCE * model.normal(size=(_RANK, _RANK)) @ basis).astype(np.float32)
    rng = np.random.default_rng([seed, rows])
    y = np.arange(rows) % classes
    rng.shuffle(y)
    X = _WHITE * rng.standard_normal((rows, width), dtype=np.float32)
    X += rng.standard_normal((rows, _RANK), dtype=np.float32) @ nuisance
    X += offsets[y]
    X += 0.5  # about a quarter to a third of the values are exact zeros after the ReLU
    np.maximum(X, 0.0, out=X)
    X *= scale
    return X, y.astype(np.int64)


def write_synthetic_cache(
    path: str | Path,
    rows: int,
    classes: int,
    width: int = 1280,
    *,
    val_rows: int | None = None,
    seed: int = 0,
    seconds: float | None = None,
) -> Path:
    """A stage-one cache of ``rows`` train and ``val_rows`` (default a fifth) val images of
    synthetic features, written through the real cache writer; ``seconds`` is recorded as
    the extraction time (what the heads' time is divided by)."""
    val_rows = max(2 * classes, rows // 5) if val_rows is None else val_rows
    X, y = synthetic_features(rows + val_rows, classes, width, seed=seed)
    splits = ["train"] * rows + ["val"] * val_rows
    names = [f"class_{c:03d}" for c in range(classes)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer, _ = CacheWriter.open(
        path,
        config_json='{"synthetic": 1}',
        fingerprint="5" * 64,
        paths=[
            f"{s}/{names[c]}/{i:06d}.png" for i, (s, c) in enumerate(zip(splits, y, strict=True))
        ],
        labels=[int(v) for v in y],
        splits=splits,
        width=width,
        dtype="float32",
    )
    writer.write_batch(0, X, np.ones(len(X), dtype=bool), {}, 1.0)
    writer.finalize(
        {
            "backbone": "synthetic",
            "weights": "none",
            "weights_source": "none",
            "input_size": 224,
            "pooling": "avg",
            "layer": "",
            "preprocessing": "none",
            "precision": "float32",
            "dataset": f"synthetic-{classes}x{rows}",
            "seconds": float(seconds) if seconds is not None else 0.0,
            "class_names": names,
            "feature_width": width,
            "n_images": len(X),
            "n_skipped": 0,
        }
    )
    return path
