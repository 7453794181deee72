"""One declarative table of option constraints, checked by one helper.

Each public config (``FeatureConfig``, ``SplitConfig``, ``FinetuneConfig``, the
head and report options) declares its fields' constraints in :data:`OPTIONS`
(the idea of scikit-learn's ``_parameter_constraints``) and calls
:func:`check_options`. Messages name the option as the user can type it: the
make variable and the CLI flag where both exist, only ones that exist.

Examples
--------
>>> check_options({"batch_size": 0})
Traceback (most recent call last):
...
pipeline.core.errors.PipelineError: BATCH= (--batch-size) must be a whole number in [1, 4096]; got 0
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

from pipeline.core.errors import PipelineError, did_you_mean


@dataclass(frozen=True)
class Interval:
    """Numbers of ``kind`` (``Integral`` or ``Real``) between ``low`` and ``high``.

    ``closed`` is ``"both"``, ``"left"``, ``"right"`` or ``"neither"``; a bound of
    ``None`` is unbounded.
    """

    kind: type
    low: float | None
    high: float | None
    closed: str = "both"

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, self.kind):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        left_closed = self.closed in ("both", "left")
        right_closed = self.closed in ("both", "right")
        if self.low is not None and (value < self.low or (value == self.low and not left_closed)):
            return False
        return not (
            self.high is not None
            and (value > self.high or (value == self.high and not right_closed))
        )

    def describe(self) -> str:
        what = "a whole number" if self.kind is Integral else "a number"
        if self.low is not None and self.high is None:
            sign = ">=" if self.closed in ("both", "left") else ">"
            return f"{what} {sign} {_num(self.low)}"
        if self.high is not None and self.low is None:
            sign = "<=" if self.closed in ("both", "right") else "<"
            return f"{what} {sign} {_num(self.high)}"
        left = "[" if self.closed in ("both", "left") else "("
        right = "]" if self.closed in ("both", "right") else ")"
        return f"{what} in {left}{_num(self.low)}, {_num(self.high)}{right}"


@dataclass(frozen=True)
class OneOf:
    """One of a fixed set of words."""

    choices: tuple[str, ...]

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and value in self.choices

    def describe(self) -> str:
        return f"one of {', '.join(self.choices)}"


@dataclass(frozen=True)
class Option:
    """A user-facing option: how it is typed and what it accepts.

    ``constraints``: the value passes when any of them accepts it; ``None`` in
    the tuple accepts ``None`` (an optional option).
    """

    make: str | None
    flag: str | None
    constraints: tuple[Interval | OneOf | None, ...]

    @property
    def label(self) -> str:
        parts = [f"{self.make}=" if self.make else None, self.flag]
        typed = [p for p in parts if p]
        return f"{typed[0]} ({typed[1]})" if len(typed) == 2 else typed[0]

    def check(self, value: Any, error: type[PipelineError] = PipelineError) -> None:
        if any(c.accepts(value) if c is not None else value is None for c in self.constraints):
            return
        described = [c.describe() for c in self.constraints if c is not None]
        hint = ""
        words = [w for c in self.constraints if isinstance(c, OneOf) for w in c.choices]
        if words and isinstance(value, str):
            hint = did_you_mean(value, words)
        optional = " (or unset)" if None in self.constraints else ""
        raise error(f"{self.label} must be {' or '.join(described)}{optional}; got {value!r}{hint}")


# The backbone's compute precision, whichever runtime runs it (pipeline.features.runtimes):
# auto takes the fastest one whose features pass the runtime's checks, else float32;
# int8 is OpenVINO's (NNCF post-training quantization on the user's images).
PRECISIONS = ("auto", "float32", "bfloat16", "float16", "int8")
STORAGES = ("float32", "float16")  # how stage one stores its features
RUNTIMES = ("auto", "keras", "openvino")  # pipeline.features.runtimes: who runs the backbone
COMBINES = ("mean", "concat")  # pipeline.features.views: how the scales of VIEWS= become one vector
JOIN_NORMS = ("l2", "standard")  # pipeline.features.joins: each part's normalisation before joining
ENGINES = ("local", "ray")  # who runs stage one and the head search (pipeline.features.ray_engine)
POOLINGS = ("avg", "max", "flatten")
NORMS = ("l2", "standard", "none")
LAYER_WORDS = ("all", "block")
CLASS_WEIGHTS = ("balanced", "none")
# METRIC=: what a head is chosen by (make head: CV scorer, ranking, headline); the protocols
# report top-5 accuracy too, above ten classes (pipeline.heads.protocol_run).
METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
PROTOCOL_METRICS = ("balanced_accuracy", "accuracy", "macro_f1", "top5")
FLIPS = ("horizontal", "vertical", "horizontal_and_vertical", "none")
MAX_INPUT_SIZE = 1024  # a 1024 px square is ~13x the pixels of 299: beyond, memory runs out first

_fraction = Interval(Real, 0.0, 1.0, closed="left")
_rate = Interval(Real, 0.0, 1.0, closed="neither")

# Every checked option, by its Python field name.
OPTIONS: dict[str, Option] = {
    # stage one
    "input_size": Option(
        "INPUT_SIZE", "--input-size", (Interval(Integral, 1, MAX_INPUT_SIZE), None)
    ),
    "pooling": Option("POOLING", "--pooling", (OneOf(POOLINGS),)),
    "batch_size": Option("BATCH", "--batch-size", (Interval(Integral, 1, 4096),)),
    "precision": Option("PRECISION", "--precision", (OneOf(PRECISIONS),)),
    "workers": Option(None, "--workers", (Interval(Integral, 1, 256), None)),
    "runtime": Option("RUNTIME", "--runtime", (OneOf(RUNTIMES),)),
    "storage": Option("STORAGE", "--storage", (OneOf(STORAGES),)),
    "combine": Option("COMBINE", "--combine", (OneOf(COMBINES),)),
    "join_norm": Option("JOIN_NORM", "--join-norm", (OneOf(JOIN_NORMS),)),
    "engine": Option("ENGINE", "--engine", (OneOf(ENGINES),)),
    "concurrency": Option("CONCURRENCY", "--concurrency", (Interval(Integral, 1, 1024),)),
    # the split
    "seed": Option("SEED", "--seed", (Interval(Integral, 0, 2**32 - 1),)),
    "val_fraction": Option("VAL_FRACTION", "--val-fraction", (_fraction,)),
    "test_fraction": Option("TEST_FRACTION", "--test-fraction", (_fraction,)),
    "train_per_class": Option(
        "TRAIN_PER_CLASS", "--train-per-class", (Interval(Integral, 1, None), None)
    ),
    # stage two and the report
    "norm": Option("NORM", "--norm", (OneOf(NORMS), None)),
    "pca": Option("PCA", "--pca", (Interval(Integral, 1, None), None)),
    "cv": Option("CV", "--cv", (Interval(Integral, 2, 20),)),
    # 0: each head its own (every core for big searches of one-core solvers, else one job)
    "jobs": Option("JOBS", "--jobs", (Interval(Integral, 0, 256), Interval(Integral, -1, -1))),
    "n_resamples": Option(None, "--resamples", (Interval(Integral, 1, 1_000_000),)),
    "metric": Option("METRIC", "--metric", (OneOf(METRICS),)),
    "protocol_metric": Option("METRIC", "--metric", (OneOf(PROTOCOL_METRICS),)),
    # stage three
    "epochs": Option("EPOCHS", "--epochs", (Interval(Integral, 0, 10_000),)),
    "head_epochs": Option("HEAD_EPOCHS", "--head-epochs", (Interval(Integral, 0, 10_000),)),
    "patience": Option("PATIENCE", "--patience", (Interval(Integral, 1, 10_000),)),
    "learning_rate": Option("LR", "--lr", (_rate,)),
    "head_learning_rate": Option(None, "--head-lr", (_rate,)),
    "rotation": Option(None, "--rotation", (_fraction,)),
    "zoom": Option(None, "--zoom", (_fraction,)),
    "flip": Option(None, "--flip", (OneOf(FLIPS),)),
    "class_weight": Option("CLASS_WEIGHT", "--class-weight", (OneOf(CLASS_WEIGHTS),)),
}


def check_options(
    values: Mapping[str, Any],
    names: Sequence[str] | None = None,
    *,
    error: type[PipelineError] = PipelineError,
) -> None:
    """Check ``values`` (field name -> value) against :data:`OPTIONS`.

    ``names`` limits the check to those fields; fields without an entry are
    ignored (they are checked where they are resolved, e.g. the backbone name).
    ``error`` is the :class:`PipelineError` subclass to raise.

    Raises
    ------
    PipelineError
        The first option out of bounds, named as the user types it.
    """
    for name in names if names is not None else values:
        if name in OPTIONS and name in values:
            OPTIONS[name].check(values[name], error)


def option_label(name: str) -> str:
    """How the user types the option ``name`` (``"BATCH= (--batch-size)"``)."""
    return OPTIONS[name].label


def _num(value: float | None) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
