"""``make export``: a cache's features, labels, paths and splits as NumPy ``.npz`` and Parquet.

The audit's out-of-fold class probabilities (``artifacts/audit/<dataset>/oof.npz``) join
them when the audit read the same images (same cache fingerprint), matched by path.
Parquet needs pyarrow (the ``export`` extra, which ``make export`` installs); without it
the ``.npz`` is written and the result says why the Parquet file is not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.audit.run import audit_dir
from pipeline.core.artifacts import safe_name
from pipeline.core.files import write_atomic
from pipeline.features.cache import FeatureSet, load_features


@dataclass
class ExportResult:
    """The files written, and a note where something was left out."""

    npz: Path
    parquet: Path | None
    n_images: int
    with_predictions: bool
    note: str = ""

    def format(self) -> str:
        oof = ", with the audit's out-of-fold probabilities" if self.with_predictions else ""
        lines = [f"exported {self.n_images} images{oof}: {self.npz}"]
        lines += [f"  {self.parquet}"] if self.parquet else []
        return "\n".join(lines + ([f"  note: {self.note}"] if self.note else []))


def _predictions(fs: FeatureSet, artifacts_dir: str | Path) -> np.ndarray | None:
    """The audit's out-of-fold probabilities in the cache's row order (NaN where not audited)."""
    dataset = str(fs.attrs.get("dataset") or Path(fs.path).parent.name)
    path = audit_dir(artifacts_dir, dataset) / "oof.npz"
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as saved:
        if str(saved["fingerprint"]) != str(fs.attrs.get("fingerprint") or ""):
            return None
        if list(saved["class_names"]) != list(fs.class_names):
            return None
        row = {p: i for i, p in enumerate(saved["paths"].tolist())}
        probs = saved["pred_probs"]
    out = np.full((len(fs.paths), len(fs.class_names)), np.nan, dtype=np.float32)
    for i, p in enumerate(fs.paths):
        if p in row:
            out[i] = probs[row[p]]
    return out


def export_features(
    cache_path: str | Path, *, artifacts_dir: str | Path = "artifacts"
) -> ExportResult:
    """Write ``artifacts/export/<dataset>/<cache stem>.npz`` and ``.parquet``.

    Arrays (and columns): ``features`` (n, d) float32, ``labels`` int64, ``class_name``,
    ``paths`` (relative to the data root), ``split``, and ``oof_proba`` (n, classes) when
    the audit's probabilities belong to these images; the ``.npz`` has ``class_names`` too.

    Raises
    ------
    CacheError
        A missing or unreadable cache.
    """
    fs = load_features(cache_path)
    dataset = str(fs.attrs.get("dataset") or Path(fs.path).parent.name)
    folder = Path(artifacts_dir) / "export" / safe_name(dataset)
    stem = Path(fs.path).stem
    oof = _predictions(fs, artifacts_dir)
    arrays = {
        "features": np.asarray(fs.features, dtype=np.float32),
        "labels": fs.labels.astype(np.int64),
        "class_names": np.asarray(fs.class_names, dtype=str),
        "paths": np.asarray(fs.paths, dtype=str),
        "split": np.asarray(fs.split, dtype=str),
    }
    if oof is not None:
        arrays["oof_proba"] = oof

    def write_npz(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.savez_compressed(f, **arrays)

    npz = write_atomic(folder / f"{stem}.npz", write_npz)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        note = "no Parquet file: pyarrow is not installed (pip install pyarrow, or make export)"
        return ExportResult(npz, None, len(fs.labels), oof is not None, note)
    columns = {
        "path": pa.array(arrays["paths"].tolist()),
        "label": pa.array(arrays["labels"]),
        "class_name": pa.array([fs.class_names[i] for i in arrays["labels"]]),
        "split": pa.array(arrays["split"].tolist()),
        "features": _fixed_lists(pa, arrays["features"]),
    }
    if oof is not None:
        columns["oof_proba"] = _fixed_lists(pa, oof)
    table = pa.table(columns).replace_schema_metadata(
        {"class_names": ",".join(fs.class_names), "cache": str(Path(fs.path).resolve())}
    )
    parquet = write_atomic(folder / f"{stem}.parquet", lambda tmp: pq.write_table(table, tmp))
    return ExportResult(npz, parquet, len(fs.labels), oof is not None)


def _fixed_lists(pa, matrix: np.ndarray):
    """An (n, d) float32 matrix as one Parquet column of fixed-size lists."""
    flat = pa.array(np.ascontiguousarray(matrix, dtype=np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, int(matrix.shape[1]))
