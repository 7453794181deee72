"""The sweep of `make head`: GRID=, grids that move, fit counts that move, reuse and FORCE."""

from __future__ import annotations

import os

import pytest
from heads_helpers import synthetic_cache

from pipeline.core.errors import HeadError
from pipeline.heads import fit as head_fit
from pipeline.heads.fit import fit_heads, grid_move_lines
from pipeline.heads.registry import parse_grid


def test_grid_parses_heads_params_and_values():
    grid = parse_grid("svm:C=0.01,0.1,1; logreg:c=1e-3,1e-2;knn:n_neighbors=3,1,3")
    assert grid == {"svm": {"C": (0.01, 0.1, 1.0)}, "logreg": {"C": (1e-3, 1e-2)},
                    "knn": {"n_neighbors": (1, 3)}}  # fmt: skip
    assert parse_grid({"ridge": {"alpha": [5, 50]}}) == {"ridge": {"alpha": (5.0, 50.0)}}
    assert parse_grid(None) == parse_grid("") == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("svm-C=1", "GRID entry 'svm-C=1' is not head:param=values; e.g. GRID="),
        ("svn:C=1", "unknown head 'svn'; did you mean svm"),
        ("svm:gamma=1", "GRID: svm has no grid parameter 'gamma' (its grid: C)"),
        ("svm:C=1,ten", "GRID: svm:C value 'ten' is not a positive number"),
        ("svm:C=-1", "GRID: svm:C value '-1' is not a positive number"),
        ("knn:n_neighbors=2.5", "GRID: knn:n_neighbors value '2.5' is not a whole number"),
        ("softmax:learning_rate=0.1", "GRID: softmax is not searched"),
        ("svm:C=,", "GRID: svm:C has no values"),
    ],
)
def test_a_bad_grid_is_one_line_that_says_how_to_write_it(text, message):
    with pytest.raises(HeadError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        parse_grid(text)


def test_cli_grid_error_is_one_line_with_status_2(tmp_path, capsys):
    from pipeline.cli.main import main

    cache = synthetic_cache(tmp_path)
    argv = ["head", "--cache", str(cache), "--head", "ridge", "--artifacts", str(tmp_path)]
    assert main([*argv, "--grid", "svm:C=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "GRID names svm, which HEAD=ridge does not fit" in err and "\n" not in err
    assert not (tmp_path / "heads").exists()


def test_a_head_fitted_with_the_same_cache_and_options_is_reused_and_force_refits(tmp_path):
    cache = synthetic_cache(tmp_path / "c")
    art = tmp_path / "art"
    (first,) = fit_heads(cache, "ridge", artifacts_dir=art)
    stamp = first.manifest_path.stat().st_mtime_ns
    lines: list[str] = []
    (again,) = fit_heads(cache, "ridge", artifacts_dir=art, log=lines.append)
    assert again.reused and again.manifest == first.manifest
    assert first.manifest_path.stat().st_mtime_ns == stamp  # nothing rewritten
    assert any("reused 1 head" in line and "FORCE=1" in line for line in lines)
    (forced,) = fit_heads(cache, "ridge", artifacts_dir=art, force=True)
    assert not forced.reused and forced.manifest["created"] >= first.manifest["created"]
    (other,) = fit_heads(cache, "ridge", artifacts_dir=art, grid="ridge:alpha=1,10")
    assert not other.reused and other.manifest["grid"] == {"alpha": [1.0, 10.0]}
    assert other.manifest["grid_source"] == "GRID"


def test_a_changed_cache_or_a_damaged_head_file_is_refitted(tmp_path):
    cache = synthetic_cache(tmp_path / "c")
    art = tmp_path / "art"
    (first,) = fit_heads(cache, "ridge", artifacts_dir=art)
    later = first.manifest_path.stat().st_mtime + 5
    os.utime(cache, (later, later))  # the cache rebuilt
    (rebuilt,) = fit_heads(cache, "ridge", artifacts_dir=art)
    assert not rebuilt.reused
    (rebuilt.manifest_path.parent / "ridge.skops").write_bytes(b"damaged")
    (again,) = fit_heads(cache, "ridge", artifacts_dir=art)
    assert not again.reused


def test_fit_counts_move_during_a_search(tmp_path, monkeypatch):
    monkeypatch.setattr(head_fit, "PROGRESS_EVERY", 0.0)
    cache = synthetic_cache(tmp_path)
    lines: list[str] = []
    fit_heads(
        cache, "ridge,knn", artifacts_dir=tmp_path, log=lines.append, grid="knn:n_neighbors=1"
    )
    counts = [line.split("]")[0] for line in lines if line.startswith("[fits ")]
    assert counts[:3] == ["[fits 0/14", "[fits 1/14", "[fits 2/14"]
    assert "[fits 10/14" in counts  # knn starts after ridge's 10 fits


def test_a_moved_grid_is_one_line_in_the_terminal():
    manifest = {
        "name": "svm",
        "params": {"C": 100.0},
        "grid_moves": {"C": {"from": [0.1, 1.0, 10.0], "searched": [0.1, 1.0, 10.0, 100.0, 1000.0],
                             "direction": "up", "stopped": "inside"}},
    }  # fmt: skip
    (line,) = grid_move_lines(manifest)
    assert line.startswith("svm: C grid moved up past 10 to 100, 1000 (the best, 100, is now")


def test_all_leaves_out_a_head_that_cannot_scale_in_one_line_and_naming_it_keeps_it():
    from pipeline.heads.registry import HEADS, named_heads

    lines: list[str] = []
    kept = head_fit._scalable(("svm", "rbf_svm"), named_heads("all"), 30_000, lines.append)
    assert kept == ("svm",) and HEADS["rbf_svm"].max_rows == 10_000
    assert lines == [
        "rbf_svm left out: 30,000 train images is more than the 10,000 it searches in "
        "reasonable time; HEAD=rbf_svm fits it anyway"
    ]
    assert head_fit._scalable(("rbf_svm",), named_heads("all,rbf_svm"), 30_000, print) == (
        "rbf_svm",
    )
    assert head_fit._scalable(("rbf_svm",), set(), 3_000, print) == ("rbf_svm",)
