"""Stage two's commands: ``head``, ``report``, ``predict`` and ``bench-heads``.

:mod:`pipeline.cli.main` adds them to its parser (:func:`add_stage_two`); each
``cmd_*`` is a thin call of a public function (:func:`pipeline.heads.fit.fit_heads`,
:func:`pipeline.report.collect.write_report`, :func:`pipeline.predict.predict_images`,
:func:`pipeline.benchmarks.bench_heads`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.benchmarks import bench_heads, bench_heads_on_folders, bench_heads_synthetic
from pipeline.cli.hints import make_command
from pipeline.cli.options import (
    add_command,
    add_engine_options,
    add_feature_options,
    add_split_options,
    feature_config,
    one_of,
    optional_int,
    split_config,
    warn_random_weights,
)
from pipeline.core.artifacts import Artifacts, dataset_name
from pipeline.core.errors import PipelineError
from pipeline.core.options import JOIN_NORMS, METRICS, NORMS, check_options
from pipeline.features.config import cache_path_for
from pipeline.features.joins import join_caches, resolve_parts, split_features_arg
from pipeline.features.ray_session import joblib_on_ray
from pipeline.features.records import check_cache_for
from pipeline.heads.fit import fit_heads
from pipeline.heads.registry import GRID_EXAMPLE
from pipeline.predict import predict_images
from pipeline.report.collect import write_report


def _cache_for(args: argparse.Namespace):
    """The cache named by --cache, or the one stage one wrote for --data and the feature options."""
    if args.cache:
        return Path(args.cache)
    if getattr(
        args, "features", None
    ):  # FEATURES=a.h5+b.h5: a joined cache (pipeline.features.joins)
        where = (
            Artifacts(args.artifacts).features_dir(dataset_name(args.data, args.artifacts))
            if args.data
            else None
        )
        parts = resolve_parts(split_features_arg(args.features), where)
        joined = join_caches(parts, norm=args.join_norm, artifacts_dir=args.artifacts, log=print)
        print(joined.format())
        return joined.path
    if not args.data:
        raise PipelineError(
            "give --data (the image folder stage one read) or --cache (a feature cache)"
        )

    return cache_path_for(
        dataset_name(args.data, args.artifacts), feature_config(args), args.artifacts
    )


def checked_cache_for(args: argparse.Namespace) -> Path:
    """:func:`_cache_for`, checked against --data and the options when found from them
    (``make head`` checks inside :func:`fit_heads`; the protocols and the curve here)."""
    path = _cache_for(args)
    if not args.cache and not getattr(args, "features", None) and Path(path).is_file():
        for warning in check_cache_for(
            path, args.data, feature_config(args), artifacts_dir=args.artifacts
        ):
            print(f"warning: {warning}")
    return path


def cmd_head(args: argparse.Namespace) -> int:
    import contextlib

    warn_random_weights(args)
    check_options({"engine": args.engine})
    jobs, engine = args.jobs, contextlib.nullcontext()
    if args.engine == "ray":  # the same search, its fits sent to Ray through joblib
        engine = joblib_on_ray(args.ray_address or None)
        if jobs in (0, 1):  # one job would stay in this process
            jobs = -1
            print("ENGINE=ray: the search's fits run on every CPU of the Ray cluster (JOBS=-1)")
    checked = not (args.cache or getattr(args, "features", None))  # found for DATA: check it
    with engine:
        fit_heads(
            _cache_for(args),
            args.head,
            data=args.data if checked else None,
            features=feature_config(args) if checked else None,
            artifacts_dir=args.artifacts,
            norm=args.norm or None,
            pca=args.pca,
            cv=args.cv,
            seed=args.seed,
            jobs=jobs,
            grid=args.grid or None,
            force=args.force,
            metric=args.metric,
            log=print,
        )
    return 0


def cmd_report(args: argparse.Namespace) -> int:

    if not (args.dataset or args.data):
        raise PipelineError("give --data (the image folder) or --dataset (its name)")
    dataset = args.dataset or dataset_name(args.data, args.artifacts)
    result = write_report(
        dataset, artifacts_dir=args.artifacts, out_dir=args.out, n_resamples=args.resamples
    )
    print(result.format())
    return 0


def cmd_predict(args: argparse.Namespace) -> int:

    if not (args.model and args.images):
        raise PipelineError(_predict_usage(args))
    result = predict_images(
        args.model,
        args.images,
        args.out,
        batch_size=args.batch_size,
        artifacts_dir=args.artifacts,
        log=print,  # what is loading, skipped images
        progress=not args.quiet,
    )
    print(result.format())
    return 0


def _predict_usage(args: argparse.Namespace) -> str:
    """Which of MODEL and IMAGES is missing, and a command to paste (with a model found here)."""

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

    if args.classes is not None:  # synthetic features; --data: stage one's per-image reference
        kw = {"config": feature_config(args) if args.data else None, "out": args.out, "cv": args.cv}
        bench_heads_synthetic(args.classes, args.rows, reference=(args.data or [None])[0],
                              repeats=args.repeats, log=print, **kw)  # fmt: skip
        return print(f"wrote {args.out}") or 0
    if not args.cache and not args.data:
        raise PipelineError("give --data folders or --cache files to benchmark")
    if args.cache and args.data:
        raise PipelineError(
            "give --data folders (stage one timed in this run) or --cache files (their "
            "recorded extraction time), not both"
        )
    if args.data:  # stage one timed in this run, beside the heads
        bench_heads_on_folders(
            args.data, feature_config(args), split=split_config(args), out=args.out, cv=args.cv,
            repeats=args.repeats, log=print,
        )  # fmt: skip
    else:  # the caches' recorded extraction times
        bench_heads(list(args.cache), out=args.out, cv=args.cv, repeats=args.repeats, log=print)
    print(f"wrote {args.out}")
    return 0


def add_stage_two(sub: argparse._SubParsersAction) -> None:
    """The subcommands of stage two: head, report, predict, bench-heads."""
    _add_head(sub)
    _add_report(sub)
    _add_predict(sub)
    _add_bench_heads(sub)


def _add_head(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "head", "stage two: fit heads on cached features")
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
        "--jobs",
        type=int,
        default=0,
        help="parallel fits of the search (JOBS=; -1: all cores; 0: all cores for big "
        "searches of the heads whose solver uses one, svm and rbf_svm, else one job)",
    )
    p.add_argument("--grid", help=f"grids searched as given (GRID=), e.g. {GRID_EXAMPLE}")
    p.add_argument("--force", action="store_true", help="refit heads reused otherwise (FORCE=1)")
    p.add_argument(
        "--metric",
        default="accuracy",
        metavar=one_of(METRICS),
        help="what the search scores and the heads are ranked by on val (METRIC=; "
        "balanced_accuracy: mean per-class accuracy)",
    )
    add_engine_options(p, actors=False)
    p.set_defaults(func=cmd_head)


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "report", "write the Markdown/HTML/JSON report comparing the heads")
    p.add_argument("--data", default=None, help="image folder (its name names the data set)")
    p.add_argument("--dataset", default=None, help="data set name (instead of --data)")
    p.add_argument("--artifacts", default="artifacts", help="output root")
    p.add_argument(
        "--out", default=None, help="output folder (default: artifacts/reports/<dataset>)"
    )
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    p.set_defaults(func=cmd_report)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "predict", "classify new images with a head or a fine-tuned model")
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
        help="CSV file, or a folder to write the default file name in (default: "
        "<artifacts>/predictions/<dataset>/<model>/<images>-<hash>.csv); an existing file "
        "that is not a predictions CSV is refused (make: OUT=)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--artifacts", default="artifacts", help="output root")
    p.set_defaults(func=cmd_predict)


def _add_bench_heads(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "bench-heads", "fit time of the default heads over extraction time")
    p.add_argument("--data", action="append", default=None, help="image folder (repeatable)")
    p.add_argument("--cache", action="append", default=None, help="feature cache (repeatable)")
    add_feature_options(p)
    add_split_options(p)
    p.add_argument("--cv", type=int, default=3, help="folds of the search")
    p.add_argument("--out", default="artifacts/bench/heads.json", help="JSON file for the figures")
    p.add_argument(
        "--repeats", type=int, default=3, help="sweeps per data set; the median one is reported"
    )
    p.add_argument("--classes", type=int, help="synthetic features of this many classes (CLASSES=)")
    p.add_argument("--rows", default="3000,30000", help="with --classes: train rows (ROWS=)")
    p.set_defaults(func=cmd_bench_heads)
