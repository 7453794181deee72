"""The data audit's word in the report: a link, and one line when it found leaks or conflicts.

The report reads ``<artifacts>/audit/<dataset>/audit.json`` as plain JSON (it never imports the
audit package, which sits above it) and trusts nothing in it: a file that is not an audit of this
data set's cache, or not well formed, is left out with a note.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pipeline.core.artifacts import safe_name


def audit_note(artifacts_dir: str | Path, dataset: str, report_dir: Path) -> dict[str, Any] | None:
    """``{"href", "sentence", "found"}`` for the report, or None when there is no audit."""
    path = Path(artifacts_dir) / "audit" / safe_name(dataset) / "audit.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        counts = _counts(summary)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        why = f"{path} is not a readable audit; run `make audit` again"
        return {"href": None, "sentence": why, "found": False}
    href = os.path.relpath(path.with_suffix(".html"), report_dir)
    found = [f"{n} group{'s' * (n != 1)} of copies {what}" for what, n in counts.items() if n]
    if found:
        sentence = (
            "The data audit found "
            + ", ".join(found)
            + "; a leak makes the figures above optimistic, a conflict makes them noisy."
        )
    else:
        sentence = "The data audit found no leak across splits and no label conflict among copies."
    return {"href": href, "sentence": sentence, "found": bool(found)}


def _counts(summary: dict[str, Any]) -> dict[str, int]:
    """Groups of copies that leak across splits or carry two labels (exact and near)."""
    groups = list(summary["exact_duplicates"]) + list(summary["near_duplicates"]["groups"])
    wheres = [set(g["where"]) for g in groups]
    return {
        "across splits (a leak)": sum("leak across splits" in w for w in wheres),
        "filed under different classes": sum("label conflict" in w for w in wheres),
    }
