"""make auto (pipeline.recipes.auto): the choice reads cross-validation on train only."""

from __future__ import annotations

import numpy as np
from test_joins import write_cache

from pipeline.recipes import auto
from pipeline.recipes.auto import Candidate, choose, fit_recipe_heads


def _candidate(recipe, head, cv, val, test):
    return Candidate(recipe, head, cv, None, {"metrics": {"val": val, "test": test}})


def test_choose_reads_only_cv():
    default = _candidate("default", "logreg", 0.90, 0.90, 0.90)
    only_test = _candidate("flip", "svm", 0.89, 0.99, 1.00)  # better on val and test only
    assert choose([default, only_test]) is default
    tie = _candidate("224+320", "svm", 0.90, 1.0, 1.0)
    assert choose([default, tie]) is default  # ties to the earlier, simpler recipe
    better = _candidate("mid+last", "svm", 0.91, 0.5, 0.5)
    assert choose([default, only_test, better]) is better


def test_a_recipe_better_only_on_test_is_never_chosen(tmp_path):
    """Real heads on two caches: B separates only the test images; A is chosen."""
    rng = np.random.default_rng(0)
    n_train, n_test = 40, 20
    y = np.r_[np.arange(n_train) % 2, np.arange(n_test) % 2]
    split = ["train"] * n_train + ["test"] * n_test
    paths = [f"{'ab'[c]}/{i}.png" for i, c in enumerate(y)]
    signal = np.where(y[:, None] == 1, 1.0, -1.0)
    a = rng.normal(0, 1, (len(y), 4)) + 0.8 * signal  # informative everywhere
    b = rng.normal(0, 1, (len(y), 4))
    b[n_train:] += 5 * signal[n_train:]  # informative on test only
    ca = write_cache(tmp_path / "feat" / "a.h5", paths, y, split, a)
    cb = write_cache(tmp_path / "feat" / "b.h5", paths, y, split, b)
    art = tmp_path / "art"
    found = fit_recipe_heads("A", ca, heads=("svm",), cv=3, artifacts_dir=art)
    found += fit_recipe_heads("B", cb, heads=("svm",), cv=3, artifacts_dir=art)
    a_test = found[0].manifest["metrics"]["test"]["accuracy"]
    b_test = found[1].manifest["metrics"]["test"]["accuracy"]
    assert b_test > a_test  # B really is better on test ...
    assert choose(found).recipe == "A"  # ... and is not chosen
    figures = auto.held_out_figures(choose(found), n_resamples=200)
    assert figures["test"]["ci95"][0] <= figures["test"]["accuracy"] <= figures["test"]["ci95"][1]
    # A second call reuses the fitted head (same cache, CV and seed): no new manifest time.
    again = fit_recipe_heads("A", ca, heads=("svm",), cv=3, artifacts_dir=art)
    assert again[0].manifest["created"] == found[0].manifest["created"]


def test_recipes_are_documented():
    names = [r.name for r in auto.RECIPES]
    assert names[0] == "default" and auto.RECIPES[0].parts == ({},)
    assert len(set(names)) == len(names)
    assert auto.larger_scale(224) == 320
    for recipe in auto.RECIPES:
        assert recipe.name in auto.__doc__
