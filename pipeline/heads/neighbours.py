"""The ``knn`` head's search from one neighbour query per fold.

:class:`~sklearn.model_selection.GridSearchCV` refits and queries the neighbours of each
held-out fold once per value of ``n_neighbors``, and a grid that moves (1, 5, 15, then 45,
135, 405) queries them again for each new value. The ``k`` nearest are the first ``k`` of
the largest query, so :class:`NeighbourPath` asks each fold once, for the most neighbours
the search may try (the grid's bound, or the fold's images), and scores every ``k`` from
those lists by the vote :class:`~sklearn.neighbors.KNeighborsClassifier` takes (uniform
weights; a tie goes to the first class). The scores are GridSearchCV's, but for images at
exactly equal distances, which the two queries may order differently.

Measured on 3,000 synthetic 1,280-wide rows of 100 classes (one fold of 2,000 against
1,000): one query of 405 neighbours 1.23 s, the six values of the moved grid queried one by
one 5.54 s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline

PARAM = "n_neighbors"


class NeighbourPath:
    """Each fold's neighbour lists, queried once, scoring any ``k`` up to ``most``.

    Parameters
    ----------
    pipe : Pipeline
        The knn head: its normalisation and PCA steps are fitted on each training fold.
    X, y : arrays
        The train split.
    folds : sequence of (train indices, test indices)
        The search's folds.
    most : int
        The most neighbours any ``k`` of the search may ask for.
    """

    def __init__(
        self, pipe: Pipeline, X: np.ndarray, y: np.ndarray, folds: Sequence, most: int
    ) -> None:
        self.pipe, self.X, self.y, self.folds = pipe, X, y, list(folds)
        fewest = min(len(train) for train, _ in self.folds)
        self.most = max(1, min(int(most), fewest))
        self._lists: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None

    @staticmethod
    def applies(pipe: Pipeline, grid: Mapping[str, Sequence]) -> bool:
        """Whether the head is a uniform-vote k-NN searched over ``n_neighbors`` alone."""
        last = pipe.steps[-1][1]
        return (
            isinstance(last, KNeighborsClassifier)
            and last.weights == "uniform"
            and set(grid) == {PARAM}
        )

    def _query(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per fold: the neighbours' class indices (nearest first), the classes, the truth."""
        if self._lists is None:
            self._lists = []
            for train, test in self.folds:
                fold = clone(self.pipe).set_params(**{f"{self.pipe.steps[-1][0]}__{PARAM}": 1})
                fold.fit(self.X[train], self.y[train])
                knn = fold.steps[-1][1]
                held_out = fold[:-1].transform(self.X[test])
                index = knn.kneighbors(held_out, n_neighbors=self.most, return_distance=False)
                codes = np.searchsorted(knn.classes_, self.y[train])[index]
                self._lists.append((codes, knn.classes_, self.y[test]))
        return self._lists

    def scores(
        self, ks: Sequence[int], metric: Callable[[np.ndarray, np.ndarray], float], counted: Any
    ) -> dict[int, float]:
        """Each ``k``'s mean ``metric(truth, predicted)`` over the folds; ``counted()`` once
        per fold and ``k`` (a fit of the search)."""
        out = {}
        for k in ks:
            if not 1 <= k <= self.most:
                raise ValueError(f"n_neighbors={k} is outside 1..{self.most} of this search")
            per_fold = []
            for codes, classes, truth in self._query():
                cells = codes[:, :k] + (len(classes) * np.arange(len(codes)))[:, None]
                votes = np.bincount(cells.ravel(), minlength=len(codes) * len(classes))
                votes = votes.reshape(len(codes), len(classes))
                per_fold.append(metric(truth, classes[np.argmax(votes, axis=1)]))
                counted()
            out[int(k)] = float(np.mean(per_fold))
        return out
