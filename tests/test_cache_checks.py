"""The cache reader refuses damaged caches with one line each (issue 23)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from heads_helpers import write_cache

from pipeline.core.errors import CacheError
from pipeline.features.cache import FeatureRows, load_features


def _cache(tmp_path, features=None, labels=(0, 1, 0, 1), **attrs):
    features = np.ones((len(labels), 4), np.float32) if features is None else features
    splits = ["train"] * len(labels)
    return write_cache(tmp_path / "c.h5", features, np.array(labels), splits, ("a", "b"), **attrs)


def test_nan_or_infinite_features_are_one_line(tmp_path):
    x = np.ones((4, 4), np.float32)
    x[2, 1] = np.nan
    x[3, 0] = np.inf
    path = _cache(tmp_path, x)
    with pytest.raises(
        CacheError, match=r"2 image\(s\) have NaN or infinite features \(first: train/a/0002.png\)"
    ):
        load_features(path)
    with FeatureRows(path) as rows:
        assert rows.read(np.array([0, 1])).shape == (2, 4)
        with pytest.raises(CacheError, match="NaN or infinite"):
            rows.read(np.array([3]))


def test_nan_from_a_reduced_precision_says_to_use_float32(tmp_path):
    x = np.ones((4, 4), np.float32)
    x[0, 0] = np.nan
    path = _cache(tmp_path, x, precision="bf16")
    with pytest.raises(CacheError, match="PRECISION=float32"):
        load_features(path)


def test_labels_out_of_range_are_one_line(tmp_path):
    path = _cache(tmp_path)
    with h5py.File(path, "r+") as f:
        f["labels"][2] = 7
    with pytest.raises(CacheError, match=r"1 label\(s\) outside the 2 classes \(first: 7 of"):
        load_features(path)
    with pytest.raises(CacheError, match="outside the 2 classes"):
        FeatureRows(path)


def test_arrays_of_different_lengths_are_one_line(tmp_path):
    path = _cache(tmp_path)
    with h5py.File(path, "r+") as f:
        del f["labels"]
        f.create_dataset("labels", data=np.zeros(3, np.int32))
    with pytest.raises(CacheError, match=r"do not line up \(rows: features 4, labels 3, paths 4"):
        load_features(path)


def test_unknown_split_values_are_one_line(tmp_path):
    path = _cache(tmp_path)
    with h5py.File(path, "r+") as f:
        f["split"][1] = "holdout"
    with pytest.raises(CacheError, match="'holdout' are not train, val, test or unused"):
        load_features(path)
