"""pipeline.features.ray_engine on a local Ray cluster: the same cache as the local engine, resume, retries.

One Ray session serves the whole module (starting one costs seconds on two cores);
the engine uses a session that is already up and leaves it running.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import make_folder

from pipeline.data.folders import SplitConfig
from pipeline.features.cache import load_features, read_attrs, read_skipped
from pipeline.features.config import FeatureConfig
from pipeline.features.extract import extract_features
from pipeline.features.ray_shards import shard_dir_of

ray = pytest.importorskip("ray")

from pipeline.features.ray_engine import EmbedBatches, extract_features_ray  # noqa: E402
from pipeline.features.ray_session import RayConfig, joblib_on_ray  # noqa: E402

BLOCK = 8  # records per shard: the 22 records below make 3 blocks


pytestmark = pytest.mark.slow  # a local Ray cluster: the slow tier (make test-slow)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local cluster for the module: 2 actors of 1 CPU each, and 1 CPU for decoding."""
    ray.init(num_cpus=3, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, FeatureConfig]:
    """Two classes of 10 PNGs, a corrupt and an empty image; fixed random weights, 32 px."""
    from pipeline.features.backbones import build_feature_extractor

    root = tmp_path_factory.mktemp("raydata")
    folder = make_folder(root / "shapes", per_class=10)
    (folder / "red" / "corrupt.jpg").write_bytes(b"not a jpeg")
    (folder / "blue" / "empty.png").write_bytes(b"")
    weights = root / "random.weights.h5"  # one set of weights: local, driver and actors agree
    build_feature_extractor("mobilenet_v2", weights="none", input_size=32).save_weights(weights)
    config = FeatureConfig(
        backbone="mobilenet_v2", weights=str(weights), input_size=32, batch_size=4, runtime="keras"
    )
    return folder, config


@pytest.fixture(scope="module")
def local_cache(data, tmp_path_factory) -> Path:
    folder, config = data
    artifacts = tmp_path_factory.mktemp("local")
    return extract_features(folder, config, artifacts_dir=artifacts, progress=False).cache_path


def _assert_same_cache(ray_path: Path, local_path: Path) -> None:
    a, b = load_features(ray_path), load_features(local_path)
    assert ray_path.name == local_path.name  # engine is not part of the identity
    assert list(a.paths) == list(b.paths)
    assert list(a.labels) == list(b.labels)
    assert list(a.split) == list(b.split)
    assert a.class_names == b.class_names
    cosine = np.sum(a.features * b.features, 1) / (
        np.linalg.norm(a.features, axis=1) * np.linalg.norm(b.features, axis=1)
    )
    assert cosine.min() >= 0.9999
    for key in ("config_json", "fingerprint", "n_images", "n_skipped", "feature_width"):
        assert a.attrs[key] == b.attrs[key], key
    assert a.attrs["engine"] == "ray"
    assert not shard_dir_of(ray_path).exists()


def _run(folder, config, artifacts, **kwargs):
    return extract_features_ray(
        folder,
        config,
        split=SplitConfig(),
        artifacts_dir=artifacts,
        progress=False,
        **{"ray_config": RayConfig(block_size=BLOCK), **kwargs},
    )


def test_two_actors_give_the_local_cache_and_skip_bad_images(
    ray_cluster, data, local_cache, tmp_path, capsys
):
    folder, config = data
    summary = extract_features(
        folder,
        config,
        artifacts_dir=tmp_path,
        progress=False,
        engine="ray",
        ray_config=RayConfig(concurrency=2, block_size=BLOCK),
    )
    _assert_same_cache(summary.cache_path, local_cache)
    assert summary.status == "built" and summary.extracted == 20
    assert summary.skipped == read_skipped(local_cache)
    assert {Path(p).name for p, _ in summary.skipped} == {"corrupt.jpg", "empty.png"}
    assert "skipped red/corrupt.jpg: " in capsys.readouterr().out  # reported as it happens
    assert read_attrs(summary.cache_path)["ray_actors"] == 2
    # A second run, either engine, finds it up to date.
    assert extract_features(folder, config, artifacts_dir=tmp_path, progress=False).status == (
        "up to date"
    )


class _DriverKilled(Exception):
    pass


def test_a_killed_driver_leaves_shards_and_the_next_run_computes_only_the_rest(
    ray_cluster, data, local_cache, tmp_path
):
    folder, config = data
    written: list[Path] = []

    def die_after_one(shard: Path) -> None:
        written.append(shard)
        raise _DriverKilled  # the driver stops here, as a kill would stop it

    with pytest.raises(_DriverKilled):
        _run(folder, config, tmp_path, on_shard=die_after_one)
    kept = sorted(p.name for p in written[0].parent.glob("*.h5"))
    assert kept == [written[0].name]

    again: list[Path] = []
    summary = _run(folder, config, tmp_path, on_shard=again.append)
    assert summary.status == "resumed"
    assert any("reusing 1 of 3 shards" in note for note in summary.notes)
    assert written[0] not in again and len(again) == 2  # only the other blocks were computed
    _assert_same_cache(summary.cache_path, local_cache)


def test_a_shard_of_other_images_is_not_reused(ray_cluster, data, tmp_path):
    folder, config = data
    written: list[Path] = []

    def stop(shard: Path) -> None:
        written.append(shard)
        raise _DriverKilled

    with pytest.raises(_DriverKilled):
        _run(folder, config, tmp_path, on_shard=stop)
    other = SplitConfig(seed=1)  # another split: another identity, the shard is stale
    summary = extract_features_ray(
        folder,
        config,
        split=other,
        artifacts_dir=tmp_path,
        progress=False,
        ray_config=RayConfig(block_size=BLOCK),
    )
    assert summary.status == "built"
    assert any("discarded" in note for note in summary.notes)


def test_a_worker_that_dies_mid_job_is_restarted_and_its_batch_retried(
    ray_cluster, data, local_cache, tmp_path
):
    folder, config = data
    marker = tmp_path / "died-once"

    class DiesOnce(EmbedBatches):  # pickled by value: a local class
        def __call__(self, batch):
            if not marker.exists():
                marker.touch()
                os._exit(1)  # the worker process dies, as on a lost node or OOM kill
            return super().__call__(batch)

    summary = _run(folder, config, tmp_path, embedder=DiesOnce)
    assert marker.exists()
    _assert_same_cache(summary.cache_path, local_cache)


def test_actors_the_cluster_cannot_start_stop_the_run_in_one_line(ray_cluster, data, tmp_path):
    """Ray Data would wait for ever for actors that ask for more than the cluster has."""
    from pipeline.core.errors import PipelineError

    folder, config = data
    with pytest.raises(PipelineError, match=r"did not start 1 backbone actor\(s\) of 16 CPU"):
        extract_features(
            folder,
            config,
            artifacts_dir=tmp_path,
            progress=False,
            engine="ray",
            ray_config=RayConfig(cpus_per_actor=16, actor_start_seconds=3),
        )


def test_the_head_search_on_ray_chooses_and_scores_as_locally(ray_cluster, tiny_cache, tmp_path):
    from pipeline.heads.fit import fit_heads

    local = fit_heads(tiny_cache, "svm,logreg", artifacts_dir=tmp_path / "local", jobs=1)
    with joblib_on_ray():
        remote = fit_heads(tiny_cache, "svm,logreg", artifacts_dir=tmp_path / "ray", jobs=-1)
    for a, b in zip(local, remote, strict=True):
        assert a.manifest["params"] == b.manifest["params"]
        assert a.manifest["cv"]["scores"] == b.manifest["cv"]["scores"]
        assert a.manifest["metrics"] == b.manifest["metrics"]


def test_unknown_engine_is_one_line_with_a_suggestion(image_folder, tmp_path, capsys):
    from pipeline.cli.main import main

    code = main(["features", "--data", str(image_folder), "--engine", "rey", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "ENGINE= (--engine) must be one of local, ray" in err and "ray" in err
