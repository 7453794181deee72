"""Saving and loading heads: the skops format, its trusted types, refusals, older heads."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import joblib
import numpy as np
import pytest
import skops.io
from heads_helpers import BASE_ATTRS, blobs
from sklearn.pipeline import Pipeline

from pipeline.core import artifacts
from pipeline.core.errors import HeadError
from pipeline.heads.fit import head_outputs
from pipeline.heads.registry import DEFAULT_HEADS, HEADS, build_head
from pipeline.heads.store import TRUSTED_TYPES, load_head, save_head

WIDTH, CLASSES = 8, ("class0", "class1", "class2")
FEATURES = artifacts.feature_identity(BASE_ATTRS)


def _data():
    return blobs(12, len(CLASSES), WIDTH, separation=3.0)


def _fit(name: str, **build) -> Pipeline:
    pipe = build_head(name, **build)
    if name == "softmax":
        pipe.set_params(softmax__max_epochs=3)
    X, y = _data()
    return pipe.fit(X, y)


def _manifest(name: str, **fields) -> dict:
    """A head manifest of the synthetic features (``fields`` added or replaced)."""
    return artifacts.new_manifest(
        "head",
        name=name,
        dataset="synthetic",
        class_names=CLASSES,
        features=FEATURES,
        fingerprint="f" * 64,
        feature_width=WIDTH,
        **fields,
    )


def _save(pipe: Pipeline, folder: Path, name: str, **options) -> Path:
    return save_head(pipe, _manifest(name), folder, **options)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _replace_model(manifest_path: Path, payload: bytes) -> Path:
    """Swap the head's .skops file and write a manifest that vouches for it (a hostile copy)."""
    manifest = json.loads(manifest_path.read_text())
    model = manifest_path.parent / manifest["files"]["model"]
    model.write_bytes(payload)
    manifest["sha256"]["model"] = _sha256(model)
    manifest_path.write_text(json.dumps(manifest))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every registered head fitted on tiny blobs and saved: name -> (pipeline, manifest)."""
    folder = tmp_path_factory.mktemp("heads")
    out = {}
    for name in HEADS:
        pipe = _fit(name)
        out[name] = (pipe, _save(pipe, folder, name))
    return out


@pytest.mark.parametrize("name", list(HEADS))
def test_every_head_round_trips_through_skops(saved, name):
    pipe, manifest_path = saved[name]
    manifest = json.loads(manifest_path.read_text())
    folder = manifest_path.parent
    assert manifest["files"]["model"] == f"{name}.skops"
    assert manifest["files"]["joblib"] == f"{name}.joblib"  # the export
    assert set(manifest["sha256"]) == set(manifest["files"])
    # Nothing outside the trusted list: the file loads with it and nothing more.
    extra = set(skops.io.get_untrusted_types(file=folder / f"{name}.skops")) - set(TRUSTED_TYPES)
    assert not extra
    X, _ = _data()
    expected = head_outputs(pipe, X, len(CLASSES))
    for path in (manifest_path, folder / f"{name}.skops", folder / f"{name}.joblib"):
        head = load_head(path)
        pred, scores, is_proba = head.predict(X)
        np.testing.assert_array_equal(pred, expected[0])
        np.testing.assert_allclose(scores, expected[1], rtol=1e-6, atol=1e-6)
        assert is_proba == expected[2]


def test_default_heads_are_all_registered_and_tested():
    assert set(DEFAULT_HEADS) <= set(HEADS)


@pytest.mark.parametrize("norm", ["l2", "standard"])
def test_normalisation_and_pca_steps_round_trip(tmp_path, norm):
    pipe = _fit("logreg", norm=norm, pca=4)
    head = load_head(_save(pipe, tmp_path, "logreg"))
    X, _ = _data()
    np.testing.assert_allclose(head.predict(X)[1], head_outputs(pipe, X, 3)[1], atol=1e-9)


def test_the_joblib_export_is_optional_and_never_read(saved, tmp_path):
    _, manifest_path = saved["svm"]
    folder = tmp_path / "copy"
    shutil.copytree(manifest_path.parent, folder)
    (folder / "svm.joblib").write_bytes(b"not a pickle")  # damaged: the set is refused
    with pytest.raises(HeadError, match="corrupt, truncated or from another run"):
        load_head(folder / "svm.json")
    (folder / "svm.joblib").unlink()  # removed: the head loads without it
    assert load_head(folder / "svm.skops").name == "svm"
    no_export = _save(_fit("svm"), tmp_path / "plain", "svm", export_joblib=False)
    assert "joblib" not in json.loads(no_export.read_text())["files"]
    assert not (tmp_path / "plain" / "svm.joblib").exists()


def test_the_joblib_export_loads_with_joblib(saved):
    pipe, manifest_path = saved["ridge"]
    exported = joblib.load(manifest_path.with_suffix(".joblib"))
    X, _ = _data()
    np.testing.assert_array_equal(exported.predict(X), pipe.predict(X))


# --------------------------------------------------------------------------- hostile files

HOSTILE_MODULE = """
import pathlib
pathlib.Path(__file__).with_name("imported.marker").write_text("imported")

class Trap:
    def __init__(self):
        self.payload = "boom"

    def __setstate__(self, state):
        pathlib.Path(__file__).with_name("built.marker").write_text("built")
        self.__dict__.update(state)

    def fit(self, X, y=None):
        return self

    def predict(self, X):
        return X
"""


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    """``(skops bytes of a Pipeline holding hostile_trap.Trap, the module's folder)``.

    The module is importable while the test runs, and importing or building it
    leaves a marker file, so a test sees any code of it that ran.
    """
    (tmp_path / "hostile_trap.py").write_text(HOSTILE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import hostile_trap

    payload = skops.io.dumps(Pipeline([("norm", "passthrough"), ("svm", hostile_trap.Trap())]))
    del sys.modules["hostile_trap"]
    (tmp_path / "imported.marker").unlink()
    yield payload, tmp_path
    sys.modules.pop("hostile_trap", None)


def test_a_file_holding_an_untrusted_type_is_refused_unbuilt(saved, hostile, tmp_path):
    payload, module_dir = hostile
    folder = tmp_path / "copy"
    shutil.copytree(saved["svm"][1].parent, folder)
    _replace_model(folder / "svm.json", payload)
    for path in (folder / "svm.json", folder / "svm.skops", folder / "svm.joblib"):
        with pytest.raises(HeadError) as caught:
            load_head(path)
        message = str(caught.value)
        assert "\n" not in message
        assert "'hostile_trap.Trap'" in message and "refused without building" in message
    assert not (module_dir / "imported.marker").exists()
    assert not (module_dir / "built.marker").exists()
    assert "hostile_trap" not in sys.modules


def test_predict_refuses_an_untrusted_skops_head_in_one_line(saved, hostile, tmp_path):
    from pipeline.predict import load_predictor

    payload, module_dir = hostile
    folder = tmp_path / "copy"
    shutil.copytree(saved["svm"][1].parent, folder)
    _replace_model(folder / "svm.json", payload)
    with pytest.raises(HeadError, match="holds types a head never holds") as caught:
        load_predictor(folder / "svm.skops")
    assert "\n" not in str(caught.value)
    assert not (module_dir / "built.marker").exists()


def test_a_trusted_type_outside_a_head_is_refused(saved, tmp_path):
    from sklearn.tree import DecisionTreeClassifier

    folder = tmp_path / "copy"
    shutil.copytree(saved["svm"][1].parent, folder)
    X, y = _data()
    tree = Pipeline([("norm", "passthrough"), ("tree", DecisionTreeClassifier().fit(X, y))])
    _replace_model(folder / "svm.json", skops.io.dumps(tree))
    with pytest.raises(HeadError, match="steps no registered head has \\('DecisionTreeClassifier'"):
        load_head(folder / "svm.json")
    _replace_model(folder / "svm.json", skops.io.dumps(np.arange(3)))
    with pytest.raises(HeadError, match="holds a ndarray, not a head pipeline"):
        load_head(folder / "svm.json")
    _replace_model(folder / "svm.json", b"PK\x03\x04 not a zip")
    with pytest.raises(HeadError, match="not a readable skops file"):
        load_head(folder / "svm.json")


def test_a_forest_tree_pointing_outside_itself_is_refused(saved, tmp_path):
    pipe, manifest_path = saved["forest"]
    folder = tmp_path / "copy"
    shutil.copytree(manifest_path.parent, folder)
    forest = pipe.steps[-1][1]
    tree = forest.estimators_[0].tree_
    state = tree.__getstate__()
    nodes = state["nodes"].copy()
    split = np.flatnonzero(nodes["left_child"] != -1)[0]
    nodes["right_child"][split] = 10**6  # far outside the node array
    try:
        tree.__setstate__({**state, "nodes": nodes})
        _replace_model(folder / "forest.json", skops.io.dumps(pipe))
    finally:
        tree.__setstate__(state)
    with pytest.raises(HeadError, match="forest tree whose nodes point outside it"):
        load_head(folder / "forest.json")
    nodes = state["nodes"].copy()
    nodes["feature"][split] = WIDTH + 5  # a feature the input does not have
    try:
        tree.__setstate__({**state, "nodes": nodes})
        _replace_model(folder / "forest.json", skops.io.dumps(pipe))
    finally:
        tree.__setstate__(state)
    with pytest.raises(HeadError, match="forest tree whose nodes point outside it"):
        load_head(folder / "forest.json")


def test_a_neighbour_index_is_rebuilt_not_trusted(saved, tmp_path):
    pipe, manifest_path = saved["knn"]
    knn = pipe.steps[-1][1]
    assert knn._tree is not None  # narrow features: algorithm="auto" builds a tree
    folder = tmp_path / "copy"
    shutil.copytree(manifest_path.parent, folder)
    original = knn._tree
    data, idx, node_data, bounds = original.get_arrays()
    crafted = type(original)(data[:3], leaf_size=knn.leaf_size)  # an index of other points
    knn._tree = crafted
    try:
        _replace_model(folder / "knn.json", skops.io.dumps(pipe))
    finally:
        knn._tree = original
    head = load_head(folder / "knn.json")
    rebuilt = head.estimator.steps[-1][1]._tree
    assert len(rebuilt.get_arrays()[0]) == len(knn._fit_X)
    X, _ = _data()
    np.testing.assert_array_equal(head.predict(X)[0], pipe.predict(X))


# --------------------------------------------------------------------------- older heads


def _legacy(pipe: Pipeline, folder: Path, name: str, version: int) -> Path:
    """A head as saved before the skops format: ``files.model`` is ``<name>.joblib``."""
    folder.mkdir(parents=True, exist_ok=True)
    last = pipe.steps[-1][1]
    files = {"model": f"{name}.joblib"}
    if name == "softmax":
        last.model_.save(folder / "softmax.keras")
        files["keras"] = "softmax.keras"
        model, last.model_ = last.model_, None
        try:
            joblib.dump(pipe, folder / files["model"])
        finally:
            last.model_ = model
    else:
        joblib.dump(pipe, folder / files["model"])
    manifest = _manifest(
        name,
        head=name,
        files=files,
        sha256={role: _sha256(folder / file) for role, file in files.items()},
        manifest_version=version,
    )
    if version == 1:
        del manifest["name"]
    path = folder / f"{name}.json"
    path.write_text(json.dumps(manifest))
    return path


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("name", ["svm", "softmax"])
def test_a_head_saved_before_skops_still_loads(saved, tmp_path, name, version):
    pipe, _ = saved[name]
    path = _legacy(pipe, tmp_path / "old", name, version)
    X, _ = _data()
    expected = head_outputs(pipe, X, len(CLASSES))
    for model in (path, path.with_suffix(".joblib")):
        head = load_head(model)
        assert head.name == name
        np.testing.assert_allclose(head.predict(X)[1], expected[1], atol=1e-6)
    (tmp_path / "old" / f"{name}.joblib").write_bytes(b"swapped")  # still checked first
    with pytest.raises(HeadError, match="corrupt, truncated or from another run"):
        load_head(path)
