"""The report's evaluation: honest selection, the verdict's ties, costs, error analysis."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

from pipeline.core.artifacts import SplitPredictions
from pipeline.report import stats
from pipeline.report.evaluation import Run, build_report_data, top_losses

NAMES = ("a", "b", "c")


def _split(labels, pred, proba=None, *, prefix="val"):
    labels, pred = np.asarray(labels), np.asarray(pred)
    return SplitPredictions(
        paths=np.array([f"{prefix}/{NAMES[y]}/{i:03d}.png" for i, y in enumerate(labels)], object),
        labels=labels.astype(np.int64),
        pred=pred.astype(np.int64),
        scores=None if proba is None else np.asarray(proba, dtype=np.float64),
        is_proba=proba is not None,
    )


def _predictions(n: int, right: int, seed: int, prefix: str) -> SplitPredictions:
    """``n`` images of three classes, the first ``right`` of a shuffled order right."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    correct = np.zeros(n, dtype=bool)
    correct[rng.permutation(n)[:right]] = True
    pred = np.where(correct, labels, (labels + 1) % 3)
    return _split(labels, pred, prefix=prefix)


def _run(name, val_right, test_right, *, group="cache", kind="head", source="imagenet", **m):
    splits = {}
    if val_right is not None:
        splits["val"] = _predictions(60, val_right, seed=len(name), prefix="val")
    if test_right is not None:
        splits["test"] = _predictions(60, test_right, seed=len(name) + 7, prefix="test")
    manifest = {"weights_source": source, "fit_seconds": 1.0, **m}
    return Run(name, kind, group, manifest, NAMES, splits)


def _data(runs, notes=()):
    return build_report_data("demo", runs, list(notes), n_resamples=200)


def test_ranking_uses_val_never_test():
    # best_on_test wins on test (58/60) but is worse on val (40/60) than honest (50/60).
    runs = [_run("best_on_test", 40, 58), _run("honest", 50, 45)]
    data = _data(runs)
    assert [e["run"] for e in data["leaderboard"]] == ["cache/honest", "cache/best_on_test"]
    chosen = data["selection"]
    assert chosen["rule"] == "val" and chosen["winner"] == "cache/honest"
    assert chosen["final_test"]["accuracy"] == pytest.approx(45 / 60)  # reported, not chosen on
    assert chosen["final_test"]["n"] == 60
    assert "test images played no part" in chosen["words"]
    assert data["leaderboard"][0]["accuracy"] == pytest.approx(50 / 60)  # the val figure


def test_without_val_the_cross_validation_score_ranks():
    runs = [
        _run("high_test", None, 59, cv={"score": 0.70}),
        _run("high_cv", None, 40, cv={"score": 0.90}),
        _run("no_cv", None, 60),
    ]
    data = _data(runs)
    assert data["selection"]["rule"] == "cv"
    assert [e["run"] for e in data["leaderboard"]] == ["cache/high_cv", "cache/high_test"]
    assert data["selection"]["compare_split"] == "test"
    assert any("not ranked" in n and "cache/no_cv" in n for n in data["notes"])
    assert "cross-validation" in data["selection"]["words"]


def test_equal_val_scores_go_to_the_higher_cv_score_never_to_the_fit_time():
    """Fit times change from run to run; a tie broken by them made the choice change too."""
    runs = [
        _run("fast", 50, 50, fit_seconds=0.5, cv={"score": 0.80}),
        _run("slow", 50, 50, fit_seconds=9.0, cv={"score": 0.85}),
    ]
    assert _data(runs)["selection"]["winner"] == "cache/slow"
    runs = [_run("b", 50, 50, fit_seconds=0.5), _run("a", 50, 50, fit_seconds=9.0)]
    assert _data(runs)["selection"]["winner"] == "cache/a"  # no CV score: by name


def test_random_weight_runs_are_baselines_unless_alone():
    runs = [_run("random_svm", 59, 59, group="random", source="none"), _run("svm", 45, 45)]
    data = _data(runs)
    assert data["baselines"] == ["random/random_svm"]
    assert [e["run"] for e in data["leaderboard"]] == ["cache/svm"]
    assert all("random" not in c["a"] + c["b"] for c in data["mcnemar"])
    alone = _data([_run("random_svm", 59, 59, group="random", source="none")])
    assert alone["baselines"] == [] and alone["selection"]["winner"] == "random/random_svm"


def test_ties_by_mcnemar_against_the_runner_up_and_by_intervals():
    best = _run("best", 55, 50)
    same = _run("same", 55, 50)  # the same predictions: p = 1, tied
    same.splits = dict(best.splits)
    worse = _run("worse", 20, 20)
    data = _data([worse, same, best])
    chosen = data["selection"]
    assert chosen["winner"] == "cache/best"  # equal scores and fit times: by name
    assert chosen["runner_up"] == "cache/same"
    assert chosen["runner_up_mcnemar"]["p_value"] == 1.0
    assert chosen["tied"] == ["cache/same"] and chosen["overlapping"] == ["cache/same"]
    worse_entry = data["leaderboard"][2]
    assert worse_entry["mcnemar_vs_best"]["p_value"] < 0.05
    assert not worse_entry["tied_with_best"] and not worse_entry["overlaps_best"]


def test_costs_say_what_the_times_include():
    head = _run("svm", 50, 50, predict_seconds_per_image=0.001, extraction_seconds=20.0)
    head.cache_images = 1000
    tuned = _run("ft", 52, 50, kind="finetuned", group="finetuned",
                 predict_seconds_per_image=0.03, extraction_seconds=99.0)  # fmt: skip
    rows = {r["run"]: r for r in _data([head, tuned])["runs"]}
    svm, ft = rows["cache/svm"], rows["finetuned/ft"]
    assert svm["extraction_seconds_per_image"] == pytest.approx(0.02)
    assert svm["end_to_end_seconds_per_image"] == pytest.approx(0.021)
    assert not svm["includes_backbone"]
    assert ft["includes_backbone"] and ft["extraction_seconds"] is None
    assert ft["end_to_end_seconds_per_image"] == pytest.approx(0.03)


def test_error_analysis_of_the_winner():
    labels = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    pred = [0, 1, 1, 1, 1, 0, 2, 2, 2]
    proba = np.full((9, 3), 0.1)
    proba[np.arange(9), pred] = 0.8
    proba[1] = [0.05, 0.9, 0.05]  # the most confident mistake: the highest loss
    run = Run("svm", "head", "cache", {"weights_source": "imagenet"}, NAMES,
              {"val": _split(labels, pred, proba)})  # fmt: skip
    errors = _data([run])["errors"]
    assert errors["run"] == "cache/svm" and errors["has_proba"]
    confused = errors["splits"]["val"]["most_confused"]
    assert [(c["true"], c["pred"], c["count"]) for c in confused] == [("a", "b", 2), ("b", "a", 1)]
    assert confused[0]["share"] == pytest.approx(2 / 3)
    worst = errors["splits"]["val"]["top_losses"]
    assert [w["path"] for w in worst[:3]] == ["val/a/001.png", "val/a/002.png", "val/b/005.png"]
    assert all(w["label"] == w["pred"] for w in worst[3:])  # then the right ones, least sure first
    assert worst[0]["loss"] == pytest.approx(-np.log(0.05))
    assert worst[0]["p_pred"] == pytest.approx(0.9) and worst[0]["label"] == "a"


def test_top_losses_without_probabilities():
    scores = np.array([[2.0, 0.0, 0.0], [0.1, 0.5, 0.0], [0.0, 3.0, 0.0], [1.0, 0.0, 0.0]])
    p = _split([0, 0, 0, 2], [0, 1, 1, 0], scores)
    p = SplitPredictions(p.paths, p.labels, p.pred, p.scores, is_proba=False)
    worst = top_losses(p, NAMES)
    assert [w["path"] for w in worst] == ["val/a/002.png", "val/c/003.png", "val/a/001.png"]
    assert worst[0]["margin"] == pytest.approx(3.0) and "loss" not in worst[0]
    bare = _split([0, 1], [1, 1])
    assert [w["path"] for w in top_losses(bare, NAMES)] == ["val/a/000.png"]


def test_curves_for_runs_with_probabilities():
    rng = np.random.default_rng(0)
    labels = np.arange(90) % 3
    proba = rng.dirichlet(np.ones(3), size=90)
    proba[np.arange(90), labels] += 0.5
    proba /= proba.sum(axis=1, keepdims=True)
    run = Run("p", "head", "cache", {}, NAMES, {"val": _split(labels, proba.argmax(1), proba)})
    entry = _data([run])["runs"][0]["splits"]["val"]
    onehot = np.eye(3)[labels]
    assert entry["roc"]["auc"] == pytest.approx(roc_auc_score(onehot.ravel(), proba.ravel()))
    assert entry["roc"]["fpr"][0] == 0.0 and entry["roc"]["fpr"][-1] == 1.0
    assert np.all(np.diff(entry["roc"]["tpr"]) >= 0)
    assert sum(entry["calibration"]["count"]) == 90


# --------------------------------------------------------------------------- statistics


def test_per_class_metrics_match_scikit_learn():
    y = np.array([0, 0, 1, 1, 2, 2, 2, 3])
    pred = np.array([0, 1, 1, 1, 2, 0, 2, 0])
    mine = stats.per_class_metrics(stats.confusion(y, pred, 5))
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=range(5), zero_division=0)
    for key, ref in (("precision", p), ("recall", r), ("f1", f), ("support", s)):
        assert mine[key] == pytest.approx(ref), key


def test_roc_curve_matches_scikit_learn_with_ties():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    scores = np.round(rng.random(300) + 0.4 * y, 1)  # many tied scores
    fpr, tpr, auc = stats.roc_curve(y == 1, scores)
    assert auc == pytest.approx(roc_auc_score(y, scores))
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
    assert np.isnan(stats.roc_curve(np.ones(3, bool), np.arange(3.0))[2])


def test_reliability_bins_and_expected_calibration_error():
    proba = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.45, 0.55]])
    y = np.array([0, 1, 0, 0])  # 0.95 bin: half right; 0.55 bin: one of two right
    cal = stats.reliability(y, proba, bins=10)
    assert cal["count"] == [2, 2]
    assert cal["confidence"] == pytest.approx([0.55, 0.95])
    assert cal["accuracy"] == pytest.approx([0.5, 0.5])
    assert cal["ece"] == pytest.approx((2 * 0.05 + 2 * 0.45) / 4)


def test_most_confused_cells():
    cm = np.array([[5, 1, 0], [3, 4, 2], [1, 0, 6]])
    assert stats.most_confused(cm, 3) == [(1, 0, 3), (1, 2, 2), (0, 1, 1)]
    assert stats.most_confused(np.eye(3, dtype=int)) == []
