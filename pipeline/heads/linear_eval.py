"""The linear-evaluation protocol of Kornblith et al. (2019) and CLIP (Radford et al., 2021).

``HEAD=linear_eval`` in ``make protocol`` and ``make curve``: multinomial logistic
regression (scikit-learn's L-BFGS, at most 1,000 iterations, as CLIP) on the raw
features (no standardisation or normalisation, as CLIP's description and published
example), its C chosen on a stratified 20% of the training rows held out (Kornblith et
al.'s "minival") from a wide log grid, then refitted on ALL the training rows with that
C. Only the training rows a protocol gives are ever seen here: the test rows reach
neither the choice nor the refit.

This is not ``make probe`` (a quick check of one cache) nor ``HEAD=logreg`` (C chosen by
k-fold cross-validation over a narrow grid that moves past its edge).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from pipeline.heads import scoring

NAME = "linear_eval"
# 12 values, one a decade, over the range Kornblith et al. searched (1e-6 to 1e5; they
# used 45 values, CLIP 96 found by bisection): a decade is fine enough for a linear probe
# and keeps a sweep to a dozen fits.
C_GRID: tuple[float, ...] = tuple(float(c) for c in np.logspace(-6, 5, 12))
HOLD_OUT = 0.2  # of each class's training rows, Kornblith et al.'s minival
MAX_ITER = 1000  # CLIP's
FIXED_C = 1.0  # a class with a single training row leaves nothing to hold out


def _model(c: float, seed: int, warm: bool = False) -> LogisticRegression:
    return LogisticRegression(
        C=c, solver="lbfgs", max_iter=MAX_ITER, random_state=seed, warm_start=warm
    )


def held_out_rows(y: np.ndarray, seed: int, fraction: float = HOLD_OUT) -> np.ndarray:
    """A boolean mask of the rows held out: ``fraction`` of each class (at least one, and
    always leaving one to fit), drawn by ``seed``."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        rows = np.flatnonzero(y == label)
        count = min(max(1, round(fraction * len(rows))), len(rows) - 1)
        mask[rng.choice(rows, size=count, replace=False)] = True
    return mask


def fit_linear_eval(
    X: np.ndarray, y: np.ndarray, seed: int, *, metric: str = "balanced_accuracy"
) -> tuple[LogisticRegression, dict[str, Any], str]:
    """``(refitted model, {"C": chosen, "held_out": {C: score}}, scheme)`` on ``(X, y)``,
    the training rows only.

    Each C of :data:`C_GRID`, smallest first, is fitted on 80% of each class's rows
    (warm-started from the previous C: the same optimum, far fewer iterations) and scored
    on the other 20% by ``metric`` (balanced accuracy by default); the best (the smaller C on a tie) is refitted
    on all of ``(X, y)``. A class with one training row leaves nothing to hold out:
    C = :data:`FIXED_C`, fitted on all rows.
    """
    counts = np.bincount(y)[np.unique(y)]
    if counts.min() < 2:
        model = _fit(_model(FIXED_C, seed), X, y)
        return model, {"C": FIXED_C}, "fixed C=1 (a class has one training image)"
    held = held_out_rows(y, seed)
    sweep, scores, solutions = _model(C_GRID[0], seed, warm=True), {}, {}
    for c in C_GRID:
        sweep.set_params(C=c)
        _fit(sweep, X[~held], y[~held])
        scores[c] = scoring.score(metric, y[held], sweep.predict(X[held]))
        solutions[c] = (sweep.coef_.copy(), sweep.intercept_.copy())
    best = max(C_GRID, key=lambda c: (scores[c], -c))
    # The refit starts from the sweep's solution at the chosen C: the same optimum (the
    # problem is convex), a third of the iterations of a cold start.
    model = _model(best, seed, warm=True)
    model.coef_, model.intercept_ = solutions[best]
    model = _fit(model, X, y)
    model.set_params(warm_start=False)
    scheme = (
        f"C from {len(C_GRID)} values {C_GRID[0]:g}..{C_GRID[-1]:g} on a held-out "
        f"{HOLD_OUT:.0%} of train ({int(held.sum())} rows), refitted on all {len(y)}"
    )
    return model, {"C": best, "held_out": {f"{c:g}": s for c, s in scores.items()}}, scheme


def _fit(model: LogisticRegression, X: np.ndarray, y: np.ndarray) -> LogisticRegression:
    # Nearly unregularised fits (C >= 1e3) on separable features may stop at MAX_ITER, as
    # they do in the papers' sweeps; the held-out score judges them, not the warning.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(X, y)
