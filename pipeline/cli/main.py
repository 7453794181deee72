"""Command line: ``python -m pipeline <command>`` (also installed as ``pipeline``).

Each command is a thin call of a public function; the Makefile calls these. This
module holds the parser, the entry points (:func:`main`, :func:`run`) and the
commands up to stage two; probe, auto and stage three are :mod:`pipeline.cli.beyond`.
A :class:`~pipeline.core.errors.PipelineError` prints one line and exits with
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
from pipeline.benchmarks import (
    bench_features,
    bench_features_ray,
    bench_heads,
    bench_heads_on_folders,
    bench_heads_synthetic,
)
from pipeline.cli.audit import add_audit
from pipeline.cli.beyond import add_beyond, add_stage_three
from pipeline.cli.hints import (  # noqa: F401  (make_command: public)
    backend_missing,
    fill_make_hints,
    make_command,
    usage_error,
)
from pipeline.cli.options import (
    HelpFormatter,
    Parser,
    UsageError,
    add_bench_options,
    add_command,
    add_engine_options,
    add_feature_options,
    add_split_options,
    feature_config,
    one_of,
    optional_int,
    ray_config,
    split_config,
    warn_random_weights,
)
from pipeline.core.artifacts import Artifacts, dataset_name
from pipeline.core.errors import PipelineError
from pipeline.core.options import JOIN_NORMS, NORMS, check_options
from pipeline.core.processes import own_processes
from pipeline.data.demo import write_digits, write_small_blurred, write_textures
from pipeline.features.backbones import list_backbones
from pipeline.features.config import cache_path_for
from pipeline.features.extract import extract_features
from pipeline.features.joins import join_caches, resolve_parts, split_features_arg
from pipeline.features.ray_session import joblib_on_ray
from pipeline.heads.fit import fit_heads
from pipeline.heads.registry import GRID_EXAMPLE
from pipeline.predict import predict_images
from pipeline.report.collect import write_report

Command = Callable[[argparse.Namespace], int]


def cmd_backbones(args: argparse.Namespace) -> int:

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

    folder = write_digits(args.out)
    print(f"wrote scikit-learn digits (1797 images, 10 classes) to {folder}")
    return 0


def cmd_unseen_data(args: argparse.Namespace) -> int:
    from pathlib import Path

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

    warn_random_weights(args)
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
    parser = Parser(
        prog="python -m pipeline",
        description="Transfer learning for small image data sets: features, heads, fine-tuning.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    p = add_command(sub, "backbones", "list the registered backbones")
    p.add_argument("pattern", nargs="?", default=None, help="shell pattern, e.g. 'resnet*'")
    p.set_defaults(func=cmd_backbones)

    p = add_command(sub, "demo-data", "write scikit-learn's digits as a folder of PNG files")
    p.add_argument("--out", default="artifacts/data/digits", help="output folder")
    p.set_defaults(func=cmd_demo_data)

    p = add_command(
        sub, "unseen-data", "write data sets unlike ImageNet: textures, small blurred images"
    )
    p.add_argument("--out", default="artifacts/data", help="parent folder of the data sets")
    p.add_argument("--source", default=None, help="image folder to shrink and blur (optional)")
    p.set_defaults(func=cmd_unseen_data)

    p = add_command(sub, "features", "stage one: cache backbone features of an image folder")
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

    p = add_command(sub, "bench-features", "benchmark stage one against the pure forward pass")
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
    add_beyond(sub)  # probe, auto (pipeline.cli.beyond)
    add_stage_three(sub)  # finetune, bench-finetune (pipeline.cli.beyond)
    add_audit(sub)  # audit, export, bench-audit (pipeline.cli.audit)
    return parser


# --- stage two: heads, report, predict (pipeline.heads.fit, pipeline.report.collect, pipeline.predict)


def _cache_for(args: argparse.Namespace):
    """The cache named by --cache, or the one stage one wrote for --data and the feature options."""
    from pathlib import Path

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


def cmd_head(args: argparse.Namespace) -> int:
    import contextlib

    warn_random_weights(args)
    check_options({"engine": args.engine})
    jobs, engine = args.jobs, contextlib.nullcontext()
    if args.engine == "ray":  # the same search, its fits sent to Ray through joblib
        engine = joblib_on_ray(args.ray_address or None)
        if jobs == 1:  # one job would stay in this process
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


def _add_stage_two(sub: argparse._SubParsersAction) -> None:
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
        "--jobs", type=int, default=1, help="parallel fits of the search (JOBS=; -1: all cores)"
    )
    p.add_argument("--grid", help=f"grids searched as given (GRID=), e.g. {GRID_EXAMPLE}")
    p.add_argument("--force", action="store_true", help="refit heads reused otherwise (FORCE=1)")
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


def run() -> None:
    """The ``pipeline`` script and ``python -m pipeline``: :func:`main`, its status the exit's."""
    own_processes()  # killed or interrupted, the command takes the processes it started with it
    sys.exit(main())


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (2 for a user error)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version: argparse has printed it
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None) * 2
    except UsageError as exc:  # one line naming the make variable or the option, not the usage
        from_make = os.environ.get("PIPELINE_FROM_MAKE") == "1"
        print(f"error: {usage_error(exc.message, exc.prog, from_make=from_make)}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except PipelineError as exc:
        print(f"error: {fill_make_hints(str(exc), args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except (ModuleNotFoundError, ValueError) as exc:  # KERAS_BACKEND= a backend not installed
        message = backend_missing(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    run()
