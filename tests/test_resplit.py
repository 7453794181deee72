"""Another split re-splits a cache's rows, nothing extracted (pipeline.features.resplit).
Caches here are written as stage one writes them (its identity, its attributes, the real
writer) with made-up features: no Keras; the backbone is never built (it raises)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import make_folder

from pipeline.core.artifacts import real_root
from pipeline.core.errors import CacheError
from pipeline.data.folders import SplitConfig, scan_folder
from pipeline.features import cache_writer, extract
from pipeline.features.cache import load_features, read_attrs
from pipeline.features.cache_writer import CacheWriter
from pipeline.features.config import FeatureConfig, cache_path_for, resolve_features
from pipeline.features.records import cache_config_json, check_cache_for, claim_dataset
from pipeline.features.resplit import can_resplit, split_attrs, split_record, split_words

CONFIG = FeatureConfig(backbone="mobilenet_v2", weights="none", input_size=32, runtime="keras")


def stage_one(data: Path, art: Path, split: SplitConfig | None = None, *, legacy=False) -> Path:
    """The cache stage one writes for ``data`` (random features); ``legacy``: as versions
    before the split left the identity wrote it (split in ``config_json``, no
    ``images_fingerprint``)."""
    folder, _, record_name = claim_dataset(scan_folder(data, split), art)
    record_name()
    resolved = resolve_features(CONFIG, artifacts_dir=art, choose_runtime=False)
    path = cache_path_for(folder.name, resolved, art)
    path.parent.mkdir(parents=True, exist_ok=True)
    config_json = cache_config_json(resolved)
    attrs = split_attrs(folder)
    if legacy:
        identity = json.loads(config_json)
        identity.update(split_source="stratified", split=vars(folder.split))
        config_json = json.dumps(identity, sort_keys=True)
        del attrs["images_fingerprint"]
    records = folder.records
    writer, _ = CacheWriter.open(
        path, config_json=config_json, fingerprint=folder.fingerprint(),
        paths=[r.path for r in records], labels=[r.label for r in records],
        splits=[r.split for r in records], width=4, dtype="float32",
    )  # fmt: skip
    features = np.random.default_rng(0).normal(size=(len(records), 4)).astype(np.float32)
    writer.write_batch(0, features, np.ones(len(records), bool), {}, 0.1)
    writer.finalize({
        "backbone": resolved.spec.name, "weights": resolved.weights_id,
        "weights_source": CONFIG.weights, "input_size": resolved.input_size,
        "pooling": CONFIG.pooling, "layer": "", "preprocessing": resolved.spec.preprocessing,
        "precision": "fp32", "dtype": "float32", "class_names": list(folder.class_names),
        "data_root": str(folder.root.resolve()), "dataset": folder.name, **attrs,
        "n_images": len(records), "n_skipped": 0, "seconds": 0.1,
    })  # fmt: skip
    return path


def features(data: Path, art: Path, seed: int, monkeypatch):
    """``make features SEED=seed`` with a backbone that must not be built."""

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone was built: features were extracted again")

    monkeypatch.setattr(extract, "build_extractor", no_backbone)
    return extract.extract_features(
        data, CONFIG, split=SplitConfig(seed=seed), artifacts_dir=art, progress=False
    )


def splits_of(data: Path, seed: int) -> dict[str, str]:
    return {r.path: r.split for r in scan_folder(data, SplitConfig(seed=seed)).records}


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "photos", per_class=10)


def test_another_seed_resplits_without_extracting(photos, tmp_path, monkeypatch):
    art = tmp_path / "art"
    path = stage_one(photos, art)
    before = load_features(path)
    summary = features(photos, art, 1, monkeypatch)
    assert summary.status == "re-split" and summary.cache_path == path
    line = summary.format()
    assert line.startswith("re-split 20 images with SEED=1, VAL_FRACTION=0.2, TEST_FRACTION=0.2")
    assert "0 extracted" in line and f"{summary.moved} moved" in line
    after = load_features(path)
    assert np.array_equal(after.features, before.features)  # the same rows, untouched
    assert list(after.paths) == list(before.paths) and np.array_equal(after.labels, before.labels)
    assert dict(zip(after.paths, after.split, strict=True)) == splits_of(photos, 1)
    assert summary.moved == int(np.sum(after.split != before.split)) > 0
    attrs = after.attrs
    assert attrs["split_seed"] == 1
    assert attrs["fingerprint"] == scan_folder(photos, SplitConfig(seed=1)).fingerprint()
    assert attrs["images_fingerprint"] == before.attrs["images_fingerprint"]
    assert check_cache_for(path, photos, CONFIG, artifacts_dir=art) == []  # make head reads it
    assert features(photos, art, 1, monkeypatch).status == "up to date"
    assert features(photos, art, 0, monkeypatch).status == "re-split"
    assert np.array_equal(load_features(path).split, before.split)  # SEED=0 again: the first


def test_a_cache_of_before_the_change_is_read_then_resplit(photos, tmp_path, monkeypatch):
    art = tmp_path / "art"
    path = stage_one(photos, art, legacy=True)
    assert "split" in json.loads(read_attrs(path)["config_json"])
    assert features(photos, art, 0, monkeypatch).status == "up to date"  # no rebuild
    assert check_cache_for(path, photos, CONFIG, artifacts_dir=art) == []
    assert features(photos, art, 2, monkeypatch).status == "re-split"
    attrs = read_attrs(path)
    assert "split" not in json.loads(attrs["config_json"]) and "images_fingerprint" in attrs
    assert dict(zip(*[load_features(path).paths, load_features(path).split], strict=True)) == (
        splits_of(photos, 2)
    )


def test_an_interrupted_resplit_leaves_the_cache_whole(photos, tmp_path, monkeypatch):
    art = tmp_path / "art"
    path = stage_one(photos, art)
    before = path.read_bytes()
    real = cache_writer._string_array

    def interrupted(values):  # the new split column is being written when the run stops
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_writer, "_string_array", interrupted)
    with pytest.raises(KeyboardInterrupt):
        features(photos, art, 1, monkeypatch)
    assert path.read_bytes() == before and not list(path.parent.glob("*.tmp"))
    assert load_features(path).attrs["split_seed"] == 0  # the old cache, valid
    monkeypatch.setattr(cache_writer, "_string_array", real)
    assert features(photos, art, 1, monkeypatch).status == "re-split"


def test_changed_images_or_split_folders_are_not_resplit(photos, tmp_path, split_folder):
    art = tmp_path / "art"
    path = stage_one(photos, art)
    config_json = read_attrs(path)["config_json"]
    root, name = str(real_root(photos)), read_attrs(path)["dataset"]

    def resplittable(data: Path, seed: int = 1) -> bool:
        folder = scan_folder(data, SplitConfig(seed=seed))
        return can_resplit(path, folder, config_json, data_root=root, dataset=name)

    assert resplittable(photos)
    image = photos / "red" / "img00.png"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    assert not resplittable(photos)  # an edited image: extract again
    folders = stage_one(split_folder, art)
    attrs = read_attrs(folders)
    where = {"data_root": attrs["data_root"], "dataset": attrs["dataset"]}
    pooled = scan_folder(split_folder, SplitConfig(train_per_class=1))
    assert pooled.pooled and can_resplit(folders, pooled, attrs["config_json"], **where)
    (split_folder / "train" / "blue" / "new.png").write_bytes(b"not read here")
    edited = scan_folder(split_folder, SplitConfig(train_per_class=1))
    assert not can_resplit(folders, edited, attrs["config_json"], **where)  # other images
    assert split_record(attrs) == {"source": "folders"} and split_words(split_record(attrs)) == (
        "split folders"
    )


def test_exact_copies_stay_in_one_split_after_a_resplit(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "copies", per_class=10)
    for i in (1, 2):  # two copies of one red image
        (data / "red" / f"copy{i}.png").write_bytes((data / "red" / "img00.png").read_bytes())
    art = tmp_path / "art"
    path = stage_one(data, art)
    for seed in (1, 2, 3, 4):
        assert features(data, art, seed, monkeypatch).status == "re-split"
        fs = load_features(path)
        split = dict(zip(fs.paths, fs.split, strict=True))
        assert len({split[f"red/{p}.png"] for p in ("img00", "copy1", "copy2")}) == 1
        assert split == splits_of(data, seed)


def test_the_split_in_words():
    attrs = {"split_source": "stratified", "split_seed": 3, "val_fraction": 0.1,
             "test_fraction": 0.3, "split_groups": "exact-copies"}  # fmt: skip
    record = split_record(attrs)
    assert record == {"source": "stratified", "seed": 3, "val_fraction": 0.1,
                      "test_fraction": 0.3, "groups": "exact-copies"}  # fmt: skip
    assert split_words(record) == "SEED=3, VAL_FRACTION=0.1, TEST_FRACTION=0.3"
    assert (
        split_words(None) == split_words({"source": "stratified", "seed": "x"}) == ("not recorded")
    )


def test_the_ray_engine_resplits_too(photos, tmp_path, monkeypatch):
    from pipeline.features import ray_engine

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone was built: features were extracted again")

    monkeypatch.setattr(ray_engine, "_driver_model", no_backbone)
    stage_one(photos, tmp_path / "art")
    summary = extract.extract_features(
        photos, CONFIG, split=SplitConfig(seed=1), artifacts_dir=tmp_path / "art",
        progress=False, engine="ray",
    )  # fmt: skip
    assert summary.status == "re-split"


def test_heads_refit_after_a_resplit_and_the_report_leaves_out_the_old_split(
    photos, tmp_path, monkeypatch
):
    from pipeline.heads.fit import fit_heads
    from pipeline.report.collect import collect_runs

    art = tmp_path / "art"
    path = stage_one(photos, art)
    first = fit_heads(path, "knn,ridge", data=photos, artifacts_dir=art, cv=2)
    assert [r.manifest["split"]["seed"] for r in first] == [0, 0]
    assert all(r.reused for r in fit_heads(path, "knn,ridge", artifacts_dir=art, cv=2))
    features(photos, art, 1, monkeypatch)
    again = fit_heads(path, "knn", data=photos, artifacts_dir=art, cv=2)
    assert not again[0].reused and again[0].manifest["split"]["seed"] == 1  # refit, not reused
    runs, notes = collect_runs(read_attrs(path)["dataset"], art)
    assert [r.name for r in runs] == ["knn"]  # ridge was fit on SEED=0: left out, in one line
    (line,) = [n for n in notes if "another split" in n]
    assert "left out 1 head(s)" in line and "(SEED=0," in line and "now (SEED=1," in line
    assert "ridge" in line and "re-run `make head`" in line
    from pipeline.report.evaluation import run_config

    split = run_config(runs[0])["split"]  # the report's configuration table shows it
    assert split == "SEED=1, VAL_FRACTION=0.2, TEST_FRACTION=0.2"


def test_skipped_images_take_the_new_split_too(tmp_path):
    from pipeline.features.cache import read_paths

    path = tmp_path / "c.h5"
    writer, _ = CacheWriter.open(
        path, config_json="{}", fingerprint="f", paths=["a/1.png", "a/2.png", "b/3.png"],
        labels=[0, 0, 1], splits=["train", "val", "test"], width=2, dtype="float32",
    )  # fmt: skip
    writer.write_batch(0, np.ones((2, 2), np.float32), np.array([1, 0, 1], bool), {1: "bad"}, 0.1)
    writer.finalize({"class_names": ["a", "b"], "n_images": 2})
    moved = cache_writer.rewrite_split(
        path, {"a/1.png": "train", "a/2.png": "test", "b/3.png": "val"}, {"split_seed": 5}
    )
    assert moved == 2
    assert read_paths(path) == {"a/1.png": ("a", "train"), "a/2.png": ("a", "test"),
                                "b/3.png": ("b", "val")}  # fmt: skip
    attrs = read_attrs(path)
    assert attrs["split_seed"] == 5 and attrs["class_names"] == ["a", "b"]
    with pytest.raises(CacheError, match="no longer has"):
        cache_writer.rewrite_split(path, {"a/1.png": "train"}, {})
    assert read_paths(path)["b/3.png"] == ("b", "val") and not list(tmp_path.glob("*.tmp"))


# ------------------------------------------------ make features SPLIT_FILE= / TRAIN_PER_CLASS=


def run(data: Path, art: Path, split: SplitConfig, monkeypatch):
    """``make features`` with ``split``, a backbone that must not be built."""
    monkeypatch.setattr(extract, "build_extractor", _no_backbone)
    return extract.extract_features(data, CONFIG, split=split, artifacts_dir=art, progress=False)


def _no_backbone(*args, **kwargs):
    raise AssertionError("the backbone was built: features were extracted again")


def write_list(path: Path, rows: list[str]) -> Path:
    path.write_text("path,split,label\n" + "\n".join(rows) + "\n")
    return path


def official(tmp_path: Path) -> Path:
    """A paper's list for ``photos``: 6 train, 2 val, 1 test per class; img09 not listed."""
    names = {**{i: "train" for i in range(6)}, 6: "val", 7: "val", 8: "test"}
    return write_list(tmp_path / "official.csv", [
        f"{c}/img{i:02d}.png,{s},{c}" for c in ("red", "blue") for i, s in names.items()
    ])  # fmt: skip


def test_a_split_file_resplits_the_cache_and_a_plain_run_gives_the_default_back(
    photos, tmp_path, monkeypatch
):
    art = tmp_path / "art"
    path = stage_one(photos, art)
    before = load_features(path)
    listed = official(tmp_path)
    summary = run(photos, art, SplitConfig(split_file=str(listed)), monkeypatch)
    assert summary.status == "re-split" and summary.extracted == 0
    assert summary.format().startswith("re-split 20 images with SPLIT_FILE=official.csv (sha256 ")
    after = load_features(path)
    assert np.array_equal(after.features, before.features)  # nothing extracted, rows untouched
    split = dict(zip(after.paths, after.split, strict=True))
    assert split["red/img00.png"] == "train" and split["blue/img07.png"] == "val"
    assert split["red/img08.png"] == "test" and split["red/img09.png"] == "unused"
    assert after.splits == ("train", "val", "test")  # unused: in no split
    assert after.select("train")[0].shape[0] == 12
    attrs = after.attrs
    assert attrs["split_source"] == "split_file" and attrs["split_file"] == str(listed.resolve())
    assert len(attrs["split_file_sha256"]) == 64 and attrs["train_per_class"] == 0
    record = split_record(attrs)
    assert split_words(record) == f"SPLIT_FILE=official.csv (sha256 {record['sha256'][:12]})"
    assert check_cache_for(path, photos, CONFIG, artifacts_dir=art) == []  # make head reads it
    assert run(photos, art, SplitConfig(split_file=str(listed)), monkeypatch).status == (
        "up to date"
    )
    listed.rename(tmp_path / "moved.csv")  # the cache holds the split: make head still reads it
    assert check_cache_for(path, photos, CONFIG, artifacts_dir=art) == []
    back = run(photos, art, SplitConfig(), monkeypatch)  # no split option: the default split
    assert back.status == "re-split"
    assert dict(zip(*[load_features(path).paths, load_features(path).split], strict=True)) == (
        splits_of(photos, 0)
    )
    attrs = read_attrs(path)
    assert attrs["split_source"] == "stratified" and attrs["split_file"] == ""
    assert attrs["fingerprint"] == before.attrs["fingerprint"]


def test_train_per_class_draws_n_per_class_the_rest_test(photos, tmp_path, monkeypatch):
    art = tmp_path / "art"
    path = stage_one(photos, art)
    before = load_features(path)
    summary = run(photos, art, SplitConfig(seed=1, train_per_class=3), monkeypatch)
    assert summary.status == "re-split"
    assert "with TRAIN_PER_CLASS=3, SEED=1: 0 extracted" in summary.format()
    fs = load_features(path)
    assert np.array_equal(fs.features, before.features) and fs.splits == ("train", "test")
    assert np.bincount(fs.labels[fs.split == "train"]).tolist() == [3, 3]  # no val
    attrs = fs.attrs
    assert (attrs["split_source"], attrs["train_per_class"], attrs["split_seed"]) == (
        "per_class",
        3,
        1,
    )
    assert split_words(split_record(attrs)) == "TRAIN_PER_CLASS=3, SEED=1"
    notes = check_cache_for(path, photos, CONFIG, artifacts_dir=art)
    assert notes == []  # no val: heads are compared on CV, the report says so itself
    again = run(photos, art, SplitConfig(seed=1, train_per_class=3), monkeypatch)
    assert again.status == "up to date"
    other = run(photos, art, SplitConfig(seed=2, train_per_class=3), monkeypatch)
    assert other.status == "re-split" and other.moved > 0


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (["../elsewhere.png,train,red"], "is outside the data folder"),
        (["red/img00.png,train,red", "red/img00.png,test,red"], "listed twice"),
        (["red/img00.png,train,green"], "unknown label 'green'"),
        (["red/img99.png,train,red"], "'red/img99.png' is not an image of the data folder"),
        (["red/img00.png,holdout,red"], "unknown split 'holdout'"),
        (["red/img00.png,test,red"], "names no train image"),
        (None, "cannot read split list"),
        ("TRAIN_PER_CLASS=10", "class 'blue' has 10 images, fewer than TRAIN_PER_CLASS=10"),
    ],
)
def test_a_bad_split_option_is_refused_in_one_line_with_nothing_written(
    photos, tmp_path, monkeypatch, capsys, rows, message
):
    from pipeline.core.errors import DataError

    art = tmp_path / "art"
    path = stage_one(photos, art)
    before, files = path.read_bytes(), sorted(art.rglob("*"))
    if rows == "TRAIN_PER_CLASS=10":
        split = SplitConfig(train_per_class=10)
    else:
        listed = tmp_path / "list.csv"
        split = SplitConfig(split_file=str(write_list(listed, rows) if rows else listed))
    with pytest.raises(DataError, match=message) as caught:
        run(photos, art, split, monkeypatch)
    assert "\n" not in str(caught.value)
    assert path.read_bytes() == before and sorted(art.rglob("*")) == files


def test_split_folders_are_pooled_and_come_back(split_folder, tmp_path, monkeypatch):
    from pipeline.data.folders import describe_folder

    art = tmp_path / "art"
    path = stage_one(split_folder, art)
    folder = scan_folder(split_folder, SplitConfig(train_per_class=2))
    line = describe_folder(folder).splitlines()[1]
    assert line == (
        "  split: train 6, test 18 (TRAIN_PER_CLASS=2, SEED=0; the split folders train/, val/ "
        "pooled)"
    )
    assert run(split_folder, art, SplitConfig(train_per_class=2), monkeypatch).status == (
        "re-split"
    )
    assert read_attrs(path)["split_pooled"] == "train/, val/"
    assert check_cache_for(path, split_folder, CONFIG, artifacts_dir=art) == []
    back = run(split_folder, art, SplitConfig(), monkeypatch)
    assert back.status == "re-split" and back.format().startswith("re-split 24 images with split")
    fs = load_features(path)
    assert {p.split("/")[0] for p in fs.paths[fs.split == "val"]} == {"val"}
    assert read_attrs(path)["split_source"] == "folders"


def test_heads_fit_on_a_split_file_name_it_and_a_report_of_only_old_heads_says_why(
    photos, tmp_path, monkeypatch
):
    from pipeline.core.errors import ReportError
    from pipeline.heads.fit import fit_heads
    from pipeline.report.collect import collect_runs, write_report
    from pipeline.report.evaluation import run_config

    art = tmp_path / "art"
    path = stage_one(photos, art)
    run(photos, art, SplitConfig(split_file=str(official(tmp_path))), monkeypatch)
    (fitted,) = fit_heads(path, "knn", data=photos, artifacts_dir=art, cv=2)
    assert fitted.manifest["split"]["source"] == "split_file"
    dataset = read_attrs(path)["dataset"]
    runs, _ = collect_runs(dataset, art)
    assert run_config(runs[0])["split"].startswith("SPLIT_FILE=official.csv (sha256 ")
    run(photos, art, SplitConfig(), monkeypatch)  # back to the default split, heads not refit
    with pytest.raises(ReportError, match=r"left out 1 head\(s\) fit on another split") as caught:
        write_report(dataset, artifacts_dir=art)
    assert "the split left val and test empty" not in str(caught.value)


def test_a_split_file_may_be_one_list_per_split(photos, tmp_path, monkeypatch):
    art = tmp_path / "art"
    path = stage_one(photos, art)
    (tmp_path / "tr.txt").write_text("".join(f"{c}/img0{i}.png\n" for c in ("red", "blue")
                                             for i in range(5)))  # fmt: skip
    (tmp_path / "te.txt").write_text("red/img05.png\nblue/img05.png\n")
    spec = f"train={tmp_path / 'tr.txt'},test={tmp_path / 'te.txt'}"
    assert run(photos, art, SplitConfig(split_file=spec), monkeypatch).status == "re-split"
    fs = load_features(path)
    assert [int(np.sum(fs.split == s)) for s in ("train", "val", "test", "unused")] == [10, 0, 2, 8]
    assert read_attrs(path)["split_file"] == spec  # each list's absolute path
    assert run(photos, art, SplitConfig(split_file=spec), monkeypatch).status == "up to date"


def test_other_commands_read_the_split_the_cache_holds(photos, tmp_path, monkeypatch):
    """make finetune and make auto pass split_in_use to stage one: a cache make features
    re-split stays so (their own SEED default would split it back)."""
    from pipeline.features.resplit import split_in_use

    art = tmp_path / "art"
    default = SplitConfig()
    assert split_in_use(photos, CONFIG, default, art) is default  # no cache yet
    path = stage_one(photos, art)
    features(photos, art, 1, monkeypatch)
    held = split_in_use(photos, CONFIG, default, art)
    assert held == SplitConfig(seed=1)
    before = load_features(path).split
    monkeypatch.setattr(extract, "build_extractor", lambda *a, **k: None)
    summary = extract.extract_features(photos, CONFIG, split=held, artifacts_dir=art)
    assert summary.status == "up to date"
    assert np.array_equal(load_features(path).split, before)
    extract.extract_features(
        photos, CONFIG, split=SplitConfig(train_per_class=3, seed=2), artifacts_dir=art,
        progress=False,
    )  # fmt: skip
    assert split_in_use(photos, CONFIG, default, art) == SplitConfig(seed=2, train_per_class=3)


def test_a_cache_resized_before_the_resize_was_recorded_is_refused(photos, tmp_path):
    """Features of Pillow's antialiased resize are not today's: make head says to rebuild."""
    import h5py

    art = tmp_path / "art"
    path = stage_one(photos, art)
    identity = json.loads(read_attrs(path)["config_json"])
    del identity["resize"]
    with h5py.File(path, "r+") as f:
        f.attrs["config_json"] = json.dumps(identity, sort_keys=True)
    with pytest.raises(CacheError, match=r"image resize .* is unset in the cache, bilinear asked"):
        check_cache_for(path, photos, CONFIG, artifacts_dir=art)


def test_finetuning_reads_the_split_a_cache_was_resplit_to(photos, tmp_path, monkeypatch):
    """make finetune DATA=photos after make features SEED=1: the cache's split, not SEED=0's."""
    from pipeline.finetuning.config import FinetuneConfig
    from pipeline.finetuning.run import _config_from_cache

    art = tmp_path / "art"
    path = stage_one(photos, art)
    features(photos, art, 1, monkeypatch)
    notes: list[str] = []
    config = FinetuneConfig(features=CONFIG)
    _, from_folder, _ = _config_from_cache(photos, config, notes.append, art)
    assert from_folder.split == SplitConfig(seed=1)
    assert notes == ["using the cache's split: SEED=1, VAL_FRACTION=0.2, TEST_FRACTION=0.2"]
    _, from_cache, _ = _config_from_cache(path, config, notes.append, art)
    assert from_cache.split == SplitConfig(seed=1)
