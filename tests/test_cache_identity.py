"""make head checks the cache it finds against DATA and the options; data sets of the same
folder name get distinct names (issue 23). Caches here are written as stage one writes them
(its identity functions, the real writer), with made-up features: no Keras."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import COLOURS, make_folder, make_image

from pipeline.cli.main import main
from pipeline.core.artifacts import Artifacts, dataset_name
from pipeline.core.errors import CacheError
from pipeline.data.folders import scan_folder
from pipeline.features.cache_writer import CacheWriter
from pipeline.features.config import FeatureConfig, cache_path_for, resolve_features
from pipeline.features.records import cache_config_json

CONFIG = FeatureConfig(backbone="mobilenet_v2", weights="none", input_size=32)


def stage_one(data: Path, art: Path, config: FeatureConfig = CONFIG) -> Path:
    """The cache stage one would write for ``data`` (features made up), named as it names it."""
    try:
        from pipeline.features.records import claim_dataset
    except ImportError:  # before issue 23: the folder's own name (the tests below then fail)
        folder = scan_folder(data)
    else:
        folder, _, record_name = claim_dataset(scan_folder(data), art)
        record_name()
    resolved = resolve_features(config, choose_runtime=False)
    path = cache_path_for(folder.name, resolved, art)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = folder.records
    writer, _ = CacheWriter.open(
        path, config_json=cache_config_json(resolved), fingerprint=folder.fingerprint(),
        paths=[r.path for r in records], labels=[r.label for r in records],
        splits=[r.split for r in records], width=4, dtype="float32",
    )  # fmt: skip
    writer.write_batch(
        0, np.ones((len(records), 4), np.float32), np.ones(len(records), bool), {}, 0.1
    )
    split = folder.split or SimpleNamespace(seed=-1, val_fraction=-1.0, test_fraction=-1.0)
    writer.finalize(
        {
            "backbone": resolved.spec.name, "weights": resolved.weights_id,
            "weights_source": config.weights, "input_size": resolved.input_size,
            "pooling": config.pooling, "layer": "", "preprocessing": resolved.spec.preprocessing,
            "precision": "fp32", "dtype": "float32", "class_names": list(folder.class_names),
            "data_root": str(folder.root.resolve()), "dataset": folder.name,
            "split_source": folder.split_source, "split_seed": split.seed,
            "val_fraction": split.val_fraction, "test_fraction": split.test_fraction,
            "n_images": len(records), "n_skipped": 0, "seconds": 0.1,
        }
    )  # fmt: skip
    return path


def check(path, data, config=CONFIG, art=None):
    from pipeline.features.records import check_cache_for

    return check_cache_for(path, data, config, artifacts_dir=art or "artifacts")


@pytest.fixture
def photos(tmp_path):
    return make_folder(tmp_path / "p1" / "photos", per_class=6)


def test_a_cache_that_matches_passes(photos, tmp_path):
    art = tmp_path / "art"
    assert check(stage_one(photos, art), photos, art=art) == []


def test_images_added_or_edited_after_stage_one_are_refused(photos, tmp_path):
    art = tmp_path / "art"
    path = stage_one(photos, art)
    make_image(photos / "red" / "new.png", COLOURS["red"], seed=77)
    with pytest.raises(CacheError, match=r"images changed since it was made \(1 added\)"):
        check(path, photos, art=art)
    (photos / "red" / "new.png").unlink()
    edited = photos / "blue" / "img00.png"
    os.utime(edited, ns=(0, edited.stat().st_mtime_ns + 10**9))
    with pytest.raises(
        CacheError, match="sizes or modification times differ.*re-run `make features`"
    ):
        check(path, photos, art=art)


def test_exact_copies_across_splits_are_one_warning(tmp_path, split_folder):
    art = tmp_path / "art"
    shutil.copy(split_folder / "train" / "red" / "0.jpg", split_folder / "val" / "red" / "dup.jpg")
    (notes,) = check(stage_one(split_folder, art), split_folder, art=art)
    assert notes.startswith("warning: 1 image(s) are exact copies") and "val/red/dup.jpg" in notes


def _added(photos, art, tmp_path):
    stage_one(photos, art)
    make_image(photos / "red" / "new.png", COLOURS["red"], seed=77)
    return photos, "mobilenet_v2", "1 added"


def _copied(photos, art, tmp_path):
    other = make_folder(tmp_path / "other", per_class=6)
    source = stage_one(photos, art)
    copied = Artifacts(art).cache_path("other", source.stem)
    copied.parent.mkdir(parents=True)
    shutil.copy(source, copied)
    return other, "mobilenet_v2", "it was made from"


def _renamed(photos, art, tmp_path):
    v2 = stage_one(photos, art)
    small = FeatureConfig(backbone="mobilenet_025", weights="none", input_size=32)
    v2.rename(cache_path_for("photos", small, art))
    return photos, "mobilenet_025", "BACKBONE is mobilenet_v2 in the cache"


@pytest.mark.parametrize("case", [_added, _copied, _renamed])
def test_make_head_refuses_a_cache_of_other_images_or_options_in_one_line(
    case, photos, tmp_path, capsys
):
    art = tmp_path / "art"
    data, backbone, expected = case(photos, art, tmp_path)
    argv = ["head", "--data", str(data), "--artifacts", str(art), "--backbone", backbone,
            "--weights", "none", "--input-size", "32", "--head", "logreg"]  # fmt: skip
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert expected in err[0] and "re-run `make features" in err[0]
    assert not (art / "heads").exists()


def test_two_folders_of_one_name_get_two_names(photos, tmp_path, capsys):
    from pipeline.features.records import claim_dataset

    art = tmp_path / "art"
    second = make_folder(tmp_path / "p2" / "photos", per_class=6)
    first_cache = stage_one(photos, art)
    folder, note, _ = claim_dataset(scan_folder(second), art)
    assert folder.name.startswith("photos-") and len(folder.name) == len("photos-") + 6
    assert "'photos' belongs to" in note and str(photos.resolve()) in note
    assert dataset_name(second, art) == folder.name and dataset_name(photos, art) == "photos"
    second_cache = stage_one(second, art)
    assert second_cache.parent.name == folder.name != first_cache.parent.name
    assert check(second_cache, second, art=art) == []


def test_artifacts_from_before_names_were_recorded_keep_the_first_folder_s_name(photos, tmp_path):
    from pipeline.features.records import claim_dataset

    art = tmp_path / "art"
    stage_one(photos, art)
    Artifacts(art).dataset_record("photos").unlink()  # as written before this change
    second = make_folder(tmp_path / "p2" / "photos", per_class=6)
    folder, note, _ = claim_dataset(scan_folder(second), art)
    assert folder.name != "photos" and note
    assert dataset_name(photos, art) == "photos"


def test_a_symlinked_folder_is_named_as_typed(photos, tmp_path):
    link = tmp_path / "mine"
    link.symlink_to(photos)
    assert dataset_name(link) == "mine"
    assert dataset_name(photos) == "photos"


def test_stage_one_does_not_call_a_copied_cache_up_to_date(photos, tmp_path):
    from pipeline.features.extractor import prepare_extraction

    art = tmp_path / "art"
    twin = tmp_path / "twin"
    shutil.copytree(photos, twin)  # copy2: same names, sizes and modification times
    source = stage_one(photos, art)
    copied = Artifacts(art).cache_path("twin", source.stem)
    copied.parent.mkdir(parents=True)
    shutil.copy(source, copied)
    run = prepare_extraction(twin, CONFIG.__class__(**{**CONFIG.__dict__, "runtime": "keras"}),
                             split=None, artifacts_dir=art, cache_path=None, log=None)  # fmt: skip
    assert run.path == copied and run.fingerprint == scan_folder(photos).fingerprint()
    assert run.cache_state() is False


def test_no_val_or_test_images_is_one_warning_from_make_head(tmp_path, split_folder):
    art = tmp_path / "art"
    shutil.rmtree(split_folder / "val")
    notes = check(stage_one(split_folder, art), split_folder, art=art)
    assert notes == [
        "warning: no val or test images: heads are compared on cross-validation only and "
        "`make report` has no held-out predictions to rank (see the split line of "
        "`make features`)"
    ]


def test_the_cache_make_head_finds_does_not_depend_on_runtime_records(photos, tmp_path):
    art = tmp_path / "art"
    path = stage_one(photos, art, FeatureConfig(backbone="mobilenet_v2", input_size=32))
    found = cache_path_for("photos", FeatureConfig(backbone="mobilenet_v2", input_size=32), art)
    assert found == path and not (art / "runtimes").exists()  # stage one's name, no records
