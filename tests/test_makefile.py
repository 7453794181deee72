"""The Makefile hands every variable to the CLI as one argument, whatever characters it holds.

Each make run here calls a stand-in ``python`` (a script in a fake virtual environment) that
prints the arguments it received as JSON, so no Keras is loaded and a run takes milliseconds.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from make_helpers import REPO, fake_venv, run_make

# target -> {make variable: the CLI option it becomes}
TARGETS: dict[str, dict[str, str]] = {
    "features": {
        "DATA": "--data", "BACKBONE": "--backbone", "WEIGHTS": "--weights",
        "INPUT_SIZE": "--input-size", "POOLING": "--pooling", "LAYER": "--layer",
        "VIEWS": "--views", "COMBINE": "--combine", "BATCH": "--batch-size",
        "PRECISION": "--precision", "STORAGE": "--storage", "RUNTIME": "--runtime",
        "ARTIFACTS": "--artifacts", "SEED": "--seed", "VAL_FRACTION": "--val-fraction",
        "TEST_FRACTION": "--test-fraction", "ENGINE": "--engine", "RAY_ADDRESS": "--ray-address",
        "CONCURRENCY": "--concurrency", "TRAIN_PER_CLASS": "--train-per-class",
        "SPLIT_FILE": "--split-file",
    },
    "head": {
        "DATA": "--data", "FEATURES": "--features", "JOIN_NORM": "--join-norm", "HEAD": "--head",
        "NORM": "--norm", "PCA": "--pca", "CV": "--cv", "JOBS": "--jobs", "METRIC": "--metric",
    },
    "report": {"DATA": "--data", "ARTIFACTS": "--artifacts"},
    "predict": {"MODEL": "--model", "IMAGES": "--images", "OUT": "--out", "BATCH": "--batch-size"},
    "probe": {"DATA": "--data", "PROBE_LAYERS": "--layers", "CV": "--cv"},
    "auto": {"DATA": "--data", "CV": "--cv"},
    "bench-features": {"BENCH_DATA": "--data", "N": "--images", "BACKBONE": "--backbone"},
    "bench-finetune": {"BENCH_DATA": "--data", "N": "--images", "AUG_COPIES": "--aug-copies"},
    "finetune": {
        "DATA": "--data", "UNFREEZE": "--unfreeze", "EPOCHS": "--epochs", "LR": "--lr",
        "HEAD_EPOCHS": "--head-epochs", "PATIENCE": "--patience", "AUGMENT": "--augment",
        "AUG_COPIES": "--aug-copies", "PHASE_TWO": "--phase-two", "CLASS_WEIGHT": "--class-weight", "RESTART": "--restart",
        "NAME": "--name", "WEIGHTS": "--weights", "INPUT_SIZE": "--input-size",
    },
    "protocol": {
        "DATA": "--data", "TRAIN_PER_CLASS": "--train-per-class", "SPLIT_FILE": "--split-file",
        "SEEDS": "--seeds", "HEAD": "--head", "METRIC": "--metric", "CV": "--cv",
    },
    "curve": {"DATA": "--data", "SHOTS": "--shots", "SEEDS": "--seeds", "METRIC": "--metric"},
}  # fmt: skip


def hostile(var: str, marker: Path) -> str:
    """A value a shell or make would split, run or expand: ; & $(...) `...` quotes, spaces,
    non-ASCII, and make's own $(shell ...)."""
    return f"{var} x;echo hi;& $(echo sub) `id` \"q\" 'a' é $(shell touch {marker}) $$HOME end"


def option_values(argv: list[str]) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag.startswith("--"):
            values.setdefault(flag, []).append(value)
    return values


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_variable_reaches_the_cli_as_one_unexpanded_argument(tmp_path, target):
    marker = tmp_path / "make-expanded-it"
    variables = TARGETS[target]
    values = {var: hostile(var, marker) for var in variables}
    calls = run_make(tmp_path, target, *(f"{var}={value}" for var, value in values.items()))
    assert len(calls) == 1 and calls[0]["argv"][:3] == ["-m", "pipeline", target]
    assert calls[0]["make"] == "1"  # the CLI knows make called it (errors name EPOCHS=)
    got = option_values(calls[0]["argv"])
    for var, flag in variables.items():
        assert values[var] in got.get(flag, []), (var, flag, got.get(flag))
    assert not marker.exists()  # make's $(shell ...) stayed text
    assert "hi" not in calls[0]["argv"] and "sub" not in calls[0]["argv"]


def test_paths_built_from_variables_stay_one_argument(tmp_path):
    marker = tmp_path / "make-expanded-it"
    art, assets = hostile("ARTIFACTS", marker), hostile("ASSETS", marker)
    (call,) = run_make(tmp_path, "bench-heads", f"ARTIFACTS={art}", f"ASSETS={assets}")
    got = option_values(call["argv"])
    assert got["--data"] == [f"{assets}/datasets/hymenoptera_data",
                             f"{assets}/datasets/cats_and_dogs_filtered"]  # fmt: skip
    assert got["--out"] == [f"{art}/bench/heads.json"]
    demo = run_make(tmp_path, "demo-data", f"ARTIFACTS={art}")
    assert option_values(demo[0]["argv"])["--out"] == [f"{art}/data/digits"]
    assert not marker.exists()


def test_old_spellings_pass_their_value_raw_too(tmp_path):
    marker = tmp_path / "make-expanded-it"
    value = hostile("LAYERS", marker)
    (call,) = run_make(tmp_path, "finetune", f"LAYERS={value}", f"AUG_VIEWS={value}")
    got = option_values(call["argv"])
    assert got["--unfreeze"] == [value] and got["--aug-copies"] == [value]
    (call,) = run_make(tmp_path, "head", f"AUTO_CV={value}", "FLOAT16=1")
    got = option_values(call["argv"])
    assert got["--cv"] == [value] and got["--storage"] == ["float16"]
    assert not marker.exists()


def test_py_chooses_the_interpreter(tmp_path):
    venv = fake_venv(tmp_path)
    other = tmp_path / "my python"  # a path with a space
    other.write_bytes((venv / "bin" / "python").read_bytes())
    other.chmod(0o755)
    (venv / "bin" / "python").unlink()  # only PY= can run now
    (call,) = run_make(tmp_path, "report", f"PY={other}")
    assert call["argv"][:3] == ["-m", "pipeline", "report"]


def test_unset_optional_variables_pass_no_option(tmp_path):
    (call,) = run_make(tmp_path, "predict")
    assert call["argv"] == ["-m", "pipeline", "predict", "--batch-size", "32",
                            "--artifacts", "artifacts"]  # fmt: skip


def test_protocol_passes_head_and_seeds_only_when_given(tmp_path):
    # make's HEAD default (all) is make head's; the protocols default to svm,logreg.
    (call,) = run_make(tmp_path, "protocol", "TRAIN_PER_CLASS=30")
    assert "--head" not in call["argv"] and "--seeds" not in call["argv"]
    assert option_values(call["argv"])["--train-per-class"] == ["30"]


def test_features_passes_the_split_options_only_when_given(tmp_path):
    # unset: the stratified split (or the split folders); set: the cache's split comes from them
    (call,) = run_make(tmp_path, "features")
    assert "--train-per-class" not in call["argv"] and "--split-file" not in call["argv"]
    (call,) = run_make(tmp_path, "features", "SPLIT_FILE=lists/a b.csv")
    assert option_values(call["argv"])["--split-file"] == ["lists/a b.csv"]
    (call,) = run_make(tmp_path, "features", "TRAIN_PER_CLASS=30", "SEED=1")
    got = option_values(call["argv"])
    assert got["--train-per-class"] == ["30"] and got["--seed"] == ["1"]


def test_metric_is_passed_only_when_given_each_command_keeping_its_own_default(tmp_path):
    # make head's default is accuracy, the protocols' balanced_accuracy: the CLI holds both.
    for target in ("head", "protocol", "curve"):
        (call,) = run_make(tmp_path, target)
        assert "--metric" not in call["argv"], target
    (call,) = run_make(tmp_path, "head", "METRIC=macro_f1")
    assert option_values(call["argv"])["--metric"] == ["macro_f1"]


def test_make_shows_the_command_with_its_values_ready_to_paste(tmp_path):
    import shlex

    venv = fake_venv(tmp_path)
    done = subprocess.run(
        ["make", "--no-print-directory", "-f", str(REPO / "Makefile"), "-o",
         f"{venv}/.installed", f"VENV={venv}",  # no "Entering directory" under `make test`
         "predict", "MODEL=my model.json", "IMAGES=new;photos", "OUT=$(shell id)"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    shown, called = done.stdout.splitlines()
    assert "ARG_" not in shown  # the values, not the variables that carry them
    assert shlex.split(shown) == [f"{venv}/bin/python", *json.loads(called)["argv"]]
