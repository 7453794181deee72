"""The data audit on real features (slow tier): planted label flips in cats and dogs are
recovered, and hymenoptera's placeholder image is an outlier. Skipped without the assets.

Stage one runs once per session into ``AUDIT_TEST_ARTIFACTS`` (a folder to reuse between
runs) or a temporary folder.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import ASSETS, needs_assets

from pipeline.audit import audit
from pipeline.audit.labels import audit_labels
from pipeline.features.cache import load_features

pytestmark = [pytest.mark.slow, pytest.mark.real_data]
WEIGHTS = "weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return os.environ.get("AUDIT_TEST_ARTIFACTS") or tmp_path_factory.mktemp("audit-real")


def _cache(name: str, artifacts) -> str:
    from pipeline.features.config import FeatureConfig
    from pipeline.features.extract import extract_features

    summary = extract_features(
        ASSETS / "datasets" / name, FeatureConfig(), artifacts_dir=artifacts, progress=False
    )
    return summary.cache_path


@needs_assets("datasets", "cats_and_dogs_filtered")
@needs_assets(WEIGHTS)
def test_flipped_labels_in_cats_and_dogs_are_recovered(artifacts):
    fs = load_features(_cache("cats_and_dogs_filtered", artifacts))
    rng = np.random.default_rng(0)
    labels = fs.labels.copy()
    flipped = np.concatenate(
        [rng.choice(np.flatnonzero(labels == c), int(0.05 * np.sum(labels == c)), replace=False)
         for c in (0, 1)]
    )  # fmt: skip
    labels[flipped] = 1 - labels[flipped]
    found = audit_labels(fs.features, labels, cv=3, seed=0)
    k = len(flipped)
    recall = len(set(found.ranked[: 2 * k].tolist()) & set(flipped.tolist())) / k
    assert recall >= 0.8, recall
    flagged = set(found.issues.tolist())
    precision = len(flagged & set(flipped.tolist())) / max(1, len(flagged))
    print(f"k={k} recall@2k={recall:.3f} flagged={len(flagged)} precision={precision:.3f}")
    assert precision >= 0.5, precision


@needs_assets("datasets", "hymenoptera_data")
@needs_assets(WEIGHTS)
def test_the_placeholder_image_is_an_outlier(artifacts):
    result = audit(
        _cache("hymenoptera_data", artifacts), artifacts_dir=artifacts, calibration="neighbours"
    )
    outliers = [item["path"] for item in result.summary["outliers"]["items"]]
    assert "train/ants/imageNotFound.gif" in outliers, outliers
