"""Every figure: the report's (from report data) and stage three's training curves."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

from pipeline import plotting

NAMES = ["ants", "bees", "wasps"]


def _row(name: str, group: str, confusion, *, fit_seconds=1.0, kind="head", history=()):
    cm = np.array(confusion)
    return {
        "run": f"{group}/{name}",
        "name": name,
        "kind": kind,
        "group": group,
        "class_names": list(NAMES),
        "fit_seconds": fit_seconds,
        "history": list(history),
        "splits": {
            "test": {
                "accuracy": float(np.trace(cm) / cm.sum()),
                "confusion": cm.tolist(),
                "per_class_f1": [0.9, 0.5, 0.7],
            }
        },
    }


def _history(phase_one: int, phase_two: int) -> list[dict]:
    phases = [1] * phase_one + [2] * phase_two
    return [
        {"phase": p, "epoch": i + 1, "loss": 1.0 / (i + 1), "accuracy": 0.5 + 0.04 * i,
         "val_loss": 1.2 / (i + 1), "val_accuracy": None if i == 0 else 0.5 + 0.03 * i}
        for i, p in enumerate(phases)
    ]  # fmt: skip


CM = [[5, 1, 0], [0, 4, 2], [1, 0, 6]]


def test_confusion_figure_one_panel_per_run_with_counts():
    rows = [_row(n, "cache", CM) for n in ("svm", "knn", "softmax", "logreg", "ridge")]
    figure = plotting.confusion_figure(rows, NAMES, "test")
    assert isinstance(figure, Figure)
    axes = figure.axes
    assert len(axes) == 8  # 5 runs on two lines of four; the three spare panels are off
    assert [ax.get_title() for ax in axes[:5]] == [f"{r['name']} (test)" for r in rows]
    assert not any(ax.axison for ax in axes[5:])
    first = axes[0]
    assert [t.get_text() for t in first.get_xticklabels()] == NAMES
    assert first.get_xlabel() == "predicted" and first.get_ylabel() == "true"
    assert sorted(int(t.get_text()) for t in first.texts) == sorted(np.ravel(CM).tolist())


def test_per_class_f1_figure_bars_per_run_and_class():
    rows = [_row("svm", "cache", CM), _row("softmax", "cache", CM)]
    figure = plotting.per_class_f1_figure(rows, NAMES, "test", "cache")
    (ax,) = figure.axes
    assert ax.get_title() == "per-class F1: cache"
    assert ax.get_ylabel() == "F1 (test)"
    assert len(ax.patches) == len(rows) * len(NAMES)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["svm", "softmax"]


def test_accuracy_vs_fit_time_figure_log_scale_one_colour_per_group():
    points = [("cache", "svm", 2.0, 0.8), ("cache", "knn", 0.1, 0.7), ("finetuned", "ft", 90, 0.9)]
    figure = plotting.accuracy_vs_fit_time_figure(points, "val")
    (ax,) = figure.axes
    assert ax.get_xscale() == "log" and ax.get_ylabel() == "accuracy (val)"
    assert ax.get_title() == "accuracy against fit time"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["cache", "finetuned"]
    assert {t.get_text() for t in ax.texts} == {"svm", "knn", "ft"}


@pytest.mark.parametrize(("phase_one", "phase_two"), [(3, 9), (0, 4), (2, 0)])
def test_curves_figure_integer_epochs_and_fine_tuning_boundary(phase_one, phase_two):
    figure = plotting.curves_figure(_history(phase_one, phase_two), title="run")
    loss, accuracy = figure.axes
    assert figure.get_suptitle() == "run"
    phases = figure.get_supxlabel()
    assert ("phase one: the head on cached features" in phases) == bool(phase_one)
    assert ("phase two: fine-tuning on images" in phases) == bool(phase_two)
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


def test_report_figures_names_every_figure():
    rows = [
        _row("svm", "vgg16_224", CM),
        _row("softmax", "vgg16_224", CM, fit_seconds=None),
        _row("ft/one", "finetuned", CM, kind="finetuned", history=_history(1, 2)),
        _row("ft_no_history", "finetuned", CM, kind="finetuned"),
    ]
    data = {"primary_split": "test", "runs": rows}
    figures = plotting.report_figures(data)
    assert set(figures) == {
        "confusion_vgg16_224.png",
        "per_class_f1_vgg16_224.png",
        "confusion_finetuned.png",
        "per_class_f1_finetuned.png",
        "accuracy_vs_fit_time.png",
        "curves_ft_one.png",  # "/" made safe for a file name
    }
    assert all(png[:4] == b"\x89PNG" for png in figures.values())


def test_report_figures_plot_the_commonest_class_list_only():
    odd = _row("old", "cache", [[3, 1], [1, 3]])
    odd["class_names"] = ["ants", "bees"]
    odd["splits"]["test"]["per_class_f1"] = [0.7, 0.7]
    rows = [_row("svm", "cache", CM), _row("knn", "cache", CM), odd]
    figure_rows = [r for r in rows if r["class_names"] == NAMES]
    assert plotting._commonest_class_list(rows) == NAMES
    figure = plotting.confusion_figure(figure_rows, NAMES, "test")
    assert [ax.get_title() for ax in figure.axes] == ["svm (test)", "knn (test)"]
    assert "confusion_cache.png" in plotting.report_figures({"primary_split": "test", "runs": rows})
