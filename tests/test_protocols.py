"""Research protocols on one cache: N per class and split lists (pipeline.heads.protocols),
run per seed with mean +- std (pipeline.heads.protocol_run). Synthetic arrays, no Keras."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import HeadError
from pipeline.features.cache import FeatureSet
from pipeline.heads import protocol_run
from pipeline.heads.protocols import per_class_split, split_file

CLASSES = ("ant", "bee", "wasp")


def _labels(per_class: int = 8) -> np.ndarray:
    return np.repeat(np.arange(len(CLASSES)), per_class)


def _feature_set(tmp_path: Path, per_class: int = 12, width: int = 6) -> FeatureSet:
    """Separable features, each row unique (its index in the last column)."""
    rng = np.random.default_rng(0)
    labels = _labels(per_class)
    X = rng.normal(size=(len(labels), width)) + 4.0 * np.eye(len(CLASSES), width)[labels]
    X[:, -1] = np.arange(len(labels)) * 1e-3
    paths = np.array([f"{CLASSES[c]}/{i}.jpg" for i, c in enumerate(labels)], dtype=object)
    return FeatureSet(
        path=tmp_path / "c.h5", features=X.astype(np.float32), labels=labels, paths=paths,
        split=np.full(len(labels), "train", dtype=object), class_names=CLASSES,
        attrs={"dataset": "bugs", "data_root": str(tmp_path), "seconds": 1.0},
    )  # fmt: skip


def test_per_class_split_draws_n_per_class_and_tests_the_rest() -> None:
    labels = _labels()
    split = per_class_split(labels, 3, seed=0)
    for c in range(len(CLASSES)):
        assert list(split[labels == c]).count("train") == 3
        assert list(split[labels == c]).count("test") == 5


def test_per_class_split_is_deterministic_per_seed_and_differs_across_seeds() -> None:
    labels = _labels()
    a, b = per_class_split(labels, 3, seed=1), per_class_split(labels, 3, seed=1)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, per_class_split(labels, 3, seed=2))


def test_per_class_split_refuses_a_class_too_small_naming_it() -> None:
    labels = np.concatenate([_labels(), np.full(3, 3)])
    with pytest.raises(HeadError, match=r"class 'hornet' has 3 images.*at most 2"):
        per_class_split(labels, 3, seed=0, class_names=(*CLASSES, "hornet"))
    with pytest.raises(HeadError, match="at least 1"):
        per_class_split(labels, 0, seed=0)


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "splits.csv"
    path.write_text(text)
    return path


def test_split_file_reads_a_csv_with_labels_and_leaves_unlisted_rows_out(tmp_path: Path) -> None:
    paths = ["ant/0.jpg", "bee/1.jpg", "bee/2.jpg"]
    csv = _csv(tmp_path, "path,split,label\nant/0.jpg,train,ant\nbee/1.jpg,test,bee\n")
    split = split_file(csv, paths, tmp_path, labels=np.array([0, 1, 1]), class_names=CLASSES)
    assert list(split) == ["train", "test", ""]
    absolute = _csv(tmp_path, f"path,split\n{tmp_path}/ant/0.jpg,val\nbee/2.jpg,test\n")
    assert list(split_file(absolute, paths, tmp_path)) == ["train", "", "test"]


def test_split_file_reads_one_text_list_per_split(tmp_path: Path) -> None:
    (tmp_path / "Train.txt").write_text("ant/0.jpg\n\nbee/1.jpg\n")
    (tmp_path / "Test.txt").write_text("bee/2.jpg\n")
    spec = f"train={tmp_path}/Train.txt,test={tmp_path}/Test.txt"
    assert list(split_file(spec, ["ant/0.jpg", "bee/1.jpg", "bee/2.jpg"], tmp_path)) == [
        "train", "train", "test",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("ant/9.jpg,train", r"splits.csv:2: 'ant/9.jpg' is not an image of the feature cache"),
        ("../x/ant/0.jpg,train", r"splits.csv:2: .* is outside the data folder"),
        ("ant/0.jpg,train\nant/0.jpg,test", r"splits.csv:3: .* listed twice \(first at .*:2\)"),
        ("ant/0.jpg,holdout", r"splits.csv:2: unknown split 'holdout'"),
        ("ant/0.jpg,train", r"names no test image"),
    ],
)
def test_split_file_refuses_bad_lists_in_one_line(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(HeadError, match=message) as caught:
        split_file(_csv(tmp_path, f"path,split\n{body}\n"), ["ant/0.jpg", "bee/1.jpg"], tmp_path)
    assert "\n" not in str(caught.value)


def test_split_file_refuses_unknown_or_wrong_labels_and_bad_headers(tmp_path: Path) -> None:
    labels, paths = np.array([0, 1]), ["ant/0.jpg", "bee/1.jpg"]
    for row, message in (("moth", "unknown label 'moth'"), ("bee", "labelled 'bee' in the list")):
        csv = _csv(tmp_path, f"path,split,label\nant/0.jpg,train,{row}\nbee/1.jpg,test,bee\n")
        with pytest.raises(HeadError, match=message):
            split_file(csv, paths, tmp_path, labels=labels, class_names=CLASSES)
    with pytest.raises(HeadError, match="header path,split"):
        split_file(_csv(tmp_path, "file,set\nant/0.jpg,train\n"), paths, tmp_path)
    with pytest.raises(HeadError, match="cannot read split list"):
        split_file(tmp_path / "none.csv", paths, tmp_path)


def test_run_protocol_reports_mean_and_std_per_head_and_writes_json(tmp_path: Path) -> None:
    fs = _feature_set(tmp_path)
    result = protocol_run.run_protocol(
        fs, train_per_class=5, seeds=[0, 1], heads="logreg", artifacts_dir=tmp_path / "art"
    )
    record = json.loads(result.json_path.read_text())
    runs = record["heads"]["logreg"]["seeds"]
    assert [r["n_train"] for r in runs] == [15, 15] and runs[0]["n_test"] == 21
    assert runs[0]["scheme"].endswith("-fold")  # 5 per class: chosen by CV
    values = [r["balanced_accuracy"] for r in runs]
    assert result.mean("logreg") == pytest.approx(np.mean(values))
    assert result.std("logreg") == pytest.approx(np.std(values))
    assert result.json_path == tmp_path / "art/protocols/bugs/c/5-per-class.json"
    assert "| logreg | " in result.md_path.read_text()


def test_few_shots_use_fixed_defaults_and_knn_fits_one_shot(tmp_path: Path) -> None:
    fs = _feature_set(tmp_path)
    result = protocol_run.run_protocol(
        fs, train_per_class=1, seeds=[0], heads="knn,svm", artifacts_dir=None
    )
    run = result.record["heads"]["knn"]["seeds"][0]
    assert run["scheme"].startswith("fixed defaults") and run["params"] == {"n_neighbors": 3}


@pytest.mark.parametrize("n", [5, 2])  # searched by CV, and fixed defaults
def test_test_rows_reach_neither_the_search_nor_the_refit(tmp_path, monkeypatch, n) -> None:
    from sklearn.pipeline import Pipeline

    fs = _feature_set(tmp_path)
    seen: list[np.ndarray] = []
    real = Pipeline.fit

    def spy(self, X, y=None, **params):  # every fit: each CV fold's and the refit
        seen.append(np.asarray(X)[:, -1])
        return real(self, X, y, **params)

    monkeypatch.setattr(Pipeline, "fit", spy)
    split = protocol_run.per_class_split(fs.labels, n, seed=3)
    test_ids = set(np.round(fs.features[split == "test", -1], 6).tolist())
    protocol_run.evaluate_split(fs, split, ["svm"], seed=3)
    assert len(seen) >= (2 if n == 5 else 1)
    assert all(not (set(np.round(s, 6).tolist()) & test_ids) for s in seen)
    assert len(seen[-1]) == n * len(CLASSES)  # the refit: all the training rows


def test_run_protocol_refuses_bad_requests_in_one_line(tmp_path: Path) -> None:
    fs = _feature_set(tmp_path)
    for kwargs, message in (
        ({"train_per_class": 2, "metric": "auc"}, r"METRIC= \(--metric\) must be one of"),
        ({"train_per_class": 2, "seeds": []}, "SEEDS= is empty"),
        ({}, "give one of TRAIN_PER_CLASS="),
        ({"train_per_class": 2, "metric": "top5"}, "top5 needs more than 10 classes"),
        ({"train_per_class": 12}, "class 'ant' has 12 images"),
    ):
        with pytest.raises(HeadError, match=message):
            protocol_run.run_protocol(fs, heads="svm", artifacts_dir=None, **kwargs)


def test_parse_shots_orders_values_and_refuses_bad_ones() -> None:
    from pipeline.recipes.curve import parse_shots

    assert parse_shots("10,all,1,2") == [1, 2, 10, "all"]
    for bad in ("0", "five", ""):
        with pytest.raises(HeadError, match="SHOTS="):
            parse_shots(bad)


def test_run_curve_writes_table_json_and_plot(tmp_path: Path) -> None:
    from pipeline.recipes.curve import run_curve

    fs = _feature_set(tmp_path)
    fs.split[::3] = "test"
    result = run_curve(fs, "1,2,all", seeds=[0, 1], heads="ridge", artifacts_dir=tmp_path)
    points = result.record["points"]
    assert [p["shots"] for p in points] == [1, 2, "all"]
    assert (
        points[0]["heads"]["ridge"]["n_train"] == 3 and points[2]["heads"]["ridge"]["n_train"] == 24
    )
    assert [p.name for p in result.paths] == ["curve.json", "curve.md", "curve.png"]
    assert result.paths[2].read_bytes()[:4] == b"\x89PNG"
    assert "| all | " in result.paths[1].read_text()


def test_curve_all_leaves_out_the_rows_a_split_file_left_unused(tmp_path: Path) -> None:
    from pipeline.recipes.curve import run_curve

    fs = _feature_set(tmp_path)
    fs.split[::3] = "test"
    fs.split[1::6] = "unused"  # make features SPLIT_FILE= did not list them
    result = run_curve(fs, "all", seeds=[0], heads="ridge", artifacts_dir=tmp_path)
    n_train = int(np.sum(fs.split == "train"))
    assert result.record["points"][0]["heads"]["ridge"]["n_train"] == n_train


def test_n_per_class_draws_only_from_rows_in_a_split(tmp_path: Path, monkeypatch) -> None:
    fs = _feature_set(tmp_path)
    fs.split[1::4] = "unused"  # make features SPLIT_FILE= did not list them
    seen = []
    real = protocol_run.evaluate_split
    monkeypatch.setattr(protocol_run, "evaluate_split",
                        lambda fs, split, *a, **k: seen.append(split) or real(fs, split, *a, **k))  # fmt: skip
    protocol_run.run_protocol(fs, 2, seeds=[0], heads="ridge", artifacts_dir=None)
    (split,) = seen
    assert set(split[fs.split == "unused"]) == {""} and set(split[fs.split != "unused"]) == {
        "train",
        "test",
    }


def test_protocol_command_names_the_make_variable_in_one_line(capsys) -> None:
    from pipeline.cli.main import main

    assert main(["protocol", "--cache", "x.h5", "--seeds", "a,b"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--seeds" in err and "0,1,2,3,4" in err and "\n" not in err


def test_the_docs_mit67_snippet_writes_a_csv_split_file_reads(tmp_path, monkeypatch) -> None:
    page = (Path(__file__).resolve().parents[1] / "docs/protocols.md").read_text()
    (snippet,) = [b.split("```")[0] for b in page.split("```python\n")[1:]]
    (tmp_path / "TrainImages.txt").write_text("bar/a.jpg\nbar/b.jpg\n")
    (tmp_path / "TestImages.txt").write_text("bar/c.jpg\n")
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "protocols.md", "exec"), {})
    paths = ["bar/a.jpg", "bar/b.jpg", "bar/c.jpg", "bar/d.jpg"]
    assert list(split_file(tmp_path / "mit67.csv", paths, tmp_path)) == [
        "train", "train", "test", "",
    ]  # fmt: skip


def test_linear_eval_chooses_c_on_held_out_train_rows_and_refits_on_all(
    tmp_path, monkeypatch
) -> None:
    from sklearn.linear_model import LogisticRegression

    from pipeline.heads import linear_eval

    assert len(linear_eval.C_GRID) == 12
    assert (min(linear_eval.C_GRID), max(linear_eval.C_GRID)) == pytest.approx((1e-6, 1e5))
    fs = _feature_set(tmp_path, per_class=12)
    seen: list[np.ndarray] = []
    real = LogisticRegression.fit

    def spy(self, X, y=None, **params):  # every sweep fit and the refit
        assert self.solver == "lbfgs"
        seen.append(np.asarray(X)[:, -1])
        return real(self, X, y, **params)

    monkeypatch.setattr(LogisticRegression, "fit", spy)
    split = per_class_split(fs.labels, 10, seed=1)
    test_ids = set(np.round(fs.features[split == "test", -1], 6).tolist())
    run = protocol_run.evaluate_split(fs, split, ["linear_eval"], seed=1)["linear_eval"]
    assert len(seen) == len(linear_eval.C_GRID) + 1
    assert all(not (set(np.round(s, 6).tolist()) & test_ids) for s in seen)
    assert all(len(s) == 8 * len(CLASSES) for s in seen[:-1])  # 2 of each class's 10 held out
    assert len(seen[-1]) == 10 * len(CLASSES)  # the refit: every training row
    assert run["params"]["C"] in linear_eval.C_GRID and len(run["params"]["held_out"]) == 12
    assert "held-out 20%" in run["scheme"]


def test_linear_eval_is_a_protocol_head_named_among_others_and_recorded_per_seed(
    tmp_path,
) -> None:
    assert protocol_run.resolve_protocol_heads("svm,linear-eval") == ("svm", "linear_eval")
    with pytest.raises(HeadError, match="protocols also take linear_eval"):
        protocol_run.resolve_protocol_heads("linear_evil")
    fs = _feature_set(tmp_path)
    result = protocol_run.run_protocol(
        fs, train_per_class=1, seeds=[0, 1], heads="linear_eval", artifacts_dir=None
    )
    runs = result.record["heads"]["linear_eval"]["seeds"]
    assert [r["params"]["C"] for r in runs] == [1.0, 1.0]  # one image: nothing to hold out
    assert runs[0]["scheme"].startswith("fixed C=1")


@pytest.mark.parametrize(("metric", "chooses"), [("macro_f1", "macro_f1"), ("top5", "accuracy")])
def test_the_searches_choose_by_the_protocols_metric(
    tmp_path, monkeypatch, metric, chooses
) -> None:
    from pipeline.heads import search as head_search

    fs = _feature_set(tmp_path)
    used: list[str] = []
    real = head_search.timed_search

    def spy(*args, **kwargs):
        used.append(kwargs["metric"])
        return real(*args, **kwargs)

    monkeypatch.setattr(head_search, "timed_search", spy)
    split = protocol_run.per_class_split(fs.labels, 5, seed=0)
    protocol_run.evaluate_split(fs, split, ["svm", "logreg"], seed=0, metric=metric)
    assert used == [chooses, chooses]


def test_protocol_and_curve_commands_write_the_protocols_page(tmp_path, capsys) -> None:
    from heads_helpers import synthetic_cache

    from pipeline.cli.main import main

    cache = synthetic_cache(tmp_path, width=6, per_class=10, dataset="bugs")
    common = ["--cache", str(cache), "--seeds", "0,1", "--head", "ridge"]
    common += ["--artifacts", str(tmp_path / "art")]
    assert main(["protocol", *common, "--train-per-class", "3"]) == 0
    page = tmp_path / "art/protocols/bugs/index.html"
    assert f"wrote {page} and {page.with_suffix('.md')}" in capsys.readouterr().out
    assert main(["curve", *common, "--shots", "1,2"]) == 0
    text = page.with_suffix(".md").read_text()
    assert "## 3 per class" in text and "## Few-shot curve" in text
    assert "| 1 | ridge |" in text  # each seed of the curve's N=1, in the curve's section
