"""Make commands in messages, completed with the user's own variables.

An error or a note that names a make command (```make features```) is completed
by :func:`fill_make_hints` with the variables of the command the user ran, so
the hint can be pasted as it is; :func:`make_command` writes one such command.
"""

from __future__ import annotations

import argparse
import re
import shlex

# make variable, argparse dest, the Makefile's default (a variable is written when it differs).
_MAKE_VARIABLES: tuple[tuple[str, str, object], ...] = (
    ("DATA", "data", None),
    ("MODEL", "model", None),
    ("IMAGES", "images", None),
    ("BACKBONE", "backbone", "mobilenet_v2"),
    ("WEIGHTS", "weights", "imagenet"),
    ("INPUT_SIZE", "input_size", None),
    ("POOLING", "pooling", "avg"),
    ("LAYER", "layer", None),
    ("PRECISION", "precision", "auto"),
    ("STORAGE", "storage", "float32"),
    ("RUNTIME", "runtime", "auto"),
    ("SEED", "seed", 0),
    ("VAL_FRACTION", "val_fraction", 0.2),
    ("TEST_FRACTION", "test_fraction", 0.2),
    ("ARTIFACTS", "artifacts", "artifacts"),
    ("ENGINE", "engine", "local"),
    ("RAY_ADDRESS", "ray_address", None),
    ("CONCURRENCY", "concurrency", 1),
)
_FEATURE_VARIABLES = ("DATA", "BACKBONE", "WEIGHTS", "INPUT_SIZE", "POOLING", "LAYER", "PRECISION",
                      "STORAGE", "RUNTIME", "ARTIFACTS")  # fmt: skip
_SPLIT_VARIABLES = ("SEED", "VAL_FRACTION", "TEST_FRACTION")
# The variables each target reads (others of the user's command would not change it).
_TARGET_VARIABLES = {
    "features": (*_FEATURE_VARIABLES, *_SPLIT_VARIABLES, "ENGINE", "RAY_ADDRESS", "CONCURRENCY"),
    "head": (*_FEATURE_VARIABLES, "SEED", "ENGINE", "RAY_ADDRESS"),
    "report": ("DATA", "ARTIFACTS"),
    "predict": ("MODEL", "IMAGES", "ARTIFACTS"),
    "finetune": ("DATA", "BACKBONE", "WEIGHTS", "INPUT_SIZE", "PRECISION", *_SPLIT_VARIABLES,
                 "ARTIFACTS"),
}  # fmt: skip
_PLACEHOLDERS = {
    "DATA": "path/to/images",
    "MODEL": "path/to/model.json",
    "IMAGES": "path/to/images",
}
_MAKE_HINT = re.compile(r"`make ([a-z][a-z-]*)([^`]*)`")


def make_command(target: str, args: argparse.Namespace | None = None, **explicit: str) -> str:
    """``make <target> VAR=value ...``: ``explicit`` values, then the user's own from ``args``.

    Only variables that ``target`` reads and that differ from the Makefile's
    defaults are written; the data folder (or model and images) always is, as
    a placeholder when ``args`` does not know it.

    Examples
    --------
    >>> ns = argparse.Namespace(data="photos", backbone="vgg16", weights="imagenet")
    >>> make_command("features", ns)
    'make features DATA=photos BACKBONE=vgg16'
    """
    wanted = _TARGET_VARIABLES.get(target, ("DATA", "ARTIFACTS"))
    words = [f"make {target}"]
    for var, dest, default in _MAKE_VARIABLES:
        if var not in wanted or var in explicit:
            continue
        value = getattr(args, dest, None) if args is not None else None
        if isinstance(value, bool):
            value = 1 if value else None
        if value is None and var in _PLACEHOLDERS:
            value = _PLACEHOLDERS[var]
        if value is not None and value != default:
            words.append(f"{var}={shlex.quote(str(value))}")
    words += [f"{var}={shlex.quote(str(value))}" for var, value in explicit.items()]
    return " ".join(words)


def fill_make_hints(message: str, args: argparse.Namespace | None) -> str:
    """Every ```make <target> [VAR=value] [...]``` in ``message`` completed by :func:`make_command`.

    Values the hint names (``HEAD=svm``) are kept; ``...`` and ``VAR=...`` are
    placeholders, filled from ``args``.
    """

    def complete(match: re.Match) -> str:
        try:
            words = shlex.split(match.group(2))  # a complete command stays as it is
        except ValueError:
            words = match.group(2).split()
        explicit = {}
        for word in words:
            var, _, value = word.partition("=")
            if value and value != "..." and var.isupper():
                explicit[var] = value
        return f"`{make_command(match.group(1), args, **explicit)}`"

    return _MAKE_HINT.sub(complete, message)


# Options whose make variable is not the option's name in capitals, per command ("" for all).
_OPTION_VARIABLES = {
    ("", "--batch-size"): "BATCH",
    ("probe", "--layers"): "PROBE_LAYERS",
    ("bench-features", "--data"): "BENCH_DATA",
    ("bench-finetune", "--data"): "BENCH_DATA",
    ("bench-audit", "--data"): "BENCH_DATA",
    ("bench-features", "--images"): "N",
    ("bench-finetune", "--images"): "N",
}
_ARGPARSE_ERROR = re.compile(r"argument (?P<option>[^:\s/]+)(?:/\S+)?: (?P<rest>.*)", re.S)
_REWORDED = (
    (re.compile(r"invalid int value: (.*)"), r"must be a whole number; got \1"),
    (re.compile(r"invalid float value: (.*)"), r"must be a number; got \1"),
    (re.compile(r"expected one argument"), "needs a value"),
)


def make_variable(command: str, option: str) -> str:
    """The make variable that the Makefile passes as ``option`` of ``command`` (``EPOCHS``)."""
    default = option.lstrip("-").upper().replace("-", "_")
    return _OPTION_VARIABLES.get((command, option), _OPTION_VARIABLES.get(("", option), default))


def usage_error(message: str, prog: str, *, from_make: bool) -> str:
    """argparse's error ``message`` as one line naming what the user typed.

    Called from make, the option is its make variable (``EPOCHS=``); called directly,
    the option, with the command's ``--help`` to see them all.

    Examples
    --------
    >>> usage_error("argument --epochs: invalid int value: 'many'",
    ...             "python -m pipeline finetune", from_make=True)
    "EPOCHS= must be a whole number; got 'many'"
    """
    command = prog.split()[-1] if len(prog.split()) > 3 else ""
    match = _ARGPARSE_ERROR.match(message)
    if match and match.group("option").startswith("--"):
        option, rest = match.group("option"), match.group("rest")
        for pattern, replacement in _REWORDED:
            rest = pattern.sub(replacement, rest)
        joiner = " " if rest.startswith(("must", "needs")) else ": "
        if from_make:
            return f"{make_variable(command, option)}={joiner}{rest}"
        return f"{option}{joiner}{rest} (see `{prog} --help`)"
    message = " ".join(
        message.replace("argument command: invalid choice:", "unknown command").split()
    )
    return f"{message} (see `{prog} --help`)"


_BACKEND_MODULES = {"jax": "jax", "torch": "torch", "tensorflow": "tensorflow"}


def backend_missing(exc: BaseException) -> str | None:
    """One line for a Keras backend that cannot be imported (``KERAS_BACKEND=jax`` without
    JAX installed), or ``None`` when ``exc`` is something else."""
    import os
    import sys

    backend = os.environ.get("KERAS_BACKEND", "").strip()
    if isinstance(exc, ModuleNotFoundError):
        module = (exc.name or "").split(".")[0]
        if not backend or _BACKEND_MODULES.get(backend) != module:
            return None
        return (
            f"KERAS_BACKEND={backend}, but {module} is not installed in this environment "
            f"({sys.executable}); install it (`{sys.executable} -m pip install {module}`) or "
            "unset KERAS_BACKEND to use TensorFlow"
        )
    if isinstance(exc, ValueError) and "Unable to import backend" in str(exc):
        return (
            f"KERAS_BACKEND={backend!r} is not a Keras backend; use tensorflow, jax or torch "
            "(installed), or unset KERAS_BACKEND"
        )
    return None
