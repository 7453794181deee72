"""The benchmarks' arithmetic on tiny inputs (the figures themselves come from `make bench-*`)."""

from __future__ import annotations

import json

import pytest
from heads_helpers import synthetic_cache

from pipeline.benchmarks.heads import bench_heads
from pipeline.heads.registry import DEFAULT_HEADS


def test_bench_heads_divides_the_heads_fit_time_by_extraction(tmp_path):
    cache = synthetic_cache(tmp_path, seconds=20.0)
    lines: list[str] = []
    summary = bench_heads([cache], out=tmp_path / "heads.json", log=lines.append)
    (row,) = summary["caches"]
    assert set(row["fit_seconds"]) == set(DEFAULT_HEADS)
    assert row["extraction_seconds"] == 20.0
    assert row["ratio"] == pytest.approx(row["searches_seconds"] / 20.0)
    each = row["searches_seconds_each_sweep"]
    assert len(each) == 3 and row["searches_seconds"] == sorted(each)[1]  # the median sweep
    assert row["ratio_sweep"] == pytest.approx(row["sweep_seconds"] / 20.0)
    # the searches run one after another; the sweep holds them, and evaluation and saving
    assert row["searches_seconds"] == pytest.approx(sum(row["fit_seconds"].values()))
    assert row["searches_seconds"] <= row["sweep_seconds"]
    assert json.loads((tmp_path / "heads.json").read_text())["caches"][0]["ratio"] == row["ratio"]
    assert "ratio" in lines[0] and "target <= 0.1" in lines[0]


def test_bench_heads_refuses_no_sweep(tmp_path):
    from pipeline.core.errors import PipelineError

    with pytest.raises(PipelineError, match="--repeats must be at least 1"):
        bench_heads([synthetic_cache(tmp_path)], repeats=0)


def test_bench_heads_on_folders_checks_repeats_before_stage_one(tmp_path, monkeypatch):
    import pipeline.features.extract
    from pipeline.benchmarks.heads import bench_heads_on_folders
    from pipeline.core.errors import PipelineError

    def no_extraction(*args, **kwargs):
        raise AssertionError("stage one ran before the options were checked")

    monkeypatch.setattr(pipeline.features.extract, "extract_features", no_extraction)
    with pytest.raises(PipelineError, match="--repeats"):
        bench_heads_on_folders([tmp_path], None, repeats=0)


def test_bench_heads_on_folders_times_stage_one_in_the_same_run(
    split_folder, tmp_path, monkeypatch
):
    """make bench-heads: stage one extracts into a temporary folder and its time, taken in
    this run, is the ratio's denominator; the user's artifacts are not written."""
    from pipeline.benchmarks.heads import bench_heads_on_folders
    from pipeline.features.config import FeatureConfig

    monkeypatch.chdir(tmp_path)  # so a stray write to ./artifacts would land in tmp_path
    config = FeatureConfig(weights="none", input_size=32, batch_size=8, runtime="keras")
    summary = bench_heads_on_folders([split_folder], config, out=tmp_path / "heads.json")
    (row,) = summary["caches"]
    assert row["extraction_seconds"] > 0
    assert row["ratio"] == pytest.approx(row["searches_seconds"] / row["extraction_seconds"])
    assert not (split_folder / "artifacts").exists() and not (tmp_path / "artifacts").exists()


def test_synthetic_features_look_like_pooled_cnn_features_and_are_repeatable(tmp_path):
    import numpy as np

    from pipeline.benchmarks.synthetic import synthetic_features, write_synthetic_cache
    from pipeline.features.cache import load_features

    X, y = synthetic_features(400, 20, 64, seed=3)
    assert X.dtype == np.float32 and X.min() == 0.0 and 0.15 < np.mean(X == 0) < 0.5
    assert np.median(X) < 0.5 * X.mean()  # a long upper tail, as ReLU features have
    assert np.bincount(y).tolist() == [20] * 20
    assert np.array_equal(synthetic_features(400, 20, 64, seed=3)[0], X)
    path = write_synthetic_cache(tmp_path / "s.h5", 100, 5, 8, seconds=12.0)
    fs = load_features(path)
    assert fs.select("train")[0].shape == (100, 8) and fs.select("val")[0].shape == (20, 8)
    assert fs.attrs["seconds"] == 12.0 and len(fs.class_names) == 5


def test_bench_heads_rows_and_classes_are_checked_in_one_line(capsys):
    from pipeline.cli.main import main

    assert main(["bench-heads", "--classes", "100", "--rows", "3000,lots"]) == 2
    assert "ROWS='3000,lots' is not a comma list" in capsys.readouterr().err
    assert main(["bench-heads", "--classes", "100", "--rows", "150"]) == 2
    assert "at least twice as many rows as classes" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_heads_synthetic_times_the_default_sweep_per_row_count(tmp_path):
    from pipeline.benchmarks.heads import bench_heads_synthetic

    lines: list[str] = []
    summary = bench_heads_synthetic(
        4, [40, 80], width=16, repeats=1, out=tmp_path / "s.json", log=lines.append
    )
    assert [row["rows"] for row in summary["caches"]] == [40, 80]
    assert all(set(row["fit_seconds"]) == set(DEFAULT_HEADS) for row in summary["caches"])
    assert summary["caches"][0]["ratio"] is None  # no reference folder: no stage-one time
    assert lines[0].startswith("4 classes x 40 rows: ") and summary["caches"][1]["max_rss_mb"] > 0
