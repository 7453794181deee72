"""``make head``'s word from the data audit: near duplicates that sit in more than one split.

Exact copies across splits are found at every ``make head`` from the files
(:func:`pipeline.data.folders.cross_split_copies`); near duplicates need the audit's
neighbour search, so they are counted only where ``make audit`` has run. ``audit.json`` is
read as plain JSON (the audit package sits above the heads) and trusted for nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.core.artifacts import safe_name


def audit_leak_note(artifacts_dir: str | Path, attrs: Mapping[str, Any]) -> str | None:
    """One warning line about the audit's near-duplicate groups across splits, or ``None``
    (no audit of this data set, or no such group)."""
    dataset = attrs.get("dataset")
    if not dataset:
        return None
    path = Path(artifacts_dir) / "audit" / safe_name(str(dataset)) / "audit.json"
    if not path.is_file():
        return None
    page = path.with_suffix(".html")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        leaks = [
            g for g in summary["near_duplicates"]["groups"] if "leak across splits" in g["where"]
        ]
        images = sum(len(g["members"]) for g in leaks)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return f"{path} is not a readable audit; run `make audit` again"
    if summary.get("fingerprint") != attrs.get("fingerprint"):
        return (
            f"the data audit {page} was made from other images or another split than this "
            "cache; run `make audit` again to count near duplicates across splits"
        )
    if not leaks:
        return None
    return (
        f"the data audit found {len(leaks)} group(s) of near duplicates ({images} images) "
        "in more than one split: their held-out accuracy is not held out; see "
        f"{page}, remove or move them and re-run `make features`"
    )
