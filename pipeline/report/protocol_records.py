"""Protocol and curve results as the protocols page reads them: plain JSON, checked.

``make protocol`` and ``make curve`` (:mod:`pipeline.heads.protocol_run`,
:mod:`pipeline.recipes.curve`) write ``artifacts/protocols/<dataset>/<cache stem>/``
``<protocol>.json`` and ``curve.json``. The report package sits below the recipes, so it
reads these files as data and trusts nothing in them: every value the page shows is checked
here (a score a number in [0, 1], a seed a whole number, each head's seeds the protocol's),
the means and standard deviations are computed again from the per-seed figures, and a file
that fails any check is skipped with one line that names it and says why.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.artifacts import safe_name

METRIC_WORDS = {
    "balanced_accuracy": "balanced accuracy",
    "accuracy": "accuracy",
    "macro_f1": "macro F1",
    "top5": "top-5 accuracy",
}
CURVE_FILE = "curve.json"
_PER_CLASS = re.compile(r"(\d+)-per-class")


class Malformed(ValueError):
    """A results file the page cannot use; the message says what is wrong in it."""


@dataclass
class CacheResults:
    """One cache's results: its protocols shown on their own, its curve, and the
    per-N protocols the curve ran (by N), shown with it."""

    stem: str
    protocols: list[dict[str, Any]] = field(default_factory=list)
    curve: dict[str, Any] | None = None
    curve_runs: dict[int, dict[str, Any]] = field(default_factory=dict)


def protocols_root(artifacts_dir: str | Path, dataset: str) -> Path:
    """``<artifacts>/protocols/<dataset>/``, named as :func:`protocols_dir` names it."""
    return Path(artifacts_dir) / "protocols" / safe_name(dataset)


def read_results(root: Path) -> tuple[list[CacheResults], list[str]]:
    """Every readable result under ``root`` (one folder per cache stem), and one note per
    file skipped."""
    caches, notes = [], []
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    for folder in folders:
        cache = CacheResults(folder.name)
        for path in sorted(folder.glob("*.json"), key=_order):
            try:
                if path.name == CURVE_FILE:
                    cache.curve = read_curve(path)
                else:
                    cache.protocols.append(read_protocol(path))
            except (OSError, UnicodeError, ValueError) as exc:
                notes.append(f"skipped {path}: {exc}")
        _attach_curve_runs(cache)
        if cache.protocols or cache.curve:
            caches.append(cache)
    return caches, notes


def _order(path: Path) -> tuple[int, int, str]:
    """N per class by N, then split lists by name, then the curve."""
    match = _PER_CLASS.fullmatch(path.stem)
    if match:
        return 0, int(match.group(1)), ""
    return (2 if path.name == CURVE_FILE else 1), 0, path.name


def _attach_curve_runs(cache: CacheResults) -> None:
    """Move the protocols the curve ran (``part_of`` curve, its N, seeds, heads and metric)
    from ``protocols`` to ``curve_runs``; a later ``make protocol`` of the same N is its own."""
    if cache.curve is None:
        return
    shots = {p["shots"] for p in cache.curve["points"] if p["shots"] != "all"}
    kept = []
    for record in cache.protocols:
        n = record["split"].get("train_per_class")
        if (
            record.get("part_of") == "curve"
            and n in shots
            and record["seeds"] == cache.curve["seeds"]
            and record["metric"] == cache.curve["metric"]
            and list(record["heads"]) == cache.curve["heads"]
        ):
            cache.curve_runs[n] = record
        else:
            kept.append(record)
    cache.protocols = kept


# --------------------------------------------------------------------------- checks


def _load(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise Malformed(f"not JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(raw, dict):
        raise Malformed("not a JSON object")
    return raw


def _get(raw: Mapping[str, Any], key: str, what: str) -> Any:
    if not isinstance(raw, Mapping) or key not in raw:
        raise Malformed(f"{what} has no {key!r}")
    return raw[key]


def _score(value: Any, what: str) -> float:
    """A metric's value: a finite number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise Malformed(f"{what} is {value!r}, not a score between 0 and 1")
    return float(value)


def _seconds(value: Any) -> float | None:
    """A recorded time, or None when it is missing or not a time."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok and math.isfinite(value) and value >= 0 else None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _seeds(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not value or any(_count(s) is None for s in value):
        raise Malformed(f"{what} is {value!r}, not a list of seeds")
    return list(value)


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise Malformed(f"{what} is {value!r}, not a name")
    return value


def _metric(raw: Mapping[str, Any]) -> str:
    metric = _get(raw, "metric", "the file")
    if metric not in METRIC_WORDS:
        raise Malformed(f"metric {metric!r} is not one of {', '.join(METRIC_WORDS)}")
    return str(metric)


def _params(value: Any) -> dict[str, str]:
    """The chosen hyper-parameters as text; nested values (linear_eval's every held-out
    score) stay in the JSON."""
    if not isinstance(value, Mapping):
        return {}
    plain = (str, int, float, bool, type(None))
    return {
        str(k): f"{v:g}" if isinstance(v, float) else str(v)
        for k, v in value.items()
        if isinstance(v, plain)
    }


def _run(raw: Any, metric: str, what: str) -> dict[str, Any]:
    """One head on one seed."""
    seed = _count(_get(raw, "seed", what))
    scores = {m: _score(raw[m], f"{what} {m}") for m in METRIC_WORDS if m in raw}
    if metric not in scores:
        raise Malformed(f"{what} has no {metric!r}")
    return {
        "seed": seed, "scores": scores,
        "params": _params(raw.get("params")), "scheme": str(raw.get("scheme") or ""),
        "n_train": _count(raw.get("n_train")), "n_test": _count(raw.get("n_test")),
        "fit_seconds": _seconds(raw.get("fit_seconds")),
    }  # fmt: skip


def read_protocol(path: Path) -> dict[str, Any]:
    """A protocol's record, checked: per head its runs (one per seed) and their mean and
    std, computed here from the runs.

    Raises
    ------
    Malformed, OSError
        Unreadable, or anything the page would show is missing or not what it should be.
    """
    raw = _load(path)
    metric, seeds = _metric(raw), _seeds(_get(raw, "seeds", "the file"), "seeds")
    heads = _get(raw, "heads", "the file")
    if not isinstance(heads, Mapping) or not heads:
        raise Malformed("'heads' is empty or not an object")
    clean = {}
    for name, entry in heads.items():
        runs = _get(entry, "seeds", f"head {name!r}")
        if not isinstance(runs, list):
            raise Malformed(f"head {name!r}: 'seeds' is not a list")
        runs = [_run(r, metric, f"head {name!r} seed") for r in runs]
        if [r["seed"] for r in runs] != seeds:
            raise Malformed(f"head {name!r} has seeds {[r['seed'] for r in runs]}, not {seeds}")
        keys = [m for m in METRIC_WORDS if all(m in r["scores"] for r in runs)]
        values = {m: [r["scores"][m] for r in runs] for m in keys}
        clean[_text(name, "a head")] = {
            "runs": runs,
            "mean": {m: float(np.mean(v)) for m, v in values.items()},
            "std": {m: float(np.std(v)) for m, v in values.items()},  # ddof=0, as run_protocol
            "fit_seconds": _seconds(sum(r["fit_seconds"] or 0.0 for r in runs)),
        }
    return {
        "file": path, "protocol": _text(_get(raw, "protocol", "the file"), "protocol"),
        "metric": metric, "seeds": seeds, "heads": clean, "classes": _count(raw.get("classes")),
        "split": _split(raw.get("split")), "seconds": _seconds(raw.get("seconds")),
        "stage_one_seconds": _seconds(raw.get("stage_one_seconds")),
        "created": str(raw.get("created") or ""), "part_of": raw.get("part_of"),
    }  # fmt: skip


def _split(raw: Any) -> dict[str, Any]:
    if isinstance(raw, Mapping) and raw.get("kind") == "per_class":
        n = _count(raw.get("train_per_class"))
        if not n:
            raise Malformed(f"split train_per_class is {raw.get('train_per_class')!r}")
        return {"kind": "per_class", "train_per_class": n}
    if isinstance(raw, Mapping) and raw.get("kind") == "list":
        return {"kind": "list", "file": str(raw.get("file") or "?")}
    raise Malformed(f"split is {raw!r}, neither N per class nor a split list")


def read_curve(path: Path) -> dict[str, Any]:
    """A curve's record, checked: its points (``shots`` a whole number or ``all``), each
    with every head's mean and std.

    Raises
    ------
    Malformed, OSError
        As :func:`read_protocol`.
    """
    raw = _load(path)
    metric, seeds = _metric(raw), _seeds(_get(raw, "seeds", "the file"), "seeds")
    heads = _get(raw, "heads", "the file")
    if not isinstance(heads, list) or not heads:
        raise Malformed("'heads' is empty or not a list")
    heads = [_text(h, "a head") for h in heads]
    points = _get(raw, "points", "the file")
    if not isinstance(points, list) or not points:
        raise Malformed("'points' is empty or not a list")
    clean = []
    for point in points:
        shots = _get(point, "shots", "a point")
        if shots != "all" and not _count(shots):
            raise Malformed(f"a point's shots is {shots!r}, not N >= 1 or 'all'")
        figures = _get(point, "heads", f"point {shots}")
        clean.append({
            "shots": shots, "seconds": _seconds(point.get("seconds")),
            "scored": str(point.get("scored") or "test"),
            "heads": {h: {"mean": _score(_get(_get(figures, h, f"point {shots}"), "mean", h),
                                         f"point {shots} {h} mean"),
                          "std": _score(_get(figures[h], "std", h), f"point {shots} {h} std"),
                          "n_train": _count(figures[h].get("n_train"))} for h in heads},
        })  # fmt: skip
    return {
        "file": path, "dataset": str(raw.get("dataset") or ""), "metric": metric,
        "seeds": seeds, "heads": heads, "points": clean, "seconds": _seconds(raw.get("seconds")),
        "stage_one_seconds": _seconds(raw.get("stage_one_seconds")),
        "created": str(raw.get("created") or ""),
    }  # fmt: skip
