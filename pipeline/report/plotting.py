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
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.files import write_atomic
from pipeline.report.fonts import GLYPH_WARNING, class_labels, font_family, printable


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

        # Fonts are resolved when a Text is made: the CJK fallbacks join here too.
        rc = {"text.parse_math": False, "font.family": list(font_family())}
        with matplotlib.rc_context(rc), warnings.catch_warnings():
            warnings.filterwarnings("ignore", GLYPH_WARNING, UserWarning)
            return draw(*args, **kwargs)

    return wrapper


def png_bytes(figure: Any, **kwargs: Any) -> bytes:
    """``figure`` as PNG bytes, drawn without glyph warnings (labels were checked already)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", GLYPH_WARNING, UserWarning)
        figure.savefig(buffer, format="png", **kwargs)
    return buffer.getvalue()


# --- stage three: training curves ------------------------------------------------------------


def plot_curves(
    history: list[dict], path: str | Path, *, title: str = "", phase_two: str = ""
) -> Path:
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
    phase_two : str, optional
        What phase two trained on (``"on cached activations ..."``), for the caption.

    Returns
    -------
    Path
        ``path``.
    """
    figure = curves_figure(history, title=title, phase_two=phase_two)
    return write_atomic(path, lambda tmp: Path(tmp).write_bytes(png_bytes(figure)))


def _epochs(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def _phases_label(phase_one: int, phase_two: int, input_words: str = "") -> str:
    parts = []
    if phase_one:
        parts.append(f"phase one: the head on cached features ({_epochs(phase_one)})")
    if phase_two:
        on = f" {input_words}" if input_words else ""
        parts.append(f"phase two ({_epochs(phase_two)}): fine-tuning{on}")
    return "; ".join(parts)


@literal_text
def curves_figure(history: list[dict], *, title: str = "", phase_two: str = "") -> Any:
    """Loss and accuracy per epoch of both phases of stage three.

    Phase one trains the head on cached features, phase two fine-tunes (on what:
    ``phase_two``, from the run's record); a vertical line marks where fine-tuning starts and the label under
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
    caption = _phases_label(phase_one, len(history) - phase_one, phase_two)
    figure.supxlabel(printable(caption), fontsize=9)
    if title:
        figure.suptitle(printable(title))
    figure.tight_layout()
    return figure


# --- the report's figures --------------------------------------------------------------------

# Each run keeps one colour on the whole page (forest, cost, ROC, calibration); its role
# (chosen, tied) is a marker shape, never a colour.
RUN_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
               "#17becf", "#bcbd22")  # fmt: skip
MORE_RUNS = "#7f7f7f"  # past the ninth run
_ROLE_MARKERS = {"winner": "*", "tied": "o", "other": "o"}


def run_colours(runs: list[str]) -> dict[str, str]:
    """Run id -> its colour, in ranking order."""
    return {r: RUN_COLOURS[i] if i < len(RUN_COLOURS) else MORE_RUNS for i, r in enumerate(runs)}


def _cell_inches(k: int) -> float:
    """Side of one confusion cell: 0.8 in up to four classes, 0.42 in up to 15, then down
    to 0.15 in (100 classes: 15 in, 1,500 px, shown at full size and scrolled)."""
    if k <= 15:
        return max(0.42, min(0.8, 3.2 / k))
    return max(0.15, 6.3 / k)


@literal_text
def confusion_figure(cm: Any, class_names: list[str], *, title: str) -> Any:
    """One confusion matrix coloured by the share of each true class (rows sum to 1),
    with the count of images in each non-empty cell.

    Sized for its class count (cells of 0.9 in for two classes, 0.15 in for a hundred),
    so two classes are not a thumbnail and a hundred keep readable labels; counts are
    written up to 25 classes. Names no font can draw become class numbers
    (:func:`pipeline.report.fonts.class_labels`; the report prints the key).
    """
    cm = np.asarray(cm, dtype=np.int64)
    k = len(class_names)
    names, _ = class_labels(class_names)
    names = [n if len(n) <= 24 else n[:23] + "…" for n in names]
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    cell = _cell_inches(k)
    margin = 0.8 + min(max(len(n) for n in names), 24) * 0.075
    side = k * cell
    figure = _figure(figsize=(side + margin + 1.2, side + margin + 1.0))
    ax = figure.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.03, shrink=min(1.0, 0.5 + 0.1 * k))
    tick_size = 9 if k <= 15 else 8 if k <= 30 else 7
    rotate = 90 if max(len(n) for n in names) > max(2, int(cell * 11)) else 0  # fits its cell
    ax.set_xticks(range(k), names, rotation=rotate, fontsize=tick_size)
    ax.set_yticks(range(k), names, fontsize=tick_size)
    ax.set_xlabel("predicted class", fontsize=10)
    ax.set_ylabel("true class", fontsize=10)
    # What colour and numbers mean goes under the title, never beside the colour bar
    # (where its label ran over the title of a small matrix).
    legend = "colour: share of the true class" + ("; numbers: images" if k <= 25 else "")
    ax.set_title(f"{printable(title)}\n{legend}", fontsize=9)
    if k <= 25:
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

    ``entries``: ``label``, ``accuracy``, ``accuracy_ci``, ``role`` (``winner``,
    ``tied`` or ``other``) and ``colour`` (the run's, as in every figure). The
    role is the marker: a star for the chosen run, a filled dot for a run tied
    with it, an open dot otherwise. The chosen run's interval is shaded grey.
    """
    n = len(entries)
    figure = _figure(figsize=(8.5, 0.34 * n + 1.3))
    ax = figure.subplots()
    for i, e in enumerate(entries):
        y = n - 1 - i
        low, high = e["accuracy_ci"]
        colour = e.get("colour", RUN_COLOURS[0])
        face = "white" if e["role"] == "other" else colour
        ax.errorbar(e["accuracy"], y, xerr=[[e["accuracy"] - low], [high - e["accuracy"]]],
                    fmt=_ROLE_MARKERS[e["role"]], color=colour, markerfacecolor=face,
                    capsize=3, markersize=11 if e["role"] == "winner" else 6)  # fmt: skip
        if e["role"] == "winner":
            ax.axvspan(low, high, color="grey", alpha=0.12)
    ax.set_yticks(range(n), [printable(e["label"]) for e in reversed(entries)], fontsize=9)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel(f"accuracy on {split} (95% bootstrap interval)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    handles = [
        _legend_handle(color="black", marker=marker, markerfacecolor=face, linestyle="",
                       markersize=size, label=label)
        for marker, face, size, label in (
            ("*", "black", 11, "chosen (its interval shaded)"),
            ("o", "black", 6, "tied with it (McNemar p ≥ 0.05)"),
            ("o", "white", 6, "behind it (McNemar p < 0.05)"),
        )
    ]  # fmt: skip
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
    """Accuracy against fit time and against time per image from the images (log scales).

    ``points``: ``label``, ``colour`` (the run's), ``accuracy``, ``fit_seconds``,
    ``seconds_per_image`` (end to end from the images: a head's includes stage
    one's time per image; ``None`` leaves the point out of that panel, never a
    head-only time among end-to-end ones), ``finetuned`` and, for heads,
    ``extraction_seconds`` and ``cache`` (stage one, a grey dotted line per cache:
    paid once, shared by its heads). Labels are placed where they hide no point.
    """
    figure = _figure(figsize=(11, 4.6))
    axes = figure.subplots(1, 2, sharey=True)
    panels = (
        ("fit_seconds", "fit time (s)"),
        ("seconds_per_image", "time per image from the images (ms; heads: stage one + head)"),
    )
    for ax, (key, xlabel) in zip(axes, panels, strict=True):
        mine = [p for p in points if p.get(key)]
        scale = 1e3 if key == "seconds_per_image" else 1.0
        for p in mine:
            ax.scatter(p[key] * scale, p["accuracy"], color=p.get("colour", RUN_COLOURS[0]),
                       s=40, marker="^" if p["finetuned"] else "o", zorder=3)  # fmt: skip
        if key == "fit_seconds":
            _stage_one_lines(ax, points)
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
    handles = [_legend_handle(color="grey", marker="o", linestyle="", label="head")]
    if any(p["finetuned"] for p in points):
        handles.append(_legend_handle(color="grey", marker="^", linestyle="", label="fine-tuned"))
    if any(p.get("extraction_seconds") for p in points):
        handles.append(
            _legend_handle(color="grey", linestyle=":", label="stage one, once per cache")
        )
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8,
                  frameon=False)  # fmt: skip
    figure.suptitle("accuracy against cost", fontsize=10)
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    for ax, (key, _) in zip(axes, panels, strict=True):
        mine = [p for p in points if p.get(key)]
        scale = 1e3 if key == "seconds_per_image" else 1.0
        place_labels(ax, [p[key] * scale for p in mine], [p["accuracy"] for p in mine],
                     [printable(p["label"]) for p in mine])  # fmt: skip
    return figure


def _stage_one_lines(ax: Any, points: list[dict[str, Any]]) -> None:
    """A grey dotted line at each cache's stage-one time, named when there are several."""
    seconds = {
        p.get("cache"): p["extraction_seconds"] for p in points if p.get("extraction_seconds")
    }
    for cache, value in seconds.items():
        ax.axvline(value, color="grey", linestyle=":", linewidth=1)
        if len(seconds) > 1 and cache:
            ax.text(value, 0.98, f" {printable(cache)}", rotation=90, va="top", fontsize=7,
                    color="grey", transform=ax.get_xaxis_transform())  # fmt: skip


LOG_ROC_NEGATIVES = 200  # below this many negatives the ROC's false-positive axis is linear


@literal_text
def roc_figure(curves: list[tuple[str, dict[str, Any], str]], *, split: str) -> Any:
    """ROC curves (``(label, roc, colour)``; ``roc`` with ``fpr``, ``tpr``, ``auc``, ``kind``
    and ``negatives``), one per run.

    The false-positive axis is linear unless every curve has at least
    :data:`LOG_ROC_NEGATIVES` negatives; then it is logarithmic down to
    ``1 / negatives``, the smallest false-positive rate the data can show.
    """
    figure = _figure(figsize=(5.6, 4.6 + 0.2 * len(curves)))
    ax = figure.subplots()
    negatives = min((c[1].get("negatives") or 0 for c in curves), default=0)
    log = negatives >= LOG_ROC_NEGATIVES
    for label, roc, colour in curves:
        fpr, tpr = np.asarray(roc["fpr"]), np.asarray(roc["tpr"])
        keep = fpr > 0 if log else np.ones(len(fpr), bool)
        ax.plot(fpr[keep], tpr[keep], color=colour, linewidth=1.4, drawstyle="steps-post",
                label=f"{printable(label)} (AUC {roc['auc']:.3f})")  # fmt: skip
    if log:
        lowest = 1.0 / negatives
        ax.plot([lowest, 1], [lowest, 1], color="grey", linestyle=":", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlim(lowest, 1.0)
        ax.xaxis.set_major_formatter(_plain_number())
        ax.set_xlabel(f"false-positive rate (log scale, from 1/{negatives} negatives)", fontsize=10)
    else:
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
        ax.set_xlim(0, 1)
        ax.set_xlabel(f"false-positive rate ({negatives} negatives)", fontsize=10)
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
def calibration_figure(curves: list[tuple[str, dict[str, Any], str]], *, split: str) -> Any:
    """Reliability diagram: accuracy against confidence per bin, with each run's ECE
    (``curves``: ``(label, calibration, colour)``)."""
    figure = _figure(figsize=(5.6, 5.2 + 0.2 * len(curves)))
    ax = figure.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8, label="calibrated")
    for label, cal, colour in curves:
        ax.plot(cal["confidence"], cal["accuracy"], marker="o", markersize=4, linewidth=1.2,
                color=colour, label=f"{printable(label)} (ECE {cal['ece']:.3f})")  # fmt: skip
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_aspect("equal")
    ax.set_xlabel("confidence (top class probability)", fontsize=10)
    ax.set_ylabel("accuracy", fontsize=10)
    ax.grid(alpha=0.3)
    ax.set_title(f"calibration on {split}", fontsize=10)
    _legend_below(ax)
    return figure


def safe_figure_name(name: str) -> str:
    """``name`` with every character but letters, digits, ``-``, ``_`` and ``.`` as ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def confusion_name(run: str, split: str) -> str:
    """The file name of ``run``'s confusion matrix on ``split``."""
    return f"confusion_{safe_figure_name(run)}_{split}.png"
