"""Command line: ``python -m pipeline <command>`` (also installed as ``pipeline``).

Each command is a thin call of a public function; the Makefile calls these.
A :class:`~pipeline.errors.PipelineError` prints one line and exits with
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from pipeline.errors import PipelineError

Command = Callable[[argparse.Namespace], int]


def _weights(value: str) -> str:
    return value if value.lower() not in ("imagenet", "none") else value.lower()


def _optional_int(value: str) -> int | None:
    if value in ("", "default", "auto"):
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None


def _add_feature_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="mobilenet_v2", help="registry name (see `backbones`)")
    p.add_argument(
        "--weights", default="imagenet", type=_weights, help="imagenet | none | PATH to a .h5 file"
    )
    p.add_argument(
        "--input-size",
        type=_optional_int,
        default=None,
        help="square input side (default: the backbone's)",
    )
    p.add_argument("--pooling", default="avg", help="avg | max | flatten")
    p.add_argument("--layer", default=None, help="cut the backbone at this named layer")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--float16", action="store_true", help="store features as float16")
    p.add_argument(
        "--precision", default="float32", help="float32 | mixed_float16 | mixed_bfloat16 (GPU)"
    )
    p.add_argument("--workers", type=_optional_int, default=None, help="decoding threads")
    p.add_argument("--artifacts", default="artifacts", help="output root (default: artifacts)")


def _add_split_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--test-fraction", type=float, default=0.2)


def _add_bench_options(p: argparse.ArgumentParser, *, images: int, out: str) -> None:
    p.add_argument("--data", required=True, help="image folder to benchmark on")
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--weights", default="imagenet", type=_weights)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--images", type=int, default=images, help="images (N) to time on")
    p.add_argument("--out", default=out, help="JSON file for the figures")


def _feature_config(args: argparse.Namespace):
    from pipeline.features import FeatureConfig

    return FeatureConfig(
        backbone=args.backbone,
        weights=args.weights,
        input_size=args.input_size,
        pooling=args.pooling,
        layer=args.layer or None,
        batch_size=args.batch_size,
        float16=args.float16,
        precision=args.precision,
        workers=args.workers,
    )


def _split_config(args: argparse.Namespace):
    from pipeline.images import SplitConfig

    return SplitConfig(
        seed=args.seed, val_fraction=args.val_fraction, test_fraction=args.test_fraction
    )


def cmd_backbones(args: argparse.Namespace) -> int:
    from pipeline.backbones import list_backbones

    rows = [
        ("name", "keras class", "params", "input", "min", "avg/max", "flatten", "preprocessing")
    ]
    for s in list_backbones(args.pattern):
        prep = "inside the model" if s.preprocessing == "none" else s.preprocessing
        rows.append(
            (
                s.name,
                s.builder + (f"(alpha={s.builder_kwargs['alpha']})" if s.builder_kwargs else ""),
                f"{s.params:,}",
                str(s.default_size),
                str(s.min_size),
                str(s.channels),
                f"{s.feature_width('flatten'):,}",
                prep,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print(
        "params: headless (include_top=False); input: default square size; "
        "avg/max, flatten: feature width at the default input"
    )
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from pipeline.demo_data import write_digits

    folder = write_digits(args.out)
    print(f"wrote scikit-learn digits (1797 images, 10 classes) to {folder}")
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    from pipeline.features import extract_features

    summary = extract_features(
        args.data,
        _feature_config(args),
        split=_split_config(args),
        artifacts_dir=args.artifacts,
        cache_path=args.output,
        progress=not args.quiet,
    )
    print(summary.format())
    return 0


def cmd_bench_features(args: argparse.Namespace) -> int:
    from pipeline.benchmarks import bench_features

    bench_features(
        args.data,
        backbone=args.backbone,
        weights=args.weights,
        batch_size=args.batch_size,
        n_images=args.images,
        out=args.out,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Transfer learning for small image data sets: features, heads, fine-tuning.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    p = sub.add_parser("backbones", help="list the registered backbones")
    p.add_argument("pattern", nargs="?", default=None, help="shell pattern, e.g. 'resnet*'")
    p.set_defaults(func=cmd_backbones)

    p = sub.add_parser("demo-data", help="write scikit-learn's digits as a folder of PNG files")
    p.add_argument("--out", default="artifacts/data/digits")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("features", help="stage one: cache backbone features of an image folder")
    p.add_argument(
        "--data",
        required=True,
        help="folder of class subfolders (optionally under train/ val/ test/)",
    )
    _add_feature_options(p)
    _add_split_options(p)
    p.add_argument(
        "--output",
        default=None,
        help="cache file (default: artifacts/features/<dataset>/<config>.h5)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("bench-features", help="benchmark stage one against the pure forward pass")
    _add_bench_options(p, images=400, out="artifacts/bench/features.json")
    p.set_defaults(func=cmd_bench_features)

    _add_stage_two(sub)
    _add_stage_three(sub)
    return parser


# --- stage two: heads, report, predict (pipeline.heads, pipeline.report, pipeline.predict)


def _cache_for(args: argparse.Namespace):
    """The cache named by --cache, or the one stage one wrote for --data and the feature options."""
    from pathlib import Path

    from pipeline.features import cache_path_for

    if args.cache:
        return Path(args.cache)
    if not args.data:
        raise PipelineError(
            "give --data (the image folder stage one read) or --cache (a feature cache)"
        )
    from pipeline.artifacts import dataset_name

    return cache_path_for(dataset_name(args.data), _feature_config(args), args.artifacts)


def cmd_head(args: argparse.Namespace) -> int:
    from pipeline.heads import fit_heads

    fit_heads(
        _cache_for(args),
        args.head,
        artifacts_dir=args.artifacts,
        norm=args.norm or None,
        pca=args.pca,
        cv=args.cv,
        seed=args.seed,
        jobs=args.jobs,
        log=print,
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.artifacts import dataset_name
    from pipeline.report import write_report

    if not (args.dataset or args.data):
        raise PipelineError("give --data (the image folder) or --dataset (its name)")
    dataset = args.dataset or dataset_name(args.data)
    result = write_report(
        dataset, artifacts_dir=args.artifacts, out_dir=args.out, n_resamples=args.resamples
    )
    print(result.format())
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.artifacts import Artifacts
    from pipeline.predict import predict_images

    out = args.out or Artifacts(args.artifacts).predictions_csv(Path(args.model).stem)
    summary = predict_images(args.model, args.images, out, batch_size=args.batch_size)
    print(summary.format())
    return 0


def cmd_bench_heads(args: argparse.Namespace) -> int:
    from pipeline.benchmarks import bench_heads

    caches = list(args.cache or [])
    if args.data:
        from pipeline.features import extract_features

        for data in args.data:  # "up to date" in a second when stage one already ran
            caches.append(
                extract_features(
                    data,
                    _feature_config(args),
                    artifacts_dir=args.artifacts,
                    split=_split_config(args),
                    progress=False,
                ).cache_path
            )
    if not caches:
        raise PipelineError("give --data folders or --cache files to benchmark")
    bench_heads(caches, out=args.out, cv=args.cv, log=print)
    print(f"wrote {args.out}")
    return 0


def _add_stage_two(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("head", help="stage two: fit heads on cached features")
    p.add_argument("--data", default=None, help="image folder of stage one (locates the cache)")
    p.add_argument("--cache", default=None, help="feature cache file (instead of --data)")
    _add_feature_options(p)
    p.add_argument(
        "--head",
        default="all",
        help="svm | rbf_svm | logreg | knn | ridge | softmax | forest | all, or a comma list",
    )
    p.add_argument("--norm", default=None, help="l2 | standard | none (default: each head's own)")
    p.add_argument(
        "--pca", type=_optional_int, default=None, help="keep this many principal components"
    )
    p.add_argument("--cv", type=int, default=3, help="folds of the hyper-parameter search")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="parallel fits of the search")
    p.set_defaults(func=cmd_head)

    p = sub.add_parser("report", help="write the Markdown/HTML/JSON report comparing the heads")
    p.add_argument("--data", default=None, help="image folder (its name names the data set)")
    p.add_argument("--dataset", default=None, help="data set name (instead of --data)")
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument(
        "--out", default=None, help="output folder (default: artifacts/reports/<dataset>)"
    )
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("predict", help="classify new images with a head or a fine-tuned model")
    p.add_argument(
        "--model", required=True, help="head manifest/.joblib/.keras or fine-tuned .keras"
    )
    p.add_argument("--images", required=True, help="image file or folder")
    p.add_argument("--out", default=None, help="CSV (default: artifacts/predictions/<model>.csv)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--artifacts", default="artifacts")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("bench-heads", help="fit time of the default heads over extraction time")
    p.add_argument("--data", action="append", default=None, help="image folder (repeatable)")
    p.add_argument("--cache", action="append", default=None, help="feature cache (repeatable)")
    _add_feature_options(p)
    _add_split_options(p)
    p.add_argument("--cv", type=int, default=3)
    p.add_argument("--out", default="artifacts/bench/heads.json")
    p.set_defaults(func=cmd_bench_heads)


# --- stage three: finetune, bench-finetune (pipeline.finetune)


def _flag(value: str) -> bool:
    text = value.strip().lower()
    if text in ("1", "yes", "true", "on"):
        return True
    if text in ("0", "no", "false", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected 1 or 0, got {value!r}")


def _add_stage_three(sub: argparse._SubParsersAction) -> None:
    from pipeline.finetune import FinetuneConfig
    from pipeline.options import FLIPS, PRECISIONS

    defaults = FinetuneConfig()
    p = sub.add_parser("finetune", help="stage three: fine-tune the last LAYERS layers")
    p.add_argument(
        "--data", required=True, help="image folder (as in stage one) or a stage-one .h5"
    )
    p.add_argument("--backbone", default=defaults.features.backbone)
    p.add_argument("--weights", default=defaults.features.weights, type=_weights)
    p.add_argument("--input-size", type=_optional_int, default=None)
    p.add_argument("--layers", default=str(defaults.layers), help="n >= 0 | all | block")
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="most phase-two epochs")
    p.add_argument("--lr", type=float, default=defaults.learning_rate, help="phase-two Adam rate")
    p.add_argument("--head-epochs", type=int, default=defaults.head_epochs)
    p.add_argument("--head-lr", type=float, default=defaults.head_learning_rate)
    p.add_argument("--patience", type=int, default=defaults.patience)
    p.add_argument("--batch-size", type=int, default=defaults.features.batch_size)
    p.add_argument("--augment", type=_flag, default=True, help="1 | 0")
    p.add_argument("--flip", default=defaults.flip, help="|".join(FLIPS))
    p.add_argument("--rotation", type=float, default=defaults.rotation)
    p.add_argument("--zoom", type=float, default=defaults.zoom)
    p.add_argument("--class-weight", default=defaults.class_weight, help="balanced | none")
    p.add_argument("--precision", default=defaults.features.precision, help="|".join(PRECISIONS))
    _add_split_options(p)
    p.add_argument("--workers", type=_optional_int, default=None)
    p.add_argument("--name", default=None, help="output name")
    p.add_argument("--restart", type=_flag, default=False, help="discard an unfinished run")
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("bench-finetune", help="one phase-two epoch vs one stage-one pass")
    _add_bench_options(p, images=256, out="artifacts/bench/finetune.json")
    p.add_argument("--input-size", type=_optional_int, default=None)
    p.set_defaults(func=cmd_bench_finetune)


def cmd_finetune(args: argparse.Namespace) -> int:
    from pipeline.features import FeatureConfig
    from pipeline.finetune import FinetuneConfig, finetune

    features = FeatureConfig(
        backbone=args.backbone, weights=args.weights, input_size=args.input_size,
        batch_size=args.batch_size, precision=args.precision, workers=args.workers,
    )  # fmt: skip
    config = FinetuneConfig(
        features=features, split=_split_config(args), layers=args.layers, epochs=args.epochs,
        learning_rate=args.lr, head_epochs=args.head_epochs, head_learning_rate=args.head_lr,
        patience=args.patience, augment=args.augment, flip=args.flip, rotation=args.rotation,
        zoom=args.zoom, class_weight=args.class_weight, name=args.name or None,
        restart=args.restart,
    )  # fmt: skip
    config.validate()  # bad options fail before Keras is imported
    result = finetune(args.data, config, artifacts_dir=args.artifacts, progress=not args.quiet)
    print(result.format(notes=False))  # the notes were printed as they happened
    return 0


def cmd_bench_finetune(args: argparse.Namespace) -> int:
    from pipeline.benchmarks import bench_finetune

    bench_finetune(
        args.data, backbone=args.backbone, weights=args.weights, input_size=args.input_size,
        batch_size=args.batch_size, n_images=args.images, out=args.out,
    )  # fmt: skip
    return 0


def run() -> None:
    """The ``pipeline`` script and ``python -m pipeline``: quiet start-up, then :func:`main`."""
    from pipeline.console import filter_native_logs

    filter_native_logs()
    sys.exit(main())


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (2 for a user error)."""
    # TensorFlow's C++ start-up chatter (CUDA probing on CPU machines) is noise here.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    run()
