"""Every figure the pipeline draws: the report's figures and stage three's training curves.

Figures are :class:`matplotlib.figure.Figure` objects built without pyplot, so
nothing here touches global plotting state and the module is safe in threads
and tests. Each ``*_figure`` function returns a Figure; :func:`plot_curves`
writes one to a file and :func:`report_figures` gives every figure of the
report as PNG bytes.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.files import write_atomic


def _figure(**kwargs: Any) -> Any:
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def literal_text(draw: Callable[..., Any]) -> Callable[..., Any]:
    """Draw with mathtext off: a class named ``$x$`` or ``a_b^2`` prints as written.

    Text objects read ``text.parse_math`` when they are made, so the figure
    functions run inside the context (labels come from the user's folder names).
    """

    @functools.wraps(draw)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return wrapper


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


@literal_text
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

_WINNER, _TIED, _OTHER = "#d62728", "#ff7f0e", "#1f77b4"


@literal_text
def confusion_figure(cm: Any, class_names: list[str], *, title: str) -> Any:
    """One confusion matrix coloured by the share of each true class (rows sum to 1),
    with the count of images in each non-empty cell.

    The figure grows with the number of classes so the counts stay 9 pt at
    the report's width up to 15 classes (7 pt up to 30); past 30 the cells
    are colour only.
    """
    cm = np.asarray(cm, dtype=np.int64)
    k = len(class_names)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    cell = 0.42 if k <= 15 else max(0.22, 6.3 / k)
    longest = min(max(len(c) for c in class_names), 20)
    margin = 0.6 + longest * 0.07
    figure = _figure(figsize=(k * cell + margin + 1.0, k * cell + margin + 0.5))
    ax = figure.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    colorbar = figure.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
    colorbar.set_label("share of the true class", fontsize=9)
    tick_size = 9 if k <= 30 else 7
    ax.set_xticks(range(k), class_names, rotation=90 if longest > 2 else 0, fontsize=tick_size)
    ax.set_yticks(range(k), class_names, fontsize=tick_size)
    ax.set_xlabel("predicted class", fontsize=10)
    ax.set_ylabel("true class", fontsize=10)
    ax.set_title(title, fontsize=10)
    if k <= 30:
        for (i, j), count in np.ndenumerate(cm):
            if count or i == j:  # empty cells stay blank so the errors stand out
                colour = "white" if share[i, j] > 0.5 else "black"
                ax.text(j, i, str(count), ha="center", va="center",
                        fontsize=9 if k <= 15 else 7, color=colour)  # fmt: skip
    figure.tight_layout()
    return figure


@literal_text
def forest_figure(entries: list[dict[str, Any]], *, split: str) -> Any:
    """Accuracy with its 95% interval, one line per run, best-ranked at the top.

    ``entries``: ``label``, ``accuracy``, ``accuracy_ci`` and ``role`` (``winner``,
    ``tied`` or ``other``). The winner's interval is shaded across the plot, so
    an interval reaching into the band overlaps it.
    """
    n = len(entries)
    figure = _figure(figsize=(8.5, 0.34 * n + 1.3))
    ax = figure.subplots()
    colours = {"winner": _WINNER, "tied": _TIED, "other": _OTHER}
    for i, e in enumerate(entries):
        y = n - 1 - i
        low, high = e["accuracy_ci"]
        colour = colours[e["role"]]
        ax.errorbar(e["accuracy"], y, xerr=[[e["accuracy"] - low], [high - e["accuracy"]]],
                    fmt="o", color=colour, capsize=3, markersize=5)  # fmt: skip
        if e["role"] == "winner":
            ax.axvspan(low, high, color=colour, alpha=0.08)
    ax.set_yticks(range(n), [e["label"] for e in reversed(entries)], fontsize=9)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel(f"accuracy on {split} (95% bootstrap interval)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    handles = [
        _legend_handle(color=c, marker="o", linestyle="", label=label)
        for c, label in ((_WINNER, "chosen"), (_TIED, "tied with it (McNemar)"), (_OTHER, "other"))
    ]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(f"accuracy on {split}, in the order of the ranking", fontsize=10)
    figure.tight_layout()
    return figure


def _legend_handle(**kwargs: Any) -> Any:
    from matplotlib.lines import Line2D

    return Line2D([], [], **kwargs)


def place_labels(ax: Any, xs: list[float], ys: list[float], labels: list[str]) -> list[Any]:
    """Annotate each point with its label where it covers no point and no other label.

    Tries offsets around the point at growing distances (with a leader line
    past the first ring); the label goes to the first free place, else to
    the one that covers the fewest. Returns the annotations.
    """
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    figure = ax.get_figure()
    renderer = _renderer(figure)
    centres = ax.transData.transform(np.column_stack([xs, ys]))
    pad = 5.0  # pixels around each marker
    taken = [Bbox.from_extents(x - pad, y - pad, x + pad, y + pad) for x, y in centres]
    frame = ax.get_window_extent(renderer)
    ring = [(1, 0.6), (1, -1.6), (-1, 0.6), (-1, -1.6), (0, 1.4), (0, -2.4)]
    candidates = [(dx * r, dy * r) for r in (7, 16, 28, 42) for dx, dy in ring]
    out = []
    for (x, y), label in zip(zip(xs, ys, strict=True), labels, strict=True):
        best, best_cost = None, None
        for dx, dy in candidates:
            note = ax.annotate(
                label, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=8,
                ha="left" if dx > 0 else "right" if dx < 0 else "center", va="bottom",
                arrowprops=_LEADER if abs(dx) + abs(dy) > 12 else None,
            )  # fmt: skip
            note.update_positions(renderer)
            box = Text.get_window_extent(note, renderer)  # the text alone, not its leader
            cost = sum(box.overlaps(other) for other in taken)
            cost += 2 * (not frame.contains(box.x0, box.y0) or not frame.contains(box.x1, box.y1))
            if best_cost is not None and cost >= best_cost:
                note.remove()
                continue
            if best is not None:
                best[0].remove()
            best, best_cost = (note, box), cost
            if cost == 0:
                break
        taken.append(best[1])
        out.append(best[0])
    return out


_LEADER = {"arrowstyle": "-", "color": "grey", "lw": 0.6, "shrinkA": 0, "shrinkB": 3}


def _renderer(figure: Any) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not isinstance(figure.canvas, FigureCanvasAgg):
        FigureCanvasAgg(figure)
    figure.canvas.draw()
    return figure.canvas.get_renderer()


@literal_text
def cost_figure(points: list[dict[str, Any]], *, split: str) -> Any:
    """Accuracy against fit time and against time per image (log scales), side by side.

    ``points``: ``label``, ``group``, ``accuracy``, ``fit_seconds``,
    ``seconds_per_image`` (end to end: a head's includes stage one's time per
    image), ``finetuned`` and, for heads, ``extraction_seconds`` (stage one,
    drawn as a dotted line: paid once per backbone, shared by its heads).
    Labels are placed where they hide no point; the legend sits outside.
    """
    figure = _figure(figsize=(11, 4.6))
    axes = figure.subplots(1, 2, sharey=True)
    groups = sorted({p["group"] for p in points})
    colours = {g: f"C{i % 10}" for i, g in enumerate(groups)}
    panels = (("fit_seconds", "fit time (s)"), ("seconds_per_image", "time per image (ms)"))
    for ax, (key, xlabel) in zip(axes, panels, strict=True):
        mine = [p for p in points if p.get(key)]
        scale = 1e3 if key == "seconds_per_image" else 1.0
        for p in mine:
            ax.scatter(p[key] * scale, p["accuracy"], color=colours[p["group"]], s=36,
                       marker="^" if p["finetuned"] else "o", zorder=3)  # fmt: skip
        if key == "fit_seconds":
            for g in groups:
                seconds = next((p.get("extraction_seconds") for p in points if p["group"] == g
                                and p.get("extraction_seconds")), None)  # fmt: skip
                if seconds:
                    ax.axvline(seconds, color=colours[g], linestyle=":", linewidth=1)
        ax.set_xscale("log")
        _plain_log_ticks(ax.xaxis)
        ax.set_xlabel(xlabel, fontsize=10)
        ax.grid(alpha=0.3)
        if mine:
            xs = [p[key] * scale for p in mine]
            ax.set_xlim(min(xs) / 3, max(xs) * 3)
    axes[0].set_ylabel(f"accuracy ({split})", fontsize=10)
    accuracies = [p["accuracy"] for p in points]
    spread = max(accuracies) - min(accuracies)
    axes[0].set_ylim(min(accuracies) - 0.15 * spread - 0.01, max(accuracies) + 0.15 * spread + 0.01)
    handles = [_legend_handle(color=colours[g], marker="o", linestyle="", label=g) for g in groups]
    handles += [
        _legend_handle(color="grey", marker="^", linestyle="", label="fine-tuned (backbone included)"),
        _legend_handle(color="grey", linestyle=":", label="stage one, once per backbone"),
    ]  # fmt: skip
    figure.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=8,
                  frameon=False)  # fmt: skip
    figure.suptitle("accuracy against cost (heads' time per image includes stage one)", fontsize=10)
    figure.tight_layout(rect=(0, 0.08 + 0.04 * (len(handles) > 4), 1, 1))
    for ax, (key, _) in zip(axes, panels, strict=True):
        mine = [p for p in points if p.get(key)]
        scale = 1e3 if key == "seconds_per_image" else 1.0
        place_labels(ax, [p[key] * scale for p in mine], [p["accuracy"] for p in mine],
                     [p["label"] for p in mine])  # fmt: skip
    return figure


@literal_text
def roc_figure(curves: list[tuple[str, dict[str, Any]]], *, split: str) -> Any:
    """ROC curves (``(label, roc)`` with ``fpr``, ``tpr``, ``auc``, ``kind``), one per run."""
    figure = _figure(figsize=(5.6, 4.6 + 0.2 * len(curves)))
    ax = figure.subplots()
    lowest = 1.0
    for label, roc in curves:
        fpr, tpr = np.asarray(roc["fpr"]), np.asarray(roc["tpr"])
        keep = fpr > 0  # a log axis: the curve from its first false positive
        lowest = min([lowest, *fpr[keep][:1]])
        ax.plot(fpr[keep], tpr[keep], label=f"{label} (AUC {roc['auc']:.3f})", linewidth=1.4)
    ax.plot([lowest, 1], [lowest, 1], color="grey", linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlim(lowest, 1.0)
    ax.xaxis.set_major_formatter(_plain_number())
    ax.set_xlabel("false-positive rate (log scale)", fontsize=10)
    ax.set_ylabel("true-positive rate", fontsize=10)
    ax.grid(alpha=0.3)
    kind = curves[0][1]["kind"] if curves else ""
    ax.set_title(f"ROC on {split} ({kind})", fontsize=10)
    _legend_below(ax)
    return figure


def _legend_below(ax: Any) -> None:
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    ax.get_figure().tight_layout()


def _plain_log_ticks(axis: Any) -> None:
    """Ticks at 1, 2 and 5 of each decade, written as plain numbers (not 2 x 10^1)."""
    from matplotlib.ticker import LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(_plain_number())
    axis.set_minor_formatter(NullFormatter())


def _plain_number() -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda value, _: f"{value:g}")


@literal_text
def calibration_figure(curves: list[tuple[str, dict[str, Any]]], *, split: str) -> Any:
    """Reliability diagram: accuracy against confidence per bin, with each run's ECE."""
    figure = _figure(figsize=(5.6, 5.2 + 0.2 * len(curves)))
    ax = figure.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8, label="calibrated")
    for label, cal in curves:
        ax.plot(cal["confidence"], cal["accuracy"], marker="o", markersize=4, linewidth=1.2,
                label=f"{label} (ECE {cal['ece']:.3f})")  # fmt: skip
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_aspect("equal")
    ax.set_xlabel("confidence (top class probability)", fontsize=10)
    ax.set_ylabel("accuracy", fontsize=10)
    ax.grid(alpha=0.3)
    ax.set_title(f"calibration on {split}", fontsize=10)
    _legend_below(ax)
    return figure


def _report_png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def safe_figure_name(name: str) -> str:
    """``name`` with every character but letters, digits, ``-``, ``_`` and ``.`` as ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def confusion_name(run: str, split: str) -> str:
    """The file name of ``run``'s confusion matrix on ``split``."""
    return f"confusion_{safe_figure_name(run)}_{split}.png"


def run_title(row: dict[str, Any]) -> str:
    """``mobilenet_v2 224 px imagenet + svm``, or ``fine-tuned mobilenet_v2: name``."""
    c = row["config"]
    size = f" {c['input_size']} px" if c.get("input_size") else ""
    backbone = f"{c.get('backbone', '?')}{size} {c.get('weights_source', '')}".strip()
    if row["kind"] == "finetuned":
        return f"fine-tuned {backbone}: {row['name']}"
    return f"{backbone} + {row['name']}"


OTHER_CONFUSIONS = 3  # confusion matrices of the runs ranked after the winner


def report_figures(data: dict[str, Any]) -> dict[str, bytes]:
    """PNG bytes of every figure of the report, by file name.

    ``data`` is :func:`pipeline.report.evaluation.build_report_data`'s result.
    ``forest.png`` and ``cost.png`` of the ranked runs; ``confusion_<run>_<split>.png``
    of the winner on each split and of the next :data:`OTHER_CONFUSIONS` runs
    on the comparison split; ``roc.png`` and ``calibration.png`` of the ranked
    runs with probabilities (up to five); ``curves_<name>.png`` per fine-tuned
    run with a history.
    """
    rows = {r["run"]: r for r in data["runs"]}
    chosen = data["selection"]
    split = chosen["compare_split"]
    board = [e for e in data["leaderboard"] if "accuracy" in e]
    one_group = len({e["group"] for e in board}) == 1
    label = {e["run"]: rows[e["run"]]["name"] if one_group else e["run"] for e in board}
    figures: dict[str, bytes] = {}
    if board:
        tied = set(chosen["tied"])
        forest = [
            {**e, "label": label[e["run"]],
             "role": "winner" if e["rank"] == 1 else "tied" if e["run"] in tied else "other"}
            for e in board
        ]  # fmt: skip
        figures["forest.png"] = _report_png(forest_figure(forest, split=split))
        points = [_cost_point(rows[e["run"]], e["accuracy"]) for e in board]
        if any(p["fit_seconds"] or p["seconds_per_image"] for p in points):
            figures["cost.png"] = _report_png(cost_figure(points, split=split))
    if chosen["winner"]:
        winner = rows[chosen["winner"]]
        for s, entry in winner["splits"].items():
            title = f"{run_title(winner)}: {s}, {entry['n']} images"
            figure = confusion_figure(entry["confusion"], winner["class_names"], title=title)
            figures[confusion_name(winner["run"], s)] = _report_png(figure)
    for e in board[1 : 1 + OTHER_CONFUSIONS]:
        row, entry = rows[e["run"]], rows[e["run"]]["splits"][split]
        title = f"{run_title(row)}: {split}, {entry['n']} images"
        figure = confusion_figure(entry["confusion"], row["class_names"], title=title)
        figures[confusion_name(row["run"], split)] = _report_png(figure)
    with_proba = [(e["run"], rows[e["run"]]["splits"][split]) for e in board]
    with_proba = [(run, s) for run, s in with_proba if "roc" in s][:5]
    if with_proba:
        roc = roc_figure([(label[run], s["roc"]) for run, s in with_proba], split=split)
        figures["roc.png"] = _report_png(roc)
        calibration = [(label[run], s["calibration"]) for run, s in with_proba]
        cal = calibration_figure(calibration, split=split)
        figures["calibration.png"] = _report_png(cal)
    for row in data["runs"]:
        if row["kind"] == "finetuned" and row["history"]:
            curves = curves_figure(row["history"], title=f"training curves: {row['name']}")
            figures[f"curves_{safe_figure_name(row['name'])}.png"] = _report_png(curves)
    return figures


def _cost_point(row: dict[str, Any], accuracy: float) -> dict[str, Any]:
    return {
        "label": row["name"],  # the colour says which backbone cache
        "group": row["group"],
        "accuracy": accuracy,
        "fit_seconds": row.get("fit_seconds"),
        "seconds_per_image": row.get("end_to_end_seconds_per_image")
        or row.get("predict_seconds_per_image"),
        "extraction_seconds": row.get("extraction_seconds"),
        "finetuned": row["kind"] == "finetuned",
    }
