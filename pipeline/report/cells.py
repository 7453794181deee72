"""How the report writes a number: table cells, intervals, times, p-values."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: ``-`` for ``None``, floats to ``digits`` decimals."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def with_interval(value: float, interval: Sequence[float]) -> str:
    """``0.912 [0.880, 0.940]``."""
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def ci(entry: dict[str, Any], metric: str) -> str:
    """``entry[metric]`` with its 95% interval."""
    return with_interval(entry[metric], entry[f"{metric}_ci"])


def ms(seconds: float | None) -> str:
    """Seconds as milliseconds to three significant digits, ``-`` for ``None``."""
    return "-" if seconds is None else f"{seconds * 1e3:.3g}"


def p_value(p: float) -> str:
    """``p = 0.039``, ``p = 1``, ``p < 0.0001`` (an exact p-value, readably)."""
    return "p < 0.0001" if p < 1e-4 else f"p = {p:.2g}"


def listing(names: Sequence[str], most: int = 8) -> str:
    """``a, b and c``, or the first ``most`` and how many more."""
    names = list(names)
    if len(names) > most:
        return ", ".join(names[:most]) + f" and {len(names) - most} more"
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def head_times(row: dict[str, Any]) -> tuple[str, str]:
    """Milliseconds per image as two cells that never mix: the head alone on cached
    features (``-`` for a fine-tuned run, which has no such figure), and end to end
    from the images (a head's plus stage one's; a fine-tuned run's own)."""
    if row.get("includes_backbone"):
        return "-", ms(row.get("predict_seconds_per_image"))
    return ms(row.get("predict_seconds_per_image")), ms(row.get("end_to_end_seconds_per_image"))
