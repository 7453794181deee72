"""The report's "Every metric" tables: balanced accuracy always, top-5 accuracy only above
ten classes and only for runs with scores or probabilities. Synthetic predictions, no Keras."""

from __future__ import annotations

import numpy as np

from pipeline.core.artifacts import SplitPredictions
from pipeline.report.evaluation import Run, evaluate_run
from pipeline.report.render import metrics_table


def _run(name: str, classes: int, scores: bool) -> Run:
    rng = np.random.default_rng(classes)
    y = np.arange(4 * classes) % classes
    raw = rng.normal(size=(len(y), classes)) + 2.0 * np.eye(classes)[y]
    pred = raw.argmax(axis=1)
    split = SplitPredictions(
        paths=np.array([f"{i}.jpg" for i in range(len(y))], dtype=object),
        labels=y.astype(np.int64), pred=pred.astype(np.int64),
        scores=raw if scores else None, is_proba=False,
    )  # fmt: skip
    names = tuple(f"c{i}" for i in range(classes))
    return Run(name, "head", "cache", {}, names, splits={"test": split})


def _table(*runs: Run) -> tuple[list[str], list[list[str]]]:
    rows = [
        {"run": r.run_id, "splits": evaluate_run(r, n_resamples=20), "fit_seconds": 1.0}
        for r in runs
    ]
    data = {"runs": rows, "baselines": []}
    _, header, body = metrics_table(data, "test")
    return header, body


def test_every_metric_shows_balanced_accuracy_and_top5_only_above_ten_classes() -> None:
    header, body = _table(_run("svm", 12, scores=True), _run("knn", 12, scores=False))
    assert "balanced accuracy [95% CI]" in header and "top-5 accuracy" in header
    top5 = header.index("top-5 accuracy")
    assert body[0][top5] != "-" and 0.0 <= float(body[0][top5]) <= 1.0
    assert body[1][top5] == "-"  # no scores: no top-5 for that run
    header, body = _table(_run("svm", 8, scores=True))  # 8 classes: 5 guesses say little
    assert "balanced accuracy [95% CI]" in header and "top-5 accuracy" not in header
    assert len(body[0]) == len(header)
