"""How options are typed on the command line: shared argparse groups and conversions.

The commands of :mod:`pipeline.cli.main` and :mod:`pipeline.cli.beyond` are made with
:func:`add_command` and add these groups; the values are checked by
the one table of :mod:`pipeline.core.options` when the configs are built, so a bad
value gets the same message from the CLI, make and Python.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from pipeline.core.options import COMBINES, ENGINES, POOLINGS, PRECISIONS, RUNTIMES, STORAGES
from pipeline.data.folders import SplitConfig
from pipeline.features.config import FeatureConfig
from pipeline.features.ray_session import RayConfig


class UsageError(Exception):
    """A command line argparse refused: ``message`` is argparse's, ``prog`` the (sub)command's."""

    def __init__(self, message: str, prog: str) -> None:
        super().__init__(message)
        self.message, self.prog = message, prog


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are raised, not printed with the whole usage:
    the CLI turns them into one line (:func:`pipeline.cli.hints.usage_error`)."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message, self.prog)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default, except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if any(action.default is v for v in (None, False, argparse.SUPPRESS)) or not action.help:
            return action.help
        return super()._get_help_string(action)


def add_command(sub: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` shows defaults."""
    return sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)


RANDOM_WEIGHTS_WARNING = (
    "warning: WEIGHTS=none builds the backbone with random weights: its features give only a "
    "baseline (what no transfer scores), not a model to use; WEIGHTS=imagenet transfers"
)


def warn_random_weights(args: argparse.Namespace) -> None:
    """Print :data:`RANDOM_WEIGHTS_WARNING` when the command was given ``--weights none``."""
    if getattr(args, "weights", None) == "none":
        print(RANDOM_WEIGHTS_WARNING)


class Renamed(argparse.Action):
    """An old spelling kept for one release: it sets the new option and says what to write.

    ``values`` maps the old option's values to the new option's (``{None: "float16"}`` for a
    flag without a value); with ``values={}`` the old option takes a value and passes it through,
    converted by the new option's ``type``.
    """

    def __init__(self, option_strings, dest, *, new: str, values: dict, **kwargs):
        self.new, self.values = new, values
        nargs = 0 if None in values else None
        super().__init__(option_strings, dest, nargs=nargs, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        new_value = self.values.get(None if self.nargs == 0 else value, value)
        if isinstance(new_value, str):  # a value passed through: typed as the new option types it
            new = next(
                (a for a in parser._actions if a.dest == self.new and a.option_strings), None
            )
            if new is not None and new.type is not None:
                new_value = parser._get_value(new, new_value)
        flag = "--" + self.new.replace("_", "-")
        print(f"note: {option_string} is now {flag} {new_value}; write that instead")
        setattr(namespace, self.new, new_value)


def add_renamed(p: argparse.ArgumentParser, old: str, *, new: str, values: dict) -> None:
    """Accept ``old`` (an option of the previous release) as :class:`Renamed` to ``new``."""
    p.add_argument(old, action=Renamed, dest="_" + old.strip("-").replace("-", "_"), new=new,
                   values=values)  # fmt: skip


# Precision words of the previous release -> PRECISION= words.
OLD_PRECISIONS = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16", "fp32": "float32",
                  "bf16": "bfloat16", "auto": "auto"}  # fmt: skip


def precision_value(value: str) -> str:
    """``--precision``'s value; an old word is taken with a note saying the new one."""
    if value in OLD_PRECISIONS and value not in PRECISIONS:
        print(f"note: --precision {value} is now --precision {OLD_PRECISIONS[value]}")
        return OLD_PRECISIONS[value]
    return value


def one_of(words: Sequence[str]) -> str:
    """A metavar listing the accepted words (checked by pipeline.core.options, with "did you mean")."""
    return "{" + ",".join(words) + "}"


def weights_value(value: str) -> str:
    return value if value.lower() not in ("imagenet", "none") else value.lower()


def optional_int(value: str) -> int | None:
    if value in ("", "default", "auto"):
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a whole number (or empty for the default); got {value!r}"
        ) from None


WEIGHTS_HELP = "imagenet | none (random: a baseline only) | PATH to a .h5 weights file"


def add_feature_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backbone", default="mobilenet_v2", help="registry name (`python -m pipeline backbones`)"
    )
    p.add_argument("--weights", default="imagenet", type=weights_value, help=WEIGHTS_HELP)
    p.add_argument(
        "--input-size",
        type=optional_int,
        default=None,
        help="square input side (default: the backbone's)",
    )
    p.add_argument(
        "--pooling", default="avg", metavar=one_of(POOLINGS), help="last feature map to vector"
    )
    p.add_argument("--layer", default=None, help="cut the backbone at this named layer")
    p.add_argument(
        "--views",
        default=None,
        help="several views per image: scales, +flip, +crops (e.g. 224,320,448+flip)",
    )
    p.add_argument(
        "--combine",
        default="mean",
        metavar=one_of(COMBINES),
        help="VIEWS: average the scales' vectors or concatenate them",
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument(
        "--precision",
        type=precision_value,
        default="auto",
        metavar=one_of(PRECISIONS),
        help="the backbone's compute precision, whichever runtime runs it (auto: the fastest "
        "of int8, bfloat16 and float32 whose linear-head predictions agree with float32's on "
        "a sample of the images; int8 needs nncf; float16 is for GPUs)",
    )
    p.add_argument(
        "--storage",
        default="float32",
        metavar=one_of(STORAGES),
        help="how the features are stored (float16: half the disk)",
    )
    p.add_argument(
        "--runtime",
        default="auto",
        metavar=one_of(RUNTIMES),
        help="who runs the backbone (auto: the fastest that passes the check, else keras)",
    )
    add_renamed(p, "--float16", new="storage", values={None: "float16"})
    add_renamed(p, "--runtime-precision", new="precision", values=OLD_PRECISIONS)
    p.add_argument(
        "--workers",
        type=optional_int,
        default=None,
        help="decoding threads (default: cores, <= 8)",
    )
    p.add_argument("--artifacts", default="artifacts", help="output root")


def add_engine_options(p: argparse.ArgumentParser, *, actors: bool = True) -> None:
    p.add_argument(
        "--engine",
        default="local",
        metavar=one_of(ENGINES),
        help="local: this process; ray: a Ray cluster (pipeline.features.ray_engine)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="ENGINE=ray: join this cluster (default: start a local one for the run)",
    )
    if actors:
        p.add_argument(
            "--concurrency", type=int, default=1, help="ENGINE=ray: backbone actors (models)"
        )


def ray_config(args: argparse.Namespace):

    return RayConfig(address=args.ray_address or None, concurrency=args.concurrency)


def add_split_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
    p.add_argument("--val-fraction", type=float, default=0.2, help="val share (no split folders)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="test share (no split folders)")


def add_bench_options(p: argparse.ArgumentParser, *, images: int, out: str) -> None:
    p.add_argument("--data", required=True, help="image folder to benchmark on")
    p.add_argument("--backbone", default="mobilenet_v2", help="registry name")
    p.add_argument("--weights", default="imagenet", type=weights_value, help=WEIGHTS_HELP)
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--images", type=int, default=images, help="images (N) to time on")
    p.add_argument("--out", default=out, help="JSON file for the figures")


def feature_config(args: argparse.Namespace):

    return FeatureConfig(
        backbone=args.backbone,
        weights=args.weights,
        input_size=args.input_size,
        pooling=args.pooling,
        layer=args.layer or None,
        batch_size=args.batch_size,
        precision=args.precision,
        storage=args.storage,
        workers=args.workers,
        runtime=args.runtime,
        views=getattr(args, "views", None) or None,
        combine=getattr(args, "combine", "mean"),
    )


def split_config(args: argparse.Namespace):

    return SplitConfig(
        seed=args.seed,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        train_per_class=getattr(args, "train_per_class", None),
        split_file=getattr(args, "split_file", None) or None,
    )


def flag(value: str) -> bool:
    text = value.strip().lower()
    if text in ("1", "yes", "true", "on"):
        return True
    if text in ("0", "no", "false", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"must be 1 or 0; got {value!r}")
