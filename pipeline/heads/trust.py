"""What a loaded ``.skops`` head may hold: the steps :func:`pipeline.heads.registry.build_head`
makes, forest trees that stay inside themselves, and a neighbour index rebuilt rather than
trusted (used by :func:`pipeline.heads.store.load_head`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from sklearn.pipeline import Pipeline

from pipeline.core.errors import HeadError
from pipeline.heads.registry import HEADS


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def check_skops_head(estimator: Pipeline, file: Path) -> None:
    """Accept only the steps :func:`pipeline.heads.registry.build_head` makes, and make the trusted
    native structures safe to use.

    scikit-learn's Cython code indexes tree nodes and neighbour indexes without
    bounds checks, so a crafted file could make it read outside its arrays:
    forest trees are checked, a neighbour index is rebuilt.

    Raises
    ------
    HeadError
        A step of another type, or a forest tree whose nodes point outside it.
    """
    from sklearn.decomposition import PCA
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import Normalizer, StandardScaler
    from sklearn.tree import DecisionTreeClassifier

    classifiers = {type(spec.estimator(0)) for spec in HEADS.values()}
    try:
        *transforms, last = [step for _, step in estimator.steps]
    except (TypeError, ValueError):
        raise HeadError(f"head file {file} holds a pipeline without steps; refused") from None
    odd = [
        type(step).__name__
        for step in transforms
        if step not in (None, "passthrough") and type(step) not in (Normalizer, StandardScaler, PCA)
    ]
    if type(last) not in classifiers:
        odd.append(type(last).__name__)
    if odd:
        raise HeadError(
            f"head file {file} holds steps no registered head has ({', '.join(map(repr, odd))}); "
            "refused"
        )
    if isinstance(last, RandomForestClassifier):
        width = int(getattr(last, "n_features_in_", -1))
        for tree in getattr(last, "estimators_", None) or [None]:
            if type(tree) is not DecisionTreeClassifier or not _tree_in_bounds(
                getattr(tree, "tree_", None), width
            ):
                raise HeadError(
                    f"head file {file} holds a forest tree whose nodes point outside it; refused"
                )
    elif isinstance(last, KNeighborsClassifier) and getattr(last, "_tree", None) is not None:
        _rebuild_index(last, file)


def _tree_in_bounds(tree: Any, width: int) -> bool:
    """Children after their parent and inside the tree, features inside ``[0, width)``."""
    try:
        left = np.asarray(tree.children_left)
        right = np.asarray(tree.children_right)
        feature = np.asarray(tree.feature)
        n = int(tree.node_count)
        if not (len(left) == len(right) == len(feature) == n >= 1) or tree.n_features != width:
            return False
    except (AttributeError, TypeError, ValueError):
        return False
    nodes = np.arange(n)
    leaf = (left == -1) & (right == -1)
    split = ~leaf
    return bool(
        np.all((left[split] > nodes[split]) & (left[split] < n))
        and np.all((right[split] > nodes[split]) & (right[split] < n))
        and np.all((feature[split] >= 0) & (feature[split] < width))
    )


def _rebuild_index(knn: Any, file: Path) -> None:
    """Replace a loaded neighbour index by one built from the training features, as
    ``KNeighborsClassifier.fit`` builds it (same class, leaf size and metric)."""
    index_type = type(knn._tree)
    try:
        knn._tree = index_type(
            knn._fit_X,
            knn.leaf_size,
            metric=knn.effective_metric_,
            **(knn.effective_metric_params_ or {}),
        )
    except Exception as exc:
        raise HeadError(
            f"head file {file}: its neighbour index cannot be rebuilt ({one_line(exc)})"
        ) from None
