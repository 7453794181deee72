"""The research-protocol commands: ``protocol`` and ``curve`` (``make protocol``, ``make curve``).

Thin calls of :func:`pipeline.heads.protocol_run.run_protocol` and
:func:`pipeline.recipes.curve.run_curve` on the cache stage one wrote for ``--data``
(or ``--cache``), each followed by the data set's protocols page
(:func:`pipeline.report.protocols.write_protocol_page`); :mod:`pipeline.cli.main` adds them
(:func:`add_protocols`).
"""

from __future__ import annotations

import argparse

from pipeline.cli.options import add_command, add_feature_options, one_of, optional_int
from pipeline.cli.stage_two import checked_cache_for
from pipeline.core.errors import ReportError
from pipeline.heads.protocol_run import DEFAULT_HEADS, METRICS, run_protocol
from pipeline.recipes.curve import run_curve
from pipeline.report.protocols import write_protocol_page


def seeds_value(value: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``."""
    try:
        seeds = [int(s) for s in value.replace(" ", "").split(",") if s]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be whole numbers separated by commas, e.g. 0,1,2,3,4; got {value!r}"
        ) from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"must be one or more seeds >= 0; got {value!r}")
    return seeds


def cmd_protocol(args: argparse.Namespace) -> int:
    result = run_protocol(
        checked_cache_for(args),
        args.train_per_class,
        args.seeds,
        args.head,
        args.metric,
        split_list=args.split_file,
        data_root=args.data,
        cv=args.cv,
        artifacts_dir=args.artifacts,
        log=print,
    )
    print(result.format())
    _write_page(args, result.record["dataset"])
    return 0


def cmd_curve(args: argparse.Namespace) -> int:
    result = run_curve(
        checked_cache_for(args),
        args.shots,
        args.seeds,
        args.head,
        args.metric,
        cv=args.cv,
        artifacts_dir=args.artifacts,
        log=print,
    )
    print(result.format())
    _write_page(args, result.record["dataset"])
    return 0


def _write_page(args: argparse.Namespace, dataset: str | None) -> None:
    """The data set's protocols page, rewritten with this result; a page that cannot be
    written is a warning (the result is saved)."""
    try:
        page = write_protocol_page(args.artifacts, dataset or "unknown")
    except ReportError as exc:
        print(f"warning: {exc}")
        return
    if page is not None:
        print(page.format())


def _common(p: argparse.ArgumentParser, seeds: str) -> None:
    p.add_argument("--data", default=None, help="image folder of stage one (locates the cache)")
    p.add_argument("--cache", default=None, help="feature cache file (instead of --data)")
    add_feature_options(p)
    p.add_argument(
        "--seeds", type=seeds_value, default=seeds_value(seeds), help="one split per seed"
    )
    p.add_argument(
        "--head", default=DEFAULT_HEADS, help="heads, a comma list (as make head, or linear_eval)"
    )
    p.add_argument(
        "--metric",
        default="balanced_accuracy",
        metavar=one_of(METRICS),
        help="chooses hyper-parameters and heads the result (balanced_accuracy: mean "
        "per-class accuracy; top5: more than 10 classes, reported only)",
    )
    p.add_argument("--cv", type=int, default=3, help="folds of each head's search on train")


def add_protocols(sub: argparse._SubParsersAction) -> None:
    """``protocol`` and ``curve``."""
    p = add_command(
        sub, "protocol", "N train images per class (or a split list), repeated over seeds"
    )
    _common(p, "0,1,2,3,4")
    p.add_argument(
        "--train-per-class",
        type=optional_int,
        default=None,
        help="N per class to train on, drawn from all of a class's images; the rest is test",
    )
    p.add_argument(
        "--split-file",
        default=None,
        help="CSV path,split[,label] (paths relative to DATA), or train=a.txt,test=b.txt",
    )
    p.set_defaults(func=cmd_protocol)

    p = add_command(sub, "curve", "few-shot curve: the protocol for each N of --shots")
    _common(p, "0,1,2")
    p.add_argument("--shots", default="1,2,5,10,all", help="training images per class, or all")
    p.set_defaults(func=cmd_curve)
