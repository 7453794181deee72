"""Stage three's validation at the cut, the train step traced once, the model saved uncompiled.

MobileNetV2 with random weights at 32x32 on a tiny colour folder; the Keras models
of the other tests are a Dense layer.
"""

from __future__ import annotations

import json
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import COLOURS, make_folder

from pipeline.finetuning import validation
from pipeline.finetuning.activations import find_cut
from pipeline.finetuning.validation import CutEvaluation, cut_evaluation, scores


@pytest.fixture(scope="module")
def base():
    from pipeline.features.backbones import build_base, get_backbone

    return build_base(get_backbone("mobilenet_v2"), weights="none", input_size=32)


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("val") / "colours", 4, tuple(COLOURS))


def _run(base, folder, layers: int):
    """What :func:`cut_evaluation` reads of a run on the images: 12 images, 5 val, 2 test."""
    from pipeline.features.backbones import get_backbone

    paths = np.array(sorted(str(p.relative_to(folder)) for p in folder.glob("*/*.png")))
    split = np.array(["train"] * 5 + ["val"] * 5 + ["test"] * 2)
    return SimpleNamespace(
        cut=None, base=base, layers=layers, root=folder, activations={"mode": "images"},
        splits={s: split == s for s in ("train", "val", "test")},
        features=SimpleNamespace(paths=paths, labels=np.arange(len(paths)) % 3),
        config=SimpleNamespace(features=SimpleNamespace(batch_size=4, workers=1)),
        resolved=SimpleNamespace(
            input_size=32, spec=get_backbone("mobilenet_v2"),
            runtime=SimpleNamespace(keras_policy="float32"),
        ),
    )  # fmt: skip


def _whole(base):
    from pipeline.features.backbones import get_backbone
    from pipeline.finetuning.model import build_finetune_model
    from pipeline.heads.softmax import build_softmax_head

    head = build_softmax_head(1280, 3)
    return build_finetune_model(get_backbone("mobilenet_v2"), base, head, size=32), head


def test_the_top_on_the_frozen_part_predicts_what_the_whole_network_does(base, colours):
    from pipeline.data.images import load_image

    run = _run(base, colours, layers=11)
    model, head = _whole(base)
    evaluation = cut_evaluation(run, model, head)
    assert evaluation is not None and evaluation.source == "images"
    rows = np.flatnonzero(run.splits["val"] | run.splits["test"])  # 7 rows: a batch of 4, then 3
    np.testing.assert_array_equal(evaluation.rows, rows)
    assert evaluation.activations.shape == (7, find_cut(base, 11).width)  # block_15_add
    images = np.stack([load_image(colours / p, 32) for p in run.features.paths[rows]])
    whole = model.predict(images.astype(np.float32), verbose=0)
    np.testing.assert_allclose(evaluation.predict(rows), whole, atol=1e-5)
    np.testing.assert_allclose(evaluation.predict(rows[2:4]), whole[2:4], atol=1e-5)
    with pytest.raises(ValueError, match="outside"):
        evaluation.predict(np.flatnonzero(run.splits["train"]))


def test_no_cut_evaluation_when_nothing_is_frozen_or_it_would_not_fit(base, colours, monkeypatch):
    from pipeline.finetuning.freezing import backbone_layers

    model, head = _whole(base)
    everything = _run(base, colours, layers=len(backbone_layers(base)))
    assert cut_evaluation(everything, model, head) is None  # UNFREEZE=all: no cut
    monkeypatch.setattr(validation, "ACTIVATION_BYTES", 7 * find_cut(base, 11).width * 4 - 1)
    assert cut_evaluation(_run(base, colours, layers=11), model, head) is None


@pytest.mark.parametrize("sigmoid", [False, True])
def test_scores_are_what_keras_reports_for_validation_data(sigmoid):
    import keras

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 50)
    if sigmoid:
        proba = rng.uniform(0, 1, (50, 1)).astype(np.float32)
        y = labels.reshape(-1, 1).astype(np.float32)
        loss, metric = keras.losses.BinaryCrossentropy(), keras.metrics.BinaryAccuracy()
    else:
        proba = rng.dirichlet([1, 1], 50).astype(np.float32)
        y = labels
        loss = keras.losses.SparseCategoricalCrossentropy()
        metric = keras.metrics.SparseCategoricalAccuracy()
    metric.update_state(y, proba)
    got_loss, got_accuracy = scores(proba, labels, sigmoid)
    assert got_loss == pytest.approx(float(loss(y, proba)), rel=1e-6)
    assert got_accuracy == float(metric.result())


def test_the_validation_callback_fills_the_logs_the_log_and_early_stopping_read():
    top = SimpleNamespace(predict=lambda x, **_: np.stack([1 - x[:, 0], x[:, 0]], axis=1))
    rows = np.array([3, 5, 8])
    evaluation = CutEvaluation(top, rows, np.array([[0.9], [0.2], [0.7]]), 1.0, "images")
    logs = {"loss": 0.5}
    evaluation.callback(rows[:2], np.array([1, 1]), sigmoid=False).on_epoch_end(0, logs)
    assert logs["loss"] == 0.5 and logs["val_accuracy"] == 0.5
    assert logs["val_loss"] == pytest.approx(-(np.log(0.9) + np.log(0.2)) / 2, rel=1e-6)


def test_compiled_models_trace_their_train_step_once():
    import keras

    from pipeline.finetuning.model import compile_model

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    compile_model(model, 1e-3, sigmoid=False)
    assert model.optimizer.built
    traces = []
    step = model.train_step
    model.train_step = lambda data: traces.append(1) or step(data)
    x, y = np.ones((10, 4), np.float32), np.arange(10) % 3
    model.fit(x, y, batch_size=4, epochs=2, verbose=0)  # batches of 4, 4 and 2
    assert len(traces) == 1  # an optimizer built inside the first trace costs a second one


def test_the_saved_model_is_uncompiled_and_holds_the_weights(tmp_path):
    import keras

    from pipeline.finetuning.model import compile_model, load_finetuned, save_model

    inputs = keras.Input((4,), name="x")
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs), name="m")
    compile_model(model, 1e-3, sigmoid=False)
    model.fit(np.ones((4, 4), np.float32), np.array([0, 1, 0, 1]), epochs=1, verbose=0)
    save_model(model, tmp_path / "m.keras")
    with zipfile.ZipFile(tmp_path / "m.keras") as saved:
        assert not json.loads(saved.read("config.json")).get("compile_config")
        assert b"optimizer" not in saved.read("model.weights.h5")
    loaded = load_finetuned(tmp_path / "m.keras")
    assert loaded.name == "m" and not loaded.compiled
    for a, b in zip(loaded.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert model.compiled and model.optimizer.iterations.numpy() == 1  # the original untouched


def test_an_image_that_no_longer_decodes_stops_the_run_in_one_line():
    from pipeline.core.errors import FinetuneError
    from pipeline.finetuning.image_feed import check_readable

    paths = ["ants/a.jpg", "ants/b.jpg", "bees/c.jpg"]
    check_readable(SimpleNamespace(errors={}, start=0), paths)  # nothing failed: goes on
    with pytest.raises(FinetuneError) as info:
        check_readable(SimpleNamespace(errors={1: "truncated"}, start=1), paths)
    assert str(info.value) == (
        "bees/c.jpg can no longer be read (truncated); re-run `make features`"
    )
