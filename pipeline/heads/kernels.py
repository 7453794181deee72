"""The ``rbf_svm`` head's search from one kernel matrix per fold.

libsvm computes the RBF kernel itself, entry by entry, again in every fit: a 100-class
fit solves 4,950 one-vs-one problems, each evaluating the kernel among its own images, and
the search fits each fold once per value of ``C``. The kernel depends on the fold only
(``gamma="scale"`` is computed from the fold's training images), so :class:`KernelPath`
computes each fold's kernel matrices once, with matrix products, and fits
``SVC(kernel="precomputed")`` on them for every ``C``: the same optimisation problem and
the same predictions. Only the search uses it; the head that is saved is the usual
``SVC(kernel="rbf")``, refitted on all of train. The matrices are kept while the search
runs, so a search whose kernels would pass :data:`MAX_KERNEL_BYTES` scores as before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.metrics.pairwise import rbf_kernel
from sklearn.pipeline import Pipeline
from sklearn.svm import SVC

PARAM = "C"
MAX_KERNEL_BYTES = 512 * 2**20  # every fold's train and held-out kernels together
# What SVC(kernel="precomputed") takes over from the head's SVC: all but the kernel's own.
_KEPT = ("C", "tol", "shrinking", "cache_size", "class_weight", "max_iter",
         "decision_function_shape", "break_ties", "random_state")  # fmt: skip


class KernelPath:
    """Each fold's RBF kernels, computed once, scoring any ``C``.

    Parameters
    ----------
    pipe : Pipeline
        The rbf_svm head: its normalisation and PCA steps are fitted on each training fold.
    X, y : arrays
        The train split.
    folds : sequence of (train indices, test indices)
        The search's folds.
    """

    def __init__(self, pipe: Pipeline, X: np.ndarray, y: np.ndarray, folds: Sequence) -> None:
        self.pipe, self.X, self.y, self.folds = pipe, X, y, list(folds)
        self._kernels: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] | None = None

    @staticmethod
    def applies(pipe: Pipeline, grid: Mapping[str, Sequence], rows: int, folds: int) -> bool:
        """Whether the head is an RBF SVC searched over ``C`` alone whose folds' kernels fit
        in :data:`MAX_KERNEL_BYTES`."""
        last = pipe.steps[-1][1]
        # Per fold: train (rows (k-1)/k)^2 and held-out (rows/k x rows (k-1)/k), float64.
        train = rows * (folds - 1) / folds
        kernel_bytes = folds * 8 * (train * train + train * rows / folds)
        return (
            isinstance(last, SVC)
            and last.kernel == "rbf"
            and set(grid) == {PARAM}
            and kernel_bytes <= MAX_KERNEL_BYTES
        )

    def _gamma(self, X: np.ndarray) -> float:
        """The head's gamma on a training fold, as SVC computes it (in float64)."""
        gamma = self.pipe.steps[-1][1].gamma
        if gamma == "scale":
            variance = float(np.asarray(X, dtype=np.float64).var())
            return 1.0 / (X.shape[1] * variance) if variance != 0 else 1.0
        if gamma == "auto":
            return 1.0 / X.shape[1]
        return float(gamma)

    def _compute(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """Per fold: the train kernel, the held-out rows' kernel, the train and held-out labels."""
        if self._kernels is None:
            self._kernels = []
            for train, test in self.folds:
                steps = clone(self.pipe[:-1]).fit(self.X[train], self.y[train])
                inside = np.asarray(steps.transform(self.X[train]), dtype=np.float64)
                held_out = np.asarray(steps.transform(self.X[test]), dtype=np.float64)
                gamma = self._gamma(inside)
                self._kernels.append(
                    (
                        rbf_kernel(inside, inside, gamma=gamma),
                        rbf_kernel(held_out, inside, gamma=gamma),
                        self.y[train],
                        self.y[test],
                    )
                )
        return self._kernels

    def scores(
        self, Cs: Sequence[float], metric: Callable[[np.ndarray, np.ndarray], float], counted: Any
    ) -> dict[float, float]:
        """Each ``C``'s mean ``metric(truth, predicted)`` over the folds; ``counted()`` once
        per fold and ``C`` (a fit of the search)."""
        params = self.pipe.steps[-1][1].get_params()
        kept = {key: params[key] for key in _KEPT}
        out = {}
        for C in Cs:
            per_fold = []
            for inside, held_out, y_in, y_out in self._compute():
                svc = SVC(kernel="precomputed", **{**kept, "C": C}).fit(inside, y_in)
                per_fold.append(metric(y_out, svc.predict(held_out)))
                counted()
            out[C] = float(np.mean(per_fold))
        return out
