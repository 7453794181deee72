"""Stage three: freezing, warm start, resume, the saved model, refusals, `make finetune`.

MobileNetV2 with random weights at 32x32 on a tiny colour folder: every run takes seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import COLOURS, make_folder

from pipeline.core.errors import FinetuneError, PipelineError
from pipeline.data.folders import SplitConfig
from pipeline.features.config import FeatureConfig
from pipeline.finetuning import freezing
from pipeline.finetuning import run as ft

REPO = Path(__file__).resolve().parents[1]
TINY = ft.FinetuneConfig(
    FeatureConfig(weights="none", input_size=32, batch_size=8), head_epochs=2, epochs=1, unfreeze=5
)
STEM = "mobilenet_v2_32_avg_random"


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> tuple[Path, Path]:
    """A 3-class folder and an artifacts folder holding its stage-one cache."""
    from pipeline.features.extract import extract_features

    root = tmp_path_factory.mktemp("finetune")
    data = make_folder(root / "colours", per_class=8, classes=tuple(COLOURS))
    extract_features(
        data, TINY.features, split=SplitConfig(), artifacts_dir=root / "artifacts", progress=False
    )
    return data, root / "artifacts"


@pytest.fixture
def artifacts(colours, tmp_path) -> Path:
    """A private copy of the artifacts (stage-one cache only) for one test."""
    out = tmp_path / "artifacts"
    shutil.copytree(colours[1] / "features", out / "features")
    return out


@pytest.fixture(scope="module")
def base():
    from pipeline.features.backbones import build_base, get_backbone

    return build_base(get_backbone("mobilenet_v2"), weights="none", input_size=32)


def cache_file(artifacts: Path) -> Path:
    return artifacts / "features" / "colours" / f"{STEM}.h5"


# --- freezing --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 9, 40, "all"])
def test_exactly_the_last_n_layers_are_trainable_and_batchnorm_never(base, n):
    import keras

    layers = freezing.backbone_layers(base)
    count = freezing.resolve_layers(n, base, "mobilenet_v2")
    names = freezing.set_trainable(base, count)
    last = layers[len(layers) - count :] if count else []
    expected = [lyr.name for lyr in last if not isinstance(lyr, keras.layers.BatchNormalization)]
    assert names == expected
    assert [lyr.name for lyr in layers if lyr.trainable] == expected
    assert not any(
        lyr.trainable for lyr in layers if isinstance(lyr, keras.layers.BatchNormalization)
    )
    trainable_weights = {id(w) for lyr in last for w in lyr.trainable_weights}
    assert {id(w) for w in base.trainable_weights} == trainable_weights
    if n == "all":
        assert count == len(layers) == 153


def test_last_block_of_mobilenet_v2(base):
    count = freezing.last_block_size(base)
    layers = freezing.backbone_layers(base)
    assert layers[-count].name == "block_16_expand"
    assert layers[-count - 1].name == "block_15_add"


@pytest.mark.parametrize("value", [-1, "-3", "abc", "1.5", 2.5, True])
def test_layers_must_be_a_whole_number_at_least_zero(value):
    with pytest.raises(FinetuneError, match="UNFREEZE"):
        freezing.parse_layers(value)


def test_layers_deeper_than_the_backbone_says_the_depth(base):
    with pytest.raises(FinetuneError, match=r"depth of mobilenet_v2 \(153 layers\)"):
        freezing.resolve_layers(154, base, "mobilenet_v2")


@pytest.mark.parametrize("mode", ["caffe", "tf", "torch", "none"])
def test_preprocessing_layer_matches_stage_one(mode):
    from pipeline.features.backbones import preprocess
    from pipeline.finetuning.layers import ImagePreprocessing

    batch = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    layer = ImagePreprocessing(mode)
    got = np.asarray(layer(batch.astype(np.float32)))
    np.testing.assert_allclose(got, preprocess(batch, mode), rtol=1e-5, atol=1e-4)


# --- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "label"),
    [
        ({"head_learning_rate": 2.0}, "--head-lr must be"),
        ({"rotation": 1.5}, "--rotation must be"),
        ({"zoom": -0.1}, "--zoom must be"),
        ({"flip": "sideways"}, "--flip must be one of"),
        ({"epochs": -1}, "EPOCHS= (--epochs) must be"),
        ({"class_weight": "balance"}, "did you mean balanced"),
        ({"name": "../x"}, "NAME= (--name)"),
    ],
)
def test_option_messages_name_what_the_user_can_type(change, label):
    with pytest.raises(PipelineError) as info:
        replace(TINY, **change).validate()
    assert label in str(info.value)
    for missing in ("WORKERS", "FLIP=", "ROTATION", "ZOOM", "HEAD_LR"):
        assert missing not in str(info.value)
    with pytest.raises(PipelineError, match=r"--workers must be"):
        replace(TINY, features=replace(TINY.features, workers=0)).validate()


def test_a_stage_one_cache_as_data_gives_its_configuration(colours, tmp_path):
    notes: list[str] = []
    config = replace(TINY, split=SplitConfig(seed=3), features=FeatureConfig(batch_size=4))
    data, got, given = ft._config_from_cache(cache_file(colours[1]), config, notes.append, tmp_path)
    assert data == colours[0].resolve() and given == cache_file(colours[1])
    # the cache's runtime is kept (so the cache is up to date), not echoed as a difference
    assert got.features == FeatureConfig(
        weights="none", input_size=32, batch_size=4, runtime="keras", precision="float32"
    )
    assert got.split == SplitConfig(seed=0)
    assert notes == ["using the cache's weights=none, input_size=32, seed=0"]
    assert ft._default_name(got.validate(), got.unfreeze) == "mobilenet_v2_32_random_layers-5"


def test_a_stage_one_cache_at_a_reduced_precision_is_used_and_said(colours, monkeypatch, tmp_path):
    from types import SimpleNamespace

    from pipeline.features import cache

    read_attrs = cache.read_attrs
    openvino = {"runtime": "openvino", "precision": "bf16"}
    monkeypatch.setattr(cache, "read_attrs", lambda path: {**read_attrs(path), **openvino})
    notes: list[str] = []
    _, got, _ = ft._config_from_cache(cache_file(colours[1]), TINY, notes.append, tmp_path)
    assert (got.features.runtime, got.features.precision) == ("openvino", "bfloat16")
    assert not any("runtime" in line for line in notes)
    features = SimpleNamespace(path=Path("x.h5"), attrs=openvino)
    assert "x.h5 holds bf16 features (openvino)" in ft._runtime_note(features)
    assert "starts from a head fitted on those features" in ft._runtime_note(features)
    assert ft._runtime_note(SimpleNamespace(path=Path("y.h5"), attrs={"precision": "fp32"})) == ""
    assert "phase two and the exported model run on Keras" in ft._runtime_note(features)
    assert ft._runtime_note(SimpleNamespace(path=Path("x.h5"), attrs={})) == ""
    # a folder: the options as given (stage one's cache is found from them, whichever runtime)
    _, got, _ = ft._config_from_cache(colours[0], TINY, notes.append, tmp_path)
    assert got.features == TINY.features
    openvino_config = replace(TINY, features=replace(TINY.features, runtime="openvino"))
    _, got, _ = ft._config_from_cache(colours[0], openvino_config, notes.append, tmp_path)
    assert got.features.runtime == "openvino"


# --- runs ------------------------------------------------------------------------------------


def head_manifest(fingerprint: str, class_names, **fields) -> dict:
    """A stage-two head manifest, as :mod:`pipeline.heads.fit` writes it (schema version 2)."""
    return {
        "kind": "head",
        "manifest_version": 2,
        "name": "softmax",
        "fingerprint": fingerprint,
        "class_names": list(class_names),
        "norm": "none",
        "pca": None,
        **fields,
    }


def save_stage_two_head(artifacts: Path) -> list[np.ndarray]:
    """A head as stage two saves it: build_softmax_head, softmax.keras and softmax.json."""
    import keras

    from pipeline.core.artifacts import Artifacts
    from pipeline.core.files import sha256_file
    from pipeline.features.cache import read_attrs
    from pipeline.heads.softmax import build_softmax_head

    keras.utils.set_random_seed(7)
    head = build_softmax_head(1280, 3)
    path = Artifacts(artifacts).stage_two_softmax("colours", STEM)
    path.parent.mkdir(parents=True)
    head.save(path)
    attrs = read_attrs(cache_file(artifacts))
    manifest = head_manifest(
        attrs["fingerprint"], attrs["class_names"], files={"keras": path.name},
        sha256={"keras": sha256_file(path)},
    )  # fmt: skip
    path.with_suffix(".json").write_text(json.dumps(manifest))
    return [
        *head.get_layer("head_dense").get_weights(),
        *head.get_layer("head_output").get_weights(),
    ]


@pytest.mark.slow  # a whole stage run: the quick tier keeps its 5 minutes
def test_warm_start_from_the_stage_two_head_and_saved_model(colours, artifacts):
    from pipeline.core.artifacts import read_manifest
    from pipeline.finetuning.model import load_finetuned

    saved = save_stage_two_head(artifacts)
    result = ft.finetune(
        colours[0], replace(TINY, epochs=0), artifacts_dir=artifacts, progress=False
    )

    assert result.head_source == "stage two"
    head = result.model.get_layer("softmax_head")
    got = [
        *head.get_layer("head_dense").get_weights(),
        *head.get_layer("head_output").get_weights(),
    ]
    for a, b in zip(got, saved, strict=True):
        np.testing.assert_array_equal(a, b)
    assert [h["phase"] for h in result.history] == []  # nothing trained: it costs nothing

    # The saved model: loads with safe_mode, same weights, same predictions.
    loaded = load_finetuned(result.model_path)
    for a, b in zip(loaded.weights, result.model.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert loaded.get_layer("preprocessing").get_config()["mode"] == "tf"
    from pipeline.data.images import load_image

    images = sorted(colours[0].glob("*/*.png"))[:6]
    x = np.stack([load_image(p, 32) for p in images]).astype(np.float32)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), result.model.predict(x, verbose=0), atol=1e-6
    )

    # The manifest: the shared schema, weights = identity, weights_source = what was passed.
    raw = json.loads(result.manifest_path.read_text())
    assert raw["manifest_version"] == 2 and "format_version" not in raw
    manifest = read_manifest(result.manifest_path, kind="finetuned")
    assert manifest["class_names"] == ["blue", "green", "red"]
    assert manifest["input_size"] == 32 and manifest["backbone"] == "mobilenet_v2"
    assert manifest["weights"] == "none" and manifest["weights_source"] == "none"
    assert manifest["files"]["predictions"] == result.predictions_path.name
    assert manifest["config"]["features"]["batch_size"] == 8
    from pipeline.predict import predict_images  # what `make predict MODEL=...` calls

    predict_images(result.model_path, colours[0] / "red", result.model_path.with_suffix(".csv"))
    assert len(result.model_path.with_suffix(".csv").read_text().splitlines()) == 9  # header + 8
    # The results contract of pipeline.report.collect: every val/test image of the cache.
    predictions = json.loads(result.predictions_path.read_text())
    assert predictions["class_names"] == manifest["class_names"]
    entries = predictions["predictions"]
    assert len(entries) == 12 and {e["split"] for e in entries.values()} == {"val", "test"}
    assert all(e["label"] == path.split("/")[0] for path, e in entries.items())
    np.testing.assert_allclose([sum(e["proba"]) for e in entries.values()], 1.0, atol=1e-4)


@pytest.mark.slow
def test_resume_gives_the_uninterrupted_result_and_refuses_another_configuration(
    colours, artifacts, tmp_path
):
    import keras

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:  # killed after phase-two epoch 1 was checkpointed
                raise KeyboardInterrupt

    config = replace(TINY, epochs=3, patience=10)
    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(
            colours[0], config, artifacts_dir=artifacts, progress=False, echo=lines.append,
            callbacks=[Interrupt()],
        )  # fmt: skip
    assert not any(line.startswith("Epoch") for line in lines)  # only the pipeline's lines
    assert [line.split(":")[0] for line in lines if " epoch " in line] == ["phase 2 epoch 1/3"]
    name = "mobilenet_v2_32_random_layers-5"
    checkpoint = artifacts / "finetune" / "colours" / f"{name}.checkpoint"
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["epoch"] == 1 and state["head_source"] == "scratch"
    before = sorted(p.name for p in checkpoint.iterdir())

    other = replace(config, learning_rate=1e-4)
    with pytest.raises(FinetuneError, match="another configuration.*learning_rate"):
        ft.finetune(colours[0], other, artifacts_dir=artifacts, progress=False)
    assert sorted(p.name for p in checkpoint.iterdir()) == before  # nothing lost

    result = ft.finetune(colours[0], config, artifacts_dir=artifacts, progress=False)
    assert result.resumed_from == 1
    assert [h["epoch"] for h in result.history if h["phase"] == 2] == [1, 2, 3]
    assert [h["phase"] for h in result.history].count(1) == 2  # phase one on cached features
    assert not checkpoint.exists()
    assert result.plot_path.stat().st_size > 0
    assert result.history_path.with_suffix(".csv").read_text().startswith("phase,epoch,loss")

    # The same run without the interruption ends with the same log and weights.
    fresh = tmp_path / "fresh"
    shutil.copytree(artifacts / "features", fresh / "features")
    whole = ft.finetune(colours[0], config, artifacts_dir=fresh, progress=False)
    keys = ("phase", "epoch", "loss", "accuracy", "val_loss", "val_accuracy")
    for a, b in zip(whole.history, result.history, strict=True):
        assert {k: a[k] for k in keys} == pytest.approx({k: b[k] for k in keys}, rel=1e-4)
    assert whole.best_epoch == result.best_epoch
    for a, b in zip(whole.model.get_weights(), result.model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_cli_refusals_are_one_line_and_exit_2(colours, artifacts, capsys):
    from pipeline.cli.main import main

    common = ["finetune", "--data", str(colours[0]), "--weights", "none", "--input-size", "32",
              "--artifacts", str(artifacts), "--quiet"]  # fmt: skip
    for layers, message in (("abc", "whole number"), ("-2", ">= 0"), ("999", "153 layers")):
        assert main([*common, "--unfreeze", layers]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: UNFREEZE") and message in err
    assert main([*common, "--rotation", "2"]) == 2
    assert capsys.readouterr().err.startswith("error: --rotation must be a number in [0, 1)")
    assert not (artifacts / "finetune").exists()


@pytest.mark.slow
def test_make_finetune_end_to_end(colours, tmp_path):
    out = tmp_path / "artifacts"
    variables = [f"DATA={colours[0]}", "WEIGHTS=none", "INPUT_SIZE=32", "UNFREEZE=3", "EPOCHS=1",
                 "HEAD_EPOCHS=2", "BATCH=8", f"ARTIFACTS={out}", f"PY={sys.executable}"]  # fmt: skip
    make = ["make", "-s", "-o", "install", "-o", "weights-from-assets", "finetune"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    run = subprocess.run([*make, *variables], cwd=REPO, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "fine-tuned 3 of 153 backbone layers" in run.stdout
    assert "Epoch 1/1" not in run.stdout + run.stderr  # the pipeline's own epoch line only
    folder = out / "finetune" / "colours"
    for suffix in (
        ".keras",
        ".json",
        ".predictions.json",
        ".history.json",
        ".history.csv",
        ".curves.png",
    ):
        assert (folder / f"mobilenet_v2_32_random_layers-3{suffix}").is_file()

    bad = subprocess.run(
        [*make, *variables, "UNFREEZE=-1"], cwd=REPO, capture_output=True, text=True, env=env
    )
    assert bad.returncode != 0
    assert [line for line in bad.stderr.splitlines() if line.startswith("error:")] == [
        "error: UNFREEZE must be >= 0 (0 trains the head only, 'all' every layer); got -1"
    ]


def test_a_stage_two_head_fit_on_normalised_features_is_not_a_warm_start(tmp_path):
    """Stage three feeds raw pooled features: a head fit after NORM or PCA must not be copied."""
    from types import SimpleNamespace

    from pipeline.finetuning.model import stage_two_mismatch

    head = tmp_path / "softmax.keras"
    head.write_bytes(b"model")
    features = SimpleNamespace(attrs={"fingerprint": "f"}, class_names=("a", "b"))
    manifest = head_manifest("f", ["a", "b"])
    head.with_suffix(".json").write_text(json.dumps(manifest))
    assert stage_two_mismatch(head, features) is None
    for change in ({"norm": "l2"}, {"norm": "standard"}, {"pca": 16}):
        head.with_suffix(".json").write_text(json.dumps({**manifest, **change}))
        assert "not on raw features" in stage_two_mismatch(head, features)
    head.with_suffix(".json").write_text(json.dumps({**manifest, "kind": "finetuned"}))
    assert "no usable manifest" in stage_two_mismatch(head, features)
