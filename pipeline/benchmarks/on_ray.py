"""``make bench-features ENGINE=ray``: the local engine against Ray with 1 and 2 actors."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.benchmarks.stage_one import _subset_folder
from pipeline.core.files import write_json_atomic
from pipeline.data.folders import scan_folder
from pipeline.data.images import load_image
from pipeline.features.cache import load_features, read_attrs
from pipeline.features.config import FeatureConfig
from pipeline.features.extract import extract_features
from pipeline.features.ray_session import RayConfig


def bench_features_ray(
    data: str | Path,
    *,
    backbone: str = "mobilenet_v2",
    weights: str = "imagenet",
    batch_size: int = 32,
    n_images: int = 400,
    actors: tuple[int, ...] = (1, 2),
    address: str | None = None,
    out: str | Path | None = None,
    log=print,
) -> dict[str, Any]:
    """``make bench-features ENGINE=ray``: stage one locally and on Ray, on the same N images.

    Each run builds its own cache from scratch (a fresh artifacts folder), the
    Ray runs each with a cluster of their own (started for the run unless
    ``address`` names one), ``RUNTIME=keras`` on both sides so the engines
    differ and nothing else. Figures: ``wall_seconds`` (the whole call: model
    build, Ray start, actors, shards, join), ``images_per_second`` (steady
    state: the images after the first batch over the time after it), the
    lowest cosine between a row of each Ray cache and the local one, and
    ``decode_ms_per_image`` (one decode, for the README's scaling estimate).
    """

    config = FeatureConfig(
        backbone=backbone, weights=weights, batch_size=batch_size, runtime="keras"
    )
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = _subset_folder(Path(data), n_images, Path(tmp) / "subset")
        decode_ms = _decode_ms_per_image(folder)
        local_features = None
        for engine, k in [("local", 0), *[("ray", k) for k in actors]]:
            artifacts = Path(tmp) / f"{engine}{k}"
            row, features = _timed_run(folder, config, artifacts, engine, k, address)
            if local_features is None:
                local_features = features
            else:
                row["min_cosine_to_local"] = _min_cosine(features, local_features)
            runs.append(row)
            wall = row["wall_seconds"]
            log(
                f"{engine}{f' ({k} actors)' if k else ''}: {wall:.1f} s end to end, "
                f"stage {row['seconds']:.1f} s, {row['images_per_second'] or 0:.1f} images/s over it"
                + (f", min cosine to local {row['min_cosine_to_local']:.6f}" if k else "")
            )
    _compare_to_local(runs)
    result = {
        "data": str(data),
        "backbone": backbone,
        "batch_size": batch_size,
        "n_images": n_images,
        "cpu_count": os.cpu_count(),
        "decode_ms_per_image": decode_ms,
        "runs": runs,
    }
    if out is not None:
        write_json_atomic(Path(out), result)
        log(f"wrote {out}")
    return result


def _decode_ms_per_image(folder: Path) -> float:
    """Milliseconds to decode one image (the first 64 of ``folder``), for the scaling estimate."""
    records = scan_folder(folder).records
    sample = records[: min(64, len(records))]
    started = time.perf_counter()
    for record in sample:
        load_image(folder / record.path, 224)
    return 1000 * (time.perf_counter() - started) / len(sample)


def _timed_run(
    folder: Path,
    config: FeatureConfig,
    artifacts: Path,
    engine: str,
    actors: int,
    address: str | None,
) -> tuple[dict[str, Any], np.ndarray]:
    """Stage one from scratch on one engine (``actors``: 0 for the local one): its row of
    figures, and the features it wrote."""
    started = time.perf_counter()
    summary = extract_features(
        folder,
        config,
        artifacts_dir=artifacts,
        progress=False,
        engine=engine,
        ray_config=RayConfig(address=address, concurrency=actors) if actors else None,
    )
    wall = time.perf_counter() - started
    attrs = read_attrs(summary.cache_path)
    features = load_features(summary.cache_path).features.astype(np.float64)
    seconds = float(attrs["seconds"])
    row = {
        "engine": engine,
        "actors": actors or None,
        "images": summary.extracted,
        "wall_seconds": wall,
        "seconds": float(attrs["seconds"]),
        "warmup_seconds": float(attrs.get("warmup_seconds", 0.0)),
        "ray_start_seconds": attrs.get("ray_start_seconds"),
        # Over the whole stage, warm-up included: Ray's first block comes back
        # after its pipeline has filled, so a "steady" rate would flatter it.
        "images_per_second": summary.extracted / seconds if seconds > 0 else None,
    }
    return row, features


def _min_cosine(features: np.ndarray, local: np.ndarray) -> float:
    """The lowest cosine between a row of ``features`` and the same row of ``local``."""
    dot = np.sum(features * local, axis=1)
    norms = np.linalg.norm(features, axis=1) * np.linalg.norm(local, axis=1)
    return float(np.min(dot / np.maximum(norms, 1e-12)))


def _compare_to_local(runs: list[dict[str, Any]]) -> None:
    """Add each Ray run's overhead and throughput ratio to the local run (the first)."""
    local = runs[0]
    for row in runs[1:]:
        row["overhead_seconds"] = row["wall_seconds"] - local["wall_seconds"]
        if row["images_per_second"] and local["images_per_second"]:
            row["throughput_ratio_to_local"] = row["images_per_second"] / local["images_per_second"]
