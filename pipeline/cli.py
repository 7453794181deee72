"""Command line: ``python -m pipeline <command>`` (also installed as ``pipeline``).

Each command is a thin call of a public function; the Makefile calls these.
A :class:`~pipeline.errors.PipelineError` prints one line and exits with
status 2; anything else is a bug and keeps its traceback. Hints in those
lines that name a make command (```make features```) are completed here with
the variables of the command the user ran, so they can be pasted as they are.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from pipeline import __version__
from pipeline.cli_options import (
    WEIGHTS_HELP,
    HelpFormatter,
    add_bench_options,
    add_engine_options,
    add_feature_options,
    add_split_options,
    feature_config,
    flag,
    one_of,
    optional_int,
    ray_config,
    split_config,
    weights_value,
)
from pipeline.errors import PipelineError
from pipeline.hints import fill_make_hints, make_command  # noqa: F401  (make_command: public)
from pipeline.options import (
    CLASS_WEIGHTS,
    FLIPS,
    JOIN_NORMS,
    NORMS,
    PRECISIONS,
)

Command = Callable[[argparse.Namespace], int]

RANDOM_WEIGHTS_WARNING = (
    "warning: WEIGHTS=none builds the backbone with random weights: its features give only a "
    "baseline (what no transfer scores), not a model to use; WEIGHTS=imagenet transfers"
)


def _warn_random_weights(args: argparse.Namespace) -> None:
    if getattr(args, "weights", None) == "none":
        print(RANDOM_WEIGHTS_WARNING)


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


def cmd_unseen_data(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.demo_data import write_small_blurred, write_textures

    out = Path(args.out)
    print(
        f"wrote texture patches (scikit-image's photographs) to {write_textures(out / 'textures')}"
    )
    if args.source:
        name = f"{Path(args.source).resolve().name}_small_blurred"
        folder, skipped = write_small_blurred(args.source, out / name)
        for path, reason in skipped:
            print(f"skipped {path}: {reason}")
        print(f"wrote {args.source} shrunk to 48 px and blurred to {folder}")
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    from pipeline.features import extract_features

    _warn_random_weights(args)
    summary = extract_features(
        args.data,
        feature_config(args),
        split=split_config(args),
        artifacts_dir=args.artifacts,
        cache_path=args.output,
        progress=not args.quiet,
        log=print,  # what the scan found, before the backbone is built
        engine=args.engine,
        ray_config=ray_config(args) if args.engine == "ray" else None,
    )
    print(summary.format())
    return 0


def cmd_bench_features(args: argparse.Namespace) -> int:
    if args.engine == "ray":
        from pipeline.benchmarks import bench_features_ray

        bench_features_ray(
            args.data,
            backbone=args.backbone,
            weights=args.weights,
            batch_size=args.batch_size,
            n_images=args.images,
            actors=tuple(args.actors),
            address=args.ray_address or None,
            out=args.out,
        )
        return 0
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
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    p = _command(sub, "backbones", "list the registered backbones")
    p.add_argument("pattern", nargs="?", default=None, help="shell pattern, e.g. 'resnet*'")
    p.set_defaults(func=cmd_backbones)

    p = _command(sub, "demo-data", "write scikit-learn's digits as a folder of PNG files")
    p.add_argument("--out", default="artifacts/data/digits", help="output folder")
    p.set_defaults(func=cmd_demo_data)

    p = _command(
        sub, "unseen-data", "write data sets unlike ImageNet: textures, small blurred images"
    )
    p.add_argument("--out", default="artifacts/data", help="parent folder of the data sets")
    p.add_argument("--source", default=None, help="image folder to shrink and blur (optional)")
    p.set_defaults(func=cmd_unseen_data)

    p = _command(sub, "features", "stage one: cache backbone features of an image folder")
    p.add_argument(
        "--data",
        required=True,
        help="folder of class subfolders (optionally under train/ val/ test/)",
    )
    add_feature_options(p)
    add_split_options(p)
    add_engine_options(p)
    p.add_argument(
        "--output",
        default=None,
        help="cache file (default: artifacts/features/<dataset>/<config>.h5)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_features)

    p = _command(sub, "bench-features", "benchmark stage one against the pure forward pass")
    add_bench_options(p, images=400, out="artifacts/bench/features.json")
    add_engine_options(p, actors=False)
    p.add_argument(
        "--actors",
        type=int,
        nargs="+",
        default=[1, 2],
        help="ENGINE=ray: the actor counts to time",
    )
    p.set_defaults(func=cmd_bench_features)

    _add_stage_two(sub)
    _add_beyond(sub)
    _add_stage_three(sub)
    return parser


def _command(sub: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` shows defaults."""
    return sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)


# --- stage two: heads, report, predict (pipeline.heads, pipeline.report, pipeline.predict)


def _cache_for(args: argparse.Namespace):
    """The cache named by --cache, or the one stage one wrote for --data and the feature options."""
    from pathlib import Path

    from pipeline.features import cache_path_for

    if args.cache:
        return Path(args.cache)
    if getattr(args, "features", None):  # FEATURES=a.h5+b.h5: a joined cache (pipeline.combine)
        from pipeline.artifacts import Artifacts, dataset_name
        from pipeline.combine import join_caches, resolve_parts, split_features_arg

        where = (
            Artifacts(args.artifacts).features_dir(dataset_name(args.data)) if args.data else None
        )
        parts = resolve_parts(split_features_arg(args.features), where)
        joined = join_caches(parts, norm=args.join_norm, artifacts_dir=args.artifacts, log=print)
        print(joined.format())
        return joined.path
    if not args.data:
        raise PipelineError(
            "give --data (the image folder stage one read) or --cache (a feature cache)"
        )
    from pipeline.artifacts import dataset_name

    return cache_path_for(dataset_name(args.data), feature_config(args), args.artifacts)


def cmd_head(args: argparse.Namespace) -> int:
    import contextlib

    from pipeline.heads import fit_heads
    from pipeline.options import check_options

    _warn_random_weights(args)
    check_options({"engine": args.engine})
    jobs, engine = args.jobs, contextlib.nullcontext()
    if args.engine == "ray":  # the same search, its fits sent to Ray through joblib
        from pipeline.ray_engine import joblib_on_ray

        engine = joblib_on_ray(args.ray_address or None)
        if jobs == 1:  # one job would stay in this process
            jobs = -1
            print("ENGINE=ray: the search's fits run on every CPU of the Ray cluster (JOBS=-1)")
    with engine:
        fit_heads(
            _cache_for(args),
            args.head,
            artifacts_dir=args.artifacts,
            norm=args.norm or None,
            pca=args.pca,
            cv=args.cv,
            seed=args.seed,
            jobs=jobs,
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
    from pipeline.predict import predict_images

    if not (args.model and args.images):
        raise PipelineError(_predict_usage(args))
    result = predict_images(
        args.model,
        args.images,
        args.out,
        batch_size=args.batch_size,
        artifacts_dir=args.artifacts,
    )
    print(result.format())
    return 0


def _predict_usage(args: argparse.Namespace) -> str:
    """Which of MODEL and IMAGES is missing, and a command to paste (with a model found here)."""
    from pipeline.artifacts import Artifacts

    missing = [
        text
        for given, text in (
            (args.model, "MODEL= (--model: a head's .json, or a fine-tuned .keras)"),
            (args.images, "IMAGES= (--images: an image file or a folder)"),
        )
        if not given
    ]
    model = args.model
    if not model:
        art = Artifacts(args.artifacts)
        found = [p for d in art.datasets_with_heads() for p in art.run_manifests(d)]
        if not found:
            return (
                f"make predict needs {' and '.join(missing)}; there is no model under "
                f"{args.artifacts} yet: fit one with `make head DATA=...` first"
            )
        model = str(max(found, key=lambda p: p.stat().st_mtime))  # the newest
    example = make_command("predict", argparse.Namespace(**{**vars(args), "model": model}))
    return f"make predict needs {' and '.join(missing)}, e.g. `{example}`"


def cmd_bench_heads(args: argparse.Namespace) -> int:
    from pipeline.benchmarks import bench_heads

    caches = list(args.cache or [])
    if args.data:
        from pipeline.features import extract_features

        for data in args.data:  # "up to date" in a second when stage one already ran
            caches.append(
                extract_features(
                    data,
                    feature_config(args),
                    artifacts_dir=args.artifacts,
                    split=split_config(args),
                    progress=False,
                ).cache_path
            )
    if not caches:
        raise PipelineError("give --data folders or --cache files to benchmark")
    bench_heads(caches, out=args.out, cv=args.cv, log=print)
    print(f"wrote {args.out}")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from pipeline.probe import run_probe

    layers = [n for n in (args.layers or "").replace(",", " ").split() if n] or None
    run_probe(
        args.data,
        feature_config(args),
        layers=layers,
        split=split_config(args),
        folds=args.cv,
        seed=args.seed,
        artifacts_dir=args.artifacts,
        log=print,
    )
    return 0


def cmd_auto(args: argparse.Namespace) -> int:
    from pipeline.auto import run_auto

    run_auto(
        args.data,
        feature_config(args),
        split=split_config(args),
        cv=args.cv,
        seed=args.seed,
        artifacts_dir=args.artifacts,
        report=not args.no_report,
        progress=not args.quiet,
    )
    return 0


def _add_beyond(sub: argparse._SubParsersAction) -> None:
    """``probe`` and ``auto`` (pipeline.probe, pipeline.auto)."""
    p = _command(sub, "probe", "linear-head accuracy per cut layer of one backbone (CV on train)")
    p.add_argument("--data", required=True, help="image folder, as stage one")
    add_feature_options(p)
    add_split_options(p)
    p.add_argument("--layers", default=None, help="comma list of layers (default: stage ends)")
    p.add_argument("--cv", type=int, default=5, help="folds of the cross-validation on train")
    p.set_defaults(func=cmd_probe)

    p = _command(sub, "auto", "try the feature recipes, choose recipe and head by CV on train")
    p.add_argument("--data", required=True, help="image folder, as stage one")
    add_feature_options(p)
    add_split_options(p)
    p.add_argument("--cv", type=int, default=5, help="folds of the heads' search: the choice")
    p.add_argument("--no-report", action="store_true", help="skip the usual report")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_auto)


def _add_stage_two(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "head", "stage two: fit heads on cached features")
    p.add_argument("--data", default=None, help="image folder of stage one (locates the cache)")
    p.add_argument("--cache", default=None, help="feature cache file (instead of --data)")
    p.add_argument(
        "--features",
        default=None,
        help="join caches by image path: a.h5+b.h5 (files, or stems under DATA's features folder)",
    )
    p.add_argument(
        "--join-norm",
        default="l2",
        metavar=one_of(JOIN_NORMS),
        help="FEATURES: each part's normalisation before joining (standard: train statistics)",
    )
    add_feature_options(p)
    p.add_argument(
        "--head",
        default="all",
        help="svm | rbf_svm | logreg | knn | ridge | softmax | forest | all, or a comma list "
        "(all: every head but forest)",
    )
    p.add_argument(
        "--norm",
        default=None,
        metavar=one_of(NORMS),
        help="feature normalisation for every head (default: each head's own)",
    )
    p.add_argument(
        "--pca", type=optional_int, default=None, help="keep this many principal components"
    )
    p.add_argument("--cv", type=int, default=3, help="folds of the hyper-parameter search")
    p.add_argument("--seed", type=int, default=0, help="seed of the search's folds")
    p.add_argument(
        "--jobs", type=int, default=1, help="parallel fits of the search (JOBS=; -1: all cores)"
    )
    add_engine_options(p, actors=False)
    p.set_defaults(func=cmd_head)

    p = _command(sub, "report", "write the Markdown/HTML/JSON report comparing the heads")
    p.add_argument("--data", default=None, help="image folder (its name names the data set)")
    p.add_argument("--dataset", default=None, help="data set name (instead of --data)")
    p.add_argument("--artifacts", default="artifacts", help="output root")
    p.add_argument(
        "--out", default=None, help="output folder (default: artifacts/reports/<dataset>)"
    )
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    p.set_defaults(func=cmd_report)

    p = _command(sub, "predict", "classify new images with a head or a fine-tuned model")
    # Not required=True: the missing one is named as a make variable, with a command to paste.
    p.add_argument(
        "--model",
        default=None,
        help="a head's .json/.skops/.joblib/softmax.keras or a fine-tuned .keras (make: MODEL=)",
    )
    p.add_argument(
        "--images",
        default=None,
        help="image file or folder; images in class folders are scored (make: IMAGES=)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="CSV (default: <artifacts>/predictions/<dataset>/<model>/<images>.csv)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--artifacts", default="artifacts", help="output root")
    p.set_defaults(func=cmd_predict)

    p = _command(sub, "bench-heads", "fit time of the default heads over extraction time")
    p.add_argument("--data", action="append", default=None, help="image folder (repeatable)")
    p.add_argument("--cache", action="append", default=None, help="feature cache (repeatable)")
    add_feature_options(p)
    add_split_options(p)
    p.add_argument("--cv", type=int, default=3, help="folds of the search")
    p.add_argument("--out", default="artifacts/bench/heads.json", help="JSON file for the figures")
    p.set_defaults(func=cmd_bench_heads)


# --- stage three: finetune, bench-finetune (pipeline.finetune)


def _add_stage_three(sub: argparse._SubParsersAction) -> None:
    from pipeline.finetune import FinetuneConfig

    defaults = FinetuneConfig()
    p = _command(sub, "finetune", "stage three: fine-tune the last LAYERS layers")
    p.add_argument(
        "--data", required=True, help="image folder (as in stage one) or a stage-one .h5"
    )
    p.add_argument("--backbone", default=defaults.features.backbone, help="registry name")
    p.add_argument(
        "--weights", default=defaults.features.weights, type=weights_value, help=WEIGHTS_HELP
    )
    p.add_argument("--input-size", type=optional_int, default=None, help="default: the backbone's")
    p.add_argument("--layers", default=str(defaults.layers), help="n >= 0 | all | block")
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="most phase-two epochs")
    p.add_argument("--lr", type=float, default=defaults.learning_rate, help="phase-two Adam rate")
    p.add_argument(
        "--head-epochs", type=int, default=defaults.head_epochs, help="most phase-one epochs"
    )
    p.add_argument(
        "--head-lr", type=float, default=defaults.head_learning_rate, help="phase-one Adam rate"
    )
    p.add_argument(
        "--patience", type=int, default=defaults.patience, help="epochs without improvement"
    )
    p.add_argument(
        "--batch-size", type=int, default=defaults.features.batch_size, help="images per step"
    )
    p.add_argument("--augment", type=flag, default=True, help="1 | 0")
    p.add_argument("--flip", default=defaults.flip, metavar=one_of(FLIPS), help="random flips")
    p.add_argument("--rotation", type=float, default=defaults.rotation, help="random rotation")
    p.add_argument("--zoom", type=float, default=defaults.zoom, help="random zoom")
    p.add_argument(
        "--aug-views",
        type=int,
        default=defaults.aug_views,
        help="augmented views per training image cached at the cut (0: full forward pass)",
    )
    p.add_argument(
        "--class-weight",
        default=defaults.class_weight,
        metavar=one_of(CLASS_WEIGHTS),
        help="loss weights per class",
    )
    p.add_argument(
        "--precision",
        default=defaults.features.precision,
        metavar=one_of(PRECISIONS),
        help="compute precision",
    )
    add_split_options(p)
    p.add_argument(
        "--workers", type=optional_int, default=None, help="decoding threads (default: cores)"
    )
    p.add_argument("--name", default=None, help="output name (default: from the options)")
    p.add_argument("--restart", type=flag, default=False, help="1: discard an unfinished run")
    p.add_argument("--artifacts", default="artifacts", help="output root")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_finetune)

    p = _command(sub, "bench-finetune", "one phase-two epoch vs one stage-one pass")
    add_bench_options(p, images=256, out="artifacts/bench/finetune.json")
    p.add_argument("--input-size", type=optional_int, default=None, help="default: the backbone's")
    p.add_argument(
        "--aug-views", type=int, default=8, help="augmented views per image in the activation cache"
    )
    p.set_defaults(func=cmd_bench_finetune)


def cmd_finetune(args: argparse.Namespace) -> int:
    from pipeline.features import FeatureConfig
    from pipeline.finetune import FinetuneConfig, finetune

    features = FeatureConfig(
        backbone=args.backbone, weights=args.weights, input_size=args.input_size,
        batch_size=args.batch_size, precision=args.precision, workers=args.workers,
    )  # fmt: skip
    config = FinetuneConfig(
        features=features, split=split_config(args), layers=args.layers, epochs=args.epochs,
        learning_rate=args.lr, head_epochs=args.head_epochs, head_learning_rate=args.head_lr,
        patience=args.patience, augment=args.augment, flip=args.flip, rotation=args.rotation,
        zoom=args.zoom, class_weight=args.class_weight, aug_views=args.aug_views,
        name=args.name or None, restart=args.restart,
    )  # fmt: skip
    config.validate()  # bad options fail before Keras is imported
    _warn_random_weights(args)
    result = finetune(args.data, config, artifacts_dir=args.artifacts, progress=not args.quiet)
    print(result.format(notes=False))  # the notes were printed as they happened
    return 0


def cmd_bench_finetune(args: argparse.Namespace) -> int:
    from pipeline.benchmarks import bench_finetune

    bench_finetune(
        args.data, backbone=args.backbone, weights=args.weights, input_size=args.input_size,
        batch_size=args.batch_size, n_images=args.images, aug_views=args.aug_views, out=args.out,
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
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, a usage error: argparse has printed it
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None) * 2
    try:
        return args.func(args)
    except PipelineError as exc:
        print(f"error: {fill_make_hints(str(exc), args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    run()
