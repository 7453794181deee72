"""What :func:`pipeline.heads.fit.fit_heads` returns, as objects to read in Python.

:class:`HeadResultAccess` gives each head's scores, chosen values, grid results and
fitted estimator as attributes (``result.val_accuracy``, ``result.estimator_``), in
the spirit of :class:`~sklearn.model_selection.GridSearchCV`; :class:`HeadResultsAccess`
looks heads up by name and names the best one (``results["svm"]``, ``results.best_``).
Both read the head's manifest; the estimator is loaded from the saved head on first use.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import HeadError
from pipeline.heads import scoring
from pipeline.heads.store import Head, load_head


class HeadResultAccess:
    """Attributes of one fitted head, read from its manifest (mixed into ``HeadResult``)."""

    head: str
    manifest_path: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        """The head's registry name (``svm``, ``logreg``, ...), as ``head``."""
        return self.head

    @property
    def params(self) -> dict[str, Any]:
        """The hyper-parameters the search chose (``{"C": 1.0}``)."""
        return dict(self.manifest["params"])

    @property
    def metric(self) -> str:
        """The metric the head was chosen by (``METRIC=``; accuracy in manifests before it)."""
        return scoring.manifest_metric(self.manifest)

    @property
    def cv_score(self) -> float | None:
        """The chosen values' mean CV score on train in :attr:`metric` (the softmax head:
        its hold-out's)."""
        return self.manifest["cv"]["score"]

    @property
    def val_score(self) -> float | None:
        """:attr:`metric` on the val split (what the heads are ranked on); ``None`` without val."""
        metrics = self.manifest["metrics"].get("val")
        return None if metrics is None or self.metric not in metrics else metrics[self.metric]

    @property
    def val_accuracy(self) -> float | None:
        """Accuracy on the val split; ``None`` when the cache has none."""
        return self._accuracy("val")

    @property
    def test_accuracy(self) -> float | None:
        """Accuracy on the test split; ``None`` when the cache has none."""
        return self._accuracy("test")

    @property
    def fit_seconds(self) -> float:
        """The search and the final fit, in seconds."""
        return float(self.manifest["fit_seconds"])

    @property
    def cv_results_(self) -> dict[str, Any]:
        """The search's grid as ``GridSearchCV.cv_results_`` has it: ``params``,
        ``mean_test_score`` and ``rank_test_score`` (the manifest keeps the means, not
        the per-fold scores)."""
        scores = self.manifest["cv"].get("scores") or {}
        params = [json.loads(key) for key in scores]
        means = np.array(list(scores.values()), dtype=float)
        # GridSearchCV's ranks: 1 for the best; ties share the smaller rank.
        ranks = np.array([1 + int(np.sum(means > m)) for m in means], dtype=np.int32)
        return {"params": params, "mean_test_score": means, "rank_test_score": ranks}

    @functools.cached_property
    def estimator_(self) -> Any:
        """The fitted pipeline (normalisation, PCA, classifier), loaded from the saved
        head on first use (checksums checked: :func:`pipeline.heads.store.load_head`)."""
        return self.load().estimator

    def load(self) -> Head:
        """The saved head: manifest, estimator and :meth:`~pipeline.heads.store.Head.predict`."""
        return load_head(self.manifest_path)

    def _accuracy(self, split: str) -> float | None:
        metrics = self.manifest["metrics"].get(split)
        return None if metrics is None else float(metrics["accuracy"])


class HeadResultsAccess:
    """A sweep's heads looked up by name, and the best of them (mixed into ``HeadResults``,
    a list: integers and slices index it as one)."""

    def __getitem__(self, key: Any) -> Any:
        if not isinstance(key, str):
            return super().__getitem__(key)
        for result in self:
            if result.head == key:
                return result
        raise KeyError(f"no head {key!r} among these results (heads: {', '.join(self.names)})")

    def __contains__(self, item: object) -> bool:
        if isinstance(item, str):
            return item in self.names
        return super().__contains__(item)

    @property
    def names(self) -> list[str]:
        """The heads' names, in order."""
        return [result.head for result in self]

    @property
    def best_(self) -> Any:
        """The head to pick: best on val, else on CV (never test), as the summary marks it."""
        if not self:
            raise HeadError("no heads were fitted, so none is best")
        return chosen_head(self)

    @property
    def best_estimator_(self) -> Any:
        """The fitted pipeline of :attr:`best_`."""
        return self.best_.estimator_


def chosen_head(results: Sequence[Any]) -> Any:
    """The head to pick: best on val, else on CV (never test), in the metric the heads were
    chosen by (accuracy where they disagree); ties go to the higher CV score, then the name
    (as the report ranks them)."""
    metric, _ = scoring.common_metric(r.manifest for r in results)

    def score(result: Any) -> float:
        m = result.manifest
        val = m["metrics"].get("val", {}).get(metric)
        return val if val is not None else (m["cv"]["score"] or 0.0)

    return min(results, key=lambda r: (-score(r), -(r.manifest["cv"]["score"] or 0.0), r.head))
