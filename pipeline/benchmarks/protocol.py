"""``make bench-protocol``: a protocol's head fits against one stage-one pass.

The target: the head fits of a 5-seed, 30-per-class protocol on a 100-class set cost at
most one stage-one pass over the same number of images. The features are synthetic
(:mod:`pipeline.benchmarks.synthetic`, MobileNetV2's width 1,280; 100 classes of 90
images, Caltech-101's size); stage one's cost per image is MobileNetV2's measured on
cats and dogs on this project's 2-core machine (18.7 s for 3,000 images), or
``--stage-one-seconds-per-image``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.benchmarks.synthetic import synthetic_features
from pipeline.core.errors import PipelineError
from pipeline.features.cache import FeatureSet
from pipeline.heads.protocol_run import run_protocol

STAGE_ONE_PER_IMAGE = 18.7 / 3000  # MobileNetV2 at 224, cats and dogs, 2 CPU cores


def bench_protocol(
    classes: int = 100,
    per_class: int = 90,
    train_per_class: int = 30,
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4),
    heads: tuple[str, ...] = ("svm,logreg", "linear_eval"),
    stage_one_per_image: float = STAGE_ONE_PER_IMAGE,
) -> dict[str, Any]:
    """Each entry of ``heads`` run as one protocol; its fit seconds against stage one's."""
    X, y = synthetic_features(classes * per_class, classes)
    fs = FeatureSet(
        path=Path(f"synthetic-{classes}x{per_class}.h5"), features=X, labels=y,
        paths=np.array([f"{i}.png" for i in range(len(y))], dtype=object),
        split=np.full(len(y), "train", dtype=object),
        class_names=tuple(f"class_{c:03d}" for c in range(classes)),
        attrs={"dataset": f"synthetic-{classes}x{per_class}"},
    )  # fmt: skip
    stage_one = stage_one_per_image * len(y)
    figures: dict[str, Any] = {
        "images": len(y), "classes": classes, "width": int(X.shape[1]),
        "train_per_class": train_per_class, "seeds": list(seeds),
        "stage_one_seconds": round(stage_one, 2),
        "stage_one_source": "MobileNetV2, cats and dogs: 18.7 s for 3,000 images"
        if stage_one_per_image == STAGE_ONE_PER_IMAGE else "given",
        "protocols": {},
    }  # fmt: skip
    for names in heads:
        result = run_protocol(fs, train_per_class, seeds, names, artifacts_dir=None)
        fits = {h: round(r["fit_seconds"], 2) for h, r in result.record["heads"].items()}
        figures["protocols"][names] = {
            "seconds": round(result.record["seconds"], 2),
            "fit_seconds": fits,
            "ratio_to_stage_one": round(result.record["seconds"] / stage_one, 3),
            "balanced_accuracy": {h: round(result.mean(h), 4) for h in fits},
            "chosen": {
                h: [s["params"] for s in r["seeds"]] for h, r in result.record["heads"].items()
            },
        }
        print(
            f"HEAD={names}: {result.record['seconds']:.1f} s for {len(seeds)} seeds "
            f"({', '.join(f'{h} {s:.1f} s' for h, s in fits.items())}) against stage one "
            f"{stage_one:.1f} s for {len(y)} images: ratio "
            f"{figures['protocols'][names]['ratio_to_stage_one']:.2f}",
            flush=True,
        )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.benchmarks.protocol")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=90, help="images per class")
    parser.add_argument("--train-per-class", type=int, default=30)
    parser.add_argument("--heads", action="append", help="one protocol per use (default: "
                        "svm,logreg then linear_eval)")  # fmt: skip
    parser.add_argument("--stage-one-seconds-per-image", type=float, default=STAGE_ONE_PER_IMAGE)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    try:
        figures = bench_protocol(
            args.classes, args.per_class, args.train_per_class,
            heads=tuple(args.heads or ("svm,logreg", "linear_eval")),
            stage_one_per_image=args.stage_one_seconds_per_image,
        )  # fmt: skip
    except (PipelineError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(figures, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
