"""The artifacts module: one layout, names that stay inside, one manifest schema."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.artifacts import (
    MANIFEST_VERSION,
    ArtifactError,
    Artifacts,
    dataset_name,
    inside,
    new_manifest,
    read_manifest,
    read_predictions,
    safe_name,
    write_manifest,
    write_predictions,
)

CLASSES = ["ants", "bees"]


def test_dot_and_the_full_path_name_the_same_data_set(tmp_path, monkeypatch):
    data = tmp_path / "hymenoptera"
    data.mkdir()
    monkeypatch.chdir(data)
    assert (
        dataset_name(".") == dataset_name(str(data)) == dataset_name(os.getcwd()) == "hymenoptera"
    )


@pytest.mark.parametrize("hostile", ["../../etc", "/abs/path", "a/b", "..", ".hidden", ""])
def test_names_from_disk_become_one_safe_component(tmp_path, hostile):
    art = Artifacts(tmp_path / "artifacts")
    for path in (art.heads_dir(hostile, hostile), art.finetune_files(hostile, hostile).model,
                 art.reports_dir(hostile), art.runtime_dir(hostile, hostile)):  # fmt: skip
        resolved = path.resolve()
        assert resolved.is_relative_to((tmp_path / "artifacts").resolve()), path
    assert "/" not in safe_name(hostile) and not safe_name(hostile).startswith(".")


@pytest.mark.parametrize("name", ["/etc/passwd", "../x.json", "a/../../x", "~/x"])
def test_inside_refuses_names_that_leave_the_folder(tmp_path, name):
    with pytest.raises(ArtifactError, match="outside"):
        inside(tmp_path, name)
    assert inside(tmp_path, "svm.json") == tmp_path / "svm.json"


def _manifest(**fields):
    features = {"backbone": "mobilenet_v2", "weights": "imagenet (keras 3)",
                "weights_source": "imagenet", "input_size": 224, "pooling": "avg",
                "layer": "", "preprocessing": "tf"}  # fmt: skip
    return new_manifest("head", name="svm", dataset="d", class_names=CLASSES,
                        features=features, fingerprint="f", **fields)  # fmt: skip


def test_manifests_round_trip_and_a_malformed_one_is_refused_in_one_line(tmp_path):
    path = write_manifest(tmp_path / "svm.json", _manifest(files={"model": "svm.skops"}))
    read = read_manifest(path, kind="head")
    assert read["manifest_version"] == MANIFEST_VERSION and read["weights_source"] == "imagenet"
    with pytest.raises(ArtifactError, match="not a 'finetuned'"):
        read_manifest(path, kind="finetuned")
    for bad in ({"files": {"model": "../../evil.pkl"}}, {"class_names": "ants"},
                {"sha256": {"model": "not hex"}}):  # fmt: skip
        broken = {**_manifest(files={"model": "svm.skops"}), **bad}
        (tmp_path / "bad.json").write_text(json.dumps(broken))
        with pytest.raises(ArtifactError):
            read_manifest(tmp_path / "bad.json")


def test_a_version_1_finetuned_manifest_is_upgraded(tmp_path):
    old = {"kind": "finetuned", "format_version": 1, "class_names": CLASSES,
           "weights": "my.h5", "weights_id": "sha256:" + "ab" * 32,
           "predictions": "ft.predictions.json", "history": "ft.history.json"}  # fmt: skip
    (tmp_path / "ft.json").write_text(json.dumps(old))
    m = read_manifest(tmp_path / "ft.json")
    assert m["weights_source"] == "my.h5" and m["weights"].startswith("sha256:")
    assert m["files"] == {"predictions": "ft.predictions.json", "history": "ft.history.json"}
    assert m["name"] == "ft"


def test_predictions_round_trip_by_split(tmp_path):
    path = write_predictions(
        tmp_path / "p.json", CLASSES, paths=["val/a.png", "test/b.png", "train/c.png"],
        split=["val", "test", "train"], labels=[0, 1, 1], pred=[1, 1, 1],
        scores=np.array([[0.4, 0.6], [0.1, 0.9], [0.5, 0.5]]), is_proba=True,
    )  # fmt: skip
    splits = read_predictions(path, CLASSES)
    assert set(splits) == {"val", "test"}  # train is not evaluated
    paths, labels, pred, scores, is_proba = splits["val"]
    assert list(paths) == ["val/a.png"] and labels[0] == 0 and pred[0] == 1 and is_proba
    np.testing.assert_allclose(scores, [[0.4, 0.6]])
    with pytest.raises(ArtifactError, match="has classes"):
        read_predictions(path, ["cats", "dogs"])


def test_run_manifests_lists_heads_and_finetuned_runs_only(tmp_path):
    art = Artifacts(tmp_path)
    for p in (art.head_manifest("d", "stem", "svm"), art.finetune_files("d", "ft").manifest,
              art.finetune_files("d", "ft").predictions, art.finetune_files("d", "ft").history):  # fmt: skip
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("{}")
    assert [Path(p).name for p in art.run_manifests("d")] == ["svm.json", "ft.json"]
