"""What the chosen run gets wrong: its most-confused class pairs and highest-loss images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.artifacts import SplitPredictions
from pipeline.core.errors import CacheError
from pipeline.features.cache import FeatureRows
from pipeline.report import stats
from pipeline.report.runs import Run

TOP_LOSSES = 8  # thumbnails per split in the error analysis
MOST_CONFUSED = 10  # rows of the most-confused table
NEAREST = 3  # training images shown beside each top-loss image
_BLOCK = 4096  # train rows read at a time: the cache is never loaded whole


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
    cache = run.manifest.get("cache")
    # A fine-tuned model has no cached features of its own to search.
    if run.kind == "head" and isinstance(cache, str) and Path(cache).is_file():
        worst = [e for s in out["splits"].values() for e in s["top_losses"]]
        try:
            found = nearest_train(cache, [e["path"] for e in worst])
        except (CacheError, OSError) as exc:
            out["nearest_note"] = f"no nearest training images of the worst images: {exc}"
        else:
            for entry in worst:
                entry["nearest"] = found.get(entry["path"], [])
    return out


def nearest_train(
    cache: str | Path, queries: Sequence[str], top: int = NEAREST
) -> dict[str, list[dict[str, Any]]]:
    """For each image path of ``queries`` that ``cache`` holds, its ``top`` most similar train
    images by cosine of the cached features: ``{"path", "label", "similarity"}``, closest first.

    Beside a wrong prediction they show whether the model or the label is wrong: neighbours
    of the predicted class suggest a mislabelled image, of the true class a model mistake.
    """
    with FeatureRows(cache) as rows:
        where = {str(p): i for i, p in enumerate(rows.paths)}
        asked = [q for q in dict.fromkeys(queries) if q in where]
        train = np.flatnonzero(rows.split == "train")
        if not asked or not len(train):
            return {}
        wanted = _unit(rows.read(np.array([where[q] for q in asked])))
        sims = np.empty((len(asked), 0), np.float32)
        index = np.empty((len(asked), 0), np.int64)
        for start in range(0, len(train), _BLOCK):
            block = train[start : start + _BLOCK]
            sims = np.concatenate([sims, wanted @ _unit(rows.read(block)).T], axis=1)
            index = np.concatenate([index, np.broadcast_to(block, (len(asked), len(block)))], 1)
            keep = np.argsort(-sims, axis=1, kind="stable")[:, :top]
            sims, index = np.take_along_axis(sims, keep, 1), np.take_along_axis(index, keep, 1)
        names = list(rows.attrs.get("class_names") or ())
        return {
            query: [
                {"path": str(rows.paths[j]), "label": names[int(rows.labels[j])],
                 "similarity": round(float(s), 4)}
                for s, j in zip(sims[k], index[k], strict=True)
            ]
            for k, query in enumerate(asked)
        }  # fmt: skip


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
