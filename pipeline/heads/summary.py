"""What ``make head`` prints about a sweep: each moved grid in words, and the closing table.

The table shows every head's score in the metric the heads were chosen by (``METRIC=``,
:mod:`pipeline.heads.scoring`; accuracy unless given) on the CV of train, val and test, and
marks the head to pick (:func:`pipeline.heads.results.chosen_head`: best on val, never test).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.heads import scoring
from pipeline.heads.results import chosen_head


def short(value: Any) -> str:
    """A value as a line shows it (floats as ``%g``)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def grid_move_lines(manifest: Mapping[str, Any]) -> list[str]:
    """One line per grid that moved past its edge in a head's search (``grid_moves``)."""
    lines = []
    for param, move in (manifest.get("grid_moves") or {}).items():
        added = [v for v in move["searched"] if v not in move["from"]]
        where = {
            "inside": f"the best, {short(manifest['params'].get(param))}, is now inside it",
            "flat": "the score stopped rising there",
            "limit": "stopped after the most steps it may take; the best is still at its edge",
            "bound": "stopped at its bound; the best is still at its edge",
        }[move["stopped"]]
        lines.append(
            f"{manifest['name']}: {param} grid moved {move['direction']} past "
            f"{short(move['from'][-1] if move['direction'] == 'up' else move['from'][0])} to "
            f"{', '.join(short(v) for v in added)} ({where}); GRID= sets a grid"
        )
    return lines


def split_score(manifest: Mapping[str, Any], split: str, metric: str) -> float | None:
    """``metric`` on ``split`` as the manifest recorded it (``None``: not recorded)."""
    value = (manifest.get("metrics") or {}).get(split, {}).get(metric)
    return None if value is None else float(value)


def summary_table(results: Sequence[Any]) -> str:
    """The heads side by side, the one to pick marked: best on val, else on CV (never test);
    ties go to the higher CV score, then the name (as the report ranks them). Scores are in
    the metric the heads were chosen by (a line above the table names it unless accuracy)."""
    basis = "val" if all("val" in r.manifest["metrics"] for r in results) else "cv"
    best = chosen_head(results)
    metric, _ = scoring.common_metric(r.manifest for r in results)
    lines = [] if metric == "accuracy" else [f"  scores: {scoring.words(metric)} (METRIC={metric})"]
    lines.append(f"  {'head':<8} {'cv':>6} {'val':>6} {'test':>6} {'fit s':>7}")
    for r in results:
        m = r.manifest
        cv = m["cv"]["score"] if scoring.manifest_metric(m) == metric else None
        cells = [cv, *(split_score(m, s, metric) for s in ("val", "test"))]
        shown = " ".join(f"{c:6.3f}" if c is not None else f"{'-':>6}" for c in cells)
        mark = f"  <- best on {basis}" if r is best else ""
        lines.append(f"  {r.head:<8} {shown} {m['fit_seconds']:7.2f}{mark}")
    if getattr(results, "fits_seconds", None) is not None:  # a sweep's HeadResults
        lines.append(searches_line(results))
    return "\n".join(lines)


def searches_line(results: Any) -> str:
    """The sweep's searches' time, under the table."""
    startup = results.keras_import_seconds
    loaded = f" (after loading Keras, {startup:.1f} s)" if startup >= 0.05 else ""
    return f"  searches {results.fits_seconds:.2f} s in all{loaded}"
