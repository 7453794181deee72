"""Every figure: the report's (from report data) and stage three's training curves."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

from pipeline.report import plotting
from pipeline.report.figures import report_figures, run_title

NAMES = ["ants", "bees", "wasps"]


def _row(name: str, group: str, confusion, *, fit_seconds=1.0, kind="head", history=()):
    cm = np.array(confusion)
    split = {
        "n": int(cm.sum()),
        "accuracy": float(np.trace(cm) / cm.sum()),
        "accuracy_ci": [0.5, 0.9],
        "confusion": cm.tolist(),
    }
    return {
        "run": f"{group}/{name}",
        "name": name,
        "kind": kind,
        "group": group,
        "class_names": list(NAMES),
        "config": {"backbone": "vgg16", "input_size": 224, "weights_source": "imagenet"},
        "fit_seconds": fit_seconds,
        "predict_seconds_per_image": 0.001,
        "end_to_end_seconds_per_image": 0.02,
        "extraction_seconds": 30.0,
        "history": list(history),
        "splits": {"val": dict(split), "test": dict(split)},
    }


def _history(phase_one: int, phase_two: int) -> list[dict]:
    phases = [1] * phase_one + [2] * phase_two
    return [
        {"phase": p, "epoch": i + 1, "loss": 1.0 / (i + 1), "accuracy": 0.5 + 0.04 * i,
         "val_loss": 1.2 / (i + 1), "val_accuracy": None if i == 0 else 0.5 + 0.03 * i}
        for i, p in enumerate(phases)
    ]  # fmt: skip


CM = [[5, 1, 0], [0, 4, 2], [1, 0, 6]]


def test_confusion_figure_row_shares_counts_and_title():
    figure = plotting.confusion_figure(CM, NAMES, title="vgg16 + svm: test")
    assert isinstance(figure, Figure)
    ax = figure.axes[0]
    assert ax.get_title().splitlines()[0] == "vgg16 + svm: test"
    assert "share of the true class" in ax.get_title()  # under the title, not by the bar
    assert figure.axes[1].get_ylabel() == ""  # the colour bar has no label to run over it
    assert [t.get_text() for t in ax.get_xticklabels()] == NAMES
    assert ax.get_xlabel() == "predicted class" and ax.get_ylabel() == "true class"
    shares = ax.images[0].get_array()
    assert np.allclose(shares.sum(axis=1), 1.0)  # normalised by row
    assert shares[0, 0] == pytest.approx(5 / 6)
    nonzero = sorted(v for v in np.ravel(CM) if v)
    assert sorted(int(t.get_text()) for t in ax.texts) == nonzero  # counts, empty cells blank
    assert all(t.get_fontsize() >= 9 for t in ax.texts)


@pytest.mark.parametrize("k", [2, 10, 40, 100])
def test_confusion_figure_is_sized_for_its_classes(k):
    """Two classes are not a thumbnail; a hundred keep cells and labels a reader can read."""
    cm = np.eye(k, dtype=int) * 5 + 1
    figure = plotting.confusion_figure(cm, [f"class{i}" for i in range(k)], title="t")
    figure.canvas.draw()
    box = figure.axes[0].get_window_extent()  # pixels at the report's 100 dpi
    assert box.width >= 150 and box.height >= 150
    assert box.width / k >= 14  # a 7 pt label (10 px) per row fits its cell
    ticks = figure.axes[0].get_yticklabels()
    assert all(t.get_fontsize() >= 7 for t in ticks)
    assert (len(figure.axes[0].texts) == k * k) == (k <= 25)


def test_forest_figure_one_line_per_run_best_at_the_top():
    entries = [
        {"label": "svm", "accuracy": 0.9, "accuracy_ci": [0.85, 0.95], "role": "winner",
         "colour": "#1f77b4"},
        {"label": "knn", "accuracy": 0.88, "accuracy_ci": [0.8, 0.93], "role": "tied",
         "colour": "#d62728"},
        {"label": "ridge", "accuracy": 0.7, "accuracy_ci": [0.6, 0.8], "role": "other",
         "colour": "#2ca02c"},
    ]  # fmt: skip
    figure = plotting.forest_figure(entries, split="val")
    ax = figure.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["ridge", "knn", "svm"]  # bottom to top: the best is on top
    assert "val" in ax.get_xlabel() and "interval" in ax.get_xlabel()
    assert len(ax.containers) == 3  # one error bar per run
    assert len(ax.patches) == 1  # the winner's interval, shaded


def test_one_colour_per_run_and_roles_as_markers():
    """A colour names a run on the whole page; chosen and tied are marker shapes."""
    entries = [
        {"label": n, "accuracy": 0.9, "accuracy_ci": [0.8, 0.95], "role": role, "colour": c}
        for n, role, c in (("svm", "winner", "#1f77b4"), ("knn", "tied", "#d62728"))
    ]
    figure = plotting.forest_figure(entries, split="val")
    ax = figure.axes[0]
    lines = [c.lines[0] for c in ax.containers]
    assert [line.get_color() for line in lines] == ["#1f77b4", "#d62728"]
    assert [line.get_marker() for line in lines] == ["*", "o"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(legend) == len(set(legend)) == 3
    colours = plotting.run_colours([f"r{i}" for i in range(12)])
    assert len(set(list(colours.values())[:9])) == 9 and colours["r11"] == plotting.MORE_RUNS


def _boxes_overlap_points(figure, ax, xs, ys):
    from matplotlib.text import Text

    renderer = figure.canvas.get_renderer()
    points = ax.transData.transform(np.column_stack([xs, ys]))
    boxes = [Text.get_window_extent(t, renderer) for t in ax.texts]
    hits = [
        b for b in boxes for x, y in points if b.x0 - 3 < x < b.x1 + 3 and b.y0 - 3 < y < b.y1 + 3
    ]
    pairs = [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :] if a.overlaps(b)]
    return hits, pairs


def test_cost_figure_labels_hide_no_point_and_no_label():
    # a tight cluster, the case where labels next to their points would cover each other
    points = [
        {"label": name, "cache": "vgg16", "accuracy": 0.90 + 0.001 * i, "fit_seconds": 1.0 + 0.05 * i,
         "seconds_per_image": 0.02, "finetuned": False, "extraction_seconds": 30.0,
         "colour": plotting.RUN_COLOURS[i]}
        for i, name in enumerate(["svm", "logreg", "knn", "ridge", "softmax", "rbf_svm"])
    ] + [{"label": "ft", "accuracy": 0.95, "fit_seconds": 200.0, "seconds_per_image": 0.05,
          "finetuned": True, "colour": plotting.RUN_COLOURS[6]},
         {"label": "no stage one time", "accuracy": 0.9, "fit_seconds": 2.0,
          "seconds_per_image": None, "finetuned": False}]  # fmt: skip
    figure = plotting.cost_figure(points, split="val")
    fit_ax, time_ax = figure.axes
    assert fit_ax.get_xscale() == "log" and fit_ax.get_ylabel() == "accuracy (val)"
    assert "per image from the images" in time_ax.get_xlabel()
    assert {t.get_text() for t in fit_ax.texts} == {p["label"] for p in points}
    # a head-only time never sits among end-to-end ones: no end-to-end time, no point
    assert "no stage one time" not in {t.get_text() for t in time_ax.texts}
    xs, ys = [p["fit_seconds"] for p in points], [p["accuracy"] for p in points]
    hits, pairs = _boxes_overlap_points(figure, fit_ax, xs, ys)
    assert not hits and not pairs
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert legend == ["head", "fine-tuned", "stage one, once per cache"]  # each once
    assert any(line.get_linestyle() == ":" for line in fit_ax.lines)  # stage one's time


@pytest.mark.parametrize(("negatives", "scale"), [(70, "linear"), (3231, "log")])
def test_roc_axis_is_chosen_for_the_number_of_negatives(negatives, scale):
    """70 negatives: no false-positive rate below 1/70 exists, so no log axis from 1e-4."""
    roc = {"fpr": [0.0, 1 / negatives, 0.1, 1.0], "tpr": [0.0, 0.5, 0.95, 1.0], "auc": 0.97,
           "kind": "binary", "negatives": negatives}  # fmt: skip
    figure = plotting.roc_figure([("svm", roc, "#1f77b4"), ("knn", roc, "#d62728")], split="val")
    ax = figure.axes[0]
    assert ax.get_xscale() == scale and ax.get_title() == "ROC on val (binary)"
    low = ax.get_xlim()[0]
    assert low == (pytest.approx(1 / negatives) if scale == "log" else 0.0)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "svm (AUC 0.970)",
        "knn (AUC 0.970)",
    ]
    assert [line.get_color() for line in ax.lines[:2]] == ["#1f77b4", "#d62728"]


def test_calibration_figure():
    cal = {"confidence": [0.55, 0.95], "accuracy": [0.5, 0.9], "count": [2, 8], "ece": 0.05}
    figure = plotting.calibration_figure([("softmax", cal, "#1f77b4")], split="test")
    ax = figure.axes[0]
    assert ax.get_title() == "calibration on test"
    assert "softmax (ECE 0.050)" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert list(ax.lines[1].get_xdata()) == [0.55, 0.95]


@pytest.mark.parametrize(("phase_one", "phase_two"), [(3, 9), (0, 4), (2, 0)])
def test_curves_figure_integer_epochs_and_fine_tuning_boundary(phase_one, phase_two):
    on = "on cached activations of the frozen layers at block_15_add (no augmentation)"
    figure = plotting.curves_figure(_history(phase_one, phase_two), title="run", phase_two=on)
    loss, accuracy = figure.axes
    assert figure.get_suptitle() == "run"
    phases = figure.get_supxlabel()
    assert ("phase one: the head on cached features" in phases) == bool(phase_one)
    assert (f"phase two ({phase_two} epochs): fine-tuning {on}" in phases) == bool(phase_two)
    assert "on images" not in phases  # what the run's record says, not a guess
    assert loss.get_ylabel() == "loss" and accuracy.get_ylabel() == "accuracy"
    for ax in (loss, accuracy):
        figure.canvas.draw()  # tick positions are settled when drawn
        ticks = ax.get_xticks()
        assert len(ticks) >= 2 and np.allclose(ticks, np.round(ticks)), ticks
        boundary = [t.get_text() for t in ax.texts]
        both = phase_one and phase_two
        assert boundary == (["fine-tuning"] if both else [])
        if both:
            assert ax.lines[-1].get_xdata()[0] == phase_one + 0.5  # between the phases
        assert ax.get_xlabel() == "epoch"
        assert len(ax.get_legend().get_texts()) == 2


def test_plot_curves_writes_a_png(tmp_path):
    path = plotting.plot_curves(_history(2, 3), tmp_path / "sub" / "curves.png", title="t")
    assert path == tmp_path / "sub" / "curves.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(path.parent.glob(".*tmp*"))  # written atomically, nothing left over


def _data(rows, tied=()):
    board = [
        {"rank": i + 1, "run": r["run"], "group": r["group"], "accuracy": r["splits"]["val"]["accuracy"],
         "accuracy_ci": [0.5, 0.9]}
        for i, r in enumerate(rows)
    ]  # fmt: skip
    selection = {"winner": rows[0]["run"], "compare_split": "val", "tied": list(tied)}
    return {"runs": rows, "leaderboard": board, "selection": selection}


def test_report_figures_names_every_figure():
    rows = [
        _row("svm", "vgg16_224", CM),
        _row("softmax", "vgg16_224", CM, fit_seconds=None),
        _row("ft/one", "finetuned", CM, kind="finetuned", history=_history(1, 2)),
        _row("ft_no_history", "finetuned", CM, kind="finetuned"),
        _row("ridge", "vgg16_224", CM),
    ]
    rows[1]["splits"]["val"]["roc"] = {
        "fpr": [0, 0.1, 1],
        "tpr": [0, 0.9, 1],
        "auc": 0.9,
        "kind": "k",
    }
    rows[1]["splits"]["val"]["calibration"] = {
        "confidence": [0.9],
        "accuracy": [0.8],
        "count": [4],
        "ece": 0.1,
    }
    figures = report_figures(_data(rows, tied=["vgg16_224/softmax"]))
    assert set(figures) == {
        "forest.png",
        "cost.png",
        "confusion_vgg16_224_svm_val.png",  # the winner on each split
        "confusion_vgg16_224_svm_test.png",
        "confusion_vgg16_224_softmax_val.png",  # the next three on the comparison split
        "confusion_finetuned_ft_one_val.png",
        "confusion_finetuned_ft_no_history_val.png",
        "roc.png",  # only the softmax head has probabilities
        "calibration.png",
        "curves_ft_one.png",  # "/" made safe for a file name
    }
    assert all(png[:4] == b"\x89PNG" for png in figures.values())


def test_run_title_is_the_short_label():
    row = _row("svm", "mobilenet_v2_224_avg_imagenet", CM)
    assert run_title({**row, "label": "svm"}) == "svm"
    assert run_title(row) == "mobilenet_v2_224_avg_imagenet/svm"  # no label given: the id


def test_class_names_with_mathtext_characters_print_as_written():
    """A folder named ``$\\frac{$`` is not valid mathtext: drawing it must not fail."""
    import io

    import numpy as np

    from pipeline.report.plotting import confusion_figure

    names = ["$\\frac{$", "a_b^2 $x$"]
    figure = confusion_figure(np.array([[3, 1], [0, 4]]), names, title="$\\bad{ title")
    figure.savefig(io.BytesIO(), format="png")  # raises ValueError if parsed as mathtext
    labels = [t.get_text() for t in figure.axes[0].get_xticklabels()]
    assert labels == names
