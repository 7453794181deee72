"""Stage-one benchmark: runtimes, the streaming pipeline and start-up, on the same images.

``make bench-features`` (:func:`bench_features`) measures, on one machine, with
one backbone and batch size, over the same N images (4N for the memory check):

* **forward**: in one process, interleaved rounds over batches already decoded
  and preprocessed in memory (the limit any input pipeline can reach), median
  images/s of the Keras ``predict_on_batch`` and of each runtime at each
  precision (:mod:`pipeline.runtimes`), with the smallest cosine of each one's
  features to Keras float32 features;
* **start-up**: importing Keras, building the model, importing the runtime,
  converting, compiling (cold and from the compiled-model cache);
* **stage**: ``python -m pipeline.benchmarks stage ...`` per runtime, each in its
  own process from a folder of JPEGs to a finished HDF5 cache, timed from
  outside (interpreter start, imports and conversion included: the whole
  stage) and inside (the steady loop, first batch excluded); ``auto`` cold
  (converts and checks) and warm (the stored conversion), the default at N and
  4N for memory (``ru_maxrss`` of its own process);
* **tutorial** at N and 4N images, for reference: load every image into one
  array, ``model.predict``, write at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError
from pipeline.images import scan_folder

FORWARD_ROUNDS = 5  # interleaved rounds of the forward comparison (median taken)


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


def _decoded_batches(folder: Path, spec, batch_size: int, n_batches: int) -> list[np.ndarray]:
    from pipeline.images import iter_batches

    paths = [r.path for r in scan_folder(folder).records]
    batches = iter_batches(
        folder,
        paths[: batch_size * n_batches],
        size=spec.default_size,
        batch_size=batch_size,
        preprocess=spec.preprocess,
    )
    return [b.x for b in batches if len(b.x) == batch_size]


def _child_forward(folder: Path, backbone: str, weights: str, batch_size: int, args: dict) -> dict:
    """Keras and every runtime precision, interleaved rounds in this one process."""
    from pipeline import runtimes
    from pipeline.backbones import build_feature_extractor, get_backbone

    spec = get_backbone(backbone)
    keras_model = build_feature_extractor(spec, weights=weights)
    cached = _decoded_batches(folder, spec, batch_size, 8)  # distinct real batches
    models: dict[str, Any] = {"keras": keras_model}
    store = Path(args["store"]) / "model.xml"
    if runtimes.openvino_installed() and store.is_file():
        for precision in args["precisions"]:
            models[f"openvino_{precision}"] = runtimes.OpenVINOModel(store, precision)
    reference = [np.asarray(keras_model.predict_on_batch(x)) for x in cached]
    result: dict = {}
    for name, model in models.items():  # warm-up (compilation), and the features' fidelity
        got = [np.asarray(model.predict_on_batch(x)) for x in cached]
        result[name] = {
            "cosine_min_to_keras": runtimes.cosine_min(
                np.concatenate(got), np.concatenate(reference)
            )
        }
    steps = max(1, args["n"] // batch_size)
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(FORWARD_ROUNDS):
        for name, model in models.items():
            started = time.perf_counter()
            for step in range(steps):
                model.predict_on_batch(cached[step % len(cached)])
            rates[name].append(steps * batch_size / (time.perf_counter() - started))
    for name in models:
        result[name].update(
            images_per_second=statistics.median(rates[name]),
            rounds=[round(r, 1) for r in rates[name]],
            images_per_round=steps * batch_size,
        )
    return result


def _child_startup(folder: Path, backbone: str, weights: str, batch_size: int, args: dict) -> dict:
    """Seconds of each start-up step, in a fresh process (cold: nothing imported yet)."""
    clock = time.perf_counter
    out: dict = {}
    t = clock()
    import keras  # noqa: F401  (TensorFlow's import is most of it)

    out["import_keras_s"] = clock() - t
    from pipeline import runtimes
    from pipeline.backbones import build_feature_extractor, get_backbone

    spec = get_backbone(backbone)
    t = clock()
    model = build_feature_extractor(spec, weights=weights)
    out["build_keras_s"] = clock() - t
    x = _decoded_batches(folder, spec, batch_size, 1)[0]
    t = clock()
    model.predict_on_batch(x)
    out["keras_first_batch_s"] = clock() - t
    if not runtimes.openvino_installed():
        return out
    t = clock()
    import openvino  # noqa: F401

    out["import_openvino_s"] = clock() - t
    store = Path(args["store"])
    store.mkdir(parents=True, exist_ok=True)
    t = clock()
    model.export(str(store / "model.xml"), format="openvino", verbose=False)
    out["convert_s"] = clock() - t
    for precision in args["precisions"]:
        for state in ("cold", "cached"):  # the second compile reads the compiled-model cache
            t = clock()
            compiled = runtimes.OpenVINOModel(
                store / "model.xml", precision, cache_dir=store / "compiled"
            )
            compiled.predict_on_batch(x)
            out[f"compile_{precision}_{state}_s"] = clock() - t
    return out


def _child_stage(folder: Path, backbone: str, weights: str, batch_size: int, args: dict) -> dict:
    import shutil

    from pipeline.cache import read_attrs
    from pipeline.features import FeatureConfig, extract_features

    # Each run extracts anew; what it may keep from an earlier run is the converted model.
    shutil.rmtree(Path(args["artifacts"]) / "features", ignore_errors=True)
    started = time.perf_counter()
    config = FeatureConfig(
        backbone=backbone,
        weights=weights,
        batch_size=batch_size,
        runtime=args["runtime"],
        runtime_precision=args.get("runtime_precision", "auto"),
    )
    summary = extract_features(folder, config, artifacts_dir=args["artifacts"], progress=False)
    wall = time.perf_counter() - started
    attrs = read_attrs(summary.cache_path)
    steady = attrs["seconds"] - attrs["warmup_seconds"]
    images = summary.images - min(batch_size, summary.images)
    return {
        "images": summary.images,
        "runtime": str(attrs["runtime"]),
        "runtime_precision": str(attrs["runtime_precision"]),
        "notes": summary.notes,
        "call_seconds": wall,
        "loop_seconds": attrs["seconds"],
        "warmup_seconds": attrs["warmup_seconds"],
        "images_per_second": images / steady if steady > 0 else 0.0,
        "file_mb": summary.file_bytes / 1e6,
    }


def _child_tutorial(folder: Path, backbone: str, weights: str, batch_size: int, args: dict) -> dict:
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
    with h5py.File(Path(args["out"]) / "tutorial.h5", "w") as f:
        f["features"] = features
    seconds = time.perf_counter() - started
    return {"images": len(records), "seconds": seconds, "images_per_second": len(records) / seconds}


_CHILDREN = {
    "forward": _child_forward,
    "startup": _child_startup,
    "stage": _child_stage,
    "tutorial": _child_tutorial,
}


def _run_child(
    mode: str, folder: Path, backbone: str, weights: str, batch_size: int, args: dict
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
        json.dumps(args),
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    process_seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"benchmark step {mode} failed:\n{result.stderr[-2000:]}")
    out = json.loads(result.stdout.strip().splitlines()[-1])
    out["process_seconds"] = process_seconds  # the whole process: interpreter, imports, work
    return out


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
        ``forward`` (median images/s and cosine to Keras of every runtime and
        precision), ``startup`` (seconds per step), ``stage`` (per runtime:
        whole-process seconds, steady images/s, peak memory), ``tutorial``,
        and the ratios the targets are about.
    """
    from pipeline import runtimes

    data = Path(data)
    if not data.is_dir():
        raise DataError(f"benchmark data {data} does not exist; pass BENCH_DATA=<image folder>")
    precisions = ["fp32"] + (["bf16"] if runtimes.cpu_supports_bf16() else [])
    results: dict = {
        "backbone": backbone,
        "weights": weights,
        "batch_size": batch_size,
        "data": str(data),
        "n": n_images,
        "cpu_count": os.cpu_count(),
        "openvino": runtimes.openvino_version(),
        "cpu_capabilities": list(runtimes.cpu_capabilities()),
    }
    say = print
    with tempfile.TemporaryDirectory(prefix="bench-features-") as tmp:
        tmp = Path(tmp)
        small = _subset_folder(data, n_images, tmp / "small" / "images")
        large = _subset_folder(data, 4 * n_images, tmp / "large" / "images")
        say(
            f"benchmark: {backbone}, batch {batch_size}, N={n_images} and 4N={4 * n_images} "
            f"images of {data}; openvino {results['openvino']}, CPU bf16: {'bf16' in precisions}"
        )

        def run(key: str, mode: str, folder: Path, **args: Any) -> dict:
            results[key] = _run_child(mode, folder, backbone, weights, batch_size, args)
            return results[key]

        startup = run(
            "startup", "startup", small, store=str(tmp / "startup"), precisions=precisions
        )
        say(
            "start-up (s): "
            + ", ".join(f"{k[:-2]} {v:.2f}" for k, v in startup.items() if k.endswith("_s"))
        )
        forward = run(
            "forward",
            "forward",
            small,
            n=n_images,
            store=str(tmp / "startup"),
            precisions=precisions,
        )
        for name, row in forward.items():
            if isinstance(row, dict):
                say(
                    f"  forward {name:<16} {row['images_per_second']:7.1f} images/s   cosine to keras {row['cosine_min_to_keras']:.5f}"
                )
        stages = [
            ("stage_keras_n", small, "keras", "auto", "keras_n"),
            ("stage_auto_cold_n", small, "auto", "auto", "auto"),
            ("stage_auto_n", small, "auto", "auto", "auto"),
            ("stage_keras_4n", large, "keras", "auto", "keras_4n"),
            ("stage_auto_4n", large, "auto", "auto", "auto"),
        ] + [(f"stage_openvino_{p}_n", small, "openvino", p, "auto") for p in precisions]
        for key, folder, runtime, precision, art in stages:
            row = run(
                key,
                "stage",
                folder,
                runtime=runtime,
                runtime_precision=precision,
                artifacts=str(tmp / "art" / art),
            )
            say(
                f"  {key:<22} {row['runtime']:>8} {row['runtime_precision']:<5} whole stage "
                f"{row['process_seconds']:6.1f} s, steady {row['images_per_second']:6.1f} images/s, "
                f"peak memory {row['peak_rss_mb']:6.0f} MB"
            )
            for note in row["notes"]:
                say(f"      {note}")
        for key, folder in (("tutorial_n", small), ("tutorial_4n", large)):
            row = run(key, "tutorial", folder, out=str(folder.parent))
            say(
                f"  {key:<22} keras tutorial {row['process_seconds']:6.1f} s, {row['images_per_second']:6.1f} images/s, peak memory {row['peak_rss_mb']:6.0f} MB"
            )
    keras_forward = forward["keras"]["images_per_second"]
    results["ratios"] = {
        "default_over_keras_whole_stage_n": results["stage_keras_n"]["process_seconds"]
        / results["stage_auto_n"]["process_seconds"],
        "default_over_keras_whole_stage_4n": results["stage_keras_4n"]["process_seconds"]
        / results["stage_auto_4n"]["process_seconds"],
        "default_over_keras_steady_4n": results["stage_auto_4n"]["images_per_second"]
        / results["stage_keras_4n"]["images_per_second"],
        "keras_stage_over_keras_forward_4n": results["stage_keras_4n"]["images_per_second"]
        / keras_forward,
        "default_memory_4n_over_n": results["stage_auto_4n"]["peak_rss_mb"]
        / results["stage_auto_n"]["peak_rss_mb"],
        "tutorial_memory_4n_over_n": results["tutorial_4n"]["peak_rss_mb"]
        / results["tutorial_n"]["peak_rss_mb"],
    }
    for name, row in forward.items():
        if isinstance(row, dict) and name != "keras":
            results["ratios"][f"{name}_forward_over_keras"] = (
                row["images_per_second"] / keras_forward
            )
    r = results["ratios"]
    say(
        f"default ({results['stage_auto_n']['runtime']} {results['stage_auto_n']['runtime_precision']}) "
        f"over keras, whole stage: {r['default_over_keras_whole_stage_n']:.2f}x at N, "
        f"{r['default_over_keras_whole_stage_4n']:.2f}x at 4N (target >= 2); steady loop "
        f"{r['default_over_keras_steady_4n']:.2f}x"
    )
    say(
        f"default peak memory 4N / N: {r['default_memory_4n_over_n']:.3f} (target <= 1.1); "
        f"tutorial: {r['tutorial_memory_4n_over_n']:.3f}"
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    say(f"wrote {out}")
    return results


def _child_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=sorted(_CHILDREN))
    parser.add_argument("folder", type=Path)
    parser.add_argument("backbone")
    parser.add_argument("weights")
    parser.add_argument("batch_size", type=int)
    parser.add_argument("args", type=json.loads)
    args = parser.parse_args(argv)
    child = _CHILDREN[args.mode]
    result = child(args.folder, args.backbone, args.weights, args.batch_size, args.args)
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
    from pipeline.softmax import SoftmaxClassifier, clear_trainers

    # Stage one's seconds exclude start-up (TensorFlow initialisation, model building);
    # a one-epoch fit on noise pays the Keras start-up here, outside the timing.
    X, y = np.random.default_rng(seed).normal(size=(8, 4)), np.arange(8) % 2
    SoftmaxClassifier(max_epochs=1, validation_fraction=0.0).fit(X, y)
    rows = []
    for cache_path in cache_paths:
        attrs = read_attrs(cache_path)
        clear_trainers()  # each sweep pays its own tracing, as a fresh process would
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
    from pipeline.cache import load_features, read_attrs
    from pipeline.features import FeatureConfig, extract_features
    from pipeline.files import write_json_atomic
    from pipeline.images import load_image
    from pipeline.ray_engine import RayConfig

    config = FeatureConfig(
        backbone=backbone, weights=weights, batch_size=batch_size, runtime="keras"
    )
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = _subset_folder(Path(data), n_images, Path(tmp) / "subset")
        records = scan_folder(folder).records
        sample = records[: min(64, len(records))]
        started = time.perf_counter()
        for record in sample:
            load_image(folder / record.path, 224)
        decode_ms = 1000 * (time.perf_counter() - started) / len(sample)
        local_features = None
        for engine, k in [("local", 0), *[("ray", k) for k in actors]]:
            artifacts = Path(tmp) / f"{engine}{k}"
            started = time.perf_counter()
            summary = extract_features(
                folder,
                config,
                artifacts_dir=artifacts,
                progress=False,
                engine=engine,
                ray_config=RayConfig(address=address, concurrency=k) if k else None,
            )
            wall = time.perf_counter() - started
            attrs = read_attrs(summary.cache_path)
            features = load_features(summary.cache_path).features.astype(np.float64)
            steady = float(attrs["seconds"]) - float(attrs.get("warmup_seconds", 0.0))
            row = {
                "engine": engine,
                "actors": k or None,
                "images": summary.extracted,
                "wall_seconds": wall,
                "seconds": float(attrs["seconds"]),
                "warmup_seconds": float(attrs.get("warmup_seconds", 0.0)),
                "ray_start_seconds": attrs.get("ray_start_seconds"),
                "images_per_second": (summary.extracted - batch_size) / steady
                if steady > 0
                else None,
            }
            if local_features is None:
                local_features = features
            else:
                dot = np.sum(features * local_features, axis=1)
                norms = np.linalg.norm(features, axis=1) * np.linalg.norm(local_features, axis=1)
                row["min_cosine_to_local"] = float(np.min(dot / np.maximum(norms, 1e-12)))
            runs.append(row)
            log(
                f"{engine}{f' ({k} actors)' if k else ''}: {wall:.1f} s end to end, "
                f"{row['images_per_second'] or 0:.1f} images/s steady"
                + (f", min cosine to local {row['min_cosine_to_local']:.6f}" if k else "")
            )
    local = runs[0]
    for row in runs[1:]:
        row["overhead_seconds"] = row["wall_seconds"] - local["wall_seconds"]
        if row["images_per_second"] and local["images_per_second"]:
            row["throughput_ratio_to_local"] = row["images_per_second"] / local["images_per_second"]
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


if __name__ == "__main__":
    _child_main(sys.argv[1:])
