"""The command line in process (``pipeline.cli.main.main``): what the user reads in the terminal."""

from __future__ import annotations

import argparse
import importlib
import json

import pytest
from conftest import make_folder

import pipeline
from pipeline.cli.main import fill_make_hints, main, make_command
from pipeline.cli.options import RANDOM_WEIGHTS_WARNING


def _error(capsys) -> str:
    """The one line a user error prints."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err.strip()


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"python -m pipeline {pipeline.__version__}"


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("features", ["(default: mobilenet_v2)", "{avg,max,flatten}", "(default: 0.2)"]),
        ("head", ["(default: all)", "(default: 3)", "{l2,standard,none}", "(default: 0)"]),
        ("predict", ["(default: 32)", "(make: MODEL=)", "(make: IMAGES=)"]),
        ("finetune", ["(default: block)", "(default: 1e-05)", "{horizontal,vertical"]),
        ("report", ["(default: 2000)", "(default: artifacts)"]),
    ],
)
def test_help_shows_defaults_and_choices(capsys, command, shown):
    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # unwrap argparse's line breaks
    for words in shown:
        assert words in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_predict_without_model_or_images_names_the_make_variables(tmp_path, capsys):
    art = tmp_path / "art"
    assert main(["predict", "--artifacts", str(art)]) == 2
    err = _error(capsys)
    assert "make predict needs MODEL= (--model" in err and "and IMAGES= (--images" in err
    assert f"there is no model under {art} yet: fit one with `make head" in err

    head = art / "heads" / "flowers" / "vgg16_224_avg_imagenet" / "svm.json"
    head.parent.mkdir(parents=True)
    head.write_text(json.dumps({"kind": "head"}))
    assert main(["predict", "--images", "new photos", "--artifacts", str(art)]) == 2
    err = _error(capsys)
    assert "IMAGES=" not in err.split(", e.g.")[0]  # only the missing one is named
    assert err.endswith(f"e.g. `make predict MODEL={head} IMAGES='new photos' ARTIFACTS={art}`")


def test_run_first_hints_are_commands_with_the_users_variables(tmp_path, capsys):
    photos, art = tmp_path / "photos", tmp_path / "art"
    photos.mkdir()
    argv = ["--data", str(photos), "--backbone", "vgg16", "--artifacts", str(art)]
    assert main(["head", *argv, "--pooling", "max"]) == 2
    assert _error(capsys).endswith(
        f"run `make features DATA={photos} BACKBONE=vgg16 POOLING=max ARTIFACTS={art}` first"
    )
    assert main(["report", "--data", str(photos), "--artifacts", str(art)]) == 2
    assert _error(capsys).endswith(f"run `make head DATA={photos} ARTIFACTS={art}` first")


def test_make_hints_keep_their_own_values_and_fill_placeholders():
    args = argparse.Namespace(data="my data", backbone="resnet50", weights="none", storage="float16",
                              seed=3, input_size=None, artifacts="artifacts")  # fmt: skip
    assert make_command("features", args) == (
        "make features DATA='my data' BACKBONE=resnet50 WEIGHTS=none STORAGE=float16 SEED=3"
    )
    assert fill_make_hints("stale; re-run `make head HEAD=svm` now", args) == (
        "stale; re-run `make head DATA='my data' BACKBONE=resnet50 WEIGHTS=none STORAGE=float16 "
        "SEED=3 HEAD=svm` now"
    )
    assert fill_make_hints("use `make features POOLING=avg` and `make report DATA=...`", args) == (
        "use `make features DATA='my data' BACKBONE=resnet50 WEIGHTS=none STORAGE=float16 SEED=3 "
        "POOLING=avg` and `make report DATA='my data'`"
    )
    assert fill_make_hints("no hint here", args) == "no hint here"
    # a command run on a cache file does not know the image folder: a placeholder says so
    assert make_command("features", argparse.Namespace(cache="x.h5")) == (
        "make features DATA=path/to/images"
    )


def test_random_weights_warn_and_features_say_what_they_found(tmp_path, capsys):
    assert main(["features", "--data", str(tmp_path / "missing"), "--weights", "none"]) == 2
    out, err = capsys.readouterr()
    assert out.strip() == RANDOM_WEIGHTS_WARNING and "does not exist" in err

    data = make_folder(tmp_path / "colours", per_class=5, classes=("red", "blue"))
    argv = ["features", "--data", str(data), "--weights", "none", "--input-size", "32",
            "--quiet", "--artifacts", str(tmp_path / "art"), "--test-fraction", "0"]  # fmt: skip
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == RANDOM_WEIGHTS_WARNING
    assert lines[1] == f"found 10 images of 2 classes (blue, red) in {data}"
    assert lines[2] == (
        "  split: train 8, val 2 (stratified by class, SEED=0, VAL_FRACTION=0.2, TEST_FRACTION=0)"
    )
    assert lines[3].startswith("runtime: keras")  # random weights: the Keras runtime, said
    assert lines[-1].startswith("built ")


def test_describe_folder_with_split_folders(tmp_path):
    from pipeline.data.folders import describe_folder, scan_folder

    make_folder(tmp_path / "data" / "train", per_class=3, classes=("red", "blue"))
    make_folder(tmp_path / "data" / "val", per_class=1, classes=("red", "blue"))
    text = describe_folder(scan_folder(tmp_path / "data"))
    assert text.splitlines()[1] == "  split: train 6, val 2 (from the split folders train/, val/)"


def test_usage_errors_return_2_in_process(capsys, monkeypatch):
    monkeypatch.delenv("PIPELINE_FROM_MAKE", raising=False)
    assert main([]) == 2
    assert "required: command (see `python -m pipeline --help`)" in _error(capsys)
    assert main(["predict", "--batch-size", "many"]) == 2
    assert _error(capsys) == (
        "error: --batch-size must be a whole number; got 'many' "
        "(see `python -m pipeline predict --help`)"
    )


@pytest.mark.parametrize(
    ("argv", "from_make", "direct"),
    [
        (["finetune", "--data", "x", "--epochs", "many"], "EPOCHS= must be a whole number; got "
         "'many'", "--epochs must be a whole number; got 'many'"),
        (["features", "--data", "x", "--val-fraction", ""], "VAL_FRACTION= must be a number; "
         "got ''", "--val-fraction must be a number; got ''"),
        (["finetune", "--data", "x", "--restart", "maybe"], "RESTART= must be 1 or 0; got "
         "'maybe'", "--restart must be 1 or 0; got 'maybe'"),
        (["features", "--data", "x", "--input-size", "big"], "INPUT_SIZE= must be a whole "
         "number (or empty for the default); got 'big'", "--input-size must be a whole number"),
        (["predict", "--batch-size", "0.5"], "BATCH= must be a whole number; got '0.5'",
         "--batch-size must be"),
        (["bench-features", "--data", "x", "--images", "lots"], "N= must be a whole number; "
         "got 'lots'", "--images must be"),
        (["probe", "--data", "x", "--layers"], "PROBE_LAYERS= needs a value", "--layers needs"),
    ],
)  # fmt: skip
def test_a_bad_value_is_one_line_naming_the_make_variable_or_the_option(
    capsys, monkeypatch, argv, from_make, direct
):
    monkeypatch.setenv("PIPELINE_FROM_MAKE", "1")
    assert main(argv) == 2
    assert _error(capsys) == f"error: {from_make}"
    monkeypatch.delenv("PIPELINE_FROM_MAKE")
    assert main(argv) == 2
    err = _error(capsys)
    assert err.startswith(f"error: {direct}") and err.endswith(f" {argv[0]} --help`)")
    assert "usage:" not in err


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_a_keras_backend_that_is_not_installed_is_one_line(capsys, monkeypatch, backend):
    cli = importlib.import_module("pipeline.cli.main")

    def missing(args):  # what `import keras` raises under KERAS_BACKEND=jax without JAX
        raise ModuleNotFoundError(f"No module named '{backend}'", name=backend)

    monkeypatch.setattr(cli, "cmd_backbones", missing)
    monkeypatch.setenv("KERAS_BACKEND", backend)
    assert main(["backbones"]) == 2
    err = _error(capsys)
    assert f"KERAS_BACKEND={backend}, but {backend} is not installed" in err
    assert f"-m pip install {backend}`) or unset KERAS_BACKEND" in err
    monkeypatch.delenv("KERAS_BACKEND")  # another missing module is a bug: its traceback stays
    with pytest.raises(ModuleNotFoundError):
        main(["backbones"])


def test_an_unknown_keras_backend_is_one_line(capsys, monkeypatch):
    cli = importlib.import_module("pipeline.cli.main")

    def unknown(args):
        raise ValueError("Unable to import backend : nope")

    monkeypatch.setattr(cli, "cmd_backbones", unknown)
    monkeypatch.setenv("KERAS_BACKEND", "nope")
    assert main(["backbones"]) == 2
    assert "KERAS_BACKEND='nope' is not a Keras backend" in _error(capsys)
