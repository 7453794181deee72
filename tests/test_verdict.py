"""The verdict answers its question in words; short names; figures' fonts; times that never mix.

Built from small synthetic predictions (no Keras, no files): each test is well under a second.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from pipeline.core.artifacts import SplitPredictions
from pipeline.report import fonts, stats
from pipeline.report.cells import head_times, p_value
from pipeline.report.evaluation import Run, build_report_data
from pipeline.report.naming import display_labels, phase_two_words
from pipeline.report.pages import markdown, summary_lines
from pipeline.report.render import cost_table, leaderboard_table, metrics_table
from pipeline.report.verdict import verdict

NAMES = ("a", "b", "c")
N = 60


def _split(wrong: set[int], prefix: str) -> SplitPredictions:
    """``N`` images of three classes, wrong exactly on the indices in ``wrong``."""
    labels = np.arange(N) % 3
    pred = np.array([(y + 1) % 3 if i in wrong else y for i, y in enumerate(labels)])
    paths = np.array([f"{prefix}/{NAMES[y]}/{i:03d}.png" for i, y in enumerate(labels)], object)
    return SplitPredictions(paths, labels.astype(np.int64), pred.astype(np.int64), None, False)


def _run(name, val_wrong, test_wrong=None, *, group="mobilenet_v2_224_avg_imagenet", **m):
    splits = {}
    if val_wrong is not None:
        splits["val"] = _split(set(val_wrong), "val")
    if test_wrong is not None:
        splits["test"] = _split(set(test_wrong), "test")
    manifest = {"weights_source": "imagenet", "backbone": group.split("_2")[0], **m}
    kind = m.pop("kind", "head")
    return Run(name, kind, group if kind == "head" else "finetuned", manifest, NAMES, splits)


def _data(runs):
    return build_report_data("demo", runs, [], n_resamples=200)


def test_the_first_sentence_answers_svm_against_softmax_with_the_exact_p_value():
    svm = _run("svm", [0, 1], [0])
    softmax = _run("softmax", range(0, 14), [0, 1])  # 12 more wrong on val: significant
    data = _data([svm, softmax])
    first = verdict(data)[0]
    p = stats.mcnemar_exact(np.ones(N, bool) ^ np.isin(np.arange(N), [0, 1]),
                            ~np.isin(np.arange(N), range(14))).p_value  # fmt: skip
    assert first.startswith("Linear SVM or softmax head? On val (60 images), svm beats softmax:")
    assert "12 images only svm gets right, 0 only softmax" in first
    assert p_value(p) in first and p < 0.05


def test_no_detectable_difference_is_said_so():
    data = _data([_run("svm", [0, 1, 2], [0]), _run("softmax", [3, 4], [0])])
    first = verdict(data)[0]
    assert "On val (60 images), no detectable difference: svm 0.950" in first
    assert "exact McNemar p = 1" in first


def test_every_significant_difference_is_a_sentence_and_each_is_stated_once():
    """The test split's svm-softmax difference (8 to 1 on digits) sat only in a table."""
    svm = _run("svm", [0, 1], [])
    softmax = _run("softmax", [0, 2], list(range(9)))  # val: tied; test: 9 to 0
    knn = _run("knn", list(range(20)), [])  # val: far behind the chosen run
    data = _data([svm, softmax, knn])
    sentences = verdict(data)
    text = " ".join(sentences)
    significant = [c for c in data["mcnemar"] if c["p_value"] < 0.05]
    significant += [
        e["mcnemar_vs_best"]
        for e in data["leaderboard"][1:]
        if e["mcnemar_vs_best"]["p_value"] < 0.05
    ]
    assert significant
    for c in significant:
        assert p_value(c["p_value"]) in text
    test_sentence = [s for s in sentences if s.startswith("On the untouched test split")]
    assert test_sentence == [
        "On the untouched test split (60 images), svm beats softmax: svm 1.000 [1.000, 1.000], "
        f"softmax 0.850 {_interval(data, 'softmax')} accuracy; 9 images only svm gets right, "
        f"0 only softmax, exact McNemar {p_value(significant[0]['p_value'])}."
    ]
    assert "Significantly behind" in text and "knn" in text
    assert sum("tied" in s or "Not distinguishable" in s for s in sentences) <= 1  # listed once


def _interval(data, name):
    row = next(r for r in data["runs"] if r["name"] == name)
    low, high = row["splits"]["test"]["accuracy_ci"]
    return f"[{low:.3f}, {high:.3f}]"


def test_without_val_the_comparison_says_it_rests_on_train_scores():
    svm = _run("svm", None, [0], cv={"score": 0.91, "scheme": "3-fold"})
    softmax = _run("softmax", None, [0, 1], cv={"score": 0.88, "scheme": "one fit, hold-out"})
    first = verdict(_data([svm, softmax]))[0]
    assert "no val split" in first and "svm 0.910 (3-fold)" in first
    assert "not the same images" in first and "On the untouched test split (60 images)" in first


def test_one_head_missing_is_a_plain_statement():
    first = verdict(_data([_run("svm", [0], [0]), _run("logreg", [1], [1])]))[0]
    assert first.startswith("Linear SVM or softmax head? Not answered: only the linear SVM")


def test_no_test_split_is_said_plainly():
    text = " ".join(verdict(_data([_run("svm", [0]), _run("softmax", [1])])))
    assert "there is no test split, so there is no untouched figure to quote" in text


def test_short_names_everywhere_and_the_backbone_only_for_several_caches():
    one = _data([_run("svm", [0], [0]), _run("softmax", [1], [1])])
    for table in (leaderboard_table(one), metrics_table(one, "val"), cost_table(one)):
        assert {row[0] if table[0].startswith(("Metrics", "Cost")) else row[1]
                for row in table[2]} <= {"svm", "softmax"}  # fmt: skip
    assert not any("mobilenet" in line for line in summary_lines(one)[1:])
    two = display_labels([
        {"run": "mobilenet_v2_224_avg_imagenet/svm", "name": "svm", "kind": "head",
         "group": "mobilenet_v2_224_avg_imagenet", "config": {"backbone": "mobilenet_v2"}},
        {"run": "resnet50_224_avg_imagenet/svm", "name": "svm", "kind": "head",
         "group": "resnet50_224_avg_imagenet", "config": {"backbone": "resnet50"}},
        {"run": "finetuned/mnv2_layers-block", "name": "mnv2_layers-block", "kind": "finetuned",
         "group": "finetuned", "config": {"unfreeze": "block"}},
    ])  # fmt: skip
    assert sorted(two.values()) == [
        "fine-tuned (last block)",
        "svm (mobilenet_v2)",
        "svm (resnet50)",
    ]


def test_the_markdown_and_the_terminal_say_what_the_verdict_says():
    data = _data([_run("svm", [0, 1], []), _run("softmax", [0, 2], list(range(9)))])
    terminal = " ".join(line.strip() for line in summary_lines(data))
    page = markdown(data, [])
    for sentence in verdict(data):
        assert sentence in terminal
        assert sentence.replace("_", "\\_") in page.replace("\\[", "[").replace("\\]", "]")


def test_time_columns_never_mix_head_only_and_end_to_end():
    head = {"includes_backbone": False, "predict_seconds_per_image": 7e-6,
            "end_to_end_seconds_per_image": 0.0077}  # fmt: skip
    tuned = {"includes_backbone": True, "predict_seconds_per_image": 0.045}
    assert head_times(head) == ("0.007", "7.7")
    assert head_times(tuned) == ("-", "45")  # no head-only figure for a whole network


def test_the_fine_tuning_caption_comes_from_the_run_record():
    cached = {"phase_two_input": {"mode": "cached activations", "cut_layer": "block_15_add",
                                  "copies": 8}}  # fmt: skip
    assert phase_two_words(cached).startswith("on cached activations")
    assert "8 augmented copies" in phase_two_words(cached)
    images = {"phase_two_input": {"mode": "images", "reason": "AUG_COPIES=0"}}
    assert phase_two_words(images).startswith("on the images")


def test_class_names_without_glyphs_become_numbers_without_warnings(monkeypatch):
    from pipeline.report.plotting import confusion_figure, png_bytes

    monkeypatch.setattr(fonts, "_covered", lambda: frozenset(range(128)))  # no CJK font
    names = ["고양이", "개"]
    assert fonts.class_labels(names) == (["0", "1"], True)
    assert fonts.class_labels(["cat", "dog"]) == (["cat", "dog"], False)
    assert fonts.printable("개 photos") == "? photos"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        figure = confusion_figure(np.array([[3, 1], [0, 4]]), names, title="svm on val")
        png_bytes(figure)
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["0", "1"]
    assert not [w for w in caught if "Glyph" in str(w.message)]


@pytest.mark.skipif(not fonts.drawable("고양이"), reason="no font with Hangul installed")
def test_class_names_with_an_installed_cjk_font_are_drawn_as_written():
    assert fonts.class_labels(["고양이", "개"]) == (["고양이", "개"], False)


def test_a_report_folder_that_cannot_be_written_is_one_clear_error(monkeypatch, tmp_path):
    from pipeline.core.errors import ReportError
    from pipeline.report import collect

    runs = [_run("svm", [0], [0]), _run("softmax", [1], [1])]
    monkeypatch.setattr(collect, "collect_runs", lambda *a: (runs, []))
    monkeypatch.setattr(collect, "report_figures", lambda data: {})  # drawing is tested apart
    blocked = tmp_path / "a file"
    blocked.write_text("")  # a folder cannot be made under it, even by root
    with pytest.raises(ReportError, match="cannot write the report into .*--out") as caught:
        collect.write_report(
            "demo", artifacts_dir=tmp_path, out_dir=blocked / "reports", n_resamples=50
        )
    assert "\n" not in str(caught.value)


def test_the_audit_is_linked_and_its_leaks_said_after_the_verdict(tmp_path):
    from pipeline.report.audit_note import audit_note

    folder = tmp_path / "audit" / "photos"
    folder.mkdir(parents=True)
    assert audit_note(tmp_path, "photos", tmp_path / "reports" / "photos") is None
    leak = {"where": ["leak across splits"], "members": []}
    conflict = {"where": ["label conflict", "leak across splits"], "members": []}
    same = {"where": ["same class, same split"], "members": []}
    summary = {"exact_duplicates": [leak, same], "near_duplicates": {"groups": [conflict]}}
    (folder / "audit.json").write_text(json.dumps(summary))
    note = audit_note(tmp_path, "photos", tmp_path / "reports" / "photos")
    assert note["found"] and note["href"] == "../../audit/photos/audit.html"
    assert "2 groups of copies across splits (a leak)" in note["sentence"]
    assert "1 group of copies filed under different classes" in note["sentence"]
    (folder / "audit.json").write_text(json.dumps({"exact_duplicates": [same]}))  # malformed
    note = audit_note(tmp_path, "photos", tmp_path / "reports" / "photos")
    assert not note["found"] and "not a readable audit" in note["sentence"]


def test_grids_that_moved_are_said_under_the_leaderboard():
    moved = {"C": {"from": [0.1, 1.0], "searched": [0.1, 1.0, 10.0, 100.0], "direction": "up",
                   "stopped": "inside"}}  # fmt: skip
    svm = _run("svm", [0, 1], params={"C": 10.0}, grid_moves=moved)
    svm.manifest["name"] = "svm"
    broken = _run("logreg", [0], params={"C": 1.0}, grid_moves={"C": {}})
    broken.manifest["name"] = "logreg"
    page = markdown(_data([svm, broken, _run("softmax", [3])]), {}, {})
    assert "Grids that moved past their edge: svm: C grid moved up past 1 to 10, 100" in page
    assert "logreg: C grid" not in page  # a malformed record says nothing rather than failing
