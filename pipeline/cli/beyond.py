"""The commands beyond stage two: ``probe`` and ``auto``, ``finetune`` and ``bench-finetune``.

:mod:`pipeline.cli.main` adds them to its parser (:func:`add_beyond`,
:func:`add_stage_three`); each ``cmd_*`` is a thin call of a public function
(:func:`pipeline.recipes.probe.run_probe`, :func:`pipeline.recipes.auto.run_auto`,
:func:`pipeline.finetuning.run.finetune`, :func:`pipeline.benchmarks.bench_finetune`).
"""

from __future__ import annotations

import argparse

from pipeline.benchmarks import bench_finetune
from pipeline.cli.options import (
    WEIGHTS_HELP,
    add_bench_options,
    add_command,
    add_feature_options,
    add_renamed,
    add_split_options,
    feature_config,
    flag,
    one_of,
    optional_int,
    precision_value,
    split_config,
    warn_random_weights,
    weights_value,
)
from pipeline.core.options import CLASS_WEIGHTS, FLIPS, PRECISIONS
from pipeline.features.config import FeatureConfig
from pipeline.finetuning.config import FinetuneConfig
from pipeline.finetuning.costs import MODES
from pipeline.finetuning.run import finetune
from pipeline.recipes.auto import run_auto
from pipeline.recipes.probe import run_probe

# --- beyond one vector per image: probe, auto (pipeline.recipes.probe, pipeline.recipes.auto)


def cmd_probe(args: argparse.Namespace) -> int:

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


def add_beyond(sub: argparse._SubParsersAction) -> None:
    """``probe`` and ``auto`` (pipeline.recipes.probe, pipeline.recipes.auto)."""
    p = add_command(
        sub, "probe", "linear-head accuracy per cut layer of one backbone (CV on train)"
    )
    p.add_argument("--data", required=True, help="image folder, as stage one")
    add_feature_options(p)
    add_split_options(p)
    p.add_argument("--layers", default=None, help="comma list of layers (default: stage ends)")
    p.add_argument("--cv", type=int, default=3, help="folds of the cross-validation on train")
    p.set_defaults(func=cmd_probe)

    p = add_command(sub, "auto", "try the feature recipes, choose recipe and head by CV on train")
    p.add_argument("--data", required=True, help="image folder, as stage one")
    add_feature_options(p)
    add_split_options(p)
    p.add_argument("--cv", type=int, default=3, help="folds of the heads' search: the choice")
    p.add_argument("--no-report", action="store_true", help="skip the usual report")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_auto)


# --- stage three: finetune, bench-finetune (pipeline.finetuning.run)


def add_stage_three(sub: argparse._SubParsersAction) -> None:
    """``finetune`` and ``bench-finetune``, their defaults those of ``FinetuneConfig``."""

    defaults = FinetuneConfig()
    p = add_command(sub, "finetune", "stage three: fine-tune the last UNFREEZE layers")
    p.add_argument(
        "--data", required=True, help="image folder (as in stage one) or a stage-one .h5"
    )
    p.add_argument("--backbone", default=defaults.features.backbone, help="registry name")
    p.add_argument(
        "--weights", default=defaults.features.weights, type=weights_value, help=WEIGHTS_HELP
    )
    p.add_argument("--input-size", type=optional_int, default=None, help="default: the backbone's")
    p.add_argument(
        "--unfreeze",
        default=str(defaults.unfreeze),
        help="backbone layers to unfreeze, from the end: n >= 0 | all | block",
    )
    add_renamed(p, "--layers", new="unfreeze", values={})
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
    _add_augmentation(p, defaults)
    p.add_argument(
        "--class-weight",
        default=defaults.class_weight,
        metavar=one_of(CLASS_WEIGHTS),
        help="loss weights per class",
    )
    p.add_argument(
        "--precision",
        type=precision_value,
        default=defaults.features.precision,
        metavar=one_of(PRECISIONS),
        help="compute precision of the Keras network (auto: float32)",
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

    p = add_command(sub, "bench-finetune", "one phase-two epoch vs one stage-one pass")
    add_bench_options(p, images=256, out="artifacts/bench/finetune.json")
    p.add_argument("--input-size", type=optional_int, default=None, help="default: the backbone's")
    p.add_argument(
        "--aug-copies",
        type=int,
        default=defaults.aug_copies,
        help="augmented copies per image in the activation cache",
    )
    add_renamed(p, "--aug-views", new="aug_copies", values={})
    p.set_defaults(func=cmd_bench_finetune)


def _add_augmentation(p: argparse.ArgumentParser, defaults: FinetuneConfig) -> None:
    """Stage three's augmentation and what phase two trains on."""
    p.add_argument("--augment", type=flag, default=True, help="1 | 0")
    p.add_argument("--flip", default=defaults.flip, metavar=one_of(FLIPS), help="random flips")
    p.add_argument("--rotation", type=float, default=defaults.rotation, help="random rotation")
    p.add_argument("--zoom", type=float, default=defaults.zoom, help="random zoom")
    p.add_argument(
        "--aug-copies",
        type=int,
        default=defaults.aug_copies,
        help="augmented copies per training image cached at the cut, 0..64 (0: full forward pass)",
    )
    add_renamed(p, "--aug-views", new="aug_copies", values={})
    p.add_argument(
        "--phase-two",
        default=defaults.phase_two,
        metavar=one_of(MODES),
        help="what phase two trains on (auto: the faster for --epochs, estimated)",
    )


def cmd_finetune(args: argparse.Namespace) -> int:
    features = FeatureConfig(
        backbone=args.backbone, weights=args.weights, input_size=args.input_size,
        batch_size=args.batch_size, precision=args.precision, workers=args.workers,
    )  # fmt: skip
    config = FinetuneConfig(
        features=features, split=split_config(args), unfreeze=args.unfreeze, epochs=args.epochs,
        learning_rate=args.lr, head_epochs=args.head_epochs, head_learning_rate=args.head_lr,
        patience=args.patience, augment=args.augment, flip=args.flip, rotation=args.rotation,
        zoom=args.zoom, class_weight=args.class_weight, aug_copies=args.aug_copies,
        phase_two=args.phase_two, name=args.name or None, restart=args.restart,
    )  # fmt: skip
    config.validate()  # bad options fail before Keras is imported
    warn_random_weights(args)
    result = finetune(args.data, config, artifacts_dir=args.artifacts, progress=not args.quiet)
    print(result.format(notes=False))  # the notes were printed as they happened
    return 0


def cmd_bench_finetune(args: argparse.Namespace) -> int:
    bench_finetune(
        args.data, backbone=args.backbone, weights=args.weights, input_size=args.input_size,
        batch_size=args.batch_size, n_images=args.images, aug_copies=args.aug_copies, out=args.out,
    )  # fmt: skip
    return 0
