"""Stage one end to end: the cache, resuming, staleness, locking, bad input, CLI, make."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import make_folder

from pipeline.cli.main import main
from pipeline.core.errors import CacheError
from pipeline.data.folders import SplitConfig
from pipeline.features import cache, cache_writer
from pipeline.features.cache import load_features, read_skipped
from pipeline.features.cache_writer import CacheWriter, cache_lock
from pipeline.features.config import FeatureConfig, cache_path_for
from pipeline.features.extract import extract_features

REPO = Path(__file__).resolve().parents[1]
TINY = FeatureConfig(backbone="mobilenet_v2", weights="none", input_size=32, batch_size=4)


def run(folder, tmp_path, config=TINY, **kwargs):
    return extract_features(
        folder, config, artifacts_dir=tmp_path / "art", progress=False, **kwargs
    )


def test_cache_round_trip(image_folder, tmp_path):
    summary = run(image_folder, tmp_path)
    assert summary.status == "built" and summary.extracted == 12 and not summary.skipped
    assert summary.cache_path == tmp_path / "art/features/shapes/mobilenet_v2_32_avg_random.h5"
    fs = load_features(summary.cache_path)
    assert fs.features.shape == (12, 1280) and fs.features.dtype == np.float32
    assert fs.class_names == ("blue", "red")
    assert sorted(fs.paths)[0] == "blue/img00.png"
    assert set(fs.splits) <= {"train", "val", "test"} and "train" in fs.splits
    attrs = fs.attrs
    assert attrs["format_version"] == cache.FORMAT_VERSION
    assert (attrs["backbone"], attrs["input_size"], attrs["pooling"]) == ("mobilenet_v2", 32, "avg")
    assert attrs["preprocessing"] == "tf" and attrs["weights"] == "none"
    assert attrs["split_seed"] == 0 and attrs["split_source"] == "stratified"
    with h5py.File(summary.cache_path) as f:  # chunked by rows, readable by plain h5py
        assert f["features"].chunks[1] == 1280
    assert np.isfinite(fs.features).all() and np.abs(fs.features).sum() > 0


def test_second_run_returns_at_once_and_changes_rebuild(image_folder, tmp_path):
    first = run(image_folder, tmp_path)
    second = run(image_folder, tmp_path)
    assert second.status == "up to date"
    assert second.seconds == pytest.approx(first.seconds)
    target = image_folder / "red" / "img00.png"
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    third = run(image_folder, tmp_path)
    assert third.status == "built"
    assert any("rebuilding" in note for note in third.notes)


def test_other_options_give_another_cache(image_folder, tmp_path):
    a = run(image_folder, tmp_path)
    b = run(
        image_folder,
        tmp_path,
        FeatureConfig(**{**TINY.__dict__, "pooling": "max", "storage": "float16"}),
    )
    assert a.cache_path != b.cache_path and b.cache_path.name.endswith("_max_random_stored-f16.h5")
    assert load_features(b.cache_path).features.dtype == np.float16
    assert load_features(a.cache_path).features.dtype == np.float32


def test_flatten_pooling_and_layer(image_folder, tmp_path):
    config = FeatureConfig(backbone="vgg16", weights="none", input_size=32, pooling="flatten")
    assert load_features(run(image_folder, tmp_path, config).cache_path).features.shape == (12, 512)
    config = FeatureConfig(**{**TINY.__dict__, "layer": "block_6_expand_relu"})
    summary = run(image_folder, tmp_path, config)
    assert "block-6-expand-relu" in summary.cache_path.name
    assert load_features(summary.cache_path).attrs["layer"] == "block_6_expand_relu"


def test_unreadable_images_are_skipped_and_recorded(image_folder, tmp_path):
    (image_folder / "red" / "empty.png").write_bytes(b"")
    (image_folder / "blue" / "text.jpg").write_text("not a picture")
    summary = run(image_folder, tmp_path)
    assert summary.extracted == 12 and len(summary.skipped) == 2
    skipped = dict(read_skipped(summary.cache_path))
    assert "empty file" in skipped["red/empty.png"] and "not an image" in skipped["blue/text.jpg"]
    fs = load_features(summary.cache_path)
    assert "red/empty.png" not in set(fs.paths) and len(fs.paths) == 12
    assert "skipped red/empty.png: empty file" in summary.format()


@pytest.mark.slow  # a whole stage run: the quick tier keeps its 5 minutes
def test_interrupted_run_resumes_without_recomputing(image_folder, tmp_path, monkeypatch):
    reference = load_features(run(image_folder, tmp_path / "ref").cache_path)
    original = CacheWriter.write_batch
    calls = []

    def interrupt_after_two(self, start, *args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(start)
        return original(self, start, *args, **kwargs)

    monkeypatch.setattr(CacheWriter, "write_batch", interrupt_after_two)
    config = FeatureConfig(**{**TINY.__dict__, "weights": _weights_file(tmp_path)})
    with pytest.raises(KeyboardInterrupt):
        run(image_folder, tmp_path, config)
    path = cache_path_for("shapes", config, tmp_path / "art")
    assert not path.exists() and cache_writer.work_path_of(path).exists()
    assert json.loads(cache_writer.progress_path_of(path).read_text())["next_index"] == 8

    monkeypatch.setattr(CacheWriter, "write_batch", original)
    starts = []
    monkeypatch.setattr(
        CacheWriter,
        "write_batch",
        lambda self, start, *a, **k: (starts.append(start), original(self, start, *a, **k)),
    )
    resumed = run(image_folder, tmp_path, config)
    assert resumed.status == "resumed" and starts == [8]
    assert any("resuming at image 8 of 12" in n for n in resumed.notes)
    assert not cache_writer.work_path_of(path).exists()
    uninterrupted = load_features(run(image_folder, tmp_path / "again", config).cache_path)
    np.testing.assert_array_equal(load_features(path).features, uninterrupted.features)
    assert reference.features.shape == uninterrupted.features.shape


def _weights_file(tmp_path: Path) -> str:
    """Fixed random weights, so two runs compute identical features."""
    from pipeline.features.backbones import build_base, get_backbone

    path = tmp_path / "fixed.weights.h5"
    if not path.exists():
        build_base(get_backbone("mobilenet_v2"), weights="none", input_size=32).save_weights(path)
    return str(path)


@pytest.mark.slow
def test_kill_9_at_any_moment_then_resume_equals_an_uninterrupted_run(tmp_path, capsys):
    folder = make_folder(tmp_path / "many", per_class=60)
    weights = _weights_file(tmp_path)
    args = [
        sys.executable,
        "-m",
        "pipeline",
        "features",
        "--data",
        str(folder),
        "--backbone",
        "mobilenet_v2",
        "--weights",
        weights,
        "--input-size",
        "32",
        "--batch-size",
        "1",
        "--precision",
        "float32",  # the cache's name known before the run (auto may settle on bf16)
        "--quiet",
    ]
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    config = FeatureConfig(backbone="mobilenet_v2", weights=weights, input_size=32)
    path = cache_path_for("many", replace(config, precision="float32"), killed_dir)
    process = subprocess.Popen(
        [*args, "--artifacts", str(killed_dir)], cwd=REPO, stderr=subprocess.PIPE
    )
    progress = cache_writer.progress_path_of(path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if json.loads(progress.read_text())["next_index"] >= 20:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done_before = json.loads(progress.read_text())["next_index"]
    assert 20 <= done_before < 120 and not path.exists()

    # Resume and the clean run in this process: one killed child is all the test needs.
    assert main([*args[3:], "--artifacts", str(killed_dir)]) == 0
    assert f"resuming at image {done_before} of 120" in capsys.readouterr().out
    assert main([*args[3:], "--artifacts", str(clean_dir)]) == 0
    a = load_features(path)
    b = load_features(
        cache_path_for(
            "many",
            FeatureConfig(backbone="mobilenet_v2", weights=weights, input_size=32),
            clean_dir,
        )
    )
    np.testing.assert_array_equal(a.paths, b.paths)
    np.testing.assert_allclose(a.features, b.features, rtol=1e-5, atol=1e-6)


def test_work_file_of_other_options_is_discarded_not_mixed(image_folder, tmp_path, monkeypatch):
    config = FeatureConfig(**{**TINY.__dict__, "weights": _weights_file(tmp_path)})
    original = CacheWriter.write_batch

    def stop(self, start, *a, **k):
        original(self, start, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(CacheWriter, "write_batch", stop)
    with pytest.raises(KeyboardInterrupt):
        run(image_folder, tmp_path, config)
    monkeypatch.setattr(CacheWriter, "write_batch", original)
    (image_folder / "red" / "img00.png").write_bytes(
        (image_folder / "red" / "img01.png").read_bytes()
    )
    summary = run(image_folder, tmp_path, config)
    assert summary.status == "built"
    assert any(
        "discarded an unfinished run (the images have changed since)" in n for n in summary.notes
    )
    assert summary.cache_path == cache_path_for("shapes", config, tmp_path / "art")
    assert summary.cache_path.exists()


def test_concurrent_run_on_the_same_cache_is_refused(image_folder, tmp_path):
    path = cache_path_for("shapes", TINY, tmp_path / "art")
    with cache_lock(path), pytest.raises(CacheError, match="being written by another run"):
        run(image_folder, tmp_path)


def test_a_corrupt_finished_cache_is_rebuilt(image_folder, tmp_path):
    path = run(image_folder, tmp_path).cache_path
    path.write_bytes(b"garbage")
    with pytest.raises(CacheError, match="not a readable HDF5 file"):
        load_features(path)
    assert run(image_folder, tmp_path).status == "built"


# --- CLI -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data", "{missing}"], "does not exist"),
        (["--data", "{data}", "--backbone", "resnet05"], "did you mean resnet50"),
        (["--data", "{data}", "--input-size", "16"], "below mobilenet_v2's minimum of 32"),
        (
            ["--data", "{data}", "--pooling", "mean"],
            "POOLING= (--pooling) must be one of avg, max, flatten",
        ),
        (["--data", "{data}", "--layer", "nope"], "LAYER='nope' is not a layer"),
        (
            ["--data", "{data}", "--weights", "{missing}"],
            "neither 'imagenet', 'none' nor an existing",
        ),
        (["--data", "{data}", "--weights", "{garbage}"], "does not fit backbone mobilenet_v2"),
        (
            ["--data", "{data}", "--batch-size", "0"],
            "BATCH= (--batch-size) must be a whole number in [1, 4096]",
        ),
    ],
)
def test_cli_user_errors_print_one_line_and_exit_2(image_folder, tmp_path, capsys, argv, message):
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not weights")
    subs = {
        "missing": str(tmp_path / "missing"),
        "data": str(image_folder),
        "garbage": str(garbage),
    }
    argv = [a.format(**subs) for a in argv]
    code = main(["features", *argv, *_defaults(argv, tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert "Traceback" not in err


def _defaults(argv: list[str], tmp_path: Path) -> list[str]:
    extra = ["--quiet", "--artifacts", str(tmp_path / "art")]
    if "--weights" not in argv:
        extra += ["--weights", "none"]
    if "--input-size" not in argv:
        extra += ["--input-size", "32"]
    return extra


def test_cli_features_and_backbones(image_folder, tmp_path, capsys):
    assert (
        main(
            [
                "features",
                "--data",
                str(image_folder),
                "--weights",
                "none",
                "--input-size",
                "32",
                "--quiet",
                "--artifacts",
                str(tmp_path / "art"),
            ]
        )
        == 0
    )
    assert "built " in capsys.readouterr().out
    assert main(["backbones"]) == 0
    table = capsys.readouterr().out
    assert (
        "vgg16" in table and "caffe" in table and "25,088" in table and "convnext_xlarge" in table
    )


@pytest.mark.slow  # a whole stage run: the quick tier keeps its 5 minutes
def test_make_features_runs_for_real(image_folder, tmp_path):
    result = subprocess.run(
        [
            "make",
            "-s",
            "features",
            f"DATA={image_folder}",
            "BACKBONE=mobilenet_v2",
            "WEIGHTS=none",
            "INPUT_SIZE=32",
            "BATCH=4",
            f"ARTIFACTS={tmp_path / 'art'}",
            f"PYTHON={sys.executable}",
            f"VENV={Path(sys.executable).parent.parent}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "art/features/shapes/mobilenet_v2_32_avg_random.h5").exists()
    # TensorFlow's native start-up lines are filtered; the progress bar still shows.
    assert "absl::InitializeLog" not in result.stderr and "I0000" not in result.stderr
    assert "mobilenet_v2 features" in result.stderr
    bad = subprocess.run(
        [
            "make",
            "-s",
            "features",
            f"DATA={tmp_path / 'nowhere'}",
            "WEIGHTS=none",
            f"VENV={Path(sys.executable).parent.parent}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_split_config_is_recorded(image_folder, tmp_path):
    summary = run(
        image_folder, tmp_path, split=SplitConfig(seed=7, val_fraction=0.25, test_fraction=0.0)
    )
    attrs = load_features(summary.cache_path).attrs
    assert (attrs["split_seed"], attrs["val_fraction"], attrs["test_fraction"]) == (7, 0.25, 0.0)


def test_each_cached_row_is_the_backbone_output_of_its_own_image(image_folder, tmp_path):
    """Rows stay aligned with paths even when a bad image sits inside a batch."""
    from pipeline.data.images import load_image
    from pipeline.features.backbones import build_feature_extractor, get_backbone

    (image_folder / "blue" / "img02b.png").write_bytes(b"")  # sorts into the middle of a batch
    weights = _weights_file(tmp_path)
    config = FeatureConfig(**{**TINY.__dict__, "weights": weights})
    fs = load_features(run(image_folder, tmp_path, config).cache_path)
    assert "blue/img02b.png" not in set(fs.paths)
    model = build_feature_extractor("mobilenet_v2", weights=weights, input_size=32)
    spec = get_backbone("mobilenet_v2")
    images = np.stack([load_image(image_folder / p, 32) for p in fs.paths])
    expected = model.predict_on_batch(spec.preprocess(images))
    np.testing.assert_allclose(fs.features, expected, rtol=1e-4, atol=1e-5)
    names = list(fs.class_names)
    assert [names[label] for label in fs.labels] == [p.split("/")[0] for p in fs.paths]


def test_mixed_precision_stores_float32_and_restores_the_global_policy(image_folder, tmp_path):
    import keras

    config = FeatureConfig(**{**TINY.__dict__, "precision": "float16"})
    summary = run(image_folder, tmp_path, config)
    assert summary.cache_path.name == "mobilenet_v2_32_avg_random_fp16.h5"  # not float32's
    fs = load_features(summary.cache_path)
    assert fs.features.dtype == np.float32 and np.isfinite(fs.features).all()
    assert (fs.attrs["precision"], fs.attrs["runtime"]) == ("fp16", "keras")
    assert keras.config.dtype_policy().name == "float32"
