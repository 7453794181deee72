"""pipeline.features.records: the identity a stage-one cache is matched by."""

from __future__ import annotations

import json
from dataclasses import replace

from pipeline.features.config import FeatureConfig, resolve_features
from pipeline.features.records import cache_config_json, extractor_identity
from pipeline.features.runtimes import RuntimeChoice


def test_cache_identity_names_the_precision_never_the_runtime(tmp_path):
    config = FeatureConfig(backbone="mobilenet_v2", weights="none", input_size=32, runtime="keras")
    keras = resolve_features(config, artifacts_dir=tmp_path)

    identity = json.loads(cache_config_json(keras))
    assert identity.items() >= extractor_identity(keras).items()
    assert "split" not in identity and "split_source" not in identity  # a re-split, not a rebuild
    assert "runtime" not in identity and "views" not in identity  # older caches stay valid

    openvino = replace(keras, runtime=RuntimeChoice("openvino", "fp32"))
    assert json.loads(cache_config_json(openvino)) == identity
    bf16 = replace(keras, runtime=RuntimeChoice("openvino", "bf16"))
    other = json.loads(cache_config_json(bf16))
    assert (identity.pop("precision"), other.pop("precision")) == ("fp32", "bf16")
    assert other == identity  # the precision is the only difference

    views = resolve_features(replace(config, views="32,48+flip"), artifacts_dir=tmp_path)
    assert "views" in json.loads(cache_config_json(views))
