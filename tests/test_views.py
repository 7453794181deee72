"""Multi-view stage one (pipeline.features.views): the plain view is today's, views are recorded."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.data.folders import SplitConfig
from pipeline.features import views
from pipeline.features.cache import load_features, read_attrs
from pipeline.features.config import FeatureConfig, cache_path_for, resolve_features
from pipeline.features.extract import extract_features

BASE = FeatureConfig(backbone="mobilenet_v2", weights="none", input_size=32, batch_size=8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from conftest import COLOURS, make_folder

    root = tmp_path_factory.mktemp("views")
    return make_folder(root / "colours", per_class=5, classes=tuple(COLOURS))


def _extract(folder, config, artifacts):
    return extract_features(
        folder, config, split=SplitConfig(seed=0), artifacts_dir=artifacts, progress=False
    )


def test_parse_views():
    assert views.parse_views(None, input_size=224) is None
    assert views.parse_views("224", input_size=224) is None  # the plain view
    v = views.parse_views("224,320,448+flip", combine="concat", input_size=224)
    assert v.scales == (224, 320, 448) and v.flip and not v.crops
    assert v.tag == "views-224-320-448-flip-concat" and v.text() == "224,320,448+flip"
    assert v.count == 6 and v.width(1280) == 3840
    assert views.parse_views("+flip+crops", input_size=224).count == 10
    with pytest.raises(PipelineError, match="VIEWS"):
        views.parse_views("224+mirror", input_size=224)
    with pytest.raises(PipelineError, match="VIEWS"):
        views.parse_views("20", input_size=224, minimum=32)
    with pytest.raises(PipelineError, match="COMBINE"):
        views.parse_views("224", combine="sum", input_size=224)


def test_default_view_keeps_todays_name_and_identity(tmp_path):
    plain = resolve_features(BASE)
    single = resolve_features(replace(BASE, views="32"))
    assert single.views is None and single.cache_stem == plain.cache_stem
    assert cache_path_for("d", replace(BASE, views="32"), tmp_path) == cache_path_for(
        "d", BASE, tmp_path
    )
    flipped = resolve_features(replace(BASE, views="+flip"))
    assert flipped.cache_stem == "mobilenet_v2_32_avg_views-32-flip-mean_random"
    with pytest.raises(PipelineError, match="INPUT_SIZE"):
        resolve_features(replace(BASE, views="48,64"))


def test_single_view_model_equals_todays_forward():
    """The multi-view code path with one view computes exactly stage one's features."""
    from pipeline.features import backbones
    from pipeline.features.extractor import forward_batch

    model = backbones.build_feature_extractor("mobilenet_v2", weights="none", input_size=32)
    x = np.random.default_rng(0).uniform(-1, 1, (5, 32, 32, 3)).astype(np.float32)
    mv = views.MultiViewModel({32: model}, views.Views(scales=(32,)), batch_size=8)
    np.testing.assert_array_equal(mv.features({32: x}), forward_batch(model, x, 8))


def test_views_in_one_pass(folder, tmp_path):
    import keras

    art = tmp_path / "artifacts"
    keras.utils.set_random_seed(0)
    plain = _extract(folder, BASE, art)
    assert _extract(folder, replace(BASE, views="32"), art).status == "up to date"
    keras.utils.set_random_seed(0)  # the same random weights for the 32 px model
    concat = _extract(folder, replace(BASE, views="32,48", combine="concat"), art)
    a, c = load_features(plain.cache_path), load_features(concat.cache_path)
    assert c.features.shape == (len(a.features), 2 * a.features.shape[1])
    np.testing.assert_allclose(c.features[:, : a.features.shape[1]], a.features, rtol=1e-5)
    attrs = read_attrs(concat.cache_path)
    assert attrs["views"] == "32,48" and attrs["views_combine"] == "concat"
    assert (
        '"views"' in attrs["config_json"]
        and '"views"' not in read_attrs(plain.cache_path)["config_json"]
    )
    again = FeatureConfig.from_cache_attrs(attrs)
    assert again.views == "32,48" and again.combine == "concat"
    flip = _extract(folder, replace(BASE, views="+flip+crops"), art)
    assert load_features(flip.cache_path).features.shape == a.features.shape
    assert "views-32-flip-crops-mean" in flip.cache_path.name


def test_flip_and_crops_are_averaged():
    class Probe:  # a "model" returning the mean pixel of each image: views are visible
        output_shape = (None, 3)

        def predict_on_batch(self, x):
            return x.mean(axis=(1, 2))

    x = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    big = np.arange(2 * 5 * 5 * 3, dtype=np.float32).reshape(2, 5, 5, 3)
    v = views.Views(scales=(4,), flip=True, crops=True)
    assert views.crop_source(4) == 5
    mv = views.MultiViewModel({4: Probe()}, v, batch_size=2)
    expected = (
        x.mean(axis=(1, 2)) * 2 + 2 * sum(c.mean(axis=(1, 2)) for c in views.corner_crops(big, 4))
    ) / 10
    np.testing.assert_allclose(mv.features({4: x, 5: big}), expected, rtol=1e-6)
