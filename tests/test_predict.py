"""Predicting new images with a head (backbone rebuilt from the manifest) or a fine-tuned model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import COLOURS, make_folder, make_image

from pipeline.core.errors import PredictError
from pipeline.heads.fit import fit_heads
from pipeline.heads.store import load_head


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """svm and softmax heads on a cache made with a local (reproducible) weights file."""
    import keras

    from pipeline.data.folders import SplitConfig
    from pipeline.features.config import FeatureConfig
    from pipeline.features.extract import extract_features

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
    from pipeline.features.cache import load_features
    from pipeline.predict import predict_images

    _, data, cache, manifests = heads
    (data / "broken.jpg").write_bytes(b"not a jpeg at all")
    model = manifests[name] if name == "svm" else manifests[name].with_suffix(".keras")
    try:
        result = predict_images(model, data, tmp_path / "out.csv")
    finally:
        (data / "broken.jpg").unlink()
    assert result.n_predicted == 18 and [p for p, _ in result.skipped] == ["broken.jpg"]
    assert "skipped broken.jpg" in result.format()
    rows = {r["path"]: r for r in _rows(tmp_path / "out.csv")}
    assert len(rows) == 18
    fs = load_features(cache)
    pred, scores, is_proba = load_head(manifests[name]).predict(fs)
    value, prefix = ("probability", "p_") if is_proba else ("score", "score_")
    assert list(next(iter(rows.values()))) == [
        "path", "true_label", "predicted", value, *(prefix + c for c in fs.class_names)
    ]  # fmt: skip
    for path, p, row in zip(fs.paths, pred, scores, strict=True):
        assert rows[path]["predicted"] == fs.class_names[p]
        assert rows[path]["true_label"] == path.split("/")[0]
        assert float(rows[path][value]) == pytest.approx(row[p], abs=1e-3)
        for c, expected in zip(fs.class_names, row, strict=True):
            assert float(rows[path][prefix + c]) == pytest.approx(expected, abs=1e-3)
    # the returned predictions are the CSV's
    order = [list(fs.paths).index(path) for path in result.paths]
    np.testing.assert_array_equal(result.pred, pred[order])
    np.testing.assert_allclose(result.scores, scores[order], atol=1e-3)
    assert result.is_proba == is_proba
    assert result.accuracy == pytest.approx(np.mean(pred == fs.labels))
    assert result.format().splitlines()[-1].startswith(f"accuracy {result.accuracy:.3f} (")


def test_predict_a_single_file(heads, tmp_path):
    from pipeline.predict import predict_images

    _, data, _, manifests = heads
    image = make_image(tmp_path / "one.png", COLOURS["red"], seed=7)
    result = predict_images(manifests["svm"].with_suffix(".joblib"), image, tmp_path / "one.csv")
    assert result.n_predicted == 1 and result.accuracy is None
    row = _rows(tmp_path / "one.csv")[0]
    assert row["path"] == "one.png" and "true_label" not in row
    assert "accuracy" not in result.format()


def test_default_outputs_differ_by_data_set_model_and_images(heads, tmp_path):
    from pipeline.predict import predict_images
    from pipeline.predictions import images_label

    _, data, cache, manifests = heads
    art = tmp_path / "art"
    svm = predict_images(manifests["svm"], data, artifacts_dir=art)
    softmax = predict_images(manifests["softmax"], data / "red", artifacts_dir=art)
    stem = cache.stem
    assert svm.out_csv == art / "predictions" / "colours" / f"{stem}_svm" / (
        images_label(data) + ".csv"
    )
    assert softmax.out_csv.parent == art / "predictions" / "colours" / f"{stem}_softmax"
    assert softmax.out_csv.name.startswith("red-") and softmax.out_csv.suffix == ".csv"
    assert svm.out_csv.is_file() and softmax.out_csv.is_file()
    # IMAGES is itself a class folder: every image is labelled with it
    assert {r["true_label"] for r in softmax.records()} == {"red"}


def _finetuned(tmp_path: Path, *, sigmoid: bool, classes: list[str] | None = None) -> Path:
    import keras

    classes = classes or (["blue", "red"] if sigmoid else ["blue", "green", "red"])
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
    result = predict_images(model, images, tmp_path / "ft.csv")
    assert result.n_predicted == 2 * len(classes)
    rows = _rows(tmp_path / "ft.csv")
    for row in rows:
        assert row["predicted"] == row["true_label"] == row["path"].split("/")[0]
        assert 0.5 < float(row["probability"]) <= 1.0
        assert sum(float(v) for k, v in row.items() if k.startswith("p_")) == pytest.approx(1, 1e-4)
    assert rows == [{k: _cell(v) for k, v in r.items()} for r in result.records()]
    text = result.format()
    assert text.endswith(f"accuracy 1.000 ({len(rows)}/{len(rows)} images in class folders)")
    assert "  path" in text and "red/img00.png" in text  # few images: a table


def _cell(value):
    return f"{value:.6f}" if isinstance(value, float) else value


def test_spreadsheet_formulas_are_neutralised_and_outsiders_not_scored(tmp_path):
    from pipeline.predict import predict_images

    model = _finetuned(tmp_path, sigmoid=True, classes=["=blue", "red"])
    images = tmp_path / "new"
    formulas = ["=HYPERLINK(1).png", "+1.png", "-2.png", "@SUM.png"]
    for i, name in enumerate(formulas):  # outside class folders, predicted "=blue"
        make_image(images / name, COLOURS["blue"], seed=i)
    make_image(images / "red" / "plain.png", COLOURS["red"], seed=9)
    result = predict_images(model, images, tmp_path / "safe.csv")
    header = (tmp_path / "safe.csv").read_text().splitlines()[0]
    assert header == "path,true_label,predicted,probability,p_=blue,p_red"
    rows = {r["path"]: r for r in _rows(tmp_path / "safe.csv")}
    assert set(rows) == {"'" + name for name in formulas} | {"red/plain.png"}
    for name in formulas:
        assert rows["'" + name]["predicted"] == "'=blue" and rows["'" + name]["true_label"] == ""
    assert rows["red/plain.png"]["predicted"] == rows["red/plain.png"]["true_label"] == "red"
    assert sorted(r["path"] for r in result.records()) == sorted([*formulas, "red/plain.png"])
    assert result.n_labelled == 1
    assert result.format().endswith(
        "accuracy 1.000 (1/1 images in class folders; 4 outside class folders not scored)"
    )


def test_many_images_print_no_table(tmp_path):
    from pipeline.predict import predict_images

    model = _finetuned(tmp_path, sigmoid=True)
    images = make_folder(tmp_path / "many", per_class=11, classes=("red", "blue"))
    text = predict_images(model, images, tmp_path / "many.csv").format()
    assert len(text.splitlines()) == 2 and "img00" not in text


def test_predict_refusals(heads, tmp_path):
    from pipeline.cli.main import main
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


@pytest.mark.slow  # two multi-view extractions and joins: the quick tier keeps its 5 minutes
@pytest.mark.parametrize("join_norm", ["l2", "standard"])
def test_a_head_on_joined_multi_view_features_predicts_what_its_cache_holds(
    heads, join_norm, tmp_path
):
    """make auto's winners: each part (multi-view, a cut layer) is rebuilt from its recorded
    configuration and joined as the join did; the predictions are the cached features'."""
    from pipeline.data.folders import SplitConfig
    from pipeline.features.cache import load_features
    from pipeline.features.config import FeatureConfig
    from pipeline.features.extract import extract_features
    from pipeline.features.joins import join_caches
    from pipeline.predict import predict_images

    tmp, data, _, _ = heads
    weights = str(tmp / "random.weights.h5")
    split = SplitConfig(seed=0, val_fraction=0.2, test_fraction=0.0)
    parts = [
        extract_features(
            data,
            FeatureConfig(weights=weights, input_size=32, batch_size=8, **options),
            split=split,
            artifacts_dir=tmp / "artifacts",
            progress=False,
        ).cache_path
        for options in (
            {"views": "32,48+flip", "combine": "concat"},
            {"layer": "block_13_expand_relu"},
        )
    ]
    joined = join_caches(parts, norm=join_norm, artifacts_dir=tmp / "artifacts").path
    (result,) = fit_heads(joined, "logreg", artifacts_dir=tmp / "artifacts")
    predicted = predict_images(
        result.manifest_path,
        data,
        tmp_path / "out.csv",
        batch_size=8,
        artifacts_dir=tmp / "artifacts",
    )
    fs = load_features(joined)
    pred, scores, _ = load_head(result.manifest_path).predict(fs)
    order = [list(fs.paths).index(path) for path in predicted.paths]
    assert predicted.n_predicted == len(fs.paths) == 18
    np.testing.assert_array_equal(predicted.pred, pred[order])
    # float noise of other batch compositions, through three parts and a logistic regression
    np.testing.assert_allclose(predicted.scores, scores[order], atol=5e-3)
    # a part recorded with other weights (another Keras, another file) is refused, not rebuilt
    manifest = json.loads(result.manifest_path.read_text())
    identity = json.loads(manifest["config_json"])
    for part in identity["parts"]:
        config = json.loads(part["config_json"])
        part["config_json"] = json.dumps({**config, "weights": "file:0000 (other)"})
    result.manifest_path.write_text(json.dumps({**manifest, "config_json": json.dumps(identity)}))
    with pytest.raises(PredictError, match="part 1 .* cannot be rebuilt as it was made: weights"):
        predict_images(
            result.manifest_path, data, tmp_path / "no.csv", artifacts_dir=tmp / "artifacts"
        )


def test_a_standardised_join_whose_part_changed_is_refused(heads, tmp_path):
    from pipeline.data.folders import SplitConfig
    from pipeline.features.config import FeatureConfig
    from pipeline.features.extract import extract_features
    from pipeline.features.joins import join_caches
    from pipeline.predict import predict_images

    tmp, data, cache, _ = heads
    other = extract_features(
        data,
        FeatureConfig(weights=str(tmp / "random.weights.h5"), input_size=48, batch_size=8),
        split=SplitConfig(seed=0, val_fraction=0.2, test_fraction=0.0),
        artifacts_dir=tmp_path / "artifacts",
        progress=False,
    ).cache_path
    local = tmp_path / "artifacts" / "features" / cache.parent.name / cache.name
    local.write_bytes(cache.read_bytes())
    joined = join_caches([local, other], norm="standard", artifacts_dir=tmp_path / "artifacts").path
    (result,) = fit_heads(joined, "svm", artifacts_dir=tmp_path / "artifacts")
    other.unlink()
    with pytest.raises(PredictError, match="is missing: a JOIN_NORM=standard head needs"):
        predict_images(
            result.manifest_path, data, tmp_path / "x.csv", artifacts_dir=tmp_path / "artifacts"
        )
    assert not (tmp_path / "x.csv").exists()
