"""The report's figures from its data: which figures, with which labels and colours.

The drawing itself is :mod:`pipeline.report.plotting`'s; this module picks the runs,
gives each its short label and its one colour for the whole page, and returns PNG bytes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.report.naming import phase_two_words
from pipeline.report.plotting import (
    _figure,
    calibration_figure,
    confusion_figure,
    confusion_name,
    cost_figure,
    curves_figure,
    forest_figure,
    literal_text,
    png_bytes,
    roc_figure,
    run_colours,
    safe_figure_name,
)

OTHER_CONFUSIONS = 3  # confusion matrices of the runs ranked after the winner
CURVES_SHOWN = 5  # ROC and calibration curves of the best-ranked runs with probabilities


def _png(figure: Any) -> bytes:
    return png_bytes(figure, dpi=100, bbox_inches="tight")


def run_title(row: dict[str, Any]) -> str:
    """A run's name in a figure title: its short label on the page."""
    return row.get("label") or row["run"]


def report_figures(data: dict[str, Any]) -> dict[str, bytes]:
    """PNG bytes of every figure of the report, by file name.

    ``data`` is :func:`pipeline.report.evaluation.build_report_data`'s result.
    ``forest.png`` and ``cost.png`` of the ranked runs; ``confusion_<run>_<split>.png``
    of the winner on each split and of the next :data:`OTHER_CONFUSIONS` runs
    on the comparison split; ``roc.png`` and ``calibration.png`` of the ranked
    runs with probabilities (up to :data:`CURVES_SHOWN`); ``curves_<name>.png``
    per fine-tuned run with a history.
    """
    rows = {r["run"]: r for r in data["runs"]}
    chosen = data["selection"]
    split = chosen["compare_split"]
    board = [e for e in data["leaderboard"] if "accuracy" in e]
    colour = run_colours([e["run"] for e in board])
    figures: dict[str, bytes] = {}
    if board:
        tied = set(chosen["tied"])
        forest = [
            {**e, "label": run_title(rows[e["run"]]), "colour": colour[e["run"]],
             "role": "winner" if e["rank"] == 1 else "tied" if e["run"] in tied else "other"}
            for e in board
        ]  # fmt: skip
        figures["forest.png"] = _png(forest_figure(forest, split=split))
        points = [_cost_point(rows[e["run"]], e["accuracy"], colour[e["run"]]) for e in board]
        if any(p["fit_seconds"] or p["seconds_per_image"] for p in points):
            figures["cost.png"] = _png(cost_figure(points, split=split))
    if chosen["winner"]:
        winner = rows[chosen["winner"]]
        for s, entry in winner["splits"].items():
            title = f"{run_title(winner)} on {s}, {entry['n']} images"
            figure = confusion_figure(entry["confusion"], winner["class_names"], title=title)
            figures[confusion_name(winner["run"], s)] = _png(figure)
    for e in board[1 : 1 + OTHER_CONFUSIONS]:
        row, entry = rows[e["run"]], rows[e["run"]]["splits"][split]
        title = f"{run_title(row)} on {split}, {entry['n']} images"
        figure = confusion_figure(entry["confusion"], row["class_names"], title=title)
        figures[confusion_name(row["run"], split)] = _png(figure)
    with_proba = [e["run"] for e in board if "roc" in rows[e["run"]]["splits"][split]]
    with_proba = with_proba[:CURVES_SHOWN]
    if with_proba:
        curves = [(run_title(rows[r]), rows[r]["splits"][split], colour[r]) for r in with_proba]
        roc = roc_figure([(name, s["roc"], c) for name, s, c in curves], split=split)
        figures["roc.png"] = _png(roc)
        cal = calibration_figure(
            [(name, s["calibration"], c) for name, s, c in curves], split=split
        )
        figures["calibration.png"] = _png(cal)
    for row in data["runs"]:
        if row["kind"] == "finetuned" and row["history"]:
            curves_png = curves_figure(
                row["history"],
                title=f"training curves: {run_title(row)}",
                phase_two=phase_two_words(row["config"]),
            )
            figures[f"curves_{safe_figure_name(row['name'])}.png"] = _png(curves_png)
    return figures


def _cost_point(row: dict[str, Any], accuracy: float, colour: str) -> dict[str, Any]:
    finetuned = row["kind"] == "finetuned"
    return {
        "label": run_title(row),
        "colour": colour,
        "cache": row.get("cache_label") or row["group"],
        "accuracy": accuracy,
        "fit_seconds": row.get("fit_seconds"),
        # End to end only: a head's time without stage one is not comparable.
        "seconds_per_image": row.get("end_to_end_seconds_per_image"),
        "extraction_seconds": row.get("extraction_seconds"),
        "finetuned": finetuned,
    }


@literal_text
def curve_figure(record: dict[str, Any]) -> Any:
    """Mean per head against training images per class (log axis), the std as a band.

    ``record`` is a curve's JSON (:func:`pipeline.recipes.curve.run_curve`): ``points``
    of ``{"shots", "heads": {head: {"mean", "std"}}}``, ``heads``, ``metric``, ``seeds``,
    ``dataset``; the ``all`` point is a dashed level.
    """
    fig = _figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot()
    numbers = [p for p in record["points"] if p["shots"] != "all"]
    for head in record["heads"]:
        x = [p["shots"] for p in numbers]
        mean = np.array([p["heads"][head]["mean"] for p in numbers])
        std = np.array([p["heads"][head]["std"] for p in numbers])
        (line,) = ax.plot(x, mean, marker="o", label=head)
        # every metric here is a share: a band past 0 or 1 would draw scores nobody can get
        low, high = np.clip(mean - std, 0.0, 1.0), np.clip(mean + std, 0.0, 1.0)
        ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2)
        for p in record["points"]:
            if p["shots"] == "all":  # the shipped split: a dashed level, not a point on the axis
                ax.axhline(p["heads"][head]["mean"], color=line.get_color(), ls="--", lw=1)
    if numbers:
        ax.set_xscale("log")
        ax.set_xticks([p["shots"] for p in numbers], [str(p["shots"]) for p in numbers])
        ax.minorticks_off()  # the log axis's minor labels are mathtext, printed raw here
    shipped = any(p["shots"] == "all" for p in record["points"])
    ax.set_xlabel("training images per class" + (" (dashed: the cache's own split)" * shipped))
    ax.set_ylabel(f"{record['metric'].replace('_', ' ')} (band: +- std)")
    ax.set_title(f"{record['dataset']}: {len(record['seeds'])} seeds")
    ax.legend()
    fig.tight_layout()
    return fig
