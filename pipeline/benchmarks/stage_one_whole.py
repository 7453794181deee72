"""``make bench-stage-one``: the whole of stage one, int8 against OpenVINO float32 and
the tf.data way, and every head's accuracy at each precision.

* **whole stage** on N real images (default 2,000 cats and dogs), each run its own process
  timed from outside (interpreter start, imports, model loading, decoding, forward pass,
  writing the HDF5 file): ``PRECISION=int8`` (the fastest; ``auto`` takes it from 4,000
  images) with its conversion (and quantization) stored by a first, cold run that is timed
  too; OpenVINO float32; and the
  TensorFlow tutorial's way (``image_dataset_from_directory``, ``prefetch``, ``model.predict``
  of Keras MobileNetV2 at batch 32, the features written to HDF5). The three run in
  interleaved rounds, so a busy machine slows each alike; ratios are per round.
* **decoding**: seconds per image of decode and resize on the first 300 of the images:
  today's (JPEG draft mode, Pillow decoding at a reduced DCT scale, then OpenCV's bilinear
  resize), without draft mode, and with Pillow's antialiased resize (before).
* **heads**: every default head's val accuracy on each ``--heads-data`` folder at float32
  and at each reduced precision, in images.
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

from pipeline.benchmarks.stage_one import _run_child, _subset_folder
from pipeline.data import images as images_module
from pipeline.data.folders import scan_folder

ROUNDS = 3
DECODE_IMAGES = 300


def _child_tfdata(folder: Path, out: Path, batch_size: int) -> dict:
    """The TensorFlow tutorial's way, features written to HDF5 (timed from outside)."""
    import h5py
    import keras
    import tensorflow as tf

    data = keras.utils.image_dataset_from_directory(
        str(folder), image_size=(224, 224), batch_size=batch_size, shuffle=False
    )
    preprocess = keras.applications.mobilenet_v2.preprocess_input
    data = data.map(lambda x, y: (preprocess(x), y)).prefetch(tf.data.AUTOTUNE)
    model = keras.applications.MobileNetV2(
        input_shape=(224, 224, 3), include_top=False, pooling="avg", weights="imagenet"
    )
    features = model.predict(data, verbose=0)
    with h5py.File(out / "tfdata.h5", "w") as f:
        f["features"] = features
    return {"images": int(len(features))}


def _pillow_resize(path: Path, size: int) -> np.ndarray:
    """The decoding stage one had before OpenCV's resize: JPEG draft, then Pillow's
    antialiased bilinear resize (timed beside today's)."""
    from PIL import Image

    with Image.open(path) as image:
        image.draft("RGB", (size, size))
        return np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR))


def _child_decode(folder: Path) -> dict:
    """Decode and resize to 224, seconds per image: today's way (JPEG draft, OpenCV's
    resize), the same without draft, and Pillow's antialiased resize (before)."""
    paths = [folder / r.path for r in scan_folder(folder).records][:DECODE_IMAGES]
    ways = {
        "now": lambda p: images_module.load_image(p, 224),
        "draft_off": lambda p: images_module.load_image(p, 224),
        "pillow_resize": lambda p: _pillow_resize(p, 224),
    }
    result: dict = {}
    for _ in range(2):  # the first round warms the page cache; the second's times are kept
        for name, way in ways.items():
            images_module.JPEG_DRAFT = 0.0 if name == "draft_off" else 1.0
            started = time.perf_counter()
            for path in paths:
                way(path)
            result[name] = (time.perf_counter() - started) / len(paths)
    images_module.JPEG_DRAFT = 1.0
    return {"seconds_per_image": result, "images": len(paths)}


def _child(mode: str, args: dict) -> dict:
    if mode == "tfdata":
        return _child_tfdata(Path(args["folder"]), Path(args["out"]), args["batch_size"])
    return _child_decode(Path(args["folder"]))


def _run_own_child(mode: str, args: dict) -> dict:
    module = "pipeline.benchmarks.stage_one_whole"
    command = [sys.executable, "-m", module, "child", mode, json.dumps(args)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark step {mode} failed:\n{done.stderr[-2000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["process_seconds"] = time.perf_counter() - started
    return out


def _cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(run: Any, *args: Any) -> dict:
    """``run(*args)`` (one child process) with the CPU seconds it used: less sensitive than
    wall time to other work on a shared machine."""
    before = _cpu_of_children()
    row = run(*args)
    row["cpu_seconds"] = _cpu_of_children() - before
    return row


def _stage(folder: Path, artifacts: Path, runtime: str, precision: str, batch: int) -> dict:
    args = {"runtime": runtime, "precision": precision, "artifacts": str(artifacts)}
    return _timed(_run_child, "stage", folder, "mobilenet_v2", "imagenet", batch, args)


def bench_whole_stage(
    data: Path, n: int, batch: int, tmp: Path, say: Any, rounds_wanted: int = ROUNDS
) -> dict:
    """Cold int8, then ``ROUNDS`` interleaved rounds of int8, OpenVINO fp32, tf.data."""
    folder = _subset_folder(data, n, tmp / "images")
    art = tmp / "art"
    cold = _stage(folder, art, "auto", "int8", batch)
    say(f"  int8 cold (converts, quantizes, checks): {cold['process_seconds']:.1f} s, "
        f"{cold['runtime']} {cold['precision']}")  # fmt: skip
    for note in cold["notes"]:
        say(f"      {note}")
    rounds = []
    for i in range(rounds_wanted):
        row = {
            "int8": _stage(folder, art, "auto", "int8", batch),
            "openvino_fp32": _stage(folder, art, "openvino", "float32", batch),
            "tfdata": _timed(
                _run_own_child,
                "tfdata",
                {"folder": str(folder), "out": str(tmp), "batch_size": batch},
            ),
        }
        seconds = {k: v["process_seconds"] for k, v in row.items()}
        cpu = {k: v["cpu_seconds"] for k, v in row.items()}
        row["ratios"] = {
            "int8_over_openvino_fp32": seconds["int8"] / seconds["openvino_fp32"],
            "int8_over_tfdata": seconds["int8"] / seconds["tfdata"],
            "openvino_fp32_over_tfdata": seconds["openvino_fp32"] / seconds["tfdata"],
            "cpu_int8_over_openvino_fp32": cpu["int8"] / cpu["openvino_fp32"],
            "cpu_int8_over_tfdata": cpu["int8"] / cpu["tfdata"],
        }
        say(
            f"  round {i + 1}: int8 ({row['int8']['precision']}) "
            f"{seconds['int8']:.1f} s, openvino fp32 {seconds['openvino_fp32']:.1f} s, "
            f"tf.data {seconds['tfdata']:.1f} s; int8 / fp32 "
            f"{row['ratios']['int8_over_openvino_fp32']:.2f}, int8 / tf.data "
            f"{row['ratios']['int8_over_tfdata']:.2f}; CPU seconds {cpu['int8']:.1f}, "
            f"{cpu['openvino_fp32']:.1f}, {cpu['tfdata']:.1f}"
        )
        rounds.append(row)
    medians = {
        key: statistics.median(r["ratios"][key] for r in rounds) for key in rounds[0]["ratios"]
    }
    return {"images": n, "cold_int8": cold, "rounds": rounds, "median_ratios": medians}


def fixed_grid(row: dict[str, dict]) -> dict[str, dict[str, list]]:
    """``GRID=`` holding each searched head of ``row`` (:func:`_fit_row`) at its chosen values
    (the softmax head is not searched: it is refitted as it is)."""
    from pipeline.heads.registry import HEADS

    searched = (h for h in row if h in HEADS and not HEADS[h].keras)
    return {h: {k: [v] for k, v in row[h]["params"].items()} for h in searched}


def largest_differences(rows: dict[str, dict[str, dict]]) -> dict[str, int]:
    """Each row's largest difference in correct val images from the first row, over its heads."""
    first = next(iter(rows.values()))
    return {
        name: max(abs(row[h]["val"] - first[h]["val"]) for h in first if h in row)
        for name, row in list(rows.items())[1:]
    }


def _fit_row(cache: Path, art: Path, seed: int = 0, grid: dict | None = None) -> dict:
    """Every default head on ``cache``: correct val images and the chosen values, per head."""
    from pipeline.features.cache import load_features
    from pipeline.heads.fit import fit_heads

    n_val = int(np.sum(load_features(cache).split == "val"))
    heads = fit_heads(cache, artifacts_dir=art, seed=seed, grid=grid, force=True)
    return {
        h.head: {"val": round(float(h.val_accuracy) * n_val), "params": h.params} for h in heads
    }


def bench_heads_precisions(heads_data: list[Path], tmp: Path, say: Any) -> dict:
    """Every default head's val accuracy (in images) at float32 and each reduced precision,
    beside the head search's own noise: float32 again with another seed (other CV folds,
    another softmax start), and each reduced precision at float32's chosen hyper-parameters."""
    from pipeline.features.config import FeatureConfig
    from pipeline.features.extract import extract_features
    from pipeline.features.runtimes import cpu_supports_bf16

    precisions = ["float32", "int8"] + (["bfloat16"] if cpu_supports_bf16() else [])
    result: dict = {}
    for data in heads_data:
        rows: dict = {}
        for precision in precisions:
            config = FeatureConfig(runtime="openvino", precision=precision)
            art = tmp / "heads" / precision
            cache = extract_features(data, config, artifacts_dir=art, progress=False).cache_path
            rows[precision] = _fit_row(cache, art)
            if precision == "float32":
                rows["float32, seed 1"] = _fit_row(cache, art, seed=1)
            else:
                fixed = fixed_grid(rows["float32"])
                rows[f"{precision} at float32's values"] = _fit_row(cache, art, grid=fixed)
        worst = largest_differences(rows)
        result[data.name] = {"correct_val_images": rows, "largest_difference_images": worst}
        for name, row in rows.items():
            say(f"  {data.name}, {name}: " + ", ".join(f"{h} {r['val']}" for h, r in row.items())
                + (f"; largest difference {worst[name]}" if name in worst else ""))  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> None:
    """``make bench-stage-one``: the figures as JSON (``--out``) and lines on stdout."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.benchmarks.stage_one_whole")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--heads-data", type=Path, action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench/stage_one.json"))
    args = parser.parse_args(argv)
    say = print
    results: dict = {"data": str(args.data), "cpu_count": os.cpu_count()}
    results["load_average_before"] = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-stage-one-") as tmp:
        say(f"stage one, whole stage, {args.images} images of {args.data}")
        results["whole_stage"] = bench_whole_stage(
            args.data, args.images, args.batch_size, Path(tmp), say, args.rounds
        )
        results["decode"] = _run_own_child("decode", {"folder": str(args.data)})
        say(f"  decode + resize, s/image: {results['decode']['seconds_per_image']}")
        if args.heads_data:
            results["heads"] = bench_heads_precisions(args.heads_data, Path(tmp), say)
    results["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    say(f"wrote {args.out}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        print(json.dumps(_child(sys.argv[2], json.loads(sys.argv[3]))))
    else:
        main()
