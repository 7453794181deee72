"""Synthetic feature caches for the stage-two tests (no backbone, no images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.features.cache_writer import CacheWriter

BASE_ATTRS = {
    "backbone": "mobilenet_v2",
    "weights": "none",
    "weights_source": "none",
    "input_size": 32,
    "pooling": "avg",
    "layer": "",
    "preprocessing": "tf",
    "precision": "float32",
    "dataset": "synthetic",
    "seconds": 10.0,
}


def blobs(n_per_class: int, n_classes: int, width: int, *, separation: float, seed: int = 0):
    """Gaussian blobs: ``separation`` 0 gives labels unrelated to the features."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, separation, size=(n_classes, width))
    X = np.concatenate([c + rng.normal(0, 1, size=(n_per_class, width)) for c in centres])
    y = np.repeat(np.arange(n_classes), n_per_class)
    return X.astype(np.float32), y


def write_cache(
    path: Path,
    features: np.ndarray,
    labels: np.ndarray,
    splits: list[str] | np.ndarray,
    class_names: tuple[str, ...],
    **attrs,
) -> Path:
    """A finished cache file with these rows, written through the real cache writer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [
        f"{s}/{class_names[int(c)]}/{i:04d}.png"
        for i, (s, c) in enumerate(zip(splits, labels, strict=True))
    ]
    writer, _ = CacheWriter.open(
        path,
        config_json='{"synthetic": 1}',
        fingerprint="f" * 64,
        paths=names,
        labels=[int(v) for v in labels],
        splits=list(splits),
        width=features.shape[1],
        dtype="float32",
    )
    ok = np.ones(len(features), dtype=bool)
    writer.write_batch(0, features, ok, {}, 1.0)
    full = {
        **BASE_ATTRS,
        "class_names": list(class_names),
        "feature_width": int(features.shape[1]),
        "n_images": len(features),
        "n_skipped": 0,
        **attrs,
    }
    writer.finalize(full)
    return path


def synthetic_cache(
    tmp: Path,
    *,
    n_classes: int = 3,
    width: int = 16,
    separation: float = 3.0,
    per_class: int = 20,
    seed: int = 0,
    **attrs,
) -> Path:
    """train/val/test = 60/20/20 % per class of separable (or not) blobs."""
    X, y = blobs(per_class, n_classes, width, separation=separation, seed=seed)
    split = np.array(["train"] * len(y), dtype=object)
    for c in range(n_classes):
        rows = np.flatnonzero(y == c)
        split[rows[: per_class // 5]] = "val"
        split[rows[per_class // 5 : 2 * (per_class // 5)]] = "test"
    names = tuple(f"class{c}" for c in range(n_classes))
    return write_cache(
        tmp / "artifacts" / "features" / "synthetic" / "synth.h5", X, y, split, names, **attrs
    )
