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
from typing import Any

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


def bench_finetune(
    data: str | Path,
    *,
    backbone: str = "mobilenet_v2",
    weights: str = "imagenet",
    input_size: int | None = None,
    batch_size: int = 32,
    n_images: int = 256,
    aug_views: int = 8,
    out: str | Path | None = "artifacts/bench/finetune.json",
) -> dict:
    """Time one phase-two epoch (last block unfrozen) against one stage-one pass.

    ``make bench-finetune``. All run over the same ``n_images`` training
    images, decoded by :mod:`pipeline.images`; each is warmed up with one batch
    first, so tracing and compilation are not counted. Phase two as
    ``make finetune`` runs it: the top of the network on activations cached at
    the cut (:mod:`pipeline.activations`, ``aug_views`` augmented views per
    image, one drawn per image); the one-off cost of that cache is reported
    apart. For comparison, the epoch of the whole network on images
    (``AUG_VIEWS=0``). Stage one is timed before and after the epochs, and
    the ratios use the mean, so a change of load during the run moves both.

    Returns
    -------
    dict
        Seconds and images per second of each, the ratios, layers unfrozen.
    """
    import contextlib

    import keras

    from pipeline import activations, backbones
    from pipeline.cache import FeatureRows
    from pipeline.features import FeatureConfig, resolve_features
    from pipeline.files import write_json_atomic
    from pipeline.finetune import FinetuneConfig
    from pipeline.finetune_model import build_augmentation, build_finetune_model, compile_model
    from pipeline.freezing import backbone_layers, last_block_size, set_trainable
    from pipeline.image_feed import image_sequence
    from pipeline.images import default_workers, iter_batches
    from pipeline.softmax import build_softmax_head

    resolved = resolve_features(
        FeatureConfig(backbone=backbone, weights=weights, input_size=input_size)
    )
    spec, size = resolved.spec, resolved.input_size
    folder = scan_folder(data)
    train = [r for r in folder.records if r.split == "train"] or list(folder.records)
    order = np.random.default_rng(0).permutation(len(train))[:n_images]
    records = [train[i] for i in sorted(order)]
    paths = [r.path for r in records]
    labels = np.array([r.label for r in records])

    extractor = backbones.build_feature_extractor(spec, weights=weights, input_size=size)
    batches = dict(size=size, batch_size=batch_size, preprocess=spec.preprocess)
    with contextlib.closing(iter_batches(folder.root, paths[:batch_size], **batches)) as warmup:
        extractor.predict_on_batch(next(warmup).x)

    def stage_one() -> float:
        tick = time.perf_counter()
        for batch in iter_batches(folder.root, paths, **batches):
            extractor.predict_on_batch(batch.x)
        return time.perf_counter() - tick

    forward_before = stage_one()

    base = backbones.build_base(spec, weights=weights, input_size=size)
    layers = last_block_size(base)
    head = build_softmax_head(int(extractor.output_shape[-1]), len(folder.class_names))
    finetune_config = FinetuneConfig(aug_views=aug_views)
    augmentation = build_augmentation(finetune_config)
    model = build_finetune_model(spec, base, head, size=size, augmentation=augmentation)
    set_trainable(base, layers)
    compile_model(model, 1e-5, sigmoid=False)
    seq = image_sequence(
        folder.root, paths, labels, size=size, batch_size=batch_size, shuffle_seed=0,
        workers=default_workers(),
    )  # fmt: skip
    model.train_on_batch(*seq[0])
    tick = time.perf_counter()
    model.fit(seq, epochs=1, verbose=0)
    train_seconds = time.perf_counter() - tick

    # Phase two on cached activations: the cache once, then the epochs.
    cut = activations.find_cut(base, layers)
    views = max(1, aug_views)
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        views_spec = activations.ViewsSpec(
            stage_one="{}", views=views, seed=0,
            augmentation={"flip": "horizontal", "rotation": 0.1, "zoom": 0.1},
        )  # fmt: skip
        tick = time.perf_counter()
        activations.write_views(
            Path(tmp) / "views.h5", folder.root, paths, labels, spec=views_spec, fingerprint="",
            frozen=activations.frozen_part(base, cut), augmentation=build_augmentation(
                finetune_config), preprocessing=spec.preprocessing, size=size,
            batch_size=batch_size, dtype="float16",
            attrs={"class_names": list(folder.class_names)}, progress=False,
        )  # fmt: skip
        cache_seconds = time.perf_counter() - tick
        cache_bytes = (Path(tmp) / "views.h5").stat().st_size
        top = activations.build_top_model(base, head, cut)
        compile_model(top, 1e-5, sigmoid=False)
        with FeatureRows(Path(tmp) / "views.h5") as reader:
            feed = activations.activation_sequence(
                reader, np.arange(len(paths)), labels, views=views, batch_size=batch_size,
                shuffle_seed=0,
            )  # fmt: skip
            top.train_on_batch(*feed[0])
            epochs = []
            for epoch in (1, 2):
                feed.set_epoch(epoch)
                tick = time.perf_counter()
                top.fit(feed, epochs=1, verbose=0, shuffle=False)
                epochs.append(time.perf_counter() - tick)
    cached_seconds = float(np.mean(epochs))
    forward_after = stage_one()
    forward_seconds = (forward_before + forward_after) / 2

    result = {
        "backbone": spec.name,
        "weights": weights,
        "input_size": size,
        "images": len(paths),
        "batch_size": batch_size,
        "layers_unfrozen": layers,
        "depth": len(backbone_layers(base)),
        "cut_layer": cut.layer,
        "aug_views": aug_views,
        "trainable_params": int(sum(np.prod(v.shape) for v in top.trainable_weights)),
        "stage_one_seconds": round(forward_seconds, 2),
        "stage_one_seconds_before_after": [round(forward_before, 2), round(forward_after, 2)],
        "stage_one_images_per_second": round(len(paths) / forward_seconds, 1),
        "finetune_epoch_seconds": round(cached_seconds, 2),
        "finetune_epoch_seconds_each": [round(e, 2) for e in epochs],
        "finetune_images_per_second": round(len(paths) / cached_seconds, 1),
        "ratio": round(cached_seconds / forward_seconds, 3),
        "activation_cache_seconds": round(cache_seconds, 2),
        "activation_cache_ratio": round(cache_seconds / forward_seconds, 2),
        "activation_cache_bytes": cache_bytes,
        "full_forward_epoch_seconds": round(train_seconds, 2),
        "full_forward_ratio": round(train_seconds / forward_seconds, 2),
        "keras_backend": keras.backend.backend(),
        "cpu_count": os.cpu_count(),
    }
    print(
        f"stage one: {len(paths)} images in {forward_seconds:.1f} s "
        f"({result['stage_one_images_per_second']} images/s); phase-two epoch, last block "
        f"({layers} layers) trainable, on activations cached at {cut.layer}: "
        f"{cached_seconds:.2f} s ({result['finetune_images_per_second']} images/s); "
        f"ratio {result['ratio']}\n"
        f"  one-off activation cache ({views} views per image): {cache_seconds:.1f} s "
        f"({result['activation_cache_ratio']} stage-one passes, {cache_bytes / 1e6:.0f} MB); "
        f"full forward pass per epoch (AUG_VIEWS=0): {train_seconds:.1f} s, "
        f"ratio {result['full_forward_ratio']}"
    )
    if out:
        write_json_atomic(Path(out), result)
        print(f"wrote {out}")
    return result


def _ratio_text(value: float | None) -> str:
    return "n/a (no extraction time in the cache)" if value is None else f"{value:.3f}"


def bench_heads(
    cache_paths: list[str | Path],
    *,
    out: str | Path | None = None,
    cv: int = 3,
    seed: int = 0,
    log: Any = None,
) -> dict:
    """Fit time of the default heads over stage-one extraction time, per cache.

    ``make bench-heads``. The heads are fitted into a temporary folder (the
    user's heads are not touched); Keras is warmed up first, as stage one's
    time excludes start-up too. ``ratio`` is the sum of the heads' fit times,
    hyper-parameter search included, divided by the cache's ``seconds``
    attribute (stage one's extraction time); ``ratio_final_fit`` counts only
    the final fit of each head with its chosen hyper-parameters.

    Returns
    -------
    dict
        ``{"target": 0.1, "caches": [{"cache", "dataset", "extraction_seconds",
        "fit_seconds": {head: s}, "refit_seconds": {head: s}, "total_fit_seconds",
        "ratio", "ratio_final_fit", "accuracy": {...}}]}``, also written to
        ``out`` as JSON when given.
    """
    from pipeline.cache import read_attrs
    from pipeline.files import write_json_atomic
    from pipeline.heads import DEFAULT_HEADS, fit_heads
    from pipeline.softmax import SoftmaxClassifier

    # Stage one's seconds exclude start-up (TensorFlow initialisation, model building);
    # a one-epoch fit on noise pays the Keras start-up here, outside the timing.
    X, y = np.random.default_rng(seed).normal(size=(8, 4)), np.arange(8) % 2
    SoftmaxClassifier(max_epochs=1, validation_fraction=0.0).fit(X, y)
    rows = []
    for cache_path in cache_paths:
        attrs = read_attrs(cache_path)
        with tempfile.TemporaryDirectory() as tmp:
            results = fit_heads(cache_path, DEFAULT_HEADS, artifacts_dir=tmp, cv=cv, seed=seed)
        fit = {r.head: r.manifest["fit_seconds"] for r in results}
        refit = {r.head: r.manifest["refit_seconds"] for r in results}
        total, total_refit = float(sum(fit.values())), float(sum(refit.values()))
        extraction = float(attrs["seconds"])
        row = {
            "cache": str(cache_path),
            "dataset": attrs.get("dataset"),
            "n_images": attrs.get("n_images"),
            "extraction_seconds": extraction,
            "fit_seconds": fit,
            "refit_seconds": refit,
            "total_fit_seconds": total,
            "total_refit_seconds": total_refit,
            "ratio": total / extraction if extraction > 0 else None,
            "ratio_final_fit": total_refit / extraction if extraction > 0 else None,
            "accuracy": {r.head: r.manifest["metrics"] for r in results},
        }
        rows.append(row)
        if log is not None:
            log(
                f"{row['dataset']}: heads {total:.1f} s with search ({total_refit:.1f} s final "
                f"fits) / extraction {extraction:.1f} s = ratio {_ratio_text(row['ratio'])} "
                f"({_ratio_text(row['ratio_final_fit'])} final fits; target <= 0.1); "
                + ", ".join(f"{h} {s:.2f} s" for h, s in fit.items())
            )
    summary = {
        "target": 0.1,
        "heads": list(DEFAULT_HEADS),
        "cv": cv,
        "caches": rows,
        "cpu_count": os.cpu_count(),
    }
    if out is not None:
        write_json_atomic(out, summary)
    return summary


if __name__ == "__main__":
    _child_main(sys.argv[1:])
