"""Every figure the pipeline draws: the report's figures and stage three's training curves.

Figures are :class:`matplotlib.figure.Figure` objects built without pyplot, so
nothing here touches global plotting state and the module is safe in threads
and tests. Each ``*_figure`` function returns a Figure; :func:`plot_curves`
writes one to a file and :func:`report_figures` gives every figure of the
report as PNG bytes.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.files import write_atomic


def _figure(**kwargs: Any) -> Any:
    from matplotlib.figure import Figure

    return Figure(**kwargs)


# --- stage three: training curves ------------------------------------------------------------


def plot_curves(history: list[dict], path: str | Path, *, title: str = "") -> Path:
    """Write the training curves of a fine-tuning run as a PNG.

    Parameters
    ----------
    history : list of dict
        One row per epoch with ``phase`` (1 or 2), ``loss``, ``accuracy``,
        ``val_loss`` and ``val_accuracy`` (a missing value is left out).
    path : str or Path
        The PNG file, written atomically.
    title : str, optional
        Title above both panels.

    Returns
    -------
    Path
        ``path``.
    """
    figure = curves_figure(history, title=title)
    return write_atomic(path, lambda tmp: figure.savefig(tmp, format="png"))


def _epochs(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def _phases_label(phase_one: int, phase_two: int) -> str:
    parts = []
    if phase_one:
        parts.append(f"phase one: the head on cached features ({_epochs(phase_one)})")
    if phase_two:
        parts.append(f"phase two: fine-tuning on images ({_epochs(phase_two)})")
    return "; ".join(parts)


def curves_figure(history: list[dict], *, title: str = "") -> Any:
    """Loss and accuracy per epoch of both phases of stage three.

    Phase one trains the head on cached features, phase two fine-tunes on
    images; a vertical line marks where fine-tuning starts and the label under
    both panels says which epochs belong to which phase. Epochs are numbered
    across both phases and the x axis has integer ticks only.
    """
    from matplotlib.ticker import MaxNLocator

    figure = _figure(figsize=(10, 4), dpi=100)
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    steps = np.arange(1, len(history) + 1)
    for key, axes, style in (
        ("loss", loss_axes, "-"), ("val_loss", loss_axes, "--"),
        ("accuracy", accuracy_axes, "-"), ("val_accuracy", accuracy_axes, "--"),
    ):  # fmt: skip
        values = [np.nan if h.get(key) is None else h[key] for h in history]
        axes.plot(steps, values, style, marker=".", label=key.replace("_", " "))
    phase_one = sum(1 for h in history if h["phase"] == 1)
    both = 0 < phase_one < len(history)
    for axes, label in ((loss_axes, "loss"), (accuracy_axes, "accuracy")):
        if both:
            axes.axvline(phase_one + 0.5, color="grey", linewidth=0.8)
            axes.text(phase_one + 0.6, 0.02, "fine-tuning", transform=axes.get_xaxis_transform())
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("epoch")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.supxlabel(_phases_label(phase_one, len(history) - phase_one), fontsize=9)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


# --- the report's figures --------------------------------------------------------------------


def confusion_figure(rows: list[dict], class_names: list[str], split: str) -> Any:
    """Confusion matrices of the report rows ``rows`` on ``split``, up to four a line.

    Each row is a run of :func:`pipeline.evaluation.build_report_data`; counts
    are written in the cells when there are at most 15 classes.
    """
    k = len(class_names)
    cols = min(4, len(rows))
    nrows = -(-len(rows) // cols)
    side = 2.2 + 0.25 * k
    figure = _figure(figsize=(side * cols, side * nrows))
    axes = figure.subplots(nrows, cols, squeeze=False)
    for ax in axes.ravel()[len(rows) :]:
        ax.axis("off")
    for ax, row in zip(axes.ravel(), rows, strict=False):
        cm = np.array(row["splits"][split]["confusion"])
        ax.imshow(cm, cmap="Blues")
        ax.set_title(f"{row['name']} ({split})", fontsize=9)
        ax.set_xticks(range(k), class_names, rotation=90, fontsize=7)
        ax.set_yticks(range(k), class_names, fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        if k <= 15:
            for (i, j), v in np.ndenumerate(cm):
                colour = "white" if v > cm.max() / 2 else "black"
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color=colour)
    figure.tight_layout()
    return figure


def per_class_f1_figure(rows: list[dict], class_names: list[str], split: str, group: str) -> Any:
    """Per-class F1 of the rows ``rows`` on ``split``, one bar per run and class."""
    k = len(class_names)
    figure = _figure(figsize=(max(7, 0.25 * k * len(rows) + 2), 3.4))
    ax = figure.subplots()
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        f1 = row["splits"][split]["per_class_f1"]
        ax.bar(np.arange(k) + i * width, f1, width, label=row["name"])
    ticks = np.arange(k) + 0.4 - width / 2
    ax.set_xticks(ticks, class_names, rotation=45 if k > 4 else 0, fontsize=8)
    ax.set_ylabel(f"F1 ({split})")
    ax.set_ylim(0, 1.2)  # headroom for the legend
    ax.legend(fontsize=7, ncol=min(len(rows), 3), loc="upper center")
    ax.set_title(f"per-class F1: {group}", fontsize=9)
    return figure


def accuracy_vs_fit_time_figure(points: list[tuple[str, str, float, float]], split: str) -> Any:
    """Accuracy against fit time (log scale), one colour per cache and one for fine-tuning.

    ``points``: ``(group, run name, fit seconds, accuracy)``.
    """
    figure = _figure(figsize=(7, 4.5))
    ax = figure.subplots()
    for group in sorted({p[0] for p in points}):
        mine = [p for p in points if p[0] == group]
        ax.scatter([p[2] for p in mine], [p[3] for p in mine], label=group)
        for _, name, seconds, accuracy in mine:
            ax.annotate(name, (seconds, accuracy), fontsize=7, xytext=(4, 2),
                        textcoords="offset points")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("fit time (s, with the hyper-parameter search)")
    ax.set_ylabel(f"accuracy ({split})")
    ax.set_title("accuracy against fit time", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return figure


def _report_png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return buffer.getvalue()


def _commonest_class_list(rows: list[dict]) -> list[str]:
    # Runs of a rebuilt cache may have another class list: plot the commonest one
    # (the report's tables still show every run).
    lists = [tuple(r["class_names"]) for r in rows]
    return list(max(set(lists), key=lists.count))


def safe_figure_name(name: str) -> str:
    """``name`` with every character but letters, digits, ``-``, ``_`` and ``.`` as ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def report_figures(data: dict[str, Any]) -> dict[str, bytes]:
    """PNG bytes of every figure of the report, by file name.

    ``data`` is :func:`pipeline.evaluation.build_report_data`'s result. Per
    group (backbone cache, or ``finetuned``): ``confusion_<group>.png`` and
    ``per_class_f1_<group>.png``; ``accuracy_vs_fit_time.png`` when runs
    have fit times; ``curves_<name>.png`` per fine-tuned run with a history.
    """
    split = data["primary_split"]
    figures: dict[str, bytes] = {}
    groups: dict[str, list[dict]] = {}
    for row in data["runs"]:
        if split in row["splits"]:
            groups.setdefault(row["group"], []).append(row)
    for group, rows in groups.items():
        names = _commonest_class_list(rows)
        rows = [r for r in rows if r["class_names"] == names]
        figures[f"confusion_{group}.png"] = _report_png(confusion_figure(rows, names, split))
        f1 = per_class_f1_figure(rows, names, split, group)
        figures[f"per_class_f1_{group}.png"] = _report_png(f1)
    points = [
        (row["group"], row["name"], row["fit_seconds"], row["splits"][split]["accuracy"])
        for row in data["runs"]
        if split in row["splits"] and row["fit_seconds"]
    ]
    if points:
        scatter = accuracy_vs_fit_time_figure(points, split)
        figures["accuracy_vs_fit_time.png"] = _report_png(scatter)
    for row in data["runs"]:
        if row["kind"] == "finetuned" and row["history"]:
            curves = curves_figure(row["history"], title=f"training curves: {row['name']}")
            figures[f"curves_{safe_figure_name(row['name'])}.png"] = _report_png(curves)
    return figures
