"""The layer probe (pipeline.recipes.probe): one forward pass, several cut layers, CV on train."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.errors import BackboneError, DataError
from pipeline.data.folders import SplitConfig
from pipeline.features import backbones
from pipeline.features.config import FeatureConfig
from pipeline.recipes import probe


def test_multi_output_model_equals_separate_cut_models():
    import keras

    keras.utils.set_random_seed(0)
    base = backbones.build_base(
        backbones.get_backbone("mobilenet_v2"), weights="none", input_size=32
    )
    layers = probe.stage_ends(base)
    assert layers[-1] == "out_relu" and len(layers) >= 3
    model = probe.build_probe_model(base, layers)
    x = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    together = model.predict_on_batch(x)
    for name, out in zip(layers, together, strict=True):
        keras.utils.set_random_seed(0)  # the same random weights, a model of its own
        alone = backbones.build_feature_extractor(
            "mobilenet_v2", weights="none", input_size=32, layer=name
        )
        np.testing.assert_allclose(np.asarray(out), alone.predict_on_batch(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(BackboneError, match="not a layer"):
        probe.build_probe_model(base, ["block_99_add"])


def test_run_probe_writes_json_and_plot(tmp_path):
    from conftest import COLOURS, make_folder

    data = make_folder(tmp_path / "colours", per_class=8, classes=tuple(COLOURS))
    config = FeatureConfig(backbone="mobilenet_v2", weights="none", input_size=32, batch_size=8)
    result = probe.run_probe(
        data, config, split=SplitConfig(seed=0), folds=3, artifacts_dir=tmp_path / "art"
    )
    assert result.json_path.is_file() and result.png_path.read_bytes()[:4] == b"\x89PNG"
    assert [row["name"] for row in result.layers][-1] == "out_relu"
    assert all(0.0 <= row["cv_mean"] <= 1.0 for row in result.layers)
    from pipeline.data.folders import scan_folder

    train = [r for r in scan_folder(data, SplitConfig(seed=0)).records if r.split == "train"]
    assert result.n_train == len(train) < 24  # train only
    assert "<- best" in result.format()
    again = probe.run_probe(
        data, config, split=SplitConfig(seed=0), folds=3, artifacts_dir=tmp_path / "art"
    )
    assert again.notes and again.layers == result.layers  # reused


def test_a_class_of_one_train_image_is_left_out_and_the_folds_reported_are_those_scored():
    from pipeline.recipes.probe import cv_scores, probe_rows

    rng = np.random.default_rng(0)
    y = np.array([0, 0, 0, 1, 1, 1, 2])
    keep, folds, notes = probe_rows(y, 3, ("a", "b", "c"))
    assert keep.tolist() == [True] * 6 + [False] and folds == 3
    assert notes == ["class 'c' has 1 train image: left out of the probe (no fold can hold it out)"]
    x = rng.normal(size=(len(y), 4)) + y[:, None]
    assert len(cv_scores(x[keep], y[keep], folds=folds)) == folds
    with pytest.raises(DataError, match="two classes of at least 2 train images"):
        probe_rows(np.array([0, 0, 1]), 3, ("a", "b"))
