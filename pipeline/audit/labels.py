"""Likely label errors: out-of-fold probabilities ranked by confident learning (cleanlab).

A logistic regression on the standardised cached features is cross-validated over every
image (all splits together: a wrong label hurts wherever it sits); each image's class
probabilities come from the fold that did not train on it. cleanlab's
``find_label_issues`` (confident learning: per-class thresholds at the mean self-confidence,
the off-diagonal of the confident joint) says which labels to doubt, ranked by
self-confidence, the probability the model gives the image's own label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.core.errors import PipelineError


class AuditDependencyError(PipelineError):
    """A package the audit needs is missing."""


C = 0.005  # strong L2 on 1,000-odd standardised dimensions: probabilities not overconfident


@dataclass
class LabelAudit:
    """Out-of-fold probabilities (rows of the audited images), the ranking and the flagged set.

    ``audited``: indices into the cache of the images audited (classes with at least ``cv``
    images); ``ranked``: all audited indices, least self-confident first; ``issues``: the
    indices cleanlab flags, in ranked order; ``folds``: the folds used (``0``: not run).
    """

    audited: np.ndarray
    pred_probs: np.ndarray
    ranked: np.ndarray
    issues: np.ndarray
    self_confidence: np.ndarray
    folds: int
    left_out: list[int]


def audit_labels(features: np.ndarray, labels: np.ndarray, cv: int, seed: int) -> LabelAudit:
    """Cross-validated probabilities and cleanlab's label issues (see the module's note).

    Classes with fewer than ``cv`` images are left out of the audit (``left_out``):
    stratified folds need one image of each class per fold.
    """
    try:
        from cleanlab.filter import find_label_issues
    except ImportError:
        raise AuditDependencyError(
            "the label audit needs cleanlab, which this environment lacks: run `make install` "
            "(or pip install cleanlab)"
        ) from None

    counts = np.bincount(labels)
    left_out = [int(c) for c in np.flatnonzero((counts > 0) & (counts < cv))]
    keep = np.flatnonzero(np.isin(labels, np.flatnonzero(counts >= cv)))
    present = np.unique(labels[keep])
    if len(present) < 2:
        empty = np.zeros(0, dtype=np.int64)  # nothing audited: no probabilities to export
        width = int(labels.max()) + 1
        return LabelAudit(empty, np.zeros((0, width)), empty, empty, np.zeros(0), 0, left_out)
    y = np.searchsorted(present, labels[keep])  # classes renumbered 0..k-1 for cleanlab
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=500))
    folds = StratifiedKFold(cv, shuffle=True, random_state=seed)
    probs = cross_val_predict(model, features[keep], y, cv=folds, method="predict_proba")
    flagged = find_label_issues(y, probs, return_indices_ranked_by="self_confidence")
    confidence = probs[np.arange(len(y)), y]
    order = np.argsort(confidence, kind="stable")
    full = np.zeros((len(keep), int(labels.max()) + 1))
    full[:, present] = probs
    return LabelAudit(
        audited=keep,
        pred_probs=full,
        ranked=keep[order],
        issues=keep[np.asarray(flagged, dtype=np.int64)],
        self_confidence=confidence,
        folds=cv,
        left_out=left_out,
    )
