"""The honest ranking: how runs are scored, ranked and told apart, never on test.

Part of the report's middle step (:mod:`pipeline.report.evaluation`). Runs are ranked on
val in the metric the heads were chosen by (``make head METRIC=``, read from their
manifests: :func:`chosen_metric`; accuracy when they disagree, with a note), or on the
head's cross-validation score on train when there is no val split. Two runs are told
apart by the exact McNemar test on each image's right or wrong, whatever the metric.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.heads import scoring
from pipeline.report import stats
from pipeline.report.runs import Run

ALPHA = 0.05  # McNemar p-value below which two runs are told apart


def cv_record(run: Run) -> dict[str, Any]:
    """The head's search as its manifest records it (``{}``: none)."""
    cv = run.manifest.get("cv")
    return cv if isinstance(cv, dict) else {}


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


def selection_rule(runs: Sequence[Run], metric: str = "accuracy") -> tuple[str, str]:
    """``("val", words)`` when every run has val predictions, else ``("cv", words)``;
    ``metric`` is what they are ranked on."""
    said = scoring.words(metric)
    paired = (
        ""
        if metric == "accuracy"
        else f" The exact McNemar tests pair each image's right or wrong, whatever the {said}."
    )
    if runs and all("val" in r.splits for r in runs):
        words = (
            f"Runs are ranked on val {said} (ties: the higher cross-validation score on train, "
            "then the name); the test images played no part in choosing." + paired
        )
        if any(r.kind == "finetuned" for r in runs):
            words += (
                " Fine-tuned runs chose their best epoch on val, so their val figures lean "
                "optimistic against the heads'."
            )
        return "val", words
    return "cv", (
        f"There is no val split, so runs are ranked on the {said} of the head's "
        "cross-validation on the train split (runs without one are not ranked); the test "
        "images played no part in choosing." + paired
    )


def selection_score(run: Run, rule: str, metric: str = "accuracy") -> float | None:
    """The number a run is ranked on: ``metric`` on val, or the head's cross-validation
    score on train (in the metric it was chosen by)."""
    if rule == "val":
        p = run.splits["val"]
        return scoring.score(metric, p.labels, p.pred) if len(p.labels) else None
    score = cv_record(run).get("score")
    return None if score is None else float(score)


def rank_runs(runs: Sequence[Run], rule: str, metric: str = "accuracy") -> list[Run]:
    """Runs with a selection score, best first (ties: the higher cross-validation score on
    train, then the name; never the fit time, which changes from run to run)."""
    scored = [(selection_score(r, rule, metric), r) for r in runs]
    scored = [(s, r) for s, r in scored if s is not None]

    def key(item: tuple[float, Run]) -> tuple:
        cv = cv_record(item[1]).get("score")
        return -item[0], -cv if isinstance(cv, int | float) else np.inf, item[1].run_id

    return [r for _, r in sorted(scored, key=key)]


def chosen_metric(runs: Sequence[Run]) -> tuple[str, str | None]:
    """The metric the heads were chosen by (``make head METRIC=``, from their manifests), and
    a note when they disagree (then accuracy). Fine-tuned runs choose no metric: left out."""
    heads = [r for r in runs if r.kind == "head"]
    metric, split = scoring.common_metric({**r.manifest, "name": r.run_id} for r in heads)
    if not split:
        return metric, None
    each = "; ".join(f"{m}: {', '.join(names)}" for m, names in split.items())
    return metric, f"the heads were chosen by different metrics ({each}); ranked on accuracy"


def _overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def leaderboard(
    ranked: Sequence[Run],
    rows: dict[str, dict[str, Any]],
    rule: str,
    split: str | None,
    metric: str = "accuracy",
) -> list[dict[str, Any]]:
    """The ranked runs with their selection score, their ``split`` metrics and intervals,
    and how they compare with the best (exact McNemar on ``split``, overlapping intervals
    of ``metric``)."""
    entries = []
    best = ranked[0] if ranked else None
    for i, run in enumerate(ranked):
        row = rows[run.run_id]
        entry: dict[str, Any] = {
            "rank": i + 1,
            "run": run.run_id,
            "label": row["label"],
            "kind": run.kind,
            "group": run.group,
            "selection_score": selection_score(run, rule, metric),
            "split": split,
            "fit_seconds": row["fit_seconds"],
            "predict_seconds_per_image": row["predict_seconds_per_image"],
        }
        if split and split in row["splits"]:
            s = row["splits"][split]
            entry.update({key: s[key] for m in stats.METRICS for key in (m, f"{m}_ci")})
        if best is not None and run is not best and split:
            test = mcnemar(best, run, split)
            entry["mcnemar_vs_best"] = test
            best_ci = rows[best.run_id]["splits"].get(split, {}).get(f"{metric}_ci")
            if best_ci and f"{metric}_ci" in entry:
                entry["overlaps_best"] = _overlap(best_ci, entry[f"{metric}_ci"])
            entry["tied_with_best"] = (
                test["p_value"] >= ALPHA if test else bool(entry.get("overlaps_best"))
            )
        entries.append(entry)
    return entries


def _final(row: dict[str, Any]) -> dict[str, Any] | None:
    test = row["splits"].get("test")
    if test is None:
        return None
    keys = ("n", "accuracy", "accuracy_ci", "balanced_accuracy", "balanced_accuracy_ci")
    return {key: test[key] for key in (*keys, "macro_f1", "macro_f1_ci")}


def selection(
    ranked: Sequence[Run],
    rows: dict[str, dict[str, Any]],
    rule: str,
    words: str,
    metric: str = "accuracy",
) -> dict[str, Any]:
    """How the winner was chosen, the winner, its untouched test figures, its ties;
    ``metric`` (``chosen_by``) is what the runs were ranked on, ``metric`` its words."""
    split = "val" if rule == "val" else ("test" if ranked and "test" in ranked[0].splits else None)
    board = leaderboard(ranked, rows, rule, split, metric)
    said = scoring.words(metric)
    out: dict[str, Any] = {
        "rule": rule,
        "metric": f"val {said}" if rule == "val" else f"cross-validation {said} (train)",
        "chosen_by": metric,
        "words": words,
        "compare_split": split,
        "winner": board[0]["run"] if board else None,
        "final_test": _final(rows[board[0]["run"]]) if board else None,
        "runner_up": board[1]["run"] if len(board) > 1 else None,
        "runner_up_mcnemar": board[1].get("mcnemar_vs_best") if len(board) > 1 else None,
        "tied": [e["run"] for e in board[1:] if e.get("tied_with_best")],
        "overlapping": [e["run"] for e in board[1:] if e.get("overlaps_best")],
    }
    return {**out, "leaderboard": board}
