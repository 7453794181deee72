"""The report ranks and heads its verdict with the metric the heads were chosen by
(`make head METRIC=`), read from their manifests; every metric still appears.

Small synthetic predictions, no Keras, no files.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.artifacts import SplitPredictions
from pipeline.report.evaluation import Run, build_report_data
from pipeline.report.pages import markdown, summary_lines
from pipeline.report.render import leaderboard_table, metrics_table
from pipeline.report.verdict import verdict

NAMES = ("many", "some", "few")
LABELS = np.r_[np.zeros(50, int), np.ones(5, int), np.full(5, 2)]  # imbalanced: 50/5/5


def _split(pred: np.ndarray, prefix: str) -> SplitPredictions:
    paths = np.array([f"{prefix}/{NAMES[y]}/{i:03d}.png" for i, y in enumerate(LABELS)], object)
    return SplitPredictions(paths, LABELS.astype(np.int64), pred.astype(np.int64), None, False)


def _run(name: str, pred: np.ndarray, metric: str | None, kind: str = "head") -> Run:
    manifest = {"weights_source": "imagenet", "cv": {"score": 0.5}}
    if metric:
        manifest["metric"] = metric
    splits = {"val": _split(pred, "val"), "test": _split(pred, "test")}
    group = "mobilenet_v2_224_avg_imagenet" if kind == "head" else "finetuned"
    return Run(name, kind, group, manifest, NAMES, splits)


# svm: always the majority class (accuracy 0.833, balanced accuracy 0.333); softmax: every
# minority image right, 12 majority images wrong (accuracy 0.800, balanced accuracy 0.920).
MAJORITY = np.zeros(60, int)
FAIR = LABELS.copy()
FAIR[:12] = 1


def _data(metric: str | None, other: str | None = "same") -> dict:
    second = metric if other == "same" else other
    runs = [_run("svm", MAJORITY, metric), _run("softmax", FAIR, second)]
    return build_report_data("demo", runs, [], n_resamples=200)


def test_heads_chosen_by_balanced_accuracy_are_ranked_and_headlined_by_it():
    data = _data("balanced_accuracy")
    chosen = data["selection"]
    assert chosen["chosen_by"] == "balanced_accuracy" and chosen["winner"].endswith("/softmax")
    assert chosen["metric"] == "val balanced accuracy"
    assert data["leaderboard"][0]["selection_score"] == pytest.approx(0.92)
    sentences = verdict(data)
    assert "softmax 0.920 [" in sentences[0] and "balanced accuracy;" in sentences[0]
    assert "exact McNemar (on each image's right or wrong) p" in sentences[0]
    (chosen_line,) = [s for s in sentences if s.startswith("Chosen overall")]
    assert "the best val balanced accuracy, 0.920 [" in chosen_line
    assert "it scores 0.920 [" in chosen_line and "balanced accuracy (0.800 [" in chosen_line
    assert leaderboard_table(data)[1][2] == "val balanced accuracy [95% CI]"
    assert summary_lines(data)[0] == "demo: 2 runs, ranked on val balanced accuracy:"
    assert "right or wrong, whatever the balanced accuracy" in chosen["words"]
    # The every-metric table keeps all three, whatever the ranking's metric.
    assert metrics_table(data, "val")[1][2:5] == [
        "accuracy [95% CI]", "balanced accuracy [95% CI]", "macro F1 [95% CI]"]  # fmt: skip
    assert "For reference: the ranking uses only val balanced accuracy." in markdown(data, [])


def test_heads_chosen_by_accuracy_or_saying_nothing_rank_on_accuracy():
    for metric in (None, "accuracy"):
        data = _data(metric)
        assert data["selection"]["chosen_by"] == "accuracy"
        assert data["selection"]["winner"].endswith("/svm")  # 0.833 > 0.800
        assert "McNemar (on each" not in " ".join(verdict(data)) and not data["notes"]


def test_heads_that_disagree_are_said_in_one_line_and_ranked_on_accuracy():
    data = _data("balanced_accuracy", other=None)
    assert data["selection"]["chosen_by"] == "accuracy"
    assert data["selection"]["winner"].endswith("/svm")
    (note,) = data["notes"]
    assert note.startswith("the heads were chosen by different metrics (balanced_accuracy: ")
    assert note.endswith("; ranked on accuracy") and "\n" not in note
    assert f"  note: {note}" in summary_lines(data)


def test_a_fine_tuned_run_chooses_no_metric_and_is_ranked_on_the_heads():
    runs = [_run("svm", MAJORITY, "macro_f1"), _run("tuned", FAIR, None, kind="finetuned")]
    data = build_report_data("demo", runs, [], n_resamples=200)
    assert data["selection"]["chosen_by"] == "macro_f1" and not data["notes"]
    assert data["selection"]["winner"] == "finetuned/tuned"


@pytest.mark.slow  # a whole report, figures drawn: about 7 s on 2 cores
def test_make_head_metric_reaches_the_reports_headline(tmp_path):
    """Through the files: the manifests fit_heads writes, read back by write_report."""
    from heads_helpers import synthetic_cache

    from pipeline.heads.fit import fit_heads
    from pipeline.report.collect import write_report

    cache = synthetic_cache(tmp_path, separation=1.0)
    artifacts = tmp_path / "artifacts"
    fit_heads(cache, "logreg,ridge", artifacts_dir=artifacts, metric="macro_f1")
    result = write_report("synthetic", artifacts_dir=artifacts, n_resamples=50)
    assert result.lines[0] == "synthetic: 2 runs, ranked on val macro F1:"
    assert any("the best val macro F1, " in line for line in result.lines)
    assert r"macro F1 \[95% CI\]" in result.markdown.read_text()  # headers escaped as cells
