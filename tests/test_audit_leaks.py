"""`make head` counts the audit's near duplicates across splits beside its copies warning."""

from __future__ import annotations

import json
from pathlib import Path

from heads_helpers import synthetic_cache

from pipeline.features.cache import read_attrs
from pipeline.heads import fit
from pipeline.heads.leaks import audit_leak_note


def _group(where: str, n: int) -> dict:
    members = [{"path": f"train/a/{i}.png", "split": "train"} for i in range(n)]
    return {"members": members, "where": [where]}


def _audit(artifacts: Path, **summary) -> Path:
    path = artifacts / "audit" / "synthetic" / "audit.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"exact_duplicates": [], **summary}))
    return path


def test_the_warning_counts_near_duplicate_leaks(tmp_path: Path) -> None:
    cache = synthetic_cache(tmp_path)
    artifacts = tmp_path / "artifacts"
    lines: list[str] = []
    fit._open_cache(cache, None, artifacts, log=lines.append)
    assert not [line for line in lines if "audit" in line]  # no audit: nothing said
    groups = [_group("leak across splits", 2), _group("leak across splits", 3)]
    groups.append(_group("same class, same split", 2))
    fingerprint = read_attrs(cache)["fingerprint"]
    _audit(artifacts, fingerprint=fingerprint, near_duplicates={"groups": groups})
    fit._open_cache(cache, None, artifacts, log=lines.append)
    line = next(line for line in lines if "audit" in line)
    assert line.startswith("warning: the data audit found 2 group(s) of near duplicates (5 images)")
    assert str(artifacts / "audit" / "synthetic" / "audit.html") in line


def test_a_stale_or_broken_audit_says_so(tmp_path: Path) -> None:
    cache = synthetic_cache(tmp_path)
    attrs, artifacts = read_attrs(cache), tmp_path / "artifacts"
    _audit(artifacts, fingerprint="0" * 64, near_duplicates={"groups": []})
    assert "run `make audit` again" in (audit_leak_note(artifacts, attrs) or "")
    _audit(artifacts, fingerprint=attrs["fingerprint"], near_duplicates={"groups": []})
    assert audit_leak_note(artifacts, attrs) is None  # no leak: no line
    (artifacts / "audit" / "synthetic" / "audit.json").write_text("{not json")
    assert "is not a readable audit" in (audit_leak_note(artifacts, attrs) or "")
