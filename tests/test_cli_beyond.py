"""pipeline.cli_beyond: probe, auto and bench-finetune are thin calls of their functions."""

from __future__ import annotations

import pytest

import pipeline.auto
import pipeline.benchmarks
import pipeline.probe
from pipeline.cli import main
from pipeline.cli_options import RANDOM_WEIGHTS_WARNING


@pytest.fixture
def calls(monkeypatch) -> list[tuple[str, tuple, dict]]:
    """Each public function the commands call, replaced by a recorder."""
    seen: list[tuple[str, tuple, dict]] = []
    for module, name in (
        (pipeline.probe, "run_probe"),
        (pipeline.auto, "run_auto"),
        (pipeline.benchmarks, "bench_finetune"),
    ):
        monkeypatch.setattr(module, name, lambda *a, _n=name, **k: seen.append((_n, a, k)))
    return seen


def test_probe_auto_and_bench_finetune_pass_their_options_through(calls, capsys):
    common = ["--data", "photos", "--backbone", "vgg16", "--weights", "none", "--seed", "3"]
    assert main(["probe", *common, "--layers", "block3_pool, block4_pool", "--cv", "4"]) == 0
    assert main(["auto", *common, "--no-report", "--quiet"]) == 0
    bench = ["bench-finetune", "--data", "photos", "--input-size", "64", "--aug-views", "2"]
    assert main(bench) == 0

    (probe, p_args, p_kw), (auto, a_args, a_kw), (fine, f_args, f_kw) = calls
    assert (probe, p_args[0], p_args[1].backbone, p_args[1].weights) == (
        "run_probe", "photos", "vgg16", "none",
    )  # fmt: skip
    assert p_kw["layers"] == ["block3_pool", "block4_pool"] and p_kw["folds"] == 4
    assert p_kw["split"].seed == 3 and p_kw["seed"] == 3
    assert (auto, a_args[0], a_kw["cv"], a_kw["report"], a_kw["progress"]) == (
        "run_auto", "photos", 5, False, False,
    )  # fmt: skip
    assert fine == "bench_finetune" and f_args == ("photos",)
    assert (f_kw["input_size"], f_kw["aug_views"], f_kw["n_images"]) == (64, 2, 256)
    assert RANDOM_WEIGHTS_WARNING not in capsys.readouterr().out  # probe and auto do not warn
