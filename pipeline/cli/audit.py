"""The data audit's commands: ``audit``, ``export`` and ``bench-audit`` (:mod:`pipeline.audit`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.audit import audit, export_features
from pipeline.audit.folder import find_or_extract
from pipeline.audit.run import check_audit_options
from pipeline.benchmarks.audit import bench_audit
from pipeline.cli.options import (
    add_command,
    add_feature_options,
    add_split_options,
    feature_config,
    split_config,
    warn_random_weights,
)
from pipeline.core.errors import PipelineError


def _cache(args: argparse.Namespace) -> Path:
    """--cache as given, else stage one's cache for --data (stage one runs when there is none)."""
    if args.cache:
        return Path(args.cache)
    if not args.data:
        raise PipelineError("give --data (an image folder) or --cache (a feature cache)")
    warn_random_weights(args)
    return find_or_extract(
        args.data,
        feature_config(args),
        split=split_config(args),
        artifacts_dir=args.artifacts,
        log=print,
    )


def cmd_audit(args: argparse.Namespace) -> int:
    options = {"threshold": args.threshold, "calibration": args.calibration}
    check_audit_options(cv=args.cv, seed=args.seed, **options)
    audit(
        _cache(args),
        artifacts_dir=args.artifacts,
        cv=args.cv,
        seed=args.seed,
        threshold=args.threshold,
        calibration=args.calibration,
        log=print,
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    print(export_features(_cache(args), artifacts_dir=args.artifacts).format())
    return 0


def cmd_bench_audit(args: argparse.Namespace) -> int:
    bench_audit(args.data, feature_config(args), out=args.out, cv=args.cv, log=print)
    print(f"wrote {args.out}")
    return 0


def _source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="image folder (stage one runs if it has no cache)")
    p.add_argument("--cache", default=None, help="feature cache file (instead of --data)")
    add_feature_options(p)
    add_split_options(p)


def add_audit(sub: argparse._SubParsersAction) -> None:
    """The subcommands audit, export and bench-audit."""
    p = add_command(
        sub, "audit", "find duplicates, leaks, likely label errors and outliers in the data"
    )
    _source(p)
    p.add_argument("--cv", type=int, default=3, help="folds of the label audit's head")
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="near-duplicate cosine (default: calibrated on copies of your images)",
    )
    p.add_argument(
        "--calibration",
        default="copies",
        choices=("copies", "neighbours"),
        help="how the threshold is found: copies through the backbone, or the "
        "nearest-neighbour similarities alone",
    )
    p.set_defaults(func=cmd_audit)

    p = add_command(sub, "export", "write features, labels, paths and splits as .npz and Parquet")
    _source(p)
    p.set_defaults(func=cmd_export)

    p = add_command(sub, "bench-audit", "the audit's time over stage one's, both timed in the run")
    p.add_argument("--data", required=True, help="image folder")
    add_feature_options(p)
    p.add_argument("--cv", type=int, default=3, help="folds of the label audit's head")
    p.add_argument("--out", default="artifacts/bench/audit.json", help="JSON file for the figures")
    p.set_defaults(func=cmd_bench_audit)
