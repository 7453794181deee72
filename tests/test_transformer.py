"""ImageFeatures: stage one as a scikit-learn transformer (paths or arrays in, features out).

The quick tests run a stand-in backbone (per-channel means: no Keras); the slow ones a
tiny MobileNet with random weights, and scikit-learn's own estimator checks.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import COLOURS, make_folder
from PIL import Image
from sklearn.base import clone
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.svm import LinearSVC
from sklearn.utils.estimator_checks import parametrize_with_checks

from pipeline.core.errors import BackboneError, DataError, PipelineError
from pipeline.features import extractor
from pipeline.features import transformer as transformer_module
from pipeline.features.transformer import ImageFeatures

TINY = {"weights": "none", "input_size": 32, "batch_size": 4}


class ChannelMeans:
    """A stand-in backbone: each image's three channel means (what colour images differ by)."""

    output_shape = (None, 3)

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        return x.mean(axis=(1, 2))


@pytest.fixture
def forwarded(monkeypatch) -> list[int]:
    """Stage one's model replaced by :class:`ChannelMeans`; the images of each forward pass."""
    counts: list[int] = []
    real = extractor.forward_batch

    def counting(model, x, batch_size):
        counts.append(len(x))
        return real(model, x, batch_size)

    monkeypatch.setattr(transformer_module, "_MODELS", {})
    monkeypatch.setattr(extractor, "build_extractor", lambda resolved: ChannelMeans())
    monkeypatch.setattr(extractor, "forward_batch", counting)
    return counts


def colour_images(n_per_class: int = 6, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, colour in enumerate(COLOURS.values()):
        for _ in range(n_per_class):
            noise = rng.normal(0, 25, size=(30, 40, 3))
            images.append(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8))
            labels.append(label)
    return images, np.array(labels)


def test_cross_val_score_extracts_each_image_once_with_a_cache(forwarded, tmp_path):
    images, y = colour_images()
    model = make_pipeline(ImageFeatures("mobilenet_025", cache=tmp_path, **TINY), LinearSVC())
    scores = cross_val_score(model, images, y, cv=3)
    assert scores.mean() > 0.9
    assert sum(forwarded) == len(images)  # 3 folds, 6 fits and transforms: each image once
    # A clone in a new session reads them all back: no backbone pass at all.
    again = clone(model).fit(images, y).predict(images[:3])
    assert sum(forwarded) == len(images) and list(again) == [0, 0, 0]


def test_without_a_cache_every_transform_runs_the_backbone(forwarded):
    images, _ = colour_images(2)
    features = ImageFeatures("mobilenet_025", **TINY)
    features.transform(images)
    features.transform(images)
    assert sum(forwarded) == 2 * len(images)


def test_a_partly_cached_list_runs_only_the_new_images_in_order(forwarded, tmp_path):
    images, _ = colour_images(3)  # 9 images, batches of 4
    features = ImageFeatures("mobilenet_025", cache=tmp_path, **TINY)
    first = features.transform(images[2:7])
    assert forwarded == [4, 1]
    every = features.transform(images)
    assert forwarded == [4, 1, 4]  # the 4 new ones only, in one batch
    np.testing.assert_array_equal(every[2:7], first)
    expected = np.stack([image.mean(axis=(0, 1)) / 127.5 - 1 for image in images])
    np.testing.assert_allclose(every, expected, atol=0.05)  # resized means, in input order


def test_the_cache_key_holds_the_feature_identity(forwarded, tmp_path):
    images, _ = colour_images(1)
    ImageFeatures("mobilenet_025", cache=tmp_path, **TINY).transform(images)
    ImageFeatures("mobilenet_025", cache=tmp_path, pooling="max", **TINY).transform(images)
    assert sum(forwarded) == 2 * len(images)  # other pooling: other features, not a hit
    assert len(list((tmp_path / "images").glob("*/identity.json"))) == 2


def test_arrays_paths_and_lists_give_the_same_rows(forwarded, tmp_path):
    folder = make_folder(tmp_path / "photos", per_class=2)
    paths = sorted(folder.rglob("*.png"))
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    features = ImageFeatures("mobilenet_025", **TINY)
    from_paths = features.transform([str(p) for p in paths])
    assert from_paths.shape == (len(paths), 3) and from_paths.dtype == np.float32
    np.testing.assert_allclose(features.transform(arrays), from_paths, rtol=1e-6)
    np.testing.assert_allclose(features.transform(np.stack(arrays)), from_paths, rtol=1e-6)
    np.testing.assert_allclose(features.transform(np.array(paths, dtype=object)), from_paths)
    np.testing.assert_allclose(features.transform(arrays[0]), from_paths[:1], rtol=1e-6)
    grey = features.transform([arrays[0].mean(axis=2).astype(np.uint8)])
    assert np.allclose(grey[0], grey[0][0], atol=1e-3)  # grey: three equal channels


@pytest.mark.parametrize(
    ("X", "words"),
    [
        (np.random.default_rng(0).normal(size=(20, 5)), "2-D float64 array of shape (20, 5)"),
        ([np.zeros((8, 8, 3), np.float32)], "float32 array of shape (8, 8, 3)"),
        ([np.zeros((8, 8, 2), np.uint8)], "uint8 array of shape (8, 8, 2)"),
        (42, "got int"),
        ([], "no images"),
        (np.zeros((0, 8, 8, 3), np.uint8), "no images"),
    ],
)
def test_input_that_is_not_images_is_one_clear_line(X, words):
    with pytest.raises(DataError) as caught:
        ImageFeatures("mobilenet_025", **TINY).fit(X)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_an_unreadable_image_is_named(forwarded, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"image .*broken\.png: not an image"):
        ImageFeatures("mobilenet_025", **TINY).transform([str(bad)])
    with pytest.raises(DataError, match="missing.png: cannot read it"):
        ImageFeatures("mobilenet_025", cache=tmp_path, **TINY).transform([tmp_path / "missing.png"])


def test_bad_options_fail_at_fit_not_in_init():
    features = ImageFeatures("resnet5O")  # a letter O
    with pytest.raises(BackboneError, match="did you mean"):
        features.fit([np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(PipelineError, match="POOLING"):
        ImageFeatures(pooling="mean").fit([np.zeros((8, 8, 3), np.uint8)])


# --------------------------------------------------------------------------- a real backbone

# Every check scikit-learn feeds random 2-D numbers; ImageFeatures refuses them (one line).
NUMBERS = "feeds a 2-D array of numbers, not images"
NUMBER_CHECKS = [
    "check_complex_data",
    "check_dict_unchanged",
    "check_dont_overwrite_parameters",
    "check_dtype_object",
    "check_estimators_dtypes",
    "check_estimators_empty_data_messages",
    "check_estimators_fit_returns_self",
    "check_estimators_nan_inf",
    "check_estimators_overwrite_params",
    "check_estimators_pickle",
    "check_f_contiguous_array_estimator",
    "check_fit2d_1feature",
    "check_fit2d_1sample",
    "check_fit2d_predict1d",
    "check_fit_check_is_fitted",
    "check_fit_idempotent",
    "check_fit_score_takes_y",
    "check_methods_sample_order_invariance",
    "check_methods_subset_invariance",
    "check_n_features_in",
    "check_n_features_in_after_fitting",
    "check_pipeline_consistency",
    "check_positive_only_tag_during_fit",
    "check_readonly_memmap_input",
    "check_transformer_data_not_an_array",
    "check_transformer_general",
    "check_transformer_preserve_dtypes",
    "check_transformers_unfitted_stateless",
]


@pytest.mark.slow
@parametrize_with_checks(
    [ImageFeatures("mobilenet_025", **TINY)],
    expected_failed_checks=lambda estimator: dict.fromkeys(NUMBER_CHECKS, NUMBERS),
    xfail_strict=True,
)
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


@pytest.mark.slow
def test_a_real_backbone_gives_files_and_arrays_the_same_features(tmp_path):
    folder = make_folder(tmp_path / "photos", per_class=3)
    paths = sorted(folder.rglob("*.png"))
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    transformer_module._MODELS.clear()
    features = ImageFeatures("mobilenet_025", cache=tmp_path / "cache", **TINY).fit(paths)
    from_files = features.transform(paths)
    assert from_files.shape == (6, 256) and np.abs(from_files).sum() > 0
    np.testing.assert_allclose(features.transform(arrays), from_files, rtol=1e-5, atol=1e-6)
    # One image alone (a zero-padded batch) and a pickled copy agree with the batch.
    copy = pickle.loads(pickle.dumps(features.set_params(cache=None)))
    np.testing.assert_allclose(copy.transform(arrays[4]), from_files[4:5], rtol=1e-4, atol=1e-5)
    assert Path(tmp_path / "cache" / "images").is_dir()


@pytest.mark.slow
def test_a_notebook_session_shows_no_tensorflow_start_up_lines(tmp_path):
    code = (
        "import numpy as np\n"
        "from sklearn.svm import LinearSVC\n"
        "import pipeline\n"
        "from pipeline import ImageFeatures\n"
        "images = np.random.default_rng(0).integers(0, 255, (4, 40, 30, 3), dtype=np.uint8)\n"
        "features = ImageFeatures('mobilenet_025', weights='none', input_size=32, cache='c')\n"
        "print(features.fit_transform(images).shape)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL",)}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0 and run.stdout.strip() == "(4, 256)", run.stderr
    assert run.stderr == ""  # no absl lines, no cuInit error, no warnings
