"""Stage two heads: the registry, each head on synthetic features, save/load, refusals.

SoftmaxClassifier itself (the estimator contract, early stopping) is tested in test_softmax.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import ASSETS, needs_assets
from heads_helpers import blobs, synthetic_cache, write_cache

from pipeline.core.errors import HeadError
from pipeline.features.cache import load_features
from pipeline.heads.fit import fit_heads
from pipeline.heads.registry import DEFAULT_HEADS, HEADS, build_head, resolve_heads
from pipeline.heads.store import load_head

FAST_SOFTMAX = {"softmax__max_epochs": 60, "softmax__patience": 5}


def _split(X, y, seed=0):
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    cut = int(0.7 * len(y))
    return X[order[:cut]], y[order[:cut]], X[order[cut:]], y[order[cut:]]


@pytest.mark.parametrize("name", list(HEADS))
def test_each_head_separates_separable_features(name):
    X, y = blobs(30, 3, 12, separation=3.0)
    X_train, y_train, X_test, y_test = _split(X, y)
    head = build_head(name)
    if name == "softmax":
        head.set_params(**FAST_SOFTMAX)
    assert head.fit(X_train, y_train).score(X_test, y_test) >= 0.9


@pytest.mark.parametrize("name", ["svm", "logreg", "knn", "softmax"])
def test_heads_on_unrelated_labels_stay_near_chance(name):
    X, y = blobs(40, 2, 8, separation=0.0, seed=3)
    X_train, y_train, X_test, y_test = _split(X, y, seed=1)
    head = build_head(name)
    if name == "softmax":
        head.set_params(**FAST_SOFTMAX)
    assert 0.2 <= head.fit(X_train, y_train).score(X_test, y_test) <= 0.8


@pytest.mark.parametrize("name", list(HEADS))
def test_each_factory_makes_a_fresh_seeded_estimator_of_its_grid(name):
    spec = HEADS[name]
    first, second = spec.estimator(7), spec.estimator(7)
    assert first is not second
    params = first.get_params()
    assert set(spec.grid) <= set(params)  # the search can set every grid parameter
    assert params.get("random_state") in (7, None)  # seeded by the seed, or not random
    assert build_head(name, seed=7).steps[-1][0] == name


def test_build_head_steps_and_options():
    head = build_head("svm", norm="standard", pca=4)
    assert [s for s, _ in head.steps] == ["norm", "pca", "svm"]
    assert type(head.named_steps["norm"]).__name__ == "StandardScaler"
    assert head.named_steps["pca"].n_components == 4
    # Stage three stacks the .keras file on the backbone: raw features in.
    assert build_head("softmax").named_steps["norm"] == "passthrough"
    with pytest.raises(HeadError, match=r"NORM= \(--norm\) must be one of .*; did you mean l2"):
        build_head("svm", norm="l3")
    with pytest.raises(HeadError, match=r"PCA= \(--pca\) must be a whole number >= 1"):
        build_head("svm", pca=0)
    with pytest.raises(HeadError, match="unknown head"):
        build_head("svn")


def test_resolve_heads_names_and_suggestions():
    assert resolve_heads("all") == DEFAULT_HEADS
    assert resolve_heads("svm, softmax") == ("svm", "softmax")
    assert resolve_heads(["SVM", "rbf-svm", "svm"]) == ("svm", "rbf_svm")
    with pytest.raises(HeadError, match="unknown head 'svn'; did you mean svm"):
        resolve_heads("svn")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """svm, logreg and softmax fitted on a synthetic 3-class cache."""
    tmp = tmp_path_factory.mktemp("heads")
    cache = synthetic_cache(tmp)
    results = fit_heads(cache, "svm,logreg,softmax", artifacts_dir=tmp / "artifacts")
    return cache, tmp / "artifacts", results


def test_fit_heads_writes_heads_and_manifests(fitted):
    cache, artifacts, results = fitted
    folder = artifacts / "heads" / "synthetic" / "synth"
    assert [r.head for r in results] == ["svm", "logreg", "softmax"]
    for name in ("svm", "logreg", "softmax"):
        assert (folder / f"{name}.joblib").is_file()
        assert (folder / f"{name}.predictions.json").is_file()
        manifest = json.loads((folder / f"{name}.json").read_text())
        assert manifest["kind"] == "head" and manifest["manifest_version"] == 2
        assert manifest["name"] == manifest["head"] == name
        assert manifest["weights"] == manifest["weights_source"] == "none"
        assert manifest["class_names"] == ["class0", "class1", "class2"]
        assert manifest["feature_width"] == 16 and manifest["backbone"] == "mobilenet_v2"
        assert manifest["fingerprint"] == "f" * 64 and manifest["config_json"]
        assert set(manifest["metrics"]) == {"val", "test"}
        assert manifest["metrics"]["val"]["accuracy"] >= 0.9
        assert manifest["cv"]["folds"] == (1 if name == "softmax" else 3)
        assert manifest["cv"]["score"] > 0.8
        assert manifest["fit_seconds"] > 0 and manifest["predict_seconds_per_image"] > 0
        # The chosen values are the best-scored grid point.
        chosen = json.dumps(manifest["params"], sort_keys=True)
        assert manifest["cv"]["scores"][chosen] == max(manifest["cv"]["scores"].values())
    assert (folder / "softmax.keras").is_file()
    assert json.loads((folder / "softmax.json").read_text())["n_epochs"] >= 1
    assert "svm" in results[0].format() and "val" in results[0].format()


@pytest.mark.parametrize("name", ["svm", "softmax"])
def test_saved_heads_round_trip(fitted, name):
    cache, artifacts, _ = fitted
    folder = artifacts / "heads" / "synthetic" / "synth"
    fs = load_features(cache)
    head = load_head(folder / f"{name}.json")
    pred, scores, is_proba = head.predict(fs)
    assert is_proba == (name == "softmax")
    saved = json.loads((folder / f"{name}.predictions.json").read_text())["predictions"]
    for path, p in zip(fs.paths, pred, strict=True):
        if path in saved:
            assert saved[path]["pred"] == fs.class_names[p]
    key = "proba" if is_proba else "scores"
    first = next(p for p in fs.paths if p in saved)
    row = list(fs.paths).index(first)
    assert np.allclose(saved[first][key], scores[row], atol=1e-5)
    if name == "softmax":  # the .keras path loads the same head
        assert load_head(folder / "softmax.keras").name == "softmax"


def test_head_refuses_other_features(fitted, tmp_path):
    _, artifacts, _ = fitted
    head = load_head(artifacts / "heads" / "synthetic" / "synth" / "svm.json")
    X, y = blobs(10, 3, 16, separation=3.0)
    other = write_cache(
        tmp_path / "other.h5",
        X,
        y,
        ["train"] * 30,
        ("class0", "class1", "class2"),
        backbone="vgg16",
    )
    with pytest.raises(HeadError, match=r"fit on other features: backbone 'vgg16'"):
        head.predict(load_features(other))
    pooled = write_cache(
        tmp_path / "max.h5", X, y, ["train"] * 30, ("class0", "class1", "class2"), pooling="max"
    )
    with pytest.raises(HeadError, match="pooling 'max'"):
        head.predict(load_features(pooled))
    renamed = write_cache(tmp_path / "names.h5", X, y, ["train"] * 30, ("a", "b", "c"))
    with pytest.raises(HeadError, match="knows classes"):
        head.predict(load_features(renamed))
    with pytest.raises(HeadError, match="X has 8 features, but the head .* expects 16"):
        head.predict(np.zeros((2, 8)))


def test_corrupt_truncated_or_swapped_head_files_are_refused(fitted, tmp_path):
    _, artifacts, _ = fitted
    folder = tmp_path / "copy"
    shutil.copytree(artifacts / "heads" / "synthetic" / "synth", folder)
    model = folder / "svm.joblib"
    model.write_bytes(model.read_bytes()[:100])  # truncated
    with pytest.raises(HeadError, match="corrupt, truncated or from another run"):
        load_head(folder / "svm.json")
    shutil.copy(folder / "logreg.joblib", model)  # a head file from another run
    with pytest.raises(HeadError, match="corrupt, truncated or from another run"):
        load_head(model)
    (folder / "logreg.json").write_text("{not json")
    with pytest.raises(HeadError, match="not readable JSON"):
        load_head(folder / "logreg.joblib")
    (folder / "softmax.keras").write_bytes(b"garbage")
    with pytest.raises(HeadError, match="corrupt"):
        load_head(folder / "softmax.json")
    with pytest.raises(HeadError, match="no such file"):
        load_head(folder / "knn.json")


def _tree(path: Path) -> dict[str, bytes]:
    return (
        {str(p): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
        if path.exists()
        else {}
    )


def test_refusals_write_nothing(tmp_path):
    artifacts = tmp_path / "artifacts"
    X, y = blobs(10, 2, 6, separation=3.0)
    one_class = write_cache(
        artifacts / "features" / "synthetic" / "one.h5",
        X,
        np.zeros(20, int),
        ["train"] * 15 + ["val"] * 5,
        ("only", "other"),
    )
    with pytest.raises(HeadError, match="only one class in train \\('only'\\)"):
        fit_heads(one_class, "svm", artifacts_dir=artifacts)
    labels = np.r_[np.zeros(10, int), np.full(10, 2), np.ones(10, int)]  # class 1 only in val
    unseen = write_cache(
        artifacts / "features" / "synthetic" / "unseen.h5",
        np.vstack([X, X[:10]]),
        labels,
        ["train"] * 20 + ["val"] * 10,
        ("a", "b", "c"),
    )
    with pytest.raises(HeadError, match="class 'b' appears in val but not in train"):
        fit_heads(unseen, "svm", artifacts_dir=artifacts)
    before = _tree(artifacts / "heads")
    with pytest.raises(HeadError, match="did you mean"):
        fit_heads(one_class, "svm,sofmax", artifacts_dir=artifacts)
    with pytest.raises(HeadError, match=r"JOBS= \(--jobs\) must be a whole number in \[0, 256\]"):
        fit_heads(unseen, "svm", artifacts_dir=artifacts, jobs=-2)
    with pytest.raises(HeadError, match=r"JOBS= \(--jobs\) must be .*; got 257"):
        fit_heads(unseen, "svm", artifacts_dir=artifacts, jobs=257)
    with pytest.raises(HeadError, match=r"CV= \(--cv\) must be"):
        fit_heads(unseen, "svm", artifacts_dir=artifacts, cv=1)
    assert _tree(artifacts / "heads") == before == {}


def test_a_manifest_cannot_name_a_file_outside_its_folder(fitted, tmp_path):
    _, artifacts, _ = fitted
    folder = tmp_path / "copy"
    shutil.copytree(artifacts / "heads" / "synthetic" / "synth", folder)
    manifest = json.loads((folder / "svm.json").read_text())
    manifest["files"]["model"] = "../elsewhere/svm.joblib"
    (folder / "svm.json").write_text(json.dumps(manifest))
    with pytest.raises(HeadError, match="points outside"):
        load_head(folder / "svm.json")


def test_a_version_1_manifest_still_loads(fitted, tmp_path):
    _, artifacts, _ = fitted
    folder = tmp_path / "copy"
    shutil.copytree(artifacts / "heads" / "synthetic" / "synth", folder)
    manifest = json.loads((folder / "svm.json").read_text())
    del manifest["name"]
    (folder / "svm.json").write_text(json.dumps({**manifest, "manifest_version": 1}))
    assert load_head(folder / "svm.json").name == "svm"


def test_the_heads_folder_is_named_by_the_artifacts_module(tmp_path):
    from pipeline.core.artifacts import Artifacts

    cache = synthetic_cache(tmp_path, dataset="my photos/..")
    (result,) = fit_heads(cache, "svm", artifacts_dir=tmp_path / "artifacts")
    folder = Artifacts(tmp_path / "artifacts").heads_dir("my photos/..", "synth")
    assert result.manifest_path == folder / "svm.json" and folder.parent.name == "my-photos"


def test_a_failed_refit_keeps_the_previous_head(fitted, tmp_path):
    cache, fixture_artifacts, _ = fitted
    artifacts = tmp_path / "artifacts"  # a copy: the module's fixture stays as it is
    shutil.copytree(fixture_artifacts, artifacts)
    before = _tree(artifacts / "heads")
    with pytest.raises(HeadError):
        fit_heads(cache, "svm", artifacts_dir=artifacts, pca=10_000)
    assert _tree(artifacts / "heads") == before


def test_cli_head_errors_are_one_line_with_status_2(fitted, capsys):
    from pipeline.cli.main import main

    cache, artifacts, _ = fitted
    assert (
        main(["head", "--cache", str(cache), "--head", "svn", "--artifacts", str(artifacts)]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown head 'svn'; did you mean svm") and "\n" not in err
    assert main(["head", "--cache", str(cache.with_name("missing.h5"))]) == 2
    assert "no feature cache" in capsys.readouterr().err


def test_fit_all_default_heads_on_the_tiny_cache(tiny_cache, tmp_path):
    results = fit_heads(tiny_cache, "all", artifacts_dir=tmp_path)
    assert [r.head for r in results] == list(DEFAULT_HEADS)
    assert all(
        r.manifest["backbone"] == "mobilenet_v2" and r.manifest["input_size"] == 32 for r in results
    )


@pytest.mark.real_data
@needs_assets("weights")
@needs_assets("datasets", "hymenoptera_data")
def test_hymenoptera_figures(tmp_path):
    """MobileNetV2 ImageNet features: best head >= 0.947 on val (145/153), linear SVM >= 0.93.

    ASSETS.md's logistic-regression probe gives 0.935. Logistic regression at its optimum
    gives 0.948 here; lbfgs at its default tolerance used to stop short of the optimum
    and score 0.954 (tolerance 1e-8 gives 0.948 too), so 0.954 is not the bar.
    """
    from pipeline.features.backbones import keras_cache_dir
    from pipeline.features.config import FeatureConfig
    from pipeline.features.extract import extract_features

    name = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    if not (keras_cache_dir() / name).is_file():
        pytest.skip(
            f"copy {ASSETS / 'weights' / name} into {keras_cache_dir()} (make weights-from-assets)"
        )
    summary = extract_features(
        ASSETS / "datasets" / "hymenoptera_data",
        FeatureConfig(),
        artifacts_dir=tmp_path,
        progress=False,
    )
    results = {
        r.head: r.manifest["metrics"]["val"]["accuracy"]
        for r in fit_heads(summary.cache_path, "all", artifacts_dir=tmp_path)
    }
    assert results["svm"] >= 0.93, results
    assert max(results.values()) >= 0.947, results


def test_a_class_with_one_train_image_skips_the_search(tmp_path):
    X, y = blobs(8, 2, 6, separation=4.0)
    keep = np.r_[np.arange(8), 8]  # class 1 has a single image, in train
    path = write_cache(tmp_path / "c.h5", X[keep], y[keep], ["train"] * 9, ("a", "b"))
    (result,) = fit_heads(path, "svm", artifacts_dir=tmp_path, pca=3)
    assert result.manifest["cv"]["folds"] == 0 and result.manifest["cv"]["score"] is None
    assert result.manifest["pca"] == 3 and result.manifest["params"] == {"C": 1.0}


def test_progress_counts_planned_fits_and_the_table_marks_the_val_best_never_the_test_best():
    from pathlib import Path

    from pipeline.heads.fit import HeadResult, summary_table
    from pipeline.heads.registry import HEADS, planned_fits

    assert planned_fits(HEADS["svm"], cv=3) == len(HEADS["svm"].grid["C"]) * 3 + 1
    assert planned_fits(HEADS["softmax"], cv=3) == 1  # its whole grid in one fit

    def result(name, val, test):
        manifest = {"cv": {"score": 0.9}, "fit_seconds": 1.0,
                    "metrics": {"val": {"accuracy": val}, "test": {"accuracy": test}}}  # fmt: skip
        return HeadResult(name, Path(f"{name}.json"), manifest)

    table = summary_table([result("svm", 0.95, 0.80), result("logreg", 0.90, 0.99)])
    marked = [line for line in table.splitlines() if "<- best on val" in line]
    assert len(marked) == 1 and marked[0].split()[0] == "svm"
