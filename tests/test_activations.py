"""Stage three on cached activations: the cut, the caches, the top model, resume, the export.

MobileNetV2 with random weights at 32x32 on a tiny colour folder.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import COLOURS, make_folder

from pipeline.data.folders import SplitConfig
from pipeline.features import cache_writer
from pipeline.features.cache import FeatureRows
from pipeline.features.config import FeatureConfig
from pipeline.features.extract import extract_features
from pipeline.finetuning import activations
from pipeline.finetuning import run as ft

REPO = Path(__file__).resolve().parents[1]
TINY = ft.FinetuneConfig(
    FeatureConfig(weights="none", input_size=32, batch_size=8),
    head_epochs=2, epochs=2, unfreeze="block", aug_copies=3, phase_two="activations",
)  # fmt: skip


@pytest.fixture(scope="module")
def base():
    from pipeline.features.backbones import build_base, get_backbone

    return build_base(get_backbone("mobilenet_v2"), weights="none", input_size=32)


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("acts") / "colours", 8, tuple(COLOURS))


def _images(folder: Path, paths) -> np.ndarray:
    from pipeline.data.images import load_image

    return np.stack([load_image(folder / p, 32) for p in paths]).astype(np.float32)


# --- the cut and the top model ---------------------------------------------------------------


def test_the_cut_of_the_last_block_is_the_last_add_before_it(base):
    from pipeline.finetuning.freezing import last_block_size

    assert activations.find_cut(base, last_block_size(base)).layer == "block_15_add"
    assert activations.find_cut(base, 12).layer == "block_14_add"  # block_15 has a residual
    assert activations.find_cut(base, 153) is None  # nothing frozen: nothing to cache


@pytest.mark.parametrize("layers", [0, 5, 11, 12, 40])
def test_top_model_on_the_frozen_part_equals_the_whole_model(base, layers):
    import keras

    from pipeline.heads.softmax import build_softmax_head

    keras.utils.set_random_seed(0)
    head = build_softmax_head(1280, 3)
    cut = activations.find_cut(base, layers)
    x = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    cached = activations.frozen_part(base, cut).predict_on_batch(x).reshape(4, -1)
    top = activations.build_top_model(base, head, cut)
    pooled = keras.layers.GlobalAveragePooling2D()(base(x, training=False))
    whole = keras.ops.convert_to_numpy(head(pooled, training=False))
    np.testing.assert_allclose(top.predict_on_batch(cached), whole, atol=1e-5)


# --- the caches ------------------------------------------------------------------------------


def test_the_cut_cache_equals_the_frozen_part_run_directly(base, colours, tmp_path):
    import keras

    from pipeline.features.backbones import build_base, get_backbone

    cut = activations.find_cut(base, 11)
    config = activations.cut_config(TINY.features, cut)
    keras.utils.set_random_seed(0)  # WEIGHTS=none: finetune seeds stage one as its own base
    summary = extract_features(colours, config, artifacts_dir=tmp_path, progress=False)
    assert summary.cache_path.name == "mobilenet_v2_32_flatten_block-15-add_random.h5"
    spec = get_backbone("mobilenet_v2")
    keras.utils.set_random_seed(0)
    same = build_base(spec, weights="none", input_size=32)
    keras.utils.set_random_seed(1)
    other = build_base(spec, weights="none", input_size=32)
    with FeatureRows(summary.cache_path) as reader:
        assert reader.shape == (24, cut.width)
        rows = np.array([5, 0, 5, 23])  # any order, repeats
        images = spec.preprocess(_images(colours, reader.paths[rows]))
        direct = activations.frozen_part(same, cut).predict_on_batch(images).reshape(4, -1)
        assert _relative(reader.read(rows), direct) < 1e-5
        kwargs = dict(preprocess=spec.preprocess, size=32)
        assert activations.cut_cache_problem(
            reader, activations.frozen_part(same, cut), colours, **kwargs
        ) == ""  # fmt: skip
        problem = activations.cut_cache_problem(
            reader, activations.frozen_part(other, cut), colours, **kwargs
        )
        assert "relative difference" in problem  # other weights: finetune rebuilds it


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _write_views(path, folder, base, cut, *, seed=0, zoom=0.1, views=3, progress=False):
    from pipeline.finetuning.model import build_augmentation

    config = replace(TINY, zoom=zoom, split=SplitConfig(seed=seed))
    spec = activations.ViewsSpec(
        stage_one="{}", views=views, seed=seed,
        augmentation={"flip": config.flip, "rotation": config.rotation, "zoom": config.zoom},
    )  # fmt: skip
    paths = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))[:10]
    return activations.write_views(
        path, folder, paths, np.arange(10) % 3, spec=spec, fingerprint="f",
        frozen=activations.frozen_part(base, cut), augmentation=build_augmentation(config),
        preprocessing="tf", size=32, batch_size=4, attrs={"class_names": ["a", "b", "c"]},
        progress=progress,
    ), paths  # fmt: skip


def test_views_are_the_frozen_part_of_augmented_images_and_rebuilt_when_inputs_change(
    base, colours, tmp_path
):
    cut = activations.find_cut(base, 11)
    path = tmp_path / "views.h5"
    (status, _), paths = _write_views(path, colours, base, cut)
    assert status == "built"
    with FeatureRows(path) as reader:
        views = reader.read(np.arange(30)).reshape(10, 3, -1)
        assert list(reader.paths[:6]) == [paths[0]] * 3 + [paths[1]] * 3  # image-major
    # three different views of each image, none the unaugmented one
    frozen = activations.frozen_part(base, cut)
    plain = frozen.predict_on_batch(_images(colours, paths) / 127.5 - 1).reshape(10, -1)
    assert _relative(views[:, 0], views[:, 1]) > 1e-3  # random weights: tiny activations
    assert _relative(views[:, 0], plain) > 1e-3
    assert (_write_views(path, colours, base, cut)[0][0]) == "up to date"
    assert _write_views(path, colours, base, cut, zoom=0.2)[0][0] == "built"  # other settings
    with FeatureRows(path) as reader:
        assert _relative(reader.read(np.arange(30)).reshape(10, 3, -1), views) > 1e-3
    assert _write_views(path, colours, base, cut)[0][0] == "built"  # back: the same draws
    with FeatureRows(path) as reader:
        np.testing.assert_array_equal(reader.read(np.arange(30)).reshape(10, 3, -1), views)


def test_an_interrupted_views_cache_resumes_to_the_same_rows(base, colours, tmp_path, monkeypatch):

    cut = activations.find_cut(base, 11)
    whole = tmp_path / "whole.h5"
    _write_views(whole, colours, base, cut)
    path = tmp_path / "views.h5"
    calls = {"n": 0}
    original = cache_writer.CacheWriter.write_batch

    def dying(self, *args, **kwargs):
        if calls["n"] == 1:
            raise KeyboardInterrupt  # killed after one batch
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cache_writer.CacheWriter, "write_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        _write_views(path, colours, base, cut)
    assert cache_writer.work_path_of(path).exists() and not path.exists()
    monkeypatch.setattr(cache_writer.CacheWriter, "write_batch", original)
    assert _write_views(path, colours, base, cut)[0][0] == "resumed"
    with FeatureRows(path) as a, FeatureRows(whole) as b:
        np.testing.assert_array_equal(a.read(np.arange(30)), b.read(np.arange(30)))


def test_the_feed_draws_one_view_per_image_per_epoch_the_same_way_again(tmp_path, base, colours):
    cut = activations.find_cut(base, 11)
    path = tmp_path / "views.h5"
    _write_views(path, colours, base, cut)
    with FeatureRows(path) as reader:
        every = reader.read(np.arange(30)).reshape(10, 3, -1)
        feed = activations.activation_sequence(
            reader, np.arange(10), np.arange(10) % 3, views=3, batch_size=4, shuffle_seed=0
        )
        feed.set_epoch(1)
        x = np.concatenate([feed[i][0] for i in range(len(feed))])
        order, view = feed.order.copy(), feed.view.copy()
        np.testing.assert_array_equal(x, every[order, view[order]])  # view per image
        feed.set_epoch(2)
        assert not np.array_equal(feed.view, view) or not np.array_equal(feed.order, order)
        feed.set_epoch(1)
        np.testing.assert_array_equal(np.concatenate([feed[i][0] for i in range(3)]), x)


# --- the run ---------------------------------------------------------------------------------


@pytest.mark.slow  # a whole fine-tune and export: the quick tier keeps its 5 minutes
def test_finetune_on_cached_views_exports_the_whole_network(colours, tmp_path):
    from pipeline.finetuning.model import load_finetuned

    artifacts = tmp_path / "artifacts"
    result = ft.finetune(
        colours, TINY, artifacts_dir=artifacts, progress=False, echo=lambda _: None
    )
    assert "cached activations at block_15_add (3 augmented copies" in result.format()
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["phase_two_input"]["mode"] == "cached activations"
    assert manifest["phase_two_input"]["copies"] == 3
    cut_cache = Path(manifest["phase_two_input"]["cut_cache"])
    # the exported model (images in) equals the trained top model on the cached activations
    model = load_finetuned(result.model_path)
    assert not any("augmentation" in layer.name for layer in model.layers)
    from pipeline.features.backbones import build_base, get_backbone
    from pipeline.heads.softmax import build_softmax_head

    base = build_base(get_backbone("mobilenet_v2"), weights="none", input_size=32)
    cut = activations.find_cut(base, 11)
    top = activations.build_top_model(base, build_softmax_head(1280, 3), cut)
    inner = model.get_layer(base.name)
    base.set_weights(inner.get_weights())
    head = model.get_layer("softmax_head")
    top.get_layer("softmax_head").set_weights(head.get_weights())
    with FeatureRows(cut_cache) as reader:
        rows = np.arange(reader.shape[0])
        images = _images(colours, reader.paths)
        np.testing.assert_allclose(
            top.predict(reader.read(rows), verbose=0), model.predict(images, verbose=0), atol=1e-4
        )


@pytest.mark.slow
def test_a_killed_cached_run_resumes_to_the_uninterrupted_result(colours, tmp_path):
    import keras

    config = replace(TINY, epochs=3, patience=5)
    whole = ft.finetune(
        colours, config, artifacts_dir=tmp_path / "a", progress=False, echo=lambda _: None
    )

    class Kill(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ft.finetune(
            colours, config, artifacts_dir=tmp_path / "b", progress=False, echo=lambda _: None,
            callbacks=[Kill()],
        )  # fmt: skip
    resumed = ft.finetune(
        colours, config, artifacts_dir=tmp_path / "b", progress=False, echo=lambda _: None
    )
    assert resumed.resumed_from is not None
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in whole.history]
    again = [{k: v for k, v in h.items() if k != "seconds"} for h in resumed.history]
    assert len(again) == len(strip)
    for row, expected in zip(again, strip, strict=True):
        assert row == pytest.approx(expected, rel=1e-5)
    # the unfinished run of another way (AUG_COPIES=0) is refused, not continued
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(
            colours, config, artifacts_dir=tmp_path / "c", progress=False, echo=lambda _: None,
            callbacks=[Kill()],
        )  # fmt: skip
    with pytest.raises(ft.FinetuneError, match="aug_copies"):
        ft.finetune(
            colours, replace(config, aug_copies=0), artifacts_dir=tmp_path / "c",
            progress=False, echo=lambda _: None,
        )  # fmt: skip


@pytest.mark.slow
def test_auto_trains_a_short_run_on_the_images_and_a_long_one_on_the_caches(colours, tmp_path):
    import keras

    auto = replace(TINY, phase_two="auto", patience=1)
    lines: list[str] = []
    short = ft.finetune(
        colours, replace(auto, epochs=1), artifacts_dir=tmp_path / "a", progress=False,
        echo=lines.append,
    )  # fmt: skip
    manifest = json.loads(short.manifest_path.read_text())
    assert manifest["phase_two_input"]["mode"] == "images"
    assert manifest["phase_two_input"]["reason"].startswith("faster for EPOCHS=1")
    (line,) = [x for x in lines if x.startswith("phase 2: on the images")]
    assert "PHASE_TWO=activations" in line
    assert not list((tmp_path / "a").rglob("*flatten*"))  # no cache was built for it
    long = ft.finetune(
        colours, replace(auto, epochs=20), artifacts_dir=tmp_path / "b", progress=False,
        echo=lines.append,
    )  # fmt: skip
    assert json.loads(long.manifest_path.read_text())["phase_two_input"]["mode"] == (
        "cached activations"
    )
    assert any(x.startswith("phase 2: on cached activations: about") for x in lines)
    assert "on cached activations" in long.format()

    # An interrupted run continues on the input it started on, whatever EPOCHS says now.
    class Kill(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ft.finetune(
            colours, replace(auto, epochs=2), artifacts_dir=tmp_path / "c", progress=False,
            echo=lambda _: None, callbacks=[Kill()],
        )  # fmt: skip
    with pytest.raises(ft.FinetuneError, match="PHASE_TWO=images"):
        ft.finetune(
            colours, replace(auto, epochs=20, phase_two="activations"),
            artifacts_dir=tmp_path / "c", progress=False, echo=lambda _: None,
        )  # fmt: skip
    resumed = ft.finetune(
        colours, replace(auto, epochs=20), artifacts_dir=tmp_path / "c", progress=False,
        echo=lambda _: None,
    )  # fmt: skip
    assert resumed.resumed_from == 1
    assert json.loads(resumed.manifest_path.read_text())["phase_two_input"]["mode"] == "images"


def test_aug_copies_zero_runs_the_images_and_says_so(colours, tmp_path):
    result = ft.finetune(
        colours, replace(TINY, aug_copies=0, epochs=1), artifacts_dir=tmp_path,
        progress=False, echo=lambda _: None,
    )  # fmt: skip
    assert "images, a full forward pass every epoch (AUG_COPIES=0)" in result.format()
    assert json.loads(result.manifest_path.read_text())["phase_two_input"]["mode"] == "images"
    # Validated and predicted by the top on the frozen part's output, made once: what the
    # whole network gives on the images.
    (row,) = [h for h in result.history if h["phase"] == 2]
    assert isinstance(row["val_loss"], float) and isinstance(row["val_accuracy"], float)
    entries = json.loads(result.predictions_path.read_text())["predictions"]
    whole = result.model.predict(_images(colours, list(entries)), verbose=0)
    np.testing.assert_allclose([e["proba"] for e in entries.values()], whole, atol=1e-5)


@pytest.mark.parametrize("value", [-1, 65, 1.5, True])
def test_aug_copies_must_be_a_whole_number(value):
    with pytest.raises(ft.FinetuneError, match="AUG_COPIES"):
        replace(TINY, aug_copies=value).validate()


def test_make_finetune_passes_aug_copies(colours, tmp_path):
    from make_helpers import run_make

    (call,) = run_make(tmp_path, "finetune", f"DATA={colours}", "AUG_COPIES=2")
    assert "--aug-copies 2" in " ".join(call["argv"])


def test_a_view_is_the_seeded_augmentation_then_the_frozen_part(base, colours):
    """The compiled view model computes what the layers give run one by one, eagerly."""
    import keras

    from pipeline.finetuning.layers import ImagePreprocessing
    from pipeline.finetuning.model import build_augmentation

    cut = activations.find_cut(base, 11)
    frozen = activations.frozen_part(base, cut)
    augmentation = build_augmentation(TINY)
    model = activations.view_model(frozen, augmentation, "tf")
    paths = sorted(str(p.relative_to(colours)) for p in colours.rglob("*.png"))[:4]
    x = _images(colours, paths)
    activations.seed_views(augmentation, 0, 4, 1)
    compiled = model.predict_on_batch(x)
    activations.seed_views(augmentation, 0, 4, 1)
    augmented = keras.ops.convert_to_numpy(augmentation(x, training=True))
    eager = frozen.predict_on_batch(keras.ops.convert_to_numpy(ImagePreprocessing("tf")(augmented)))
    assert _relative(compiled, eager) < 1e-4
    activations.seed_views(augmentation, 0, 4, 2)  # another view: other draws
    assert _relative(model.predict_on_batch(x), compiled) > 1e-3
