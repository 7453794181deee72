"""The runtime registry: choice and fallback, the conversion store, identity, equality with Keras."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_folder

from pipeline.cli.main import main
from pipeline.core.errors import PipelineError
from pipeline.features import cache_writer, precisions, runtimes
from pipeline.features.cache import load_features, read_attrs
from pipeline.features.config import FeatureConfig, cache_path_for, resolve_features
from pipeline.features.extract import extract_features

TINY = FeatureConfig(backbone="mobilenet_v2", weights="none", input_size=32, batch_size=4)
needs_openvino = pytest.mark.skipif(
    not runtimes.openvino_installed(), reason="the openvino package is not installed"
)


def _store(tmp_path: Path, **overrides) -> runtimes.ConversionStore:
    args = dict(
        backbone="mobilenet_v2",
        weights_id="none",
        weights_tag="random",
        input_size=32,
        pooling="avg",
        layer=None,
    )
    return runtimes.ConversionStore.for_config(tmp_path / "art", **{**args, **overrides})


def _record(store: runtimes.ConversionStore, **meta) -> None:
    store.directory.mkdir(parents=True, exist_ok=True)
    (store.directory / "model.xml").write_text("<net/>")
    (store.directory / "model.bin").write_bytes(b"")
    full = {"identity": store.identity, "converted": True, "checks": {}, **meta}
    store.meta_path.write_text(json.dumps(full))


# --------------------------------------------------------------------------- choice


def test_keras_asked_for_is_keras(tmp_path):
    assert runtimes.choose("keras", "auto", store=_store(tmp_path)) == runtimes.RuntimeChoice()


def test_runtime_missing_falls_back_to_keras_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setattr(runtimes, "openvino_installed", lambda: False)
    choice = runtimes.choose("auto", "auto", store=_store(tmp_path))
    assert (choice.runtime, choice.precision) == ("keras", "fp32")
    assert "openvino package is not installed" in choice.notes[0]
    with pytest.raises(PipelineError, match="RUNTIME=openvino cannot run: the openvino package"):
        runtimes.choose("openvino", "auto", store=_store(tmp_path))


def test_auto_takes_a_reduced_precision_where_its_one_off_cost_pays_back(tmp_path, monkeypatch):
    monkeypatch.setattr(runtimes, "openvino_installed", lambda: True)
    monkeypatch.setattr(runtimes, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr(precisions, "nncf_installed", lambda: True)
    store = _store(tmp_path)
    auto = {"store": store, "data": "photos"}
    assert runtimes.choose("auto", "auto", **auto, images=4000).precision == "int8"
    assert runtimes.choose("auto", "auto", **auto, images=3999).precision == "bf16"
    small = runtimes.choose("auto", "auto", **auto, images=397)
    assert small.precision == "fp32" and small.notes == ()  # the reason is the runtime's line
    line = runtimes.describe(small)
    assert "int8's one-off quantization, 10 to 20 s, pays back from 4,000 images" in line
    assert line.endswith("this data set has 397)")
    # Asked for by name: whatever the size.
    assert runtimes.choose("auto", "int8", **auto, images=10).precision == "int8"
    assert runtimes.choose("auto", "bfloat16", **auto, images=10).precision == "bf16"
    # Once checked on this data set (its cost paid), auto takes it at any size, and says why.
    passed = {"rule": "agreement", "passed": True, "images": 200, "agreement": 0.995,
              "correct_float32": 194, "correct_reduced": 195}  # fmt: skip
    _record(store, checks={"photos": {"fp32": {"passed": True}, "int8": passed}})
    again = runtimes.choose("auto", "auto", **auto, images=397)
    assert again.precision == "int8"
    assert "fastest that passes the agreement check here, 99.5% of 200" in runtimes.describe(again)


def test_auto_tries_its_precisions_fastest_first_where_the_cpu_and_packages_allow(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(runtimes, "openvino_installed", lambda: True)
    monkeypatch.setattr(runtimes, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr(precisions, "nncf_installed", lambda: True)
    store = _store(tmp_path)
    choice = runtimes.choose("auto", "auto", store=store, data="photos")
    assert (choice.runtime, choice.precision) == ("openvino", "int8")
    assert choice.model_xml == str(store.directory / "int8" / "photos" / "model.xml")
    monkeypatch.setattr(precisions, "nncf_installed", lambda: False)
    choice = runtimes.choose("auto", "auto", store=store)
    assert (choice.runtime, choice.precision) == ("openvino", "bf16")
    assert choice.notes == ("runtime: int8 needs the nncf package (pip install nncf); not tried",)
    monkeypatch.setattr(runtimes, "cpu_supports_bf16", lambda: False)
    choice = runtimes.choose("auto", "auto", store=store)
    assert (choice.runtime, choice.precision) == ("openvino", "fp32")
    explicit = runtimes.choose("openvino", "bfloat16", store=store)
    assert explicit.precision == "fp32" and "no native bfloat16" in explicit.notes[0]


def test_int8_is_refused_in_one_line_where_it_cannot_run(tmp_path, monkeypatch):
    monkeypatch.setattr(runtimes, "openvino_installed", lambda: True)
    monkeypatch.setattr(precisions, "nncf_installed", lambda: True)
    keras = runtimes.choose("keras", "int8", store=_store(tmp_path))  # fine-tuning's Keras runs
    assert keras.precision == "fp32" and "RUNTIME=keras computes float32" in keras.notes[0]
    assert resolve_features(FeatureConfig(runtime="keras", precision="int8")).runtime == keras
    with pytest.raises(PipelineError, match="random weights"):
        runtimes.choose("auto", "int8", store=_store(tmp_path), random_weights=True)
    assert FeatureConfig(precision="int8").validate().name == "mobilenet_v2"
    monkeypatch.setattr(precisions, "nncf_installed", lambda: False)
    with pytest.raises(PipelineError, match=r"needs the nncf package \(pip install nncf\)"):
        runtimes.choose("auto", "int8", store=_store(tmp_path))


def test_failed_checks_and_conversions_are_remembered(tmp_path, monkeypatch):
    monkeypatch.setattr(runtimes, "openvino_installed", lambda: True)
    monkeypatch.setattr(runtimes, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr(precisions, "nncf_installed", lambda: False)
    store = _store(tmp_path)
    failed = {"rule": "agreement", "passed": False, "images": 200, "agreement": 0.95,
              "correct_float32": 190, "correct_reduced": 185}  # fmt: skip
    _record(store, checks={"photos": {"bf16": failed}})
    choice = runtimes.choose("auto", "auto", store=store, data="photos")
    assert (choice.runtime, choice.precision) == ("openvino", "fp32")
    assert "95.0% of 200 images agree with float32" in choice.notes[-1]
    # Checks are per data set: another one is not judged by this one's images.
    assert runtimes.choose("auto", "auto", store=store, data="other").precision == "bf16"
    # Asked for explicitly: used, with a warning.
    choice = runtimes.choose("openvino", "bfloat16", store=store, data="photos")
    assert choice.precision == "bf16" and choice.notes[0].startswith("warning:")
    # A reduced precision's cosine check of an earlier version is run again, not obeyed.
    _record(store, checks={"photos": {"bf16": {"cosine_min": 0.99, "passed": False}}})
    assert runtimes.choose("auto", "auto", store=store, data="photos").precision == "bf16"
    cosine_failed = {"cosine_min": 0.99, "passed": False, "images": 16}
    _record(store, checks={"photos": {"bf16": failed, "fp32": cosine_failed}})
    assert runtimes.choose("auto", "auto", store=store, data="photos").runtime == "keras"
    _record(store, converted=False, error="NotImplementedError: op")
    choice = runtimes.choose("auto", "auto", store=store)
    assert choice.runtime == "keras" and "does not convert" in choice.notes[0]
    with pytest.raises(PipelineError, match="does not convert"):
        runtimes.choose("openvino", "float32", store=store)


def test_the_agreement_rule_is_about_a_linear_heads_predictions():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 50)
    reference = rng.normal(size=(100, 6)) + labels[:, None] * 1.5
    close = reference + rng.normal(scale=0.01, size=reference.shape)  # a cosine ~0.9999
    assert precisions.head_agreement(reference, close, labels)["passed"]
    # Far from float32 per image, yet the same predictions: passes (the cosine gate refused).
    shifted = reference * 1.0 + rng.normal(scale=0.05, size=reference.shape)
    result = precisions.head_agreement(reference, shifted, labels)
    assert result["passed"] and result["agreement"] >= 0.99
    broken = reference.copy()
    broken[:, :3] = rng.normal(size=(100, 3))  # half the features lost
    result = precisions.head_agreement(reference, broken, labels)
    assert not result["passed"] and result["agreement"] < 0.99
    one_class = precisions.head_agreement(reference, close, np.zeros(100, int))
    assert not one_class["passed"] and "two classes" in one_class["reason"]


def test_float16_and_random_weights_stay_on_keras(tmp_path, monkeypatch):
    monkeypatch.setattr(runtimes, "openvino_installed", lambda: True)
    choice = runtimes.choose("auto", "float16", store=_store(tmp_path))
    assert (choice.runtime, choice.precision, choice.keras_policy) == (
        "keras", "fp16", "mixed_float16",
    )  # fmt: skip
    assert "float16" in choice.notes[0]
    with pytest.raises(PipelineError, match="no float16"):
        runtimes.choose("openvino", "float16", store=_store(tmp_path))
    choice = runtimes.choose("auto", "auto", store=_store(tmp_path), random_weights=True)
    assert (choice.runtime, choice.precision) == ("keras", "fp32")


def test_the_cache_name_says_the_precision_never_the_runtime():
    resolved = resolve_features(TINY, choose_runtime=False)
    assert resolved.stem_at("fp32") == resolved.cache_stem
    assert resolved.stem_at("bf16") == resolved.cache_stem + "_bf16"
    assert resolved.stem_at("int8") == resolved.cache_stem + "_int8"
    stored = resolve_features(FeatureConfig(**{**TINY.__dict__, "storage": "float16"}))
    assert stored.cache_stem.endswith("_stored-f16")


def test_bad_runtime_words_are_refused_at_the_boundary(tmp_path, capsys):
    with pytest.raises(PipelineError, match=r"RUNTIME= \(--runtime\) must be one of auto"):
        FeatureConfig(runtime="onnx").validate()
    code = main(["features", "--data", str(tmp_path), "--precision", "bfloat61"])
    assert code == 2 and "did you mean bfloat16" in capsys.readouterr().err


def test_old_spellings_say_what_to_write(tmp_path, capsys):
    code = main(["features", "--data", str(tmp_path / "none"), "--float16",
                 "--runtime-precision", "bf16"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 2  # the folder does not exist: the options were taken first
    assert "--float16 is now --storage float16" in out
    assert "--runtime-precision is now --precision bfloat16" in out


def test_store_key_changes_with_what_the_graph_depends_on(tmp_path):
    base = _store(tmp_path)
    for change in ({"input_size": 64}, {"pooling": "max"}, {"weights_id": "sha256:ab"}):
        assert _store(tmp_path, **change).directory != base.directory
    assert _store(tmp_path).directory == base.directory


# --------------------------------------------------------------------------- with OpenVINO


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """One conversion (tiny MobileNetV2, fixed random weights, 32 px) shared by the tests below."""
    from pipeline.features.backbones import build_base, get_backbone

    root = tmp_path_factory.mktemp("runtimes")
    folder = make_folder(root / "shapes")
    weights = root / "fixed.weights.h5"  # one set of weights for Keras and the converted model
    build_base(get_backbone("mobilenet_v2"), weights="none", input_size=32).save_weights(weights)
    config = FeatureConfig(
        **{
            **TINY.__dict__,
            "weights": str(weights),
            "runtime": "openvino",
            "precision": "float32",
        }
    )
    summary = extract_features(folder, config, artifacts_dir=root / "art", progress=False)
    return root, folder, config, summary


@needs_openvino
def test_openvino_features_equal_keras_features(converted):
    root, folder, config, summary = converted
    keras_config = FeatureConfig(**{**config.__dict__, "runtime": "keras"})
    keras = extract_features(folder, keras_config, artifacts_dir=root / "k", progress=False)
    a, b = load_features(keras.cache_path), load_features(summary.cache_path)
    assert list(a.paths) == list(b.paths)
    assert runtimes.cosine_min(a.features, b.features) > 0.9999
    np.testing.assert_allclose(
        b.features, a.features, rtol=1e-3, atol=1e-3 * np.abs(a.features).max()
    )
    if runtimes.cpu_supports_bf16():
        bf16 = extract_features(
            folder,
            FeatureConfig(**{**config.__dict__, "precision": "bfloat16"}),
            artifacts_dir=root / "art",
            progress=False,
        )
        assert runtimes.cosine_min(a.features, load_features(bf16.cache_path).features) > 0.99


@needs_openvino
def test_a_float32_runtime_writes_the_keras_cache(converted):
    root, folder, config, summary = converted
    attrs = read_attrs(summary.cache_path)
    assert (attrs["runtime"], attrs["precision"]) == ("openvino", "fp32")
    assert attrs["openvino_version"] == runtimes.openvino_version()
    assert "runtime" not in json.loads(attrs["config_json"])  # execution, not identity
    assert FeatureConfig.from_cache_attrs(attrs).runtime == "openvino"
    # Keras and later stages name the same file, without choosing a runtime.
    keras_config = FeatureConfig(**{**config.__dict__, "runtime": "keras"})
    assert cache_path_for("shapes", keras_config, root / "art") == summary.cache_path
    assert cache_path_for("shapes", config, root / "art") == summary.cache_path
    keras = extract_features(folder, keras_config, artifacts_dir=root / "art", progress=False)
    assert keras.status == "up to date" and keras.cache_path == summary.cache_path


@needs_openvino
def test_a_cache_of_another_precision_is_rebuilt_not_mixed(converted, tmp_path):
    root, folder, config, _ = converted
    path = tmp_path / "one.h5"
    keras_config = FeatureConfig(**{**config.__dict__, "runtime": "keras"})
    extract_features(folder, keras_config, artifacts_dir=root / "art", cache_path=path)
    again = extract_features(folder, config, artifacts_dir=root / "art", cache_path=path)
    assert again.status == "up to date"  # float32 of either runtime: the same features
    # A resumed work file of another precision is discarded, as for any other option.
    other_runtime = read_attrs(path)["config_json"].replace('"fp32"', '"bf16"')
    two = path.with_name("two.h5")
    writer, _ = cache_writer.CacheWriter.open(
        two,
        config_json=other_runtime,
        fingerprint="x",
        paths=["a"],
        labels=[0],
        splits=["train"],
        width=1280,
        dtype="float32",
    )
    writer.close()
    resumed = extract_features(folder, config, artifacts_dir=root / "art", cache_path=two)
    assert resumed.status == "built" and any("discarded" in n for n in resumed.notes)


@needs_openvino
def test_conversion_is_reused_and_rebuilt_on_change(converted, monkeypatch):
    root, _, config, _ = converted
    store = resolve_features(config, artifacts_dir=root / "art").store
    meta = store.meta()
    check = meta["checks"]["shapes"]["fp32"]
    assert meta["converted"] and check["passed"] and check["data"] == "shapes"
    assert check["paths"] and all(p.startswith(("red/", "green/", "blue/")) for p in check["paths"])
    xml_mtime = store.model_xml.stat().st_mtime_ns

    # Reused: another data set converts nothing; its own images are checked once.
    other = make_folder(root / "other", per_class=3)
    summary = extract_features(other, config, artifacts_dir=root / "art", progress=False)
    assert summary.status == "built" and store.model_xml.stat().st_mtime_ns == xml_mtime
    assert store.meta()["checks"]["other"]["fp32"]["data"] == "other"

    def no_keras(*args, **kwargs):
        raise AssertionError("Keras model built although the conversion and check are stored")

    monkeypatch.setattr("pipeline.features.backbones.build_feature_extractor", no_keras)
    summary = extract_features(other, config, artifacts_dir=root / "art", progress=False)
    assert summary.status == "up to date"
    monkeypatch.undo()

    # Rebuilt: a store whose record no longer matches (another identity) is converted again.
    store.meta_path.write_text(json.dumps({**meta, "identity": {"old": True}}))
    again = make_folder(root / "again", per_class=2)
    extract_features(again, config, artifacts_dir=root / "art", progress=False)
    assert store.meta() is not None and store.model_xml.stat().st_mtime_ns != xml_mtime


@needs_openvino
@pytest.mark.slow
@pytest.mark.skipif(not precisions.nncf_installed(), reason="the nncf package is not installed")
def test_int8_quantizes_on_the_users_images_into_its_own_cache(converted):
    root, folder, config, summary = converted
    int8 = FeatureConfig(**{**config.__dict__, "precision": "int8"})
    result = extract_features(folder, int8, artifacts_dir=root / "art", progress=False)
    assert result.cache_path.name == summary.cache_path.name.replace(".h5", "_int8.h5")
    attrs = read_attrs(result.cache_path)
    assert (attrs["runtime"], attrs["precision"]) == ("openvino", "int8")
    store = resolve_features(config, artifacts_dir=root / "art").store
    check = store.meta()["checks"]["shapes"]["int8"]
    assert check["rule"] == "agreement" and check["calibration_images"] > 0
    quantized = precisions.quantized_xml(store.directory, "shapes")
    model = runtimes.OpenVINOModel(quantized, "int8")
    assert list(model.compiled.inputs[0].get_partial_shape().to_shape()) == [1, 32, 32, 3]
    x = np.random.default_rng(0).uniform(-1, 1, (5, 32, 32, 3)).astype(np.float32)
    together = model.predict_on_batch(x)  # five requests in flight, outputs in order
    alone = np.concatenate([model.predict_on_batch(x[i : i + 1]) for i in range(5)])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
    assert cache_path_for("shapes", int8, root / "art") == result.cache_path


def test_settle_checks_the_conversion_then_each_reduced_precision_once(tmp_path, monkeypatch):
    monkeypatch.setattr(runtimes, "openvino_installed", lambda: True)
    monkeypatch.setattr(runtimes, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr(precisions, "nncf_installed", lambda: True)
    store = _store(tmp_path)
    _record(store)  # converted, nothing checked yet
    ran: list[str] = []

    def fake_check(store, checked, keras_model, x, *, data, paths):
        ran.append("fp32")
        store.record_check(data, "fp32", {"cosine_min": 1.0, "passed": True, "images": 2})

    def fake_reduced(store, choice, sample, data):
        ran.append(choice.precision)  # int8 changes the predictions here, bf16 does not
        result = {"rule": "agreement", "passed": choice.precision == "bf16", "images": 4,
                  "agreement": 0.5, "correct_float32": 4, "correct_reduced": 2}  # fmt: skip
        store.record_check(data, choice.precision, result)

    monkeypatch.setattr(runtimes, "check", fake_check)
    monkeypatch.setattr(precisions, "check_reduced", fake_reduced)
    sample = precisions.Sample(np.zeros((4, 1)), np.array([0, 0, 1, 1]), [], np.zeros((4, 1)))
    settle = dict(store=store, build_keras=lambda: None, sample=lambda: (np.zeros((2, 1)), []))
    choice = runtimes.settle("auto", "auto", **settle, reduced_sample=lambda: sample, data="d")
    assert (choice.runtime, choice.precision) == ("openvino", "bf16")
    assert ran == ["fp32", "int8", "bf16"] and "int8 features change" in choice.notes[0]
    again = runtimes.settle("auto", "auto", **settle, reduced_sample=lambda: sample, data="d")
    assert again.precision == "bf16" and ran == ["fp32", "int8", "bf16"]  # recorded: not rerun
    # No labelled sample (the Python API's images): auto stays at float32.
    plain = runtimes.settle("auto", "auto", **settle, data="other")
    assert plain.precision == "fp32" and ran[-1] == "fp32"


def test_the_agreement_rule_refuses_a_loss_not_a_gain():
    """Two images float32's head gets wrong, moved to their class's centre in the reduced
    features: 99% agreement, two more right, passes; the same two moved the wrong way fail."""
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 100)
    reference = rng.normal(size=(200, 4)) + labels[:, None] * 2.0
    centres = np.array([reference[labels == c].mean(axis=0) for c in (0, 1)])
    margin = (reference.sum(axis=1) - 4.0) * (2 * labels - 1)  # < 0: past the boundary
    order = np.argsort(margin)
    wrong, right = order[:2], order[-2:]  # the furthest on the wrong side, and on the right one
    better = reference.copy()
    better[wrong] = centres[labels[wrong]]
    result = precisions.head_agreement(reference, better, labels)
    assert result["correct_reduced"] >= result["correct_float32"] + 2 and result["passed"]
    worse = reference.copy()
    worse[right] = centres[1 - labels[right]]
    assert not precisions.head_agreement(reference, worse, labels)["passed"]
