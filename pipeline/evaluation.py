"""The report's numbers: metrics of each run, McNemar comparisons and the leaderboard.

The middle step of the report (collect -> **evaluate** -> render). It takes the
runs :func:`pipeline.report.collect_runs` read and returns plain JSON-ready data
(:func:`build_report_data`); it reads no file and draws nothing. The statistics
themselves (bootstrap intervals, the exact McNemar test) live in
:mod:`pipeline.stats`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline import stats
from pipeline.artifacts import EVAL_SPLITS, SplitPredictions, now_iso


@dataclass
class Run:
    """One head or fine-tuned model with its predictions on the evaluated splits."""

    name: str  # row label, e.g. "svm" or the fine-tuned model's name
    kind: str  # "head" | "finetuned"
    group: str  # cache stem for heads, "finetuned" for stage three
    manifest: dict[str, Any]
    class_names: tuple[str, ...]
    splits: dict[str, SplitPredictions] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # fine-tuned: per-epoch log

    @property
    def run_id(self) -> str:
        return f"{self.group}/{self.name}"


# --------------------------------------------------------------------------- one run


def evaluate_run(run: Run, *, n_resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Metrics of one run per split, with bootstrap intervals (see :mod:`pipeline.stats`).

    Returns
    -------
    dict
        split -> ``n``, each metric of :data:`pipeline.stats.METRICS` with its
        ``<metric>_ci`` (95% percentile bootstrap), ``top5_accuracy`` (more than
        five classes and scores), ``log_loss`` (probabilities), ``confusion``
        and ``per_class_f1``.
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
        if k > 5 and scores is not None:
            entry["top5_accuracy"] = stats.top_k_accuracy(y, scores, 5)
        if predictions.is_proba and scores is not None:
            entry["log_loss"] = stats.log_loss(y, scores)
        entry["confusion"] = cm.tolist()
        entry["per_class_f1"] = stats.per_class_f1(y, pred, k).tolist()
        out[split] = entry
    return out


_FEATURE_KEYS = ("backbone", "input_size", "pooling", "layer", "preprocessing")
_FINETUNE_SHOWN = ("layers", "learning_rate", "lr", "epochs", "augment", "batch_size", "seed")


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
        cv = m.get("cv") if isinstance(m.get("cv"), dict) else {}
        config.update(
            norm=m.get("norm"),
            pca=m.get("pca"),
            params=m.get("params"),
            cv_folds=cv.get("folds"),
            cv_accuracy=cv.get("score"),
            seed=m.get("seed"),
            estimator=m.get("estimator"),
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
    return config


def _run_row(run: Run, *, n_resamples: int, seed: int) -> dict[str, Any]:
    m = run.manifest
    return {
        "run": run.run_id,
        "name": run.name,
        "kind": run.kind,
        "group": run.group,
        "class_names": list(run.class_names),
        "fit_seconds": m.get("fit_seconds"),
        "predict_seconds_per_image": m.get("predict_seconds_per_image"),
        "extraction_seconds": m.get("extraction_seconds"),
        "config": run_config(run),
        "history": run.history,
        "splits": evaluate_run(run, n_resamples=n_resamples, seed=seed),
    }


# --------------------------------------------------------------------------- comparisons


def mcnemar(a: Run, b: Run, split: str) -> dict[str, Any] | None:
    """McNemar's exact test of two runs on one split, or ``None``.

    ``None`` unless both predicted exactly the same images with the same labels.
    """
    if split not in a.splits or split not in b.splits:
        return None
    first, second = a.splits[split], b.splits[split]
    if (
        len(first.paths) != len(second.paths)
        or not np.array_equal(first.paths, second.paths)
        or not np.array_equal(first.labels, second.labels)
    ):
        return None
    result = stats.mcnemar_exact(first.pred == first.labels, second.pred == second.labels)
    return {
        "split": split,
        "a": a.run_id,
        "b": b.run_id,
        "n": result.n,
        "only_a": result.only_a,
        "only_b": result.only_b,
        "both": result.both,
        "neither": result.neither,
        "p_value": result.p_value,
    }


def _selection_score(row: dict[str, Any], run: Run) -> float:
    """Val accuracy, else cross-validation accuracy on train: never the test images."""
    if "val" in row["splits"]:
        return float(row["splits"]["val"]["accuracy"])
    cv = run.manifest.get("cv") if isinstance(run.manifest.get("cv"), dict) else {}
    return float(cv.get("score") or 0.0)


def comparisons(runs: Sequence[Run], rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """McNemar tests: ``svm`` against ``softmax`` of each cache, then each fine-tuned run
    against the best head of each cache (chosen without the test images)."""
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
            heads = [r for r in rows if r["group"] == group and r["kind"] == "head"]
            if not heads:
                continue
            best = max(heads, key=lambda r: _selection_score(r, by_id[r["run"]]))
            for split in EVAL_SPLITS:
                if c := mcnemar(run, by_id[best["run"]], split):
                    out.append(c)
    return out


def leaderboard(rows: Sequence[dict[str, Any]], split: str) -> list[dict[str, Any]]:
    """Every run with ``split``, by accuracy (ties: the faster fit first)."""
    entries = [
        {
            "run": r["run"],
            "kind": r["kind"],
            "split": split,
            "accuracy": r["splits"][split]["accuracy"],
            "accuracy_ci": r["splits"][split]["accuracy_ci"],
            "balanced_accuracy": r["splits"][split]["balanced_accuracy"],
            "macro_f1": r["splits"][split]["macro_f1"],
            "fit_seconds": r["fit_seconds"],
        }
        for r in rows
        if split in r["splits"]
    ]
    return sorted(
        entries,
        key=lambda e: (
            -e["accuracy"],
            e["fit_seconds"] if e["fit_seconds"] is not None else np.inf,
        ),
    )


def primary_split(runs: Sequence[Run]) -> str:
    """``test`` when any run has it, else ``val``."""
    return "test" if any("test" in r.splits for r in runs) else "val"


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
        What :func:`pipeline.report.collect_runs` found.
    notes : sequence of str
        What was skipped and why; shown at the end of the report.
    n_resamples : int
        Bootstrap resamples for the intervals.
    seed : int
        Seed of the bootstrap.
    """
    primary = primary_split(runs)
    rows = [_run_row(run, n_resamples=n_resamples, seed=seed) for run in runs]
    return {
        "dataset": dataset,
        "created": now_iso(),
        "primary_split": primary,
        "bootstrap": {"resamples": n_resamples, "confidence": 0.95, "seed": seed},
        "runs": rows,
        "mcnemar": comparisons(runs, rows),
        "leaderboard": leaderboard(rows, primary),
        "notes": list(notes),
    }
