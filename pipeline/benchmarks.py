"""Stage-one benchmark: the streaming pipeline against the pure forward pass.

``make bench-features`` (:func:`bench_features`) measures, on one machine, with
one backbone and batch size:

* **forward**: ``predict_on_batch`` over batches already decoded and
  preprocessed in memory, the limit any input pipeline can reach (timed first
  and last, over 4N images each; the mean is the reference);
* **pipeline** at N and 4N images: :func:`pipeline.features.extract_features`
  from a folder of JPEGs to a finished HDF5 cache;
* **tutorial** at N and 4N images, for reference: the way tutorials do it
  (load every image into one array, ``model.predict``, write at the end).

Throughputs exclude the first batch on both sides (graph compilation, a fixed
cost, reported separately). Each measurement runs in its own process, so its
peak resident memory (``ru_maxrss``) is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.images import scan_folder


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _subset_folder(data: Path, n: int, out: Path) -> Path:
    """``out/<class>/<file>`` symlinks to the first ``n`` images of a seeded shuffle."""
    folder = scan_folder(data)
    order = np.random.default_rng(0).permutation(len(folder.records))
    if n > len(order):
        raise DataError(f"{data} has {len(order)} images; asked for {n}")
    for i in order[:n]:
        record = folder.records[i]
        link = out / folder.class_names[record.label] / f"{i:06d}_{Path(record.path).name}"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to((folder.root / record.path).resolve())
    return out


def _child_forward(folder: Path, backbone: str, weights: str, batch_size: int, n: int) -> dict:
    from pipeline.backbones import build_feature_extractor, get_backbone
    from pipeline.images import iter_batches

    spec = get_backbone(backbone)
    model = build_feature_extractor(spec, weights=weights)
    paths = [r.path for r in scan_folder(folder).records]
    # Distinct real batches, decoded before the clock starts; cycled to cover n images.
    cached = []
    for batch in iter_batches(
        folder,
        paths[: batch_size * 8],
        size=spec.default_size,
        batch_size=batch_size,
        preprocess=spec.preprocess,
    ):
        if len(batch.x) == batch_size:
            cached.append(batch.x)
    model.predict_on_batch(cached[0])  # warm-up: compilation
    steps = max(1, n // batch_size - 1)
    started = time.perf_counter()
    for step in range(steps):
        model.predict_on_batch(cached[step % len(cached)])
    seconds = time.perf_counter() - started
    return {
        "images": steps * batch_size,
        "seconds": seconds,
        "images_per_second": steps * batch_size / seconds,
    }


def _child_pipeline(
    folder: Path, backbone: str, weights: str, batch_size: int, artifacts: Path
) -> dict:
    from pipeline.cache import read_attrs
    from pipeline.features import FeatureConfig, extract_features

    started = time.perf_counter()
    summary = extract_features(
        folder,
        FeatureConfig(backbone=backbone, weights=weights, batch_size=batch_size),
        artifacts_dir=artifacts,
        progress=False,
    )
    wall = time.perf_counter() - started
    attrs = read_attrs(summary.cache_path)
    steady = attrs["seconds"] - attrs["warmup_seconds"]
    images = summary.images - min(batch_size, summary.images)
    return {
        "images": summary.images,
        "wall_seconds": wall,
        "loop_seconds": attrs["seconds"],
        "warmup_seconds": attrs["warmup_seconds"],
        "images_per_second": images / steady,
        "file_mb": summary.file_bytes / 1e6,
    }


def _child_tutorial(
    folder: Path, backbone: str, weights: str, batch_size: int, artifacts: Path
) -> dict:
    import h5py

    from pipeline.backbones import build_feature_extractor, get_backbone
    from pipeline.images import load_image

    spec = get_backbone(backbone)
    model = build_feature_extractor(spec, weights=weights)
    records = scan_folder(folder).records
    model.predict_on_batch(
        np.zeros((batch_size, spec.default_size, spec.default_size, 3), np.float32)
    )
    started = time.perf_counter()
    images = np.stack([load_image(folder / r.path, spec.default_size) for r in records])
    x = spec.preprocess(images)
    features = model.predict(x, batch_size=batch_size, verbose=0)
    with h5py.File(artifacts / "tutorial.h5", "w") as f:
        f["features"] = features
    seconds = time.perf_counter() - started
    return {"images": len(records), "seconds": seconds, "images_per_second": len(records) / seconds}


def _run_child(
    mode: str, folder: Path, backbone: str, weights: str, batch_size: int, extra: str
) -> dict:
    command = [
        sys.executable,
        "-m",
        "pipeline.benchmarks",
        mode,
        str(folder),
        backbone,
        weights,
        str(batch_size),
        extra,
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark step {mode} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_features(
    data: str | Path,
    *,
    backbone: str = "mobilenet_v2",
    weights: str = "imagenet",
    batch_size: int = 32,
    n_images: int = 400,
    out: str | Path = "artifacts/bench/features.json",
) -> dict:
    """Run the stage-one benchmark and write its figures as JSON.

    Returns
    -------
    dict
        Throughputs (images/s), the pipeline-to-forward ratios and the peak
        memory of every step, at N and 4N images.
    """
    data = Path(data)
    if not data.is_dir():
        raise DataError(f"benchmark data {data} does not exist; pass BENCH_DATA=<image folder>")
    results: dict = {
        "backbone": backbone,
        "weights": weights,
        "batch_size": batch_size,
        "data": str(data),
        "n": n_images,
        "cpu_count": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory(prefix="bench-features-") as tmp:
        tmp = Path(tmp)
        small = _subset_folder(data, n_images, tmp / "small" / "images")
        large = _subset_folder(data, 4 * n_images, tmp / "large" / "images")
        print(
            f"benchmark: {backbone}, batch {batch_size}, N={n_images} and 4N={4 * n_images} images of {data}"
        )
        # The forward pass is timed before and after the rest (over 4N images' worth of
        # batches each time); their mean is the reference, so drift hits both sides alike.
        steps = [
            ("forward_before", "forward", small, str(4 * n_images)),
            ("pipeline_n", "pipeline", small, str(tmp / "small" / "art")),
            ("pipeline_4n", "pipeline", large, str(tmp / "large" / "art")),
            ("tutorial_n", "tutorial", small, str(tmp / "small")),
            ("tutorial_4n", "tutorial", large, str(tmp / "large")),
            ("forward_after", "forward", small, str(4 * n_images)),
        ]
        for key, mode, folder, extra in steps:
            results[key] = _run_child(mode, folder, backbone, weights, batch_size, extra)
            print(
                f"  {key:<12} {results[key]['images_per_second']:7.1f} images/s   "
                f"peak memory {results[key]['peak_rss_mb']:7.0f} MB"
            )
    forward = (
        results["forward_before"]["images_per_second"]
        + results["forward_after"]["images_per_second"]
    ) / 2
    results["forward_images_per_second"] = forward
    for key in ("pipeline_n", "pipeline_4n", "tutorial_n", "tutorial_4n"):
        results[key]["ratio_to_forward"] = results[key]["images_per_second"] / forward
    for kind in ("pipeline", "tutorial"):
        results[f"{kind}_memory_4n_over_n"] = (
            results[f"{kind}_4n"]["peak_rss_mb"] / results[f"{kind}_n"]["peak_rss_mb"]
        )
    print(
        f"pipeline / forward: {results['pipeline_n']['ratio_to_forward']:.3f} at N, "
        f"{results['pipeline_4n']['ratio_to_forward']:.3f} at 4N (target >= 0.95)"
    )
    print(
        f"pipeline peak memory 4N / N: {results['pipeline_memory_4n_over_n']:.3f} (target <= 1.1); "
        f"tutorial: {results['tutorial_memory_4n_over_n']:.3f}"
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return results


def _child_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["forward", "pipeline", "tutorial"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("backbone")
    parser.add_argument("weights")
    parser.add_argument("batch_size", type=int)
    parser.add_argument("extra")
    args = parser.parse_args(argv)
    if args.mode == "forward":
        result = _child_forward(
            args.folder, args.backbone, args.weights, args.batch_size, int(args.extra)
        )
    elif args.mode == "pipeline":
        result = _child_pipeline(
            args.folder, args.backbone, args.weights, args.batch_size, Path(args.extra)
        )
    else:
        result = _child_tutorial(
            args.folder, args.backbone, args.weights, args.batch_size, Path(args.extra)
        )
    result["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(result))


if __name__ == "__main__":
    _child_main(sys.argv[1:])
