"""The report's numbers: metrics of each run, the honest ranking, the verdict, error analysis.

The middle step of the report (collect -> **evaluate** -> render). It takes the
runs :func:`pipeline.report.collect.collect_runs` read and returns plain JSON-ready data
(:func:`build_report_data`); it reads no file and draws nothing. The statistics
themselves (bootstrap intervals, the exact McNemar test, ROC and reliability
curves) live in :mod:`pipeline.report.stats`.

Selection is honest (:mod:`pipeline.report.ranking`): runs are ranked on val, in the
metric the heads were chosen by (``make head METRIC=``; accuracy unless given), or on the
head's cross-validation score on train when there is no val split, never on test; the
chosen run's test figures are reported apart, as the final number nobody chose on. Runs on
random backbone weights (``weights_source == "none"``) are baselines: listed, but not
ranked against real runs unless they are all there is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.core.artifacts import EVAL_SPLITS, SplitPredictions, now_iso
from pipeline.features.resplit import split_words
from pipeline.heads import scoring
from pipeline.heads.fit import grid_move_lines
from pipeline.report import stats
from pipeline.report.mistakes import error_analysis, top_losses
from pipeline.report.naming import cache_labels, display_labels
from pipeline.report.ranking import (
    chosen_metric,
    cv_record,
    mcnemar,
    rank_runs,
    selection,
    selection_rule,
)
from pipeline.report.runs import Run

CURVE_POINTS = 201  # ROC curves keep at most about this many of their corners
# Top-5 accuracy only above this many classes (as the protocols' tables): with 6 to 10
# classes, 5 guesses cover half or more of them and the figure says little.
TOP5_ABOVE = 10


__all__ = ["Run", "build_report_data", "error_analysis", "top_losses"]


# --------------------------------------------------------------------------- one run


def roc_points(fpr: np.ndarray, tpr: np.ndarray, negatives: int) -> tuple[list, list]:
    """The ROC's own corners, thinned to about :data:`CURVE_POINTS` where there are more.

    Only real false-positive rates are kept (multiples of ``1 / negatives``): a
    curve drawn between them invents nothing below the smallest one.
    """
    top = np.r_[np.flatnonzero(np.diff(fpr)), len(fpr) - 1]  # highest tpr at each fpr
    fpr, tpr = fpr[top], tpr[top]
    if len(fpr) > CURVE_POINTS:  # evenly in log(fpr), keeping both ends
        lowest = max(1.0 / max(negatives, 1), float(fpr[fpr > 0].min(initial=1.0)))
        wanted = np.r_[0.0, np.geomspace(lowest, 1.0, CURVE_POINTS - 1)]
        keep = np.unique(np.clip(np.searchsorted(fpr, wanted), 0, len(fpr) - 1))
        fpr, tpr = fpr[keep], tpr[keep]
    return [float(f"{v:.4g}") for v in fpr], np.round(tpr, 4).tolist()


def _curves(predictions: SplitPredictions) -> dict[str, Any]:
    """ROC (its corners, see :func:`roc_points`) and reliability bins."""
    fpr, tpr, auc = stats.one_vs_rest_roc(predictions.labels, predictions.scores)
    k = predictions.scores.shape[1]
    n = len(predictions.labels)
    # Negatives of the binary decisions: images of class 0 (two classes), else every
    # (image, wrong class) pair of the micro average.
    negatives = int(np.sum(predictions.labels == 0)) if k == 2 else n * (k - 1)
    fpr_kept, tpr_kept = roc_points(fpr, tpr, negatives)
    return {
        "roc": {
            "fpr": fpr_kept,
            "tpr": tpr_kept,
            "auc": auc,
            "negatives": negatives,
            "kind": "binary" if k == 2 else "micro one-vs-rest",
        },
        "calibration": stats.reliability(predictions.labels, predictions.scores),
    }


def evaluate_run(run: Run, *, n_resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Metrics of one run per split, with bootstrap intervals (see :mod:`pipeline.report.stats`).

    Returns
    -------
    dict
        split -> ``n``, each metric of :data:`pipeline.report.stats.METRICS` with its
        ``<metric>_ci`` (95% percentile bootstrap), ``top5_accuracy`` (more than
        :data:`TOP5_ABOVE` classes, with scores or probabilities), ``log_loss``, ``roc`` and
        ``calibration`` (probabilities), ``confusion``, ``per_class`` (precision, recall, F1,
        support) and ``per_class_f1``.
    """
    k = len(run.class_names)
    out = {}
    for split, predictions in run.splits.items():
        y, pred, scores = predictions.labels, predictions.pred, predictions.scores
        cm = stats.confusion(y, pred, k)
        point = {m: float(v) for m, v in stats.metrics_from_confusion(cm).items()}
        ci = stats.bootstrap_metrics(y, pred, k, n_resamples=n_resamples, seed=seed)
        entry: dict[str, Any] = {"n": int(len(y))}
        for m in stats.METRICS:
            entry[m] = point[m]
            entry[f"{m}_ci"] = list(ci[m])
        if k > TOP5_ABOVE and scores is not None:
            entry["top5_accuracy"] = stats.top_k_accuracy(y, scores, 5)
        if predictions.is_proba and scores is not None:
            entry["log_loss"] = stats.log_loss(y, scores)
            entry.update(_curves(predictions))
        entry["confusion"] = cm.tolist()
        per_class = stats.per_class_metrics(cm)
        entry["per_class"] = {key: values.tolist() for key, values in per_class.items()}
        entry["per_class_f1"] = per_class["f1"].tolist()
        out[split] = entry
    return out


_FEATURE_KEYS = ("backbone", "input_size", "pooling", "layer", "preprocessing")
# "layers": the name of "unfreeze" in manifests of the previous release.
_FINETUNE_SHOWN = (
    "unfreeze", "layers", "learning_rate", "lr", "epochs", "augment", "batch_size", "seed",
)  # fmt: skip


def run_config(run: Run) -> dict[str, Any]:
    """The configuration of a run as the report shows it.

    ``weights_source`` is what the user passed (``imagenet``, ``none``, a
    file); ``weights`` is the weights' identity, as in every manifest. A
    version-1 head manifest has no source: its identity stands in.
    """
    m = run.manifest
    config = {key: m.get(key) for key in _FEATURE_KEYS if m.get(key) not in (None, "")}
    if m.get("weights") not in (None, ""):
        config["weights"] = m["weights"]
    source = m.get("weights_source") or m.get("weights")
    if source not in (None, ""):
        config["weights_source"] = source
    if run.kind == "head":
        cv = cv_record(run)
        config.update(
            norm=m.get("norm"),
            pca=m.get("pca"),
            params=m.get("params"),
            cv_folds=cv.get("folds"),
            cv_accuracy=cv.get("score"),  # in cv_metric, the metric the head was chosen by
            cv_metric=scoring.manifest_metric(m),
            cv_scheme=cv.get("scheme"),
            seed=m.get("seed"),
            split=split_words(m.get("split")),  # the cache's split it was fit and scored on
            estimator=m.get("estimator"),
            grid_moves=_grid_moves(m),
        )
        if "n_epochs" in m:
            config["n_epochs"] = m["n_epochs"]
    else:  # stage three: its options (a dict under "config"), or whatever "params" holds
        options = m.get("config") if isinstance(m.get("config"), dict) else None
        config["params"] = (
            {key: options[key] for key in _FINETUNE_SHOWN if key in options}
            if options
            else m.get("params")
        )
        config["unfreeze"] = m.get("unfreeze", (options or {}).get("unfreeze"))
        config["phase_two_input"] = m.get("phase_two_input")
    return config


def _grid_moves(manifest: dict[str, Any]) -> list[str]:
    """The search's moved grids in words; a manifest that does not say them well says none."""
    try:
        return grid_move_lines(manifest)
    except (KeyError, TypeError, AttributeError, IndexError):
        return []


def _costs(run: Run) -> dict[str, Any]:
    """Fit and prediction times, and what they include.

    A head's times are on cached features: stage one's extraction (once per
    backbone cache, shared by every head) comes on top, and ``end_to_end``
    adds its time per image. A fine-tuned run's times include the backbone.
    """
    m = run.manifest
    per_image = m.get("predict_seconds_per_image")
    extraction = m.get("extraction_seconds") if run.kind == "head" else None
    stage_one = extraction / run.cache_images if extraction and run.cache_images else None
    end_to_end = per_image
    if run.kind == "head":
        end_to_end = per_image + stage_one if per_image is not None and stage_one else None
    return {
        "fit_seconds": m.get("fit_seconds"),
        "predict_seconds_per_image": per_image,
        "extraction_seconds": extraction,
        "extraction_seconds_per_image": stage_one,
        "end_to_end_seconds_per_image": end_to_end,
        "includes_backbone": run.kind == "finetuned",
    }


def is_baseline(run: Run) -> bool:
    """A run on random backbone weights (``weights_source`` ``none``): a baseline only."""
    source = run.manifest.get("weights_source") or run.manifest.get("weights")
    return str(source).lower() == "none"


def _run_row(run: Run, *, n_resamples: int, seed: int) -> dict[str, Any]:
    return {
        "run": run.run_id,
        "name": run.name,
        "kind": run.kind,
        "group": run.group,
        "baseline": is_baseline(run),
        "class_names": list(run.class_names),
        **_costs(run),
        "config": run_config(run),
        "history": run.history,
        "splits": evaluate_run(run, n_resamples=n_resamples, seed=seed),
    }


# --------------------------------------------------------------------------- comparisons


def comparisons(runs: Sequence[Run], ranked: Sequence[str]) -> list[dict[str, Any]]:
    """McNemar tests: ``svm`` against ``softmax`` of each cache, then each fine-tuned run
    against the best-ranked head of each cache (ranked without the test images)."""
    by_id = {r.run_id: r for r in runs}
    out = []
    groups = sorted({r.group for r in runs if r.kind == "head"})
    for group in groups:
        a, b = by_id.get(f"{group}/svm"), by_id.get(f"{group}/softmax")
        for split in EVAL_SPLITS:
            if a and b and (c := mcnemar(a, b, split)):
                out.append(c)
    for run in runs:
        if run.kind != "finetuned":
            continue
        for group in groups:
            best = next((by_id[i] for i in ranked if by_id[i].group == group), None)
            for split in EVAL_SPLITS:
                if best and (c := mcnemar(run, best, split)):
                    out.append(c)
    return out


# --------------------------------------------------------------------------- everything


def build_report_data(
    dataset: str,
    runs: Sequence[Run],
    notes: Sequence[str],
    *,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Everything the report shows, as plain JSON-ready data (``report.json``).

    Parameters
    ----------
    dataset : str
        The data set's name.
    runs : sequence of Run
        What :func:`pipeline.report.collect.collect_runs` found.
    notes : sequence of str
        What was skipped and why; shown at the end of the report.
    n_resamples : int
        Bootstrap resamples for the intervals.
    seed : int
        Seed of the bootstrap.
    """
    rows = {r.run_id: _run_row(r, n_resamples=n_resamples, seed=seed) for r in runs}
    for run, label in display_labels(list(rows.values())).items():
        rows[run]["label"] = label
    caches = cache_labels(list(rows.values()))
    for row in rows.values():
        row["cache_label"] = caches.get(row["group"])  # None: a fine-tuned run
    real = [r for r in runs if not is_baseline(r)]
    compared = real or list(runs)  # random-weight runs only compete among themselves
    metric, note = chosen_metric(compared)
    notes = list(notes) + ([note] if note else [])
    rule, words = selection_rule(compared, metric)
    ranked = rank_runs(compared, rule, metric)
    ranked_ids = {r.run_id for r in ranked}
    compared_ids = {r.run_id for r in compared}
    unranked = [r.run_id for r in compared if r.run_id not in ranked_ids]
    if unranked:
        notes.append(f"not ranked (no {rule} score): {', '.join(unranked)}")
    chosen = selection(ranked, rows, rule, words, metric)
    winner = next((r for r in ranked if r.run_id == chosen["winner"]), None)
    return {
        "dataset": dataset,
        "created": now_iso(),
        "bootstrap": {"resamples": n_resamples, "confidence": 0.95, "seed": seed},
        "counts": {
            "heads": sum(r.kind == "head" for r in runs),
            "finetuned": sum(r.kind == "finetuned" for r in runs),
            "backbones": len({r.group for r in runs if r.kind == "head"}),
        },
        "runs": [rows[r.run_id] for r in ranked]
        + [rows[r.run_id] for r in runs if r.run_id not in ranked_ids],
        "baselines": [r.run_id for r in runs if r.run_id not in compared_ids],
        "selection": chosen,
        "leaderboard": chosen.pop("leaderboard"),
        "mcnemar": comparisons(compared, [r.run_id for r in ranked]),
        "errors": error_analysis(winner, rows[winner.run_id]) if winner else None,
        "notes": notes,
    }
