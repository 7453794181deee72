"""The report: files, figures, statistics, the fine-tuned row contract, and `make head/report`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image
from heads_helpers import synthetic_cache

from pipeline.core.errors import PipelineError, ReportError
from pipeline.features.cache import load_features
from pipeline.heads.fit import fit_heads
from pipeline.report.collect import collect_runs, image_under, thumbnails, write_report
from pipeline.report.pages import md_escape
from pipeline.report.verdict import verdict

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    data_root = tmp / "data"
    cache = synthetic_cache(
        tmp,
        n_classes=6,
        width=12,
        separation=1.2,
        per_class=15,
        weights="imagenet (keras 3.0.0)",  # identity and source differ, as for real weights
        weights_source="imagenet",
        data_root=str(data_root),
    )
    for i, relative in enumerate(load_features(cache).paths):  # the images the cache names
        make_image(data_root / relative, (20 * i % 255, 90, 160), seed=i, size=(12, 9))
    fit_heads(cache, "svm,knn,softmax", artifacts_dir=tmp / "artifacts")
    return tmp / "artifacts"


class Page(HTMLParser):
    """What the report's HTML holds: section ids and titles, the verdict, images."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: dict[str, str] = {}
        self.verdict = ""
        self.thumbnails: list[str] = []  # src of images inside figure.thumb
        self.figures: list[str] = []  # alt of images inside div.gallery
        self.title = ""
        self._stack: list[tuple[str, str]] = []
        self._section = ""
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        cls = attrs.get("class", "")
        if tag == "section":
            self._section = attrs["id"]
        if tag == "img":
            within = {c for _, c in self._stack}
            if "thumb" in within:
                self.thumbnails.append(attrs["src"])
            if "gallery" in within:
                self.figures.append(attrs["alt"])
        if tag not in ("img", "meta", "br"):  # void elements have no end tag
            self._stack.append((tag, cls))

    def handle_endtag(self, tag):
        assert self._stack.pop()[0] == tag, f"</{tag}> closes another element"

    def handle_data(self, data):
        within = {c for _, c in self._stack}
        if "verdict" in within:
            self.verdict += data
        if self._stack and self._stack[-1][0] == "h2":
            self.sections[self._section] = data
        if self._stack and self._stack[-1][0] == "h1":
            self.title += data


def _finetuned(artifacts: Path, name: str = "ft_mobilenet", *, version: int = 2) -> dict:
    """A stage-three run as stage three writes it: manifest, predictions and history JSON.

    ``version=1``: the old fine-tuned manifest (``format_version``, ``weights`` the
    source, ``weights_id`` the identity, top-level ``predictions`` and ``history``).
    """
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
        "manifest_version": 2,
        "name": name,
        "class_names": names,
        "backbone": "mobilenet_v2",
        "weights": "sha256:" + "ab" * 32,
        "weights_source": "my_weights.h5",
        "input_size": 32,
        "files": {
            "model": f"{name}.keras",
            "predictions": f"{name}.predictions.json",
            "history": f"{name}.history.json",
        },
        "fit_seconds": 12.5,
        "predict_seconds_per_image": 0.004,
        "params": {"learning_rate": 1e-5},
    }
    if version == 1:
        del manifest["manifest_version"], manifest["files"]
        manifest.update(
            format_version=1,
            weights="my_weights.h5",
            weights_id="sha256:" + "ab" * 32,
            predictions=f"{name}.predictions.json",
            history=f"{name}.history.json",
        )
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
    assert data["selection"]["rule"] == "val" and data["selection"]["compare_split"] == "val"
    runs = {r["run"]: r for r in data["runs"]}
    assert set(runs) == {"synth/svm", "synth/knn", "synth/softmax", "finetuned/ft_mobilenet"}
    svm = runs["synth/svm"]["splits"]["test"]
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        low, high = svm[f"{key}_ci"]
        assert low <= svm[key] <= high
    assert "top5_accuracy" not in svm  # six classes: top-5 only above ten
    assert "log_loss" not in svm and "log_loss" in runs["synth/softmax"]["splits"]["test"]
    assert "roc" not in svm and "calibration" in runs["synth/softmax"]["splits"]["val"]
    assert np.array(svm["confusion"]).sum() == svm["n"] == 18
    assert len(svm["per_class"]["recall"]) == 6 and sum(svm["per_class"]["support"]) == 18
    assert (
        runs["synth/svm"]["config"]["norm"] == "l2" and "C" in runs["synth/svm"]["config"]["params"]
    )
    assert runs["synth/svm"]["extraction_seconds_per_image"] == pytest.approx(10.0 / 90)
    assert runs["finetuned/ft_mobilenet"]["includes_backbone"]
    pairs = {(c["a"], c["b"], c["split"]) for c in data["mcnemar"]}
    assert {("synth/svm", "synth/softmax", s) for s in ("val", "test")} <= pairs
    assert any(a == "finetuned/ft_mobilenet" for a, _, _ in pairs)
    for c in data["mcnemar"]:
        assert c["only_a"] + c["only_b"] + c["both"] + c["neither"] == c["n"]
        assert 0 <= c["p_value"] <= 1
    board = data["leaderboard"]
    assert len(board) == 4 and [e["rank"] for e in board] == [1, 2, 3, 4]
    val = [runs[e["run"]]["splits"]["val"]["accuracy"] for e in board]
    assert val == sorted(val, reverse=True)  # ranked on val
    winner = data["selection"]["winner"]
    assert winner == board[0]["run"]
    assert data["selection"]["final_test"]["accuracy"] == runs[winner]["splits"]["test"]["accuracy"]
    figures = {p.name for p in (out / "figures").glob("*.png")}
    assert {"forest.png", "cost.png", "roc.png", "calibration.png"} <= figures
    assert "curves_ft_mobilenet.png" in figures  # the fine-tuned run's training curves
    assert f"confusion_{winner.replace('/', '_')}_test.png" in figures
    page = result.html.read_text()
    n_thumbs = len(list((out / "thumbnails").glob("*.png")))
    embedded = set(re.findall(r"data:image/png;base64,[A-Za-z0-9+/=]+", page))
    assert len(embedded) == len(figures) + n_thumbs  # a train image beside two worst: once
    assert "nearest train" in page  # the nearest training images beside the worst (issue 21)
    md = result.markdown.read_text()
    assert "## Leaderboard" in md and "figures/cost.png" in md and "thumbnails/" in md
    terminal = " ".join(line.strip() for line in result.lines)
    assert "Chosen overall:" in terminal and "Linear SVM or softmax head?" in terminal
    assert "synth/" not in terminal  # short names, not the cache's identity
    for sentence in verdict(data):  # the terminal says what the page says
        assert sentence in terminal
        assert md_escape(sentence) in md


def test_html_structure_verdict_sections_and_thumbnails(artifacts):
    _finetuned(artifacts)
    result = write_report("synthetic", artifacts_dir=artifacts, n_resamples=100)
    data = json.loads(result.json.read_text())
    page = Page(result.html.read_text())
    assert page.title == "synthetic: 3 heads on 1 backbone cache and 1 fine-tuned run compared"
    assert list(page.sections) == [
        "verdict",
        "leaderboard",
        "errors",
        "comparisons",
        "finetuned",
        "metrics",
        "configuration",
    ]  # fmt: skip; no baselines section: no random-weight run
    assert page.sections["finetuned"] == "Fine-tuned runs"
    winner = data["selection"]["winner"]
    labels = {r["run"]: r["label"] for r in data["runs"]}
    assert page.verdict.strip().startswith("Linear SVM or softmax head?")  # the question first
    assert f"Chosen overall: {labels[winner]}," in page.verdict
    assert "untouched test split" in page.verdict
    assert labels[data["selection"]["runner_up"]] in page.verdict and "McNemar" in page.verdict
    assert "synth/" not in page.verdict
    assert "ms per image" in page.verdict
    worst = [e for s in data["errors"]["splits"].values() for e in s["top_losses"]]
    assert len(worst) >= 2 and len(page.thumbnails) == len(worst)
    assert all(src.startswith("data:image/png;base64,") for src in page.thumbnails)
    assert {"forest.png", "cost.png", "roc.png", "calibration.png"} <= set(page.figures)
    text = result.html.read_text()
    assert "Most confused on val" in text and "Per class on test" in text
    assert "<script" not in text and "http" not in text  # one self-contained file


def test_random_weight_runs_are_listed_apart(artifacts, tmp_path):
    folder = artifacts / "heads" / "synthetic" / "random_cache"
    shutil.copytree(artifacts / "heads" / "synthetic" / "synth", folder)
    for manifest in folder.glob("*.json"):
        if not manifest.name.endswith(".predictions.json"):
            m = json.loads(manifest.read_text())
            manifest.write_text(json.dumps({**m, "weights_source": "none", "cache": None}))
    try:
        result = write_report("synthetic", artifacts_dir=artifacts, n_resamples=50)
    finally:
        shutil.rmtree(folder)
    data = json.loads(result.json.read_text())
    assert set(data["baselines"]) == {f"random_cache/{h}" for h in ("svm", "knn", "softmax")}
    assert not any(e["run"].startswith("random_cache/") for e in data["leaderboard"])
    page = Page(result.html.read_text())
    assert page.sections["baselines"] == "Baselines" and "baselines" in page.verdict


def test_thumbnails_only_inside_the_data_root(artifacts, tmp_path):
    with pytest.raises(ReportError, match="not a path inside"):
        image_under(tmp_path, "../outside.png")
    with pytest.raises(ReportError, match="not a path inside"):
        image_under(tmp_path, "/etc/passwd")
    assert image_under(tmp_path, "val/a/1.png") == tmp_path / "val" / "a" / "1.png"
    runs, _ = collect_runs("synthetic", artifacts)
    svm = next(r for r in runs if r.run_id == "synth/svm")
    assert svm.data_root and svm.cache_images == 90
    errors = {
        "run": "synth/svm",
        "splits": {"val": {"top_losses": [
            {"path": svm.splits["val"].paths[0]}, {"path": "val/class0/gone.png"},
            {"path": "../../report.html"},
        ]}},
    }  # fmt: skip
    thumbs, notes = thumbnails({"errors": errors}, runs)
    assert list(thumbs) == [svm.splits["val"].paths[0]]
    assert thumbs[svm.splits["val"].paths[0]][:4] == b"\x89PNG"
    assert "gone.png" in notes[0] and "../../report.html" in notes[0]


def _config_rows(markdown: str) -> dict[str, list[str]]:
    """The configuration table of report.md: run identity -> cells by column."""
    section = markdown.split("**Configuration of each run**", 1)[1].split("##", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:  # cells are Markdown-escaped: undo the backslashes
        cells = [re.sub(r"\\(.)", r"\1", cell.strip()) for cell in line.strip("|").split("|")]
        rows[cells[1]] = dict(zip(header, cells, strict=True))
    return rows


@pytest.mark.parametrize("version", [1, 2])
def test_weights_column_is_the_source_for_heads_and_finetuned_runs(artifacts, version):
    manifest = _finetuned(artifacts, name=f"ft_v{version}", version=version)
    try:
        result = write_report("synthetic", artifacts_dir=artifacts, n_resamples=50)
    finally:
        for path in (artifacts / "finetune" / "synthetic").glob(f"ft_v{version}.*"):
            path.unlink()
    rows = _config_rows(result.markdown.read_text())
    assert rows["synth/svm"]["weights"] == "imagenet"
    assert rows["synth/svm"]["weights identity"] == "imagenet (keras 3.0.0)"
    assert rows["synth/svm"]["run"] == "svm"  # the short name, its identity beside it
    ft = rows[f"finetuned/ft_v{version}"]
    # no unfreeze recorded; the name tells it from the module's other fine-tuned run
    assert ft["run"] in ("fine-tuned", f"fine-tuned: ft_v{version}")
    assert ft["weights"] == "my_weights.h5"
    assert ft["weights identity"] == "sha256:abababababab"
    data = json.loads(result.json.read_text())
    config = {r["run"]: r["config"] for r in data["runs"]}[f"finetuned/ft_v{version}"]
    assert (
        config["weights"] == "sha256:" + "ab" * 32 and config["weights_source"] == "my_weights.h5"
    )
    # The version-1 run's history (a top-level key then) is still drawn.
    assert (result.markdown.parent / "figures" / f"curves_ft_v{version}.png").is_file()
    assert manifest["name"] in result.markdown.read_text()


@pytest.mark.parametrize(
    ("manifest", "why"),
    [
        ({"kind": "finetuned", "manifest_version": 2, "class_names": ["x"]}, "class_names"),
        ("{not json", "not readable JSON"),
        (
            {"kind": "finetuned", "manifest_version": 2, "class_names": ["a", "b"],
             "files": {"predictions": "../../heads/synthetic/synth/svm.predictions.json"}},
            "points outside",
        ),
        (
            {"kind": "finetuned", "manifest_version": 2, "class_names": ["a", "b"],
             "files": {"predictions": "missing.json"}},
            "not readable",
        ),
        ({"kind": "finetuned", "manifest_version": 2, "class_names": ["a", "b"]}, "no predictions"),
    ],
)  # fmt: skip
def test_broken_finetuned_runs_are_skipped_with_a_note(artifacts, manifest, why):
    folder = artifacts / "finetune" / "synthetic"
    folder.mkdir(parents=True, exist_ok=True)
    bad = folder / "bad.json"
    bad.write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    try:
        runs, notes = collect_runs("synthetic", artifacts)
    finally:
        bad.unlink()
    assert "bad" not in {r.name for r in runs}
    assert {r.run_id for r in runs} >= {"synth/svm", "synth/softmax"}
    assert any("bad.json" in n and why in n for n in notes), notes


def test_malformed_predictions_file_is_skipped_with_a_note(artifacts):
    _finetuned(artifacts, name="ft_broken")
    folder = artifacts / "finetune" / "synthetic"
    (folder / "ft_broken.predictions.json").write_text(
        json.dumps({"class_names": ["class0"], "predictions": {}})
    )
    try:
        runs, notes = collect_runs("synthetic", artifacts)
    finally:
        for path in folder.glob("ft_broken.*"):
            path.unlink()
    assert "ft_broken" not in {r.name for r in runs}
    assert any("ft_broken.json" in n and "has classes" in n for n in notes), notes


def test_no_heads_is_one_clear_error(tmp_path, artifacts):
    with pytest.raises(
        ReportError, match="nothing to report for 'synthetc'.*did you mean synthetic"
    ):
        write_report("synthetc", artifacts_dir=artifacts)
    with pytest.raises(ReportError, match="run `make head"):
        write_report("anything", artifacts_dir=tmp_path)
    with pytest.raises(PipelineError, match=r"--resamples must be a whole number .*; got 0"):
        write_report("synthetic", artifacts_dir=artifacts, n_resamples=0)


def test_heads_without_val_or_test_say_so_not_run_make_head(tmp_path):
    # Heads fitted on a split that left val and test empty: "run make head first" would be wrong.
    (tmp_path / "heads" / "tiny" / "svm").mkdir(parents=True)
    with pytest.raises(ReportError, match="have no val or test predictions") as caught:
        write_report("tiny", artifacts_dir=tmp_path)
    assert "did you mean" not in str(caught.value)
    assert "run `make head" not in str(caught.value)


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
        f"DATA={tiny_cache.parents[3] / 'colours'}",  # make head checks the images it was made from
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


def test_markdown_escaping_keeps_user_names_literal():
    from pipeline.report.pages import md_escape

    assert md_escape("a|b") == "a\\|b"
    assert md_escape("<img src=x onerror=alert(1)>") == "&lt;img src=x onerror=alert(1)&gt;"
    assert md_escape("*bold* _it_ $x$ [l](u)") == "\\*bold\\* \\_it\\_ \\$x\\$ \\[l\\](u)"


def test_the_report_links_the_audit_and_says_its_leaks(artifacts, tmp_path):
    folder = artifacts / "audit" / "synthetic"
    folder.mkdir(parents=True)
    leak = {"where": ["leak across splits"], "members": []}
    (folder / "audit.json").write_text(
        json.dumps({"exact_duplicates": [leak], "near_duplicates": {"groups": []}})
    )
    try:
        result = write_report("synthetic", artifacts_dir=artifacts, out_dir=tmp_path / "r")
    finally:
        shutil.rmtree(artifacts / "audit")
    html = result.html.read_text()
    assert "1 group of copies across splits (a leak)" in html
    assert "audit/synthetic/audit.html'>The audit</a>" in html
    assert html.index("a leak") < html.index("Leaderboard (ranked")
    assert any("a leak" in line for line in result.lines)


def test_the_report_writes_and_links_the_protocols_page(artifacts, tmp_path):
    folder = artifacts / "protocols" / "synthetic" / "synth"
    folder.mkdir(parents=True)
    runs = [{"seed": s, "balanced_accuracy": v, "params": {"C": 1.0}, "scheme": "3-fold"}
            for s, v in enumerate((0.8, 0.82, 0.81))]  # fmt: skip
    record = {
        "protocol": "5-per-class", "metric": "balanced_accuracy", "seeds": [0, 1, 2],
        "heads": {"svm": {"seeds": runs}}, "split": {"kind": "per_class", "train_per_class": 5},
    }  # fmt: skip
    (folder / "5-per-class.json").write_text(json.dumps(record))
    (folder / "2-per-class.json").write_text("{truncated")
    try:
        result = write_report("synthetic", artifacts_dir=artifacts, out_dir=tmp_path / "r")
        page = (artifacts / "protocols" / "synthetic" / "index.html").read_text()
    finally:
        shutil.rmtree(artifacts / "protocols")
    assert "5 per class over 3 seeds: svm 0.810 +- 0.008 balanced accuracy." in page
    html = result.html.read_text()
    link = re.search(r"<p>Research protocols on these images \(5 per class over 3 seeds\) are on "
                     r"<a href='([^']+)'>their own page</a>.</p>", html)  # fmt: skip
    assert (
        link
        and (tmp_path / "r" / link.group(1)).resolve()
        == (artifacts / "protocols" / "synthetic" / "index.html").resolve()
    )
    assert html.count("Research protocols on") == 1
    assert result.lines[-1].endswith("protocols/synthetic/index.html")
    notes = json.loads(result.json.read_text())["notes"]
    assert any(n.startswith("skipped ") and "2-per-class.json: not JSON" in n for n in notes)
