"""The data audit's word in the report: a link, and one line when it found leaks or conflicts.

``audit.json`` is read by :class:`pipeline.heads.leaks.AuditFile` (plain JSON: the audit
package sits above the report) and trusted for nothing else.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline.heads.leaks import AuditFile


def audit_note(artifacts_dir: str | Path, dataset: str, report_dir: Path) -> dict[str, Any] | None:
    """``{"href", "sentence", "found"}`` for the report, or None when there is no audit."""
    audit = AuditFile(artifacts_dir, dataset)
    if audit.error:
        return {"href": None, "sentence": audit.error, "found": False}
    if audit.summary is None:
        return None
    wheres = [where for _, where, _ in audit.groups(audit.summary)]
    counts = {
        "across splits (a leak)": sum("leak across splits" in w for w in wheres),
        "filed under different classes": sum("label conflict" in w for w in wheres),
    }
    found = [f"{n} group{'s' * (n != 1)} of copies {what}" for what, n in counts.items() if n]
    if found:
        sentence = (
            "The data audit found "
            + ", ".join(found)
            + "; a leak makes the figures above optimistic, a conflict makes them noisy."
        )
    else:
        sentence = "The data audit found no leak across splits and no label conflict among copies."
    href = os.path.relpath(audit.page, report_dir)
    return {"href": href, "sentence": sentence, "found": bool(found)}
