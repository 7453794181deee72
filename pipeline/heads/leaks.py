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


class AuditFile:
    """``audit.json`` of a data set, read as plain JSON: ``summary`` is None when there is
    none, ``error`` says why one is unreadable."""

    def __init__(self, artifacts_dir: str | Path, dataset: str) -> None:
        self.path = Path(artifacts_dir) / "audit" / safe_name(dataset) / "audit.json"
        self.page = self.path.with_suffix(".html")
        self.summary: dict[str, Any] | None = None
        self.error: str | None = None
        if not self.path.is_file():
            return
        try:
            summary = json.loads(self.path.read_text(encoding="utf-8"))
            self.groups(summary)  # the shape every reader relies on
            self.summary = summary
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            self.error = f"{self.path} is not a readable audit; run `make audit` again"

    @staticmethod
    def groups(summary: Mapping[str, Any]) -> list[tuple[str, set[str], int]]:
        """``(kind, where, members)`` of every exact and near duplicate group."""
        exact = [("exact", g) for g in summary["exact_duplicates"]]
        near = [("near", g) for g in summary["near_duplicates"]["groups"]]
        return [(kind, set(g["where"]), len(g["members"])) for kind, g in exact + near]


def audit_leak_note(artifacts_dir: str | Path, attrs: Mapping[str, Any]) -> str | None:
    """One warning line about the audit's near-duplicate groups across splits, or ``None``
    (no audit of this data set, or no such group)."""
    dataset = attrs.get("dataset")
    if not dataset:
        return None
    audit = AuditFile(artifacts_dir, str(dataset))
    if audit.error or audit.summary is None:
        return audit.error
    leaks = [
        n for kind, where, n in audit.groups(audit.summary)
        if kind == "near" and "leak across splits" in where
    ]  # fmt: skip
    if audit.summary.get("fingerprint") != attrs.get("fingerprint"):
        return (
            f"the data audit {audit.page} was made from other images or another split than this "
            "cache; run `make audit` again to count near duplicates across splits"
        )
    if not leaks:
        return None
    return (
        f"the data audit found {len(leaks)} group(s) of near duplicates ({sum(leaks)} images) "
        "in more than one split: their held-out accuracy is not held out; see "
        f"{audit.page}, remove or move them and re-run `make features`"
    )
