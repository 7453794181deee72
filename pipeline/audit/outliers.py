"""Outliers: images far from every other image in feature space.

Each image's score is its mean cosine distance to its ``K`` nearest other images (exact
copies of it excluded, so a placeholder saved twice still stands out). An image is listed
when its score is more than ``Z`` robust standard deviations above the median score
(median absolute deviation, times 1.4826), the rule of Iglewicz and Hoaglin.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.audit.neighbours import Neighbours

K = 5
Z = 3.5


def outlier_scores(neighbours: Neighbours, exact: Sequence[Sequence[int]] = ()) -> np.ndarray:
    """Mean cosine distance to the ``K`` nearest neighbours that are not exact copies."""
    twin = {}
    for group in exact:
        for i in group:
            twin[i] = set(group)
    n, k = neighbours.index.shape
    scores = np.empty(n)
    for i in range(n):
        sims = neighbours.similarity[i]
        if i in twin:
            sims = sims[[j not in twin[i] for j in neighbours.index[i]]]
        sims = sims[: min(K, k)]
        scores[i] = 1.0 - float(np.mean(sims)) if len(sims) else 0.0
    return scores


def flag_outliers(scores: np.ndarray) -> tuple[np.ndarray, float]:
    """Indices whose score passes the robust fence, highest first, and the fence."""
    median = float(np.median(scores))
    mad = float(np.median(np.abs(scores - median))) * 1.4826
    fence = median + Z * max(mad, 1e-6)
    flagged = np.flatnonzero(scores > fence)
    return flagged[np.argsort(-scores[flagged], kind="stable")], fence
