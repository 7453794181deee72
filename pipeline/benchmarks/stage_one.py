"""Stage-one benchmark: runtimes, the streaming pipeline and start-up, on the same images.

``make bench-features`` (:func:`bench_features`) measures, on one machine, with
one backbone and batch size, over the same N images (4N for the memory check):

* **forward**: in one process, interleaved rounds over batches already decoded
  and preprocessed in memory (the limit any input pipeline can reach), median
  images/s of the Keras ``predict_on_batch`` and of each runtime at each
  precision (:mod:`pipeline.features.runtimes`), with the smallest cosine of each one's
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import DataError
from pipeline.data.folders import scan_folder
from pipeline.data.images import iter_batches, load_image
from pipeline.features import runtimes
from pipeline.features.backbones import build_feature_extractor, get_backbone
from pipeline.features.cache import read_attrs
from pipeline.features.config import PRECISION_WORDS, FeatureConfig
from pipeline.features.extract import extract_features

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

    # Each run extracts anew; what it may keep from an earlier run is the converted model.
    shutil.rmtree(Path(args["artifacts"]) / "features", ignore_errors=True)
    started = time.perf_counter()
    config = FeatureConfig(
        backbone=backbone,
        weights=weights,
        batch_size=batch_size,
        runtime=args["runtime"],
        precision=args.get("precision", "auto"),
    )
    summary = extract_features(folder, config, artifacts_dir=args["artifacts"], progress=False)
    wall = time.perf_counter() - started
    attrs = read_attrs(summary.cache_path)
    steady = attrs["seconds"] - attrs["warmup_seconds"]
    images = summary.images - min(batch_size, summary.images)
    return {
        "images": summary.images,
        "runtime": str(attrs["runtime"]),
        "precision": str(attrs["precision"]),
        "notes": summary.notes,
        "call_seconds": wall,
        "loop_seconds": attrs["seconds"],
        "warmup_seconds": attrs["warmup_seconds"],
        "images_per_second": images / steady if steady > 0 else 0.0,
        "file_mb": summary.file_bytes / 1e6,
    }


def _child_tutorial(folder: Path, backbone: str, weights: str, batch_size: int, args: dict) -> dict:
    import h5py

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

        _bench_startup(run, small, tmp, precisions, say)
        _bench_forward(run, small, tmp, n_images, precisions, say)
        _bench_stages(run, small, large, tmp, precisions, say)
        _bench_tutorials(run, small, large, say)
    results["ratios"] = _ratios(results)
    _say_targets(results, say)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    say(f"wrote {out}")
    return results


# ``run(key, mode, folder, **args)``: one child process, its figures kept under ``key``.
_Run = Callable[..., dict]
_Say = Callable[[str], Any]


def _bench_startup(run: _Run, small: Path, tmp: Path, precisions: list[str], say: _Say) -> None:
    """Time each start-up step in a fresh process (it also converts the model for forward)."""
    startup = run("startup", "startup", small, store=str(tmp / "startup"), precisions=precisions)
    say(
        "start-up (s): "
        + ", ".join(f"{k[:-2]} {v:.2f}" for k, v in startup.items() if k.endswith("_s"))
    )


def _bench_forward(
    run: _Run, small: Path, tmp: Path, n_images: int, precisions: list[str], say: _Say
) -> None:
    """Measure the forward pass of Keras and of every runtime precision on decoded batches."""
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


def _bench_stages(
    run: _Run, small: Path, large: Path, tmp: Path, precisions: list[str], say: _Say
) -> None:
    """Run the whole stage per runtime, each in its own process, at N and 4N images."""
    stages = [
        ("stage_keras_n", small, "keras", "auto", "keras_n"),
        ("stage_auto_cold_n", small, "auto", "auto", "auto"),
        ("stage_auto_n", small, "auto", "auto", "auto"),
        ("stage_keras_4n", large, "keras", "auto", "keras_4n"),
        ("stage_auto_4n", large, "auto", "auto", "auto"),
    ] + [
        (f"stage_openvino_{p}_n", small, "openvino", PRECISION_WORDS[p], "auto") for p in precisions
    ]
    for key, folder, runtime, precision, art in stages:
        row = run(
            key,
            "stage",
            folder,
            runtime=runtime,
            precision=precision,
            artifacts=str(tmp / "art" / art),
        )
        say(
            f"  {key:<22} {row['runtime']:>8} {row['precision']:<5} whole stage "
            f"{row['process_seconds']:6.1f} s, steady {row['images_per_second']:6.1f} images/s, "
            f"peak memory {row['peak_rss_mb']:6.0f} MB"
        )
        for note in row["notes"]:
            say(f"      {note}")


def _bench_tutorials(run: _Run, small: Path, large: Path, say: _Say) -> None:
    """The tutorial's load-everything extraction at N and 4N images, for reference."""
    for key, folder in (("tutorial_n", small), ("tutorial_4n", large)):
        row = run(key, "tutorial", folder, out=str(folder.parent))
        say(
            f"  {key:<22} keras tutorial {row['process_seconds']:6.1f} s, {row['images_per_second']:6.1f} images/s, peak memory {row['peak_rss_mb']:6.0f} MB"
        )


def _ratios(results: dict) -> dict:
    """The ratios the targets are about, and each runtime's forward pass over Keras's."""
    forward = results["forward"]
    keras_forward = forward["keras"]["images_per_second"]
    ratios = {
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
            ratios[f"{name}_forward_over_keras"] = row["images_per_second"] / keras_forward
    return ratios


def _say_targets(results: dict, say: _Say) -> None:
    """The default runtime's gains and memory against their targets."""
    r = results["ratios"]
    say(
        f"default ({results['stage_auto_n']['runtime']} {results['stage_auto_n']['precision']}) "
        f"over keras, whole stage: {r['default_over_keras_whole_stage_n']:.2f}x at N, "
        f"{r['default_over_keras_whole_stage_4n']:.2f}x at 4N (target >= 2); steady loop "
        f"{r['default_over_keras_steady_4n']:.2f}x"
    )
    say(
        f"default peak memory 4N / N: {r['default_memory_4n_over_n']:.3f} (target <= 1.1); "
        f"tutorial: {r['tutorial_memory_4n_over_n']:.3f}"
    )


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
