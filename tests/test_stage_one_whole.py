"""make bench-stage-one's pure parts: the heads' noise rows (the benchmark itself is real data)."""

from __future__ import annotations

from pipeline.benchmarks.stage_one_whole import fixed_grid, largest_differences
from pipeline.heads.registry import parse_grid


def test_fixed_grid_holds_each_searched_head_at_its_chosen_values():
    row = {
        "svm": {"val": 144, "params": {"C": 1.0}},
        "knn": {"val": 140, "params": {"n_neighbors": 5}},
        "softmax": {"val": 143, "params": {"learning_rate": 0.001}},  # not searched
    }
    grid = fixed_grid(row)
    assert grid == {"svm": {"C": [1.0]}, "knn": {"n_neighbors": [5]}}
    assert parse_grid(grid) == {"svm": {"C": (1.0,)}, "knn": {"n_neighbors": (5,)}}


def test_largest_differences_are_against_the_first_row_in_either_direction():
    rows = {
        "float32": {"svm": {"val": 144}, "knn": {"val": 140}},
        "float32, seed 1": {"svm": {"val": 144}, "knn": {"val": 143}},
        "int8": {"svm": {"val": 142}, "knn": {"val": 141}},
    }
    assert largest_differences(rows) == {"float32, seed 1": 3, "int8": 2}
