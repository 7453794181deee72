"""Know your data before you trust a score: ``make audit`` and ``make export``.

* :func:`audit` (a cache) and :func:`audit_folder` (an image folder; stage one first when it
  has no cache): exact and near duplicates with where they sit (label conflicts, leaks
  across splits), likely label errors (cleanlab), outliers, class balance and a map;
* :func:`export_features`: a cache's features, labels, paths and splits (and the audit's
  out-of-fold probabilities) as NumPy ``.npz`` and Parquet.

This package sits beside :mod:`pipeline.predict` and :mod:`pipeline.recipes`: it reads
stage one's cache and imports nothing above :mod:`pipeline.features`.
"""

from pipeline.audit.export import ExportResult, export_features
from pipeline.audit.folder import audit_folder
from pipeline.audit.run import AuditError, AuditResult, audit, audit_dir

__all__ = [
    "AuditError",
    "AuditResult",
    "ExportResult",
    "audit",
    "audit_dir",
    "audit_folder",
    "export_features",
]
