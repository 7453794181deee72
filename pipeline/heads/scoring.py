"""The metric a head is chosen by (``METRIC=``): its score of predictions, and its words.

``make head METRIC=balanced_accuracy`` scores every head's search with it (the CV folds,
the softmax head's hold-out), ranks the heads with it on val, and records it in each
manifest (``metric``); the report heads its verdict with it. The names are those of
:data:`pipeline.core.options.METRICS`, shared with ``make protocol``. Macro F1 follows
scikit-learn's ``f1_macro`` (and the report's): the classes in the true labels or the
predictions, F1 = 0 for a class never predicted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from pipeline.core.options import METRICS

DEFAULT_METRIC = "accuracy"
WORDS = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "macro_f1": "macro F1",
    "top5": "top-5 accuracy",
}


def score(metric: str, y: np.ndarray, pred: np.ndarray) -> float:
    """``metric`` (one of :data:`~pipeline.core.options.METRICS`) of ``pred`` against ``y``."""
    y, pred = np.asarray(y), np.asarray(pred)
    if metric == "accuracy":
        return float(np.mean(pred == y))
    if metric == "balanced_accuracy":
        from sklearn.metrics import balanced_accuracy_score

        return float(balanced_accuracy_score(y, pred))
    if metric == "macro_f1":
        from sklearn.metrics import f1_score

        return float(f1_score(y, pred, average="macro", zero_division=0))
    raise ValueError(f"unknown metric {metric!r}; one of {', '.join(METRICS)}")


def scores(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Every metric of :data:`~pipeline.core.options.METRICS` (what a manifest records per split)."""
    return {metric: score(metric, y, pred) for metric in METRICS}


def manifest_metric(manifest: Mapping[str, Any]) -> str:
    """The metric a head's manifest says it was chosen by (accuracy before it said)."""
    return str(manifest.get("metric") or DEFAULT_METRIC)


def words(metric: str) -> str:
    """``"balanced_accuracy"`` -> ``"balanced accuracy"``."""
    return WORDS.get(metric, metric)


def common_metric(manifests: Iterable[Mapping[str, Any]]) -> tuple[str, dict[str, list[str]]]:
    """The metric heads were chosen by, if they agree; else accuracy. Returns it and, when
    they disagree, each metric with the heads (manifest names) chosen by it."""
    by_metric: dict[str, list[str]] = {}
    for manifest in manifests:
        name = str(manifest.get("name") or manifest.get("head") or "?")
        by_metric.setdefault(manifest_metric(manifest), []).append(name)
    if len(by_metric) == 1:
        return next(iter(by_metric)), {}
    return DEFAULT_METRIC, by_metric  # none at all: {}
