"""Predicting new images with a head (backbone rebuilt from the manifest) or a fine-tuned model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import COLOURS, make_folder, make_image

from pipeline.errors import PredictError
from pipeline.heads import fit_heads, load_head


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """svm and softmax heads on a cache made with a local (reproducible) weights file."""
    import keras

    from pipeline.features import FeatureConfig, extract_features
    from pipeline.images import SplitConfig

    tmp = tmp_path_factory.mktemp("predict")
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3))
    weights = tmp / "random.weights.h5"
    base.save_weights(weights)
    data = make_folder(tmp / "colours", per_class=6, classes=tuple(COLOURS))
    summary = extract_features(
        data,
        FeatureConfig(weights=str(weights), input_size=32, batch_size=8),
        split=SplitConfig(seed=0, val_fraction=0.2, test_fraction=0.0),
        artifacts_dir=tmp / "artifacts",
        progress=False,
    )
    results = fit_heads(summary.cache_path, "svm,softmax", artifacts_dir=tmp / "artifacts")
    return tmp, data, summary.cache_path, {r.head: r.manifest_path for r in results}


@pytest.mark.parametrize("name", ["svm", "softmax"])
def test_predict_with_a_head_matches_the_cached_features(heads, name, tmp_path):
    from pipeline.cache import load_features
    from pipeline.predict import predict_images

    _, data, cache, manifests = heads
    (data / "broken.jpg").write_bytes(b"not a jpeg at all")
    model = manifests[name] if name == "svm" else manifests[name].with_suffix(".keras")
    try:
        summary = predict_images(model, data, tmp_path / "out.csv")
    finally:
        (data / "broken.jpg").unlink()
    assert summary.predicted == 18 and [p for p, _ in summary.skipped] == ["broken.jpg"]
    assert "skipped broken.jpg" in summary.format()
    rows = {r["path"]: r for r in _rows(tmp_path / "out.csv")}
    assert len(rows) == 18
    fs = load_features(cache)
    pred, scores, is_proba = load_head(manifests[name]).predict(fs)
    for path, p, row in zip(fs.paths, pred, scores, strict=True):
        assert rows[path]["class"] == fs.class_names[p]
        column = "probability" if is_proba else "score"
        assert float(rows[path][column]) == pytest.approx(row[p], abs=1e-3)
        assert rows[path]["score" if is_proba else "probability"] == ""


def test_predict_a_single_file(heads, tmp_path):
    from pipeline.predict import predict_images

    _, data, _, manifests = heads
    image = make_image(tmp_path / "one.png", COLOURS["red"], seed=7)
    summary = predict_images(manifests["svm"].with_suffix(".joblib"), image, tmp_path / "one.csv")
    assert summary.predicted == 1
    assert _rows(tmp_path / "one.csv")[0]["path"] == "one.png"


def _finetuned(tmp_path: Path, *, sigmoid: bool) -> Path:
    import keras

    classes = ["blue", "red"] if sigmoid else ["blue", "green", "red"]
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    # A hand-set "model": class scores are the mean R, G, B (so red images come out red).
    if sigmoid:
        out = keras.layers.Dense(1, activation="sigmoid")(x)
        weights = [np.array([[20.0], [0.0], [-20.0]]), np.zeros(1)]
    else:
        out = keras.layers.Dense(3, activation="softmax")(x)
        weights = [np.array([[0, 0, 20.0], [0, 20.0, 0], [20.0, 0, 0]]), np.zeros(3)]
    model = keras.Model(inputs, out)
    model.layers[-1].set_weights(weights)
    path = tmp_path / "ft.keras"
    model.save(path)
    manifest = {"kind": "finetuned", "class_names": classes, "input_size": 32, "backbone": "toy"}
    path.with_suffix(".json").write_text(json.dumps(manifest))
    return path


@pytest.mark.parametrize("sigmoid", [False, True])
def test_predict_with_a_finetuned_model(tmp_path, sigmoid):
    from pipeline.predict import predict_images

    model = _finetuned(tmp_path, sigmoid=sigmoid)
    classes = ("red", "blue") if sigmoid else tuple(COLOURS)
    images = make_folder(tmp_path / "new", per_class=2, classes=classes)
    summary = predict_images(model, images, tmp_path / "ft.csv")
    assert summary.predicted == 2 * len(classes)
    for row in _rows(tmp_path / "ft.csv"):
        assert row["class"] == row["path"].split("/")[0]
        assert 0.5 < float(row["probability"]) <= 1.0


def test_predict_refusals(heads, tmp_path):
    from pipeline.cli import main
    from pipeline.predict import predict_images

    _, data, _, manifests = heads
    out = tmp_path / "never.csv"
    with pytest.raises(PredictError, match="is not a file"):
        predict_images(tmp_path / "missing.json", data, out)
    lonely = tmp_path / "lonely.keras"
    lonely.write_bytes(b"x")
    with pytest.raises(PredictError, match="no manifest lonely.json"):
        predict_images(lonely, data, out)
    with pytest.raises(PredictError, match="no image files"):
        predict_images(manifests["svm"], tmp_path, out)
    random_head = tmp_path / "random"
    random_head.mkdir()
    manifest = json.loads(manifests["svm"].read_text())
    (random_head / "svm.json").write_text(json.dumps({**manifest, "weights_source": "none"}))
    for key, file in manifest["files"].items():
        if key != "predictions":
            (random_head / file).write_bytes((manifests["svm"].parent / file).read_bytes())
    with pytest.raises(PredictError, match="randomly initialised backbone"):
        predict_images(random_head / "svm.json", data, out)
    assert not out.exists()
    assert main(["predict", "--model", str(lonely), "--images", str(data), "--out", str(out)]) == 2
