"""Joined caches (pipeline.features.joins): by image path, each part normalised, missing images dropped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import CacheError
from pipeline.features import cache, cache_writer
from pipeline.features.joins import join_caches, join_features, resolve_parts, split_features_arg


def write_cache(path: Path, paths, labels, splits, features, **attrs) -> Path:
    """A finished cache with the given rows (through the real writer)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    features = np.asarray(features, dtype=np.float32)
    writer, _ = cache_writer.CacheWriter.open(
        path,
        config_json=f'{{"name": "{path.stem}"}}',
        fingerprint="f-" + path.stem,
        paths=list(paths),
        labels=list(labels),
        splits=list(splits),
        width=features.shape[1],
        dtype="float32",
    )
    writer.write_batch(0, features, np.ones(len(labels), bool), {}, 1.0)
    writer.finalize(
        {
            "class_names": ["a", "b"],
            "dataset": "toy",
            "backbone": "mobilenet_v2",
            "weights": "imagenet (keras 3)",
            "weights_source": "imagenet",
            "input_size": 224,
            "pooling": "avg",
            "layer": "",
            "preprocessing": "tf",
            "feature_width": features.shape[1],
            "n_images": len(labels),
            "seconds": 1.0,
            **attrs,
        }
    )
    return path


def test_join_by_path_and_drop_missing(tmp_path):
    a = write_cache(
        tmp_path / "a.h5",
        ["x/1", "x/2", "y/3", "y/4"],
        [0, 0, 1, 1],
        ["train", "train", "train", "val"],
        [[3, 4], [1, 0], [0, 2], [5, 5]],
    )
    # Another order, one image fewer, one more: rows must meet by path.
    b = write_cache(
        tmp_path / "b.h5",
        ["y/4", "x/1", "z/9", "y/3"],
        [1, 0, 1, 1],
        ["val", "train", "test", "train"],
        [[4], [2], [7], [-1]],
    )
    features, labels, paths, split, notes = join_features(
        [cache.load_features(a), cache.load_features(b)], "l2"
    )
    assert list(paths) == ["x/1", "y/3", "y/4"]
    assert labels.tolist() == [0, 1, 1] and list(split) == ["train", "train", "val"]
    np.testing.assert_allclose(features[:, :2], [[0.6, 0.8], [0, 1], [2**-0.5, 2**-0.5]])
    np.testing.assert_allclose(features[:, 2], [1, -1, 1])
    assert any("a.h5" in n and "1 images" in n for n in notes)
    assert any("b.h5" in n for n in notes)

    result = join_caches([a, b], artifacts_dir=tmp_path / "art")
    assert result.status == "built" and result.width == 3 and result.n_images == 3
    fs = cache.load_features(result.path)
    assert fs.attrs["backbone"] == "a+b" and fs.attrs["join_norm"] == "l2"
    assert result.path.name == "join_a+b_l2.h5"
    np.testing.assert_allclose(fs.features, features)
    assert join_caches([a, b], artifacts_dir=tmp_path / "art").status == "up to date"


def test_standard_uses_train_statistics_only(tmp_path):
    a = write_cache(
        tmp_path / "a.h5", ["1", "2", "3"], [0, 1, 0], ["train", "train", "val"], [[1], [3], [100]]
    )
    b = write_cache(
        tmp_path / "b.h5", ["1", "2", "3"], [0, 1, 0], ["train", "train", "val"], [[0], [2], [1]]
    )
    features, *_ = join_features([cache.load_features(a), cache.load_features(b)], "standard")
    np.testing.assert_allclose(features[:, 0], [-1, 1, 98])  # val does not move the mean


def test_refusals(tmp_path):
    a = write_cache(tmp_path / "a.h5", ["1", "2"], [0, 1], ["train", "train"], [[1], [2]])
    b = write_cache(tmp_path / "b.h5", ["1", "2"], [1, 1], ["train", "train"], [[1], [2]])
    with pytest.raises(CacheError, match="another class or split"):
        join_features([cache.load_features(a), cache.load_features(b)])
    with pytest.raises(CacheError, match="two caches"):
        resolve_parts([a])
    with pytest.raises(CacheError, match="not a cache file"):
        resolve_parts([a, tmp_path / "missing.h5"])
    assert resolve_parts(["a", "b.h5"], tmp_path) == [a, b]
    assert split_features_arg("a.h5+b.h5, c") == ["a.h5", "b.h5", "c"]
    with pytest.raises(CacheError, match="JOIN_NORM"):
        join_features([cache.load_features(a)], "max")
