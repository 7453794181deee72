"""The report: files, figures, statistics, the fine-tuned row contract, and `make head/report`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from heads_helpers import synthetic_cache

from pipeline.errors import ReportError
from pipeline.heads import fit_heads
from pipeline.report import collect_runs, write_report

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    cache = synthetic_cache(tmp, n_classes=6, width=12, separation=1.2, per_class=15)
    fit_heads(cache, "svm,knn,softmax", artifacts_dir=tmp / "artifacts")
    return tmp / "artifacts"


def _finetuned(artifacts: Path, name: str = "ft_mobilenet") -> dict:
    """A stage-three run as its engineer would write it: manifest + predictions JSON."""
    preds = json.loads(
        (artifacts / "heads" / "synthetic" / "synth" / "svm.predictions.json").read_text()
    )
    names = preds["class_names"]
    out = {}
    for i, (path, entry) in enumerate(sorted(preds["predictions"].items())):
        proba = np.full(len(names), 0.02)
        proba[names.index(entry["label"])] = 0.9  # right on every image but every fifth
        if i % 5 == 0:
            proba = np.roll(proba, 1)
        out[path] = {
            "split": entry["split"],
            "label": entry["label"],
            "pred": names[int(np.argmax(proba))],
            "proba": (proba / proba.sum()).tolist(),
        }
    folder = artifacts / "finetune" / "synthetic"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.predictions.json").write_text(
        json.dumps({"class_names": names, "predictions": out})
    )
    manifest = {
        "kind": "finetuned",
        "name": name,
        "class_names": names,
        "backbone": "mobilenet_v2",
        "input_size": 32,
        "predictions": f"{name}.predictions.json",
        "fit_seconds": 12.5,
        "predict_seconds_per_image": 0.004,
        "params": {"learning_rate": 1e-5},
        "history": f"{name}.history.json",
    }
    history = [
        {"phase": phase, "epoch": epoch, "loss": 1.0 / (i + 1), "accuracy": 0.5 + 0.1 * i,
         "val_loss": 1.1 / (i + 1), "val_accuracy": 0.5 + 0.08 * i}
        for i, (phase, epoch) in enumerate([(1, 1), (1, 2), (2, 1), (2, 2)])
    ]  # fmt: skip
    (folder / f"{name}.history.json").write_text(json.dumps(history))
    (folder / f"{name}.json").write_text(json.dumps(manifest))
    return manifest


def test_report_files_and_figures(artifacts):
    _finetuned(artifacts)
    result = write_report("synthetic", artifacts_dir=artifacts, n_resamples=300)
    out = artifacts / "reports" / "synthetic"
    assert result.markdown == out / "report.md" and result.html.is_file() and result.json.is_file()
    data = json.loads(result.json.read_text())
    assert data["primary_split"] == "test"
    runs = {r["run"]: r for r in data["runs"]}
    assert set(runs) == {"synth/svm", "synth/knn", "synth/softmax", "finetuned/ft_mobilenet"}
    svm = runs["synth/svm"]["splits"]["test"]
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        low, high = svm[f"{key}_ci"]
        assert low <= svm[key] <= high
    assert "top5_accuracy" in svm  # six classes
    assert "log_loss" not in svm and "log_loss" in runs["synth/softmax"]["splits"]["test"]
    assert np.array(svm["confusion"]).sum() == svm["n"] == 18
    assert len(svm["per_class_f1"]) == 6
    assert (
        runs["synth/svm"]["config"]["norm"] == "l2" and "C" in runs["synth/svm"]["config"]["params"]
    )
    pairs = {(c["a"], c["b"], c["split"]) for c in data["mcnemar"]}
    assert ("synth/svm", "synth/softmax", "val") in pairs and (
        "synth/svm",
        "synth/softmax",
        "test",
    ) in pairs
    assert any(a == "finetuned/ft_mobilenet" for a, _, _ in pairs)
    for c in data["mcnemar"]:
        assert c["only_a"] + c["only_b"] + c["both"] + c["neither"] == c["n"]
        assert 0 <= c["p_value"] <= 1
    assert len(data["leaderboard"]) == 4
    assert [e["accuracy"] for e in data["leaderboard"]] == sorted(
        (e["accuracy"] for e in data["leaderboard"]), reverse=True
    )
    page = result.html.read_text()
    assert page.count("data:image/png;base64,") == len(list((out / "figures").glob("*.png"))) >= 3
    assert "McNemar" in page and "ft_mobilenet" in page
    md = result.markdown.read_text()
    assert "## Leaderboard" in md and "figures/accuracy_vs_fit_time.png" in md
    assert "figures/curves_ft_mobilenet.png" in md  # the fine-tuned run's training curves
    assert (out / "figures" / "curves_ft_mobilenet.png").stat().st_size > 1000
    assert "McNemar" in result.format()


def test_broken_finetuned_runs_are_skipped_with_a_note(artifacts):
    folder = artifacts / "finetune" / "synthetic"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bad.json").write_text(
        json.dumps({"kind": "finetuned", "class_names": ["x"], "predictions": "missing.json"})
    )
    runs, notes = collect_runs("synthetic", artifacts)
    assert "bad" not in {r.name for r in runs}
    assert any("bad.json" in n for n in notes)
    (folder / "bad.json").unlink()


def test_no_heads_is_one_clear_error(tmp_path, artifacts):
    with pytest.raises(
        ReportError, match="nothing to report for 'synthetc'.*did you mean synthetic"
    ):
        write_report("synthetc", artifacts_dir=artifacts)
    with pytest.raises(ReportError, match="run `make head"):
        write_report("anything", artifacts_dir=tmp_path)
    with pytest.raises(ReportError, match="RESAMPLES must be a positive whole number; got 0"):
        write_report("synthetic", artifacts_dir=artifacts, n_resamples=0)


def _make(*args: str) -> subprocess.CompletedProcess:
    # -o: treat the venv as installed (the tests run inside it; no pip, no network).
    python = Path(sys.executable)
    venv = python.parent.parent
    return subprocess.run(
        ["make", "-C", str(REPO), "-o", f"{venv}/.installed", f"VENV={venv}", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_make_head_and_report_end_to_end(tiny_cache, tmp_path):
    artifacts = tmp_path / "artifacts"
    target = artifacts / "features" / "colours" / tiny_cache.name
    target.parent.mkdir(parents=True)
    shutil.copy(tiny_cache, target)
    common = [
        f"ARTIFACTS={artifacts}",
        f"DATA={tmp_path / 'colours'}",
        "WEIGHTS=none",
        "INPUT_SIZE=32",
    ]
    run = _make("head", "HEAD=svm,softmax", *common)
    assert run.returncode == 0, run.stderr
    assert "svm" in run.stdout and "softmax" in run.stdout
    heads = artifacts / "heads" / "colours" / target.stem
    assert {p.name for p in heads.glob("*.json")} >= {"svm.json", "softmax.json"}
    run = _make("report", *common)
    assert run.returncode == 0, run.stderr
    assert (artifacts / "reports" / "colours" / "report.html").is_file()
    run = _make("head", "HEAD=svn", *common)
    assert run.returncode == 2
    assert "error: unknown head 'svn'; did you mean svm" in run.stderr
