"""The one table of option constraints and its messages."""

from __future__ import annotations

import pytest

from pipeline.core.errors import DataError, PipelineError
from pipeline.core.options import OPTIONS, check_options, option_label


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"batch_size": 0},
            r"BATCH= \(--batch-size\) must be a whole number in \[1, 4096\]; got 0",
        ),
        ({"batch_size": True}, "BATCH="),  # a bool is not a number here
        ({"seed": -1}, r"SEED= \(--seed\) must be a whole number in"),
        ({"val_fraction": 1.0}, r"VAL_FRACTION= \(--val-fraction\) must be a number in \[0, 1\)"),
        ({"learning_rate": float("nan")}, r"LR= \(--lr\)"),
        ({"pooling": "mean"}, "POOLING= .* one of avg, max, flatten"),
        ({"norm": "l3"}, "did you mean l2"),
        ({"jobs": -2}, r"JOBS= \(--jobs\) must be .*; got -2"),
        ({"input_size": 100_000}, r"INPUT_SIZE= \(--input-size\)"),
    ],
)
def test_each_bad_value_is_named_as_the_user_types_it(values, message):
    with pytest.raises(PipelineError, match=message):
        check_options(values)


def test_good_values_pass_and_optional_ones_accept_none():
    check_options({"batch_size": 32, "seed": 0, "val_fraction": 0.2, "jobs": -1, "pca": None,
                   "norm": None, "input_size": None, "learning_rate": 1e-5})  # fmt: skip


def test_the_error_type_is_the_callers_and_a_value_error():
    with pytest.raises(DataError) as caught:
        check_options({"seed": -3}, error=DataError)
    assert isinstance(caught.value, ValueError)


def test_labels_name_only_flags_and_variables_that_exist():
    from pathlib import Path

    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    for name, option in OPTIONS.items():
        if option.make:
            assert f"{option.make} ?=" in makefile, f"{name}: no make variable {option.make}"
    assert option_label("workers") == "--workers"
