""":func:`audit_folder`: the audit of an image folder, stage one run first where it has no cache."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.audit.run import AuditResult, audit, check_audit_options
from pipeline.core.artifacts import dataset_name
from pipeline.data.folders import SplitConfig
from pipeline.features.config import FeatureConfig, cache_path_for
from pipeline.features.extract import extract_features
from pipeline.features.records import check_cache_for


def find_or_extract(
    data_dir: str | Path,
    config: FeatureConfig | None = None,
    *,
    split: SplitConfig | None = None,
    artifacts_dir: str | Path = "artifacts",
    progress: bool = True,
    log: Callable[[str], Any] | None = None,
) -> Path:
    """The cache stage one wrote for ``data_dir`` and ``config``; stage one runs when there is none.

    A cache that is there is checked against the folder and the options as ``make head``
    checks it (:func:`pipeline.features.records.check_cache_for`): images changed since, or
    other options, are one line saying to re-run ``make features``; its warnings are logged.
    """
    config = config or FeatureConfig()
    path = cache_path_for(dataset_name(data_dir, artifacts_dir), config, artifacts_dir)
    if path.is_file():
        for note in check_cache_for(path, data_dir, config, artifacts_dir=artifacts_dir):
            if log is not None:
                log(note)
        return path
    summary = extract_features(
        data_dir, config, split=split, artifacts_dir=artifacts_dir, progress=progress, log=log
    )
    if log is not None:
        log(summary.format())
    return summary.cache_path


def audit_folder(
    data_dir: str | Path,
    config: FeatureConfig | None = None,
    *,
    split: SplitConfig | None = None,
    artifacts_dir: str | Path = "artifacts",
    progress: bool = True,
    log: Callable[[str], Any] | None = None,
    **options: Any,
) -> AuditResult:
    """Audit an image folder (:func:`pipeline.audit.audit` on its stage-one cache).

    The cache is the one ``make features`` writes for ``data_dir`` and ``config``
    (default: MobileNetV2, ImageNet, 224, avg); when there is none, stage one runs first.
    ``options`` go to :func:`pipeline.audit.audit` (``cv``, ``seed``, ``threshold``,
    ``calibration``).

    Examples
    --------
    >>> result = audit_folder("photos")
    >>> print(result.format())   # one line per finding class; artifacts/audit/photos/audit.html
    """
    check_audit_options(**{k: v for k, v in options.items() if k != "embed"})
    cache = find_or_extract(
        data_dir, config, split=split, artifacts_dir=artifacts_dir, progress=progress, log=log
    )
    return audit(cache, artifacts_dir=artifacts_dir, log=log, **options)
