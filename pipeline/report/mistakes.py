"""What the chosen run gets wrong: its most-confused class pairs and highest-loss images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.core.artifacts import SplitPredictions
from pipeline.report import stats

if TYPE_CHECKING:
    from pipeline.report.evaluation import Run

TOP_LOSSES = 8  # thumbnails per split in the error analysis
MOST_CONFUSED = 10  # rows of the most-confused table


def top_losses(
    predictions: SplitPredictions, class_names: Sequence[str], top: int = TOP_LOSSES
) -> list[dict[str, Any]]:
    """The ``top`` images the run got most wrong.

    With probabilities: highest loss, ``-log p(true class)``, first. With
    scores only: wrong images by the margin of the predicted over the true
    class. Without either: the wrong images in path order.
    """
    y, pred, scores = predictions.labels, predictions.pred, predictions.scores
    idx = np.arange(len(y))
    if scores is not None:
        true_score = scores[idx, y]
        if predictions.is_proba:
            badness = -np.log(np.clip(true_score, 1e-15, 1.0))
        else:
            badness = np.where(pred != y, scores[idx, pred] - true_score, -np.inf)
    else:
        badness = np.where(pred != y, 0.0, -np.inf)
    order = [int(i) for i in np.argsort(-badness, kind="stable")[:top] if badness[i] > -np.inf]
    out = []
    for i in order:
        entry: dict[str, Any] = {
            "path": str(predictions.paths[i]),
            "label": class_names[int(y[i])],
            "pred": class_names[int(pred[i])],
        }
        if predictions.is_proba and scores is not None:
            entry.update(p_pred=float(scores[i, pred[i]]), p_true=float(scores[i, y[i]]))
            entry["loss"] = float(badness[i])
        elif scores is not None:
            entry["margin"] = float(badness[i])
        out.append(entry)
    return out


def error_analysis(run: Run, row: dict[str, Any]) -> dict[str, Any]:
    """Most-confused class pairs and highest-loss images of ``run`` on each split."""
    out: dict[str, Any] = {"run": run.run_id, "has_proba": False, "splits": {}}
    for split, predictions in run.splits.items():
        cm = np.array(row["splits"][split]["confusion"])
        support = cm.sum(axis=1)
        pairs = [
            {
                "true": run.class_names[i],
                "pred": run.class_names[j],
                "count": count,
                "share": count / support[i] if support[i] else 0.0,
            }
            for i, j, count in stats.most_confused(cm, MOST_CONFUSED)
        ]
        out["splits"][split] = {
            "most_confused": pairs,
            "top_losses": top_losses(predictions, run.class_names),
        }
        out["has_proba"] = out["has_proba"] or predictions.is_proba
    return out
