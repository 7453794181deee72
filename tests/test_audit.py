"""The data audit on planted problems (quick tier: synthetic features, tiny images, no Keras).

A cache of separable blobs over real tiny PNG files, into which copies, near copies across
classes and splits, flipped labels and one far-off image are planted; the audit must find
each where it was put, and ``export`` must write what the audit learnt.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from heads_helpers import write_cache
from PIL import Image

from pipeline.audit import AuditError, audit, export_features
from pipeline.audit import run as run_module
from pipeline.audit.figures import thumbnail
from pipeline.audit.neighbours import exact_groups, near_groups, nearest
from pipeline.audit.render import class_table
from pipeline.cli.main import main
from pipeline.core.errors import WeightsError
from pipeline.features.cache import load_features

CLASSES = ("cat", "dog")
FLIPPED = (3, 45)  # rows whose labels are planted wrong


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """Rows 0..59: two blobs (30 each, 40 train, 20 val); the plants are described inline."""
    tmp = tmp_path_factory.mktemp("audit")
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, size=(2, 32)) * 4
    y = np.repeat([0, 1], 30)
    X = (centres[y] + rng.normal(0, 1, size=(60, 32))).astype(np.float32)
    split = np.array((["train"] * 20 + ["val"] * 10) * 2, dtype=object)
    X[10] = X[5]  # exact copy (file bytes too) of row 5 in the same class and split
    X[25] = X[2] * 1.0001 + 0.001  # near copy in val of train row 2: a leak
    X[40] = X[7] + 0.001  # near copy of a cat filed as a dog: a label conflict
    X[59] = -X[0:59].mean(axis=0) * 3  # far from everything
    y_given = y.copy()
    y_given[list(FLIPPED)] = 1 - y_given[list(FLIPPED)]
    cache = write_cache(
        tmp / "artifacts" / "features" / "planted" / "planted.h5",
        X, y_given, split, CLASSES, dataset="planted", data_root=str(tmp / "data"),
    )  # fmt: skip
    paths = [
        f"{s}/{CLASSES[int(c)]}/{i:04d}.png"
        for i, (s, c) in enumerate(zip(split, y_given, strict=True))
    ]
    for i, rel in enumerate(paths):
        (tmp / "data" / rel).parent.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(i).integers(0, 255, size=(12, 12, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp / "data" / rel)
    shutil.copyfile(tmp / "data" / paths[5], tmp / "data" / paths[10])
    shutil.copyfile(tmp / "data" / paths[6], tmp / "data" / paths[26])  # bytes equal, a leak
    result = audit(cache, artifacts_dir=tmp / "artifacts", calibration="neighbours")
    return {"tmp": tmp, "cache": cache, "result": result, "paths": paths}


def _groups_with(groups: list[dict], *rows: int) -> list[dict]:
    return [g for g in groups if set(rows) <= {m["index"] for m in g["members"]}]


def test_exact_copies_found_with_where_they_sit(planted):
    groups = planted["result"].summary["exact_duplicates"]
    (same,) = _groups_with(groups, 5, 10)
    assert same["where"] == ["same class, same split"]
    (leak,) = _groups_with(groups, 6, 26)
    assert leak["where"] == ["leak across splits"]


def test_near_copies_across_splits_and_classes_found(planted):
    near = planted["result"].summary["near_duplicates"]
    (leak,) = _groups_with(near["groups"], 2, 25)
    assert "leak across splits" in leak["where"]
    (conflict,) = _groups_with(near["groups"], 7, 40)
    assert "label conflict" in conflict["where"]
    assert not _groups_with(near["groups"], 5, 10)  # the exact copies are not reported twice
    assert near["calibration"]["rule"].startswith("neighbours")
    assert 0 < near["calibration"]["threshold"] < 1


def test_flipped_labels_and_the_far_image_found(planted):
    s = planted["result"].summary
    issues = {i["index"]: i for i in s["label_issues"]["items"]}
    assert set(FLIPPED) <= set(issues)
    assert issues[3]["suggested"] == "cat" and issues[3]["class"] == "dog"
    assert issues[3]["self_confidence"] < 0.5
    assert s["outliers"]["items"][0]["index"] == 59


def test_pages_thumbnails_and_terminal_lines(planted):
    result = planted["result"]
    folder = result.folder
    assert folder == planted["tmp"] / "artifacts" / "audit" / "planted"
    for name in ("audit.html", "audit.md", "audit.json", "map.png", "oof.npz"):
        assert (folder / name).is_file(), name
    saved = json.loads((folder / "audit.json").read_text())
    member = saved["exact_duplicates"][0]["members"][0]
    assert member["thumb"] and (folder / member["thumb"]).is_file()
    html = (folder / "audit.html").read_text()
    assert member["thumb"] in html and "map.png" in html
    lines = result.lines()
    assert [line.split(":")[0] for line in lines[:5]] == [
        "exact duplicates", "near duplicates", "label issues", "outliers", "classes",
    ]  # fmt: skip
    assert lines[0].startswith("exact duplicates: 2 groups (4 images), 0 label conflicts, 1 leak")


@pytest.mark.slow  # a second audit, map included
def test_calibration_on_copies_through_a_given_embedding(planted):
    """The copies' rule with a stand-in backbone: mean colour of 4x4 cells (no Keras)."""

    def embed(images: list) -> np.ndarray:
        cells = [np.asarray(Image.fromarray(im).resize((4, 4))).astype(np.float32) for im in images]
        return np.stack([c.reshape(-1) + 1.0 for c in cells])

    result = audit(planted["cache"], artifacts_dir=planted["tmp"] / "copies", embed=embed, seed=1)
    calibration = result.summary["near_duplicates"]["calibration"]
    assert calibration["rule"].startswith("copies")
    assert calibration["copies"]["n"] == 3 * 16
    assert calibration["threshold"] <= calibration["copies"]["median"]


def test_export_writes_npz_and_parquet_with_the_audits_probabilities(planted):
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    out = export_features(planted["cache"], artifacts_dir=planted["tmp"] / "artifacts")
    with np.load(out.npz) as saved:
        assert saved["features"].shape == (60, 32)
        assert saved["paths"].tolist() == planted["paths"]
        assert saved["oof_proba"].shape == (60, 2)
        assert saved["oof_proba"][3].argmax() == 0  # the flipped dog looks like a cat
    table = pq.read_table(out.parquet)
    assert table.column_names == ["path", "label", "class_name", "split", "features", "oof_proba"]
    assert table.num_rows == 60 and table.column("split").to_pylist()[25] == "val"


def test_copies_fall_back_to_the_neighbour_rule_when_the_backbone_fails(planted):
    def broken(images: list) -> np.ndarray:
        raise WeightsError("no weights file")

    calib = run_module._calibrate(
        load_features(planted["cache"]), planted["tmp"] / "data", nearest(np.eye(4), 2),
        None, "copies", broken, 0,
    )  # fmt: skip
    assert calib.rule.startswith("neighbours") and "no weights file" in calib.rule


def test_copies_less_alike_than_neighbours_fall_back_to_the_neighbour_rule(planted):
    """Copies whose features are unrelated to their originals (as tiny digits' are)."""

    def unrelated(images: list) -> np.ndarray:
        return np.random.default_rng(len(images)).normal(size=(len(images), 8))

    fs = load_features(planted["cache"])
    calib = run_module._calibrate(
        fs, planted["tmp"] / "data", nearest(fs.features, 5), None, "copies", unrelated, 0
    )
    assert (
        calib.rule.startswith("neighbours") and "less alike than the 90th percentile" in calib.rule
    )


def test_class_notes_say_what_is_too_small():
    fs = SimpleNamespace(
        labels=np.array([0] * 20 + [1] * 2 + [2] * 6),
        split=np.array(["train"] * 14 + ["val"] * 6 + ["train"] * 2 + ["train"] * 6),
        class_names=("a", "b", "c"),
    )
    notes = {row["class"]: row["notes"] for row in class_table(fs, cv=3)}
    assert notes["b"][:2] == [
        "fewer than CV=3 train images: the heads' 3-fold search fails",
        "left out of the label audit (fewer than 3 images)",
    ]
    assert "no val image" in notes["c"] and notes["a"] == []


def test_a_class_too_small_and_no_data_root(tmp_path):
    """One class under CV: no label audit (said so); no data root recorded: no file read."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(12, 8)).astype(np.float32)
    y = np.array([0] * 10 + [1] * 2)
    cache = write_cache(tmp_path / "small.h5", X, y, ["train"] * 12, CLASSES, dataset="small")
    result = audit(cache, artifacts_dir=tmp_path / "art", calibration="copies")
    lines = result.lines()
    assert (
        lines[2]
        == "label issues: not checked (fewer than two classes with CV images); classes left out: dog"
    )
    assert "dog: fewer than CV=3 train images" in lines[4]
    assert "no backbone to run copies through" in lines[1] or "neighbours" in lines[1]
    assert not (result.folder / "thumbs").exists()
    out = export_features(cache, artifacts_dir=tmp_path / "art")
    with np.load(out.npz) as saved:
        assert np.isnan(saved["oof_proba"]).all()


def test_stage_one_runs_only_where_the_folder_has_no_cache(tmp_path, monkeypatch):
    from pipeline.audit import folder as folder_module
    from pipeline.features.config import FeatureConfig, cache_path_for

    (tmp_path / "photos").mkdir()
    art = tmp_path / "art"
    expected = cache_path_for("photos", FeatureConfig(), art)
    calls = []

    def fake_stage_one(data, config, **kwargs):
        calls.append(data)
        write_cache(expected, np.eye(4, dtype=np.float32), np.array([0, 0, 1, 1]),
                    ["train"] * 4, CLASSES)  # fmt: skip
        return SimpleNamespace(cache_path=expected, format=lambda: "built")

    monkeypatch.setattr(folder_module, "extract_features", fake_stage_one)
    checked = []
    monkeypatch.setattr(folder_module, "check_cache_for", lambda *a, **k: checked.append(a) or [])
    assert folder_module.find_or_extract(tmp_path / "photos", artifacts_dir=art) == expected
    assert folder_module.find_or_extract(tmp_path / "photos", artifacts_dir=art) == expected
    assert len(calls) == 1 and len(checked) == 1  # the cache found is checked, as make head does


def test_the_package_offers_the_audit():
    import pipeline
    from pipeline.audit import audit_folder

    assert pipeline.audit_folder is audit_folder and pipeline.export_features is export_features


def test_thumbnails_never_read_outside_the_data_root(tmp_path):
    (tmp_path / "root").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    assert thumbnail(tmp_path / "root", "../secret.png", tmp_path / "thumbs") is None
    assert not (tmp_path / "thumbs").exists()


def test_near_groups_join_chains_and_skip_pure_exact_groups():
    X = np.eye(6, dtype=np.float32)
    X[1] = X[0]
    X[2] = X[3] + 0.01
    X[4] = X[3] + 0.02
    neighbours = nearest(X, k=3)
    exact = exact_groups(["a", "a", None, "b", "c", "d"])
    assert exact == [[0, 1]]
    assert near_groups(neighbours, 0.99, exact) == [[2, 3, 4]]


def test_bad_options_are_one_line(planted, capsys):
    with pytest.raises(AuditError, match="THRESHOLD=1.5"):
        audit(planted["cache"], threshold=1.5)
    assert main(["audit", "--cache", str(planted["tmp"] / "none.h5")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no feature cache at") and err.count("\n") == 1


@pytest.mark.slow  # a second audit, map included
def test_the_cli_prints_one_line_per_finding_class(planted, capsys):
    art = planted["tmp"] / "cli"
    argv = ["audit", "--cache", str(planted["cache"]), "--artifacts", str(art)]
    assert main([*argv, "--threshold", "0.999"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("near duplicates:") and "cosine >= 0.999, given" in out[1]
    assert out[-1].startswith(f"wrote {art}/audit/planted/audit.html")
    assert main(["export", "--cache", str(planted["cache"]), "--artifacts", str(art)]) == 0
    assert f"{art}/export/planted/planted.npz" in capsys.readouterr().out


@pytest.mark.slow  # stage one and the copies' calibration build a (tiny) backbone
def test_bench_audit_times_both_and_names_what_dominates(tmp_path):
    from conftest import make_folder

    from pipeline.benchmarks.audit import bench_audit
    from pipeline.features.config import FeatureConfig

    folder = make_folder(tmp_path / "colours", per_class=8)
    config = FeatureConfig(weights="none", input_size=32, batch_size=8, runtime="keras")
    figures = bench_audit(folder, config, out=tmp_path / "audit.json")
    assert figures["n_images"] == 16 and figures["stage_one_seconds"] > 0
    # The seconds are rounded to 0.01 s, the ratio to 0.001: it is checked within that rounding.
    stage_one, ratio = figures["stage_one_seconds"], figures["ratio"]
    assert ratio == pytest.approx(
        figures["audit_seconds"] / stage_one, abs=0.005 * (1 + ratio) / stage_one + 1e-3
    )
    assert figures["dominant_phase"] in figures["audit_phases_seconds"]
    assert figures["findings"][1].startswith("near duplicates:")
    assert json.loads((tmp_path / "audit.json").read_text())["cpu_ratio"] > 0
