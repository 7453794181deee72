"""``make bench-audit``: the data audit (map included) against stage one on the same images."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.audit import audit
from pipeline.core.files import write_json_atomic
from pipeline.features.extract import extract_features


def bench_audit(
    data_dir: str | Path,
    config: Any,
    *,
    out: str | Path | None = None,
    cv: int = 3,
    log: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Time stage one and then the audit of its cache, in one run, into a temporary folder.

    Both are timed as a user runs them, start-up included (the audit's calibration builds
    the backbone again). The figure is ``ratio`` = audit seconds / stage-one seconds, with
    the audit's phases, so what dominates is named, and ``cpu_ratio`` of the processes' CPU
    seconds. The user's artifacts are not touched.
    """
    with tempfile.TemporaryDirectory() as tmp:
        started, cpu = time.perf_counter(), time.process_time()
        summary = extract_features(data_dir, config, artifacts_dir=tmp, progress=False)
        stage_one, stage_one_cpu = time.perf_counter() - started, time.process_time() - cpu
        started, cpu = time.perf_counter(), time.process_time()
        result = audit(summary.cache_path, artifacts_dir=tmp, cv=cv)
        audit_seconds, audit_cpu = time.perf_counter() - started, time.process_time() - cpu
    phases = dict(sorted(result.summary["seconds"].items(), key=lambda kv: -kv[1]))
    figures = {
        "data": str(Path(data_dir).resolve()),
        "n_images": result.summary["n_images"],
        "stage_one_seconds": round(stage_one, 2),
        "audit_seconds": round(audit_seconds, 2),
        "ratio": round(audit_seconds / stage_one, 3),
        # CPU seconds of every thread: steadier than wall time on a machine others share
        "stage_one_cpu_seconds": round(stage_one_cpu, 2),
        "audit_cpu_seconds": round(audit_cpu, 2),
        "cpu_ratio": round(audit_cpu / stage_one_cpu, 3),
        "audit_phases_seconds": phases,
        "dominant_phase": next(iter(phases)),
        "findings": result.lines()[:-1],
    }
    if log is not None:
        log(
            f"{figures['n_images']} images: stage one {stage_one:.1f} s, audit "
            f"{audit_seconds:.1f} s (ratio {figures['ratio']:.2f}; CPU time ratio "
            f"{figures['cpu_ratio']:.2f}); audit phases: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
        )
    if out is not None:
        write_json_atomic(out, figures)
    return figures
