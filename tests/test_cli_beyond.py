"""pipeline.cli.beyond: probe, auto and bench-finetune are thin calls of their functions."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

import pipeline.cli.beyond
from pipeline.cli.main import main
from pipeline.cli.options import RANDOM_WEIGHTS_WARNING

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def calls(monkeypatch) -> list[tuple[str, tuple, dict]]:
    """Each public function the commands call, replaced by a recorder."""
    seen: list[tuple[str, tuple, dict]] = []
    for module, name in (
        (pipeline.cli.beyond, "run_probe"),
        (pipeline.cli.beyond, "run_auto"),
        (pipeline.cli.beyond, "bench_finetune"),
    ):
        monkeypatch.setattr(module, name, lambda *a, _n=name, **k: seen.append((_n, a, k)))
    return seen


def test_probe_auto_and_bench_finetune_pass_their_options_through(calls, capsys):
    common = ["--data", "photos", "--backbone", "vgg16", "--weights", "none", "--seed", "3"]
    assert main(["probe", *common, "--layers", "block3_pool, block4_pool", "--cv", "4"]) == 0
    assert main(["auto", *common, "--no-report", "--quiet"]) == 0
    bench = ["bench-finetune", "--data", "photos", "--input-size", "64", "--aug-copies", "2"]
    assert main(bench) == 0

    (probe, p_args, p_kw), (auto, a_args, a_kw), (fine, f_args, f_kw) = calls
    assert (probe, p_args[0], p_args[1].backbone, p_args[1].weights) == (
        "run_probe", "photos", "vgg16", "none",
    )  # fmt: skip
    assert p_kw["layers"] == ["block3_pool", "block4_pool"] and p_kw["folds"] == 4
    assert p_kw["split"].seed == 3 and p_kw["seed"] == 3
    assert (auto, a_args[0], a_kw["cv"], a_kw["report"], a_kw["progress"]) == (
        "run_auto", "photos", 3, False, False,
    )  # fmt: skip
    assert fine == "bench_finetune" and f_args == ("photos",)
    assert (f_kw["input_size"], f_kw["aug_copies"], f_kw["n_images"]) == (64, 2, 256)
    assert RANDOM_WEIGHTS_WARNING not in capsys.readouterr().out  # probe and auto do not warn


def test_the_old_spellings_still_work_and_say_the_new_one(calls, capsys, monkeypatch):
    import pipeline.cli.beyond as beyond

    seen = []
    result = SimpleNamespace(format=lambda notes: "done")
    monkeypatch.setattr(
        beyond, "finetune", lambda data, config, **kw: seen.append(config) or result
    )
    monkeypatch.setattr(beyond.FinetuneConfig, "validate", lambda self: None)
    args = ["--data", "photos", "--weights", "none", "--quiet"]
    assert main(["finetune", *args, "--layers", "2", "--aug-views", "3"]) == 0
    out = capsys.readouterr().out
    assert "note: --layers is now --unfreeze 2; write that instead" in out
    assert "note: --aug-views is now --aug-copies 3; write that instead" in out
    assert (seen[0].unfreeze, seen[0].aug_copies) == ("2", 3)

    assert main(["bench-finetune", "--data", "photos", "--aug-views", "3"]) == 0
    assert "note: --aug-views is now --aug-copies 3" in capsys.readouterr().out
    assert calls[-1][2]["aug_copies"] == 3


def test_make_old_spellings_warn_and_set_the_new_variables(tmp_path):
    from make_helpers import run_make_with_stderr

    (call,), err = run_make_with_stderr(tmp_path, "finetune", "LAYERS=2", "AUG_VIEWS=3")
    assert "LAYERS=2 is now UNFREEZE=2; write that instead" in err
    assert "AUG_VIEWS=3 is now AUG_COPIES=3; write that instead" in err
    argv = " ".join(call["argv"])
    assert "--unfreeze 2" in argv and "--aug-copies 3" in argv
    (call,), _ = run_make_with_stderr(tmp_path, "probe", "CV=4")
    assert "--cv 4" in " ".join(call["argv"])
    (call,), err = run_make_with_stderr(tmp_path, "auto", "AUTO_CV=6")
    assert "AUTO_CV=6 is now CV=" in err and "--cv 6" in " ".join(call["argv"])
