"""Real ImageNet weights on real data (only where ../shared/assets exists).

A wrong preprocessing mode, channel order or weight loading would fail these:
random weights give about 0.6 on hymenoptera, ImageNet MobileNetV2 about 0.93.
"""

from __future__ import annotations

import pytest
from conftest import ASSETS, needs_assets
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.features.cache import load_features
from pipeline.features.config import FeatureConfig
from pipeline.features.extract import extract_features

MOBILENET_V2 = (
    ASSETS / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
)
HYMENOPTERA = ASSETS / "datasets" / "hymenoptera_data"

pytestmark = [
    pytest.mark.real_data,
    needs_assets("weights"),
    needs_assets("datasets", "hymenoptera_data"),
]


def test_mobilenet_v2_imagenet_features_of_hymenoptera_are_linearly_separable(tmp_path):
    summary = extract_features(
        HYMENOPTERA,
        FeatureConfig(backbone="mobilenet_v2", weights=str(MOBILENET_V2)),
        artifacts_dir=tmp_path,
        progress=False,
    )
    # 397 photos plus train/ants/imageNotFound.gif, a real (placeholder) GIF
    assert summary.extracted == 398 and not summary.skipped
    features = load_features(summary.cache_path)
    assert features.class_names == ("ants", "bees") and features.splits == ("train", "val")
    X_train, y_train = features.select("train")
    X_val, y_val = features.select("val")
    assert (len(y_train), len(y_val)) == (245, 153)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, C=0.1))
    accuracy = probe.fit(X_train, y_train).score(X_val, y_val)
    assert accuracy >= 0.93, f"linear probe reached only {accuracy:.3f}"
