"""The backbone registry against the Keras models it describes."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from pipeline.core.errors import BackboneError, WeightsError
from pipeline.features import backbones
from pipeline.features.backbones import (
    BACKBONES,
    build_base,
    build_feature_extractor,
    get_backbone,
    list_backbones,
    resolve_input_size,
    weights_identity,
)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BACKBONES))
def test_every_backbone_builds_at_its_minimum_size_with_the_registered_width(name):
    import keras

    spec = BACKBONES[name]
    model = build_feature_extractor(spec, weights="none", input_size=spec.min_size)
    assert model.output_shape == (None, spec.channels)
    assert model.count_params() == spec.params  # pooling adds no parameters
    assert not model.trainable
    x = spec.preprocess(np.full((1, spec.min_size, spec.min_size, 3), 128, np.uint8))
    assert model.predict_on_batch(x).shape == (1, spec.channels)
    del model
    keras.backend.clear_session()
    gc.collect()


@pytest.mark.parametrize("name", ["vgg16", "mobilenet_v2", "inception_v3", "efficientnet_b1"])
def test_flatten_width_at_default_size_matches_the_registry(name):
    spec = get_backbone(name)
    model = build_feature_extractor(spec, weights="none", pooling="flatten")
    assert model.output_shape == (None, spec.feature_width("flatten"))


def test_vgg16_flatten_keeps_the_whole_7x7x512_map():
    assert get_backbone("vgg16").feature_width("flatten") == 25088


def test_max_pooling_and_layer_cut():
    model = build_feature_extractor(
        "mobilenet_v2", weights="none", input_size=32, pooling="max", layer="block_13_expand_relu"
    )
    assert model.output_shape == (None, 576)


def test_unknown_layer_lists_valid_names():
    with pytest.raises(BackboneError, match=r"not a layer of .*some valid names: .*out_relu"):
        build_feature_extractor("mobilenet_v2", weights="none", input_size=32, layer="block_99")


@pytest.mark.parametrize("name", list(BACKBONES))
def test_preprocessing_equals_the_family_preprocess_input_and_never_touches_the_input(name):
    """Each entry against the ``preprocess_input`` of its own keras.applications module."""
    import importlib

    import keras

    spec = BACKBONES[name]
    family = importlib.import_module(getattr(keras.applications, spec.builder).__module__)
    batch = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
    original = batch.copy()
    ours = spec.preprocess(batch)
    theirs = np.asarray(family.preprocess_input(batch.astype(np.float32)))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(batch, original)


def test_names_resolve_and_unknown_names_suggest():
    assert get_backbone("ResNet50V2").name == "resnet50_v2"
    assert get_backbone("resnet50v2").name == "resnet50_v2"
    assert get_backbone("MobileNet-V2").name == "mobilenet_v2"
    with pytest.raises(BackboneError, match=r"unknown backbone 'resnet05'; did you mean resnet50"):
        get_backbone("resnet05")
    assert [s.name for s in list_backbones("vgg*")] == ["vgg16", "vgg19"]


def test_seed_table_models_are_all_registered():
    seed_table = [
        "Xception",
        "VGG16",
        "VGG19",
        "ResNet50",
        "ResNet101",
        "ResNet152",
        "ResNet50V2",
        "ResNet101V2",
        "ResNet152V2",
        "InceptionV3",
        "InceptionResNetV2",
        "MobileNet",
        "MobileNetV2",
        "DenseNet121",
        "DenseNet169",
        "DenseNet201",
        "NASNetMobile",
        "NASNetLarge",
    ]
    assert {get_backbone(n).builder for n in seed_table} == set(seed_table)


def test_input_size_below_minimum_is_refused():
    with pytest.raises(BackboneError, match="below inception_v3's minimum of 75"):
        resolve_input_size(get_backbone("inception_v3"), 64)
    assert resolve_input_size(get_backbone("inception_v3"), None) == 299


def test_weights_identity(tmp_path):
    assert weights_identity("none") == "none"
    assert weights_identity("imagenet").startswith("imagenet (keras ")
    path = tmp_path / "w.h5"
    path.write_bytes(b"abc")
    assert weights_identity(str(path)) == (
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    with pytest.raises(WeightsError, match="neither 'imagenet', 'none' nor an existing"):
        weights_identity(str(tmp_path / "missing.h5"))


def test_local_weights_file_round_trip_and_mismatch(tmp_path):
    spec = get_backbone("mobilenet_025")
    source = build_base(spec, weights="none", input_size=32)
    path = tmp_path / "m025.weights.h5"
    source.save_weights(path)
    loaded = build_base(spec, weights=str(path), input_size=32)
    for a, b in zip(source.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(WeightsError, match="does not fit backbone vgg16"):
        build_base(get_backbone("vgg16"), weights=str(path), input_size=32)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"\x00not hdf5" * 10)
    with pytest.raises(WeightsError, match="does not fit backbone mobilenet_025"):
        build_base(spec, weights=str(garbage), input_size=32)


def test_failed_imagenet_download_names_the_file_and_the_alternative(monkeypatch):
    from keras.src.utils import file_utils

    def offline(fname, origin=None, **kwargs):
        raise Exception(
            f"URL fetch failure on {origin}: None -- [Errno -2] Name or service not known"
        )

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(WeightsError) as info:
        build_base(get_backbone("vgg16"), weights="imagenet", input_size=32)
    message = str(info.value)
    assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert str(backbones.keras_cache_dir()) in message and "WEIGHTS=/path/to/" in message


@pytest.mark.parametrize("mode", ["caffe", "tf", "torch", "none"])
def test_the_batch_preprocessing_is_normalise_exactly_in_one_copy(mode):
    """The decode threads' in-place path gives normalise's very numbers, in a new C array."""
    from pipeline.features.preprocessing import normalise, normalise_batch

    batch = np.random.default_rng(1).integers(0, 256, (3, 7, 6, 3), dtype=np.uint8)
    original = batch.copy()
    fast = normalise_batch(batch, mode)
    np.testing.assert_array_equal(fast, normalise(batch.astype(np.float32), mode))
    assert fast.dtype == np.float32 and fast.flags.c_contiguous
    np.testing.assert_array_equal(batch, original)
