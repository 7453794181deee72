"""Command line: ``python -m pipeline <command>`` (also installed as ``pipeline``).

Each command is a thin call of a public function; the Makefile calls these. This
module holds the parser, the entry points (:func:`main`, :func:`run`) and the
commands of stage one; stage two's are :mod:`pipeline.cli.stage_two`, probe, auto and
stage three's :mod:`pipeline.cli.beyond`.
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
    ray_config,
    split_config,
    warn_random_weights,
)
from pipeline.cli.protocols import add_protocols
from pipeline.cli.stage_two import add_stage_two
from pipeline.core.errors import PipelineError
from pipeline.core.processes import own_processes
from pipeline.data.demo import write_digits, write_small_blurred, write_textures
from pipeline.features.backbones import list_backbones
from pipeline.features.extract import extract_features

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
    p.add_argument(
        "--train-per-class",
        type=int,
        default=None,
        help="N train images per class (by --seed), the rest test, no val; split folders pooled",
    )
    p.add_argument(
        "--split-file",
        default=None,
        help="CSV path,split[,label] or train=a.txt,test=b.txt: the split; split folders pooled",
    )
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

    add_stage_two(sub)  # head, report, predict, bench-heads (pipeline.cli.stage_two)
    add_beyond(sub)  # probe, auto (pipeline.cli.beyond)
    add_stage_three(sub)  # finetune, bench-finetune (pipeline.cli.beyond)
    add_audit(sub)  # audit, export, bench-audit (pipeline.cli.audit)
    add_protocols(sub)  # protocol, curve (pipeline.cli.protocols)
    return parser


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
