"""Reading back what a head's features were made of (the end-to-end rebuild is in test_predict)."""

from __future__ import annotations

import json

import pytest

from pipeline.core.errors import PredictError
from pipeline.features.rebuild import feature_parts, is_plain, parts_extractor

PLAIN = {"backbone": "mobilenet_v2", "input_size": 224, "pooling": "avg", "layer": ""}
VIEWS = {**PLAIN, "views": {"scales": [224, 320], "flip": True, "crops": False, "combine": "mean"}}


def _joined(*configs, norm="l2"):
    parts = [
        {"stem": f"s{i}", "fingerprint": "f", "config_json": json.dumps(c)}
        for i, c in enumerate(configs)
    ]
    return {"name": "svm", "config_json": json.dumps({"join_norm": norm, "parts": parts})}


def test_a_plain_cache_is_one_part_and_the_fast_path():
    parts = feature_parts({"config_json": json.dumps(PLAIN)})
    assert parts == [PLAIN] and is_plain(parts)
    assert not is_plain(feature_parts({"config_json": json.dumps(VIEWS)}))  # one part, views


def test_a_joined_cache_lists_its_parts_in_order_with_their_stems():
    parts = feature_parts(_joined(PLAIN, VIEWS))
    assert [p["stem"] for p in parts] == ["s0", "s1"] and parts[1]["views"]["scales"] == [224, 320]
    assert not is_plain(parts)


def test_damaged_records_are_one_line_refusals():
    broken = _joined(PLAIN)
    identity = json.loads(broken["config_json"])
    identity["parts"][0]["config_json"] = "{not json"
    with pytest.raises(PredictError, match="damaged"):
        feature_parts({**broken, "config_json": json.dumps(identity)})

    class Head:
        path = "heads/x/svm.json"
        manifest = {**_joined(PLAIN, PLAIN, norm="minmax"), "feature_width": 2560}

    with pytest.raises(PredictError, match="JOIN_NORM='minmax', not l2 or standard"):
        parts_extractor(Head(), feature_parts(Head.manifest), "imagenet", "artifacts")
    Head.manifest = {**_joined({**PLAIN, "backbone": "no_such_net"}, PLAIN), "feature_width": 2560}
    with pytest.raises(PredictError, match="part 1 .* damaged|part 1 .*no_such_net"):
        parts_extractor(Head(), feature_parts(Head.manifest), "imagenet", "artifacts")
