"""What ``predict`` returns and writes: the :class:`Predictions` table, and where its CSV goes.

:func:`output_path` applies the rules of ``OUT=``: a predictions CSV may be replaced, any
other existing file is refused, a folder receives the default file name; the default file
name differs for every images folder (a short hash of its full path) and stays short.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.artifacts import Artifacts, dataset_name, safe_name
from pipeline.core.errors import PredictError

# Leading characters that make Excel, LibreOffice or Sheets read a cell as a formula (OWASP).
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
TABLE_LIMIT = 20  # print every prediction when there are at most this many images


def spreadsheet_safe(text: str) -> str:
    """``text`` with a ``'`` in front when a spreadsheet would evaluate it as a formula.

    Examples
    --------
    >>> spreadsheet_safe("=HYPERLINK(...)"), spreadsheet_safe("ants/1.jpg")
    ("'=HYPERLINK(...)", 'ants/1.jpg')
    """
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text


@dataclass
class Predictions:
    """What :func:`predict_images` predicted, and where it wrote it.

    Attributes
    ----------
    out_csv : Path
        The CSV written.
    model : str
        The model, in words.
    class_names : tuple of str
        Column order of ``scores``.
    paths : list of str
        Image paths relative to ``IMAGES`` (a folder) or the file's name.
    pred : ndarray of int64
        Predicted class index of each image.
    scores : ndarray of float64, shape (n, n_classes)
        Probabilities (``is_proba``) or decision scores of every class.
    is_proba : bool
        Whether ``scores`` are probabilities.
    labels : ndarray of int64
        True class index from the image's class folder, ``-1`` outside class folders.
    skipped : list of (path, reason)
        Images that could not be read.
    """

    out_csv: Path
    model: str
    class_names: tuple[str, ...]
    paths: list[str]
    pred: np.ndarray
    scores: np.ndarray
    is_proba: bool
    labels: np.ndarray
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def n_predicted(self) -> int:
        return len(self.paths)

    @property
    def n_labelled(self) -> int:
        """Images inside a class folder (they have a true label)."""
        return int(np.sum(self.labels >= 0))

    @property
    def accuracy(self) -> float | None:
        """Accuracy on the images inside class folders; ``None`` when there are none."""
        known = self.labels >= 0
        return float(np.mean(self.pred[known] == self.labels[known])) if known.any() else None

    @property
    def value_column(self) -> str:
        return "probability" if self.is_proba else "score"

    def columns(self) -> list[str]:
        """CSV header: ``path, [true_label,] predicted, probability|score, p_<class>|score_<class>...``."""
        prefix = "p_" if self.is_proba else "score_"
        label = ["true_label"] if self.n_labelled else []
        return ["path", *label, "predicted", self.value_column] + [
            prefix + c for c in self.class_names
        ]

    def records(self) -> list[dict[str, Any]]:
        """One dict per image, keyed by :meth:`columns` (values as Python objects, not text)."""
        names, columns = self.class_names, self.columns()
        out = []
        for i, path in enumerate(self.paths):
            p = int(self.pred[i])
            row: dict[str, Any] = {"path": path}
            if self.n_labelled:
                row["true_label"] = names[self.labels[i]] if self.labels[i] >= 0 else None
            row["predicted"] = names[p]
            row[self.value_column] = float(self.scores[i, p])
            row.update(zip(columns[-len(names) :], map(float, self.scores[i]), strict=True))
            out.append(row)
        return out

    def to_csv(self) -> str:
        """The CSV text; text cells that a spreadsheet would evaluate are prefixed with ``'``."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([spreadsheet_safe(c) for c in self.columns()])
        for record in self.records():
            writer.writerow(
                [
                    f"{v:.6f}" if isinstance(v, float) else spreadsheet_safe(v or "")
                    for v in record.values()
                ]
            )
        return buffer.getvalue()

    def format(self, table_limit: int = TABLE_LIMIT) -> str:
        """What ``make predict`` prints: the file, skipped images, a table when few, accuracy."""
        lines = [
            f"wrote {self.out_csv}: {self.n_predicted} images predicted with {self.model}, "
            f"{len(self.skipped)} skipped"
        ]
        lines += [f"  skipped {path}: {reason}" for path, reason in self.skipped]
        if 0 < self.n_predicted <= table_limit:
            lines += self._table()
        accuracy = self.accuracy
        if accuracy is not None:
            correct = int(round(accuracy * self.n_labelled))
            outside = self.n_predicted - self.n_labelled
            rest = f"; {outside} outside class folders not scored" if outside else ""
            lines.append(
                f"accuracy {accuracy:.3f} ({correct}/{self.n_labelled} images in class "
                f"folders{rest})"
            )
        return "\n".join(lines)

    def _table(self) -> list[str]:
        labelled = bool(self.n_labelled)
        header = ["path", *(["true"] if labelled else []), "predicted", self.value_column]
        rows = [header]
        for record in self.records():
            row = [_shorten(record["path"], 48)]
            if labelled:
                row.append(record["true_label"] or "-")
            value = record[self.value_column]
            row += [record["predicted"], f"{value:.3f}"]
            if labelled and record["true_label"] not in (None, record["predicted"]):
                row[-1] += "  wrong"
            rows.append(row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        return [
            "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in rows
        ]


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3) :]


# --- where the CSV goes

#: Longest images name kept in a default file name, in bytes (file systems allow 255).
NAME_LIMIT = 60


def images_label(images: str | Path) -> str:
    """``<name>-<hash>``: the images folder's (or file's) name, cut to :data:`NAME_LIMIT`
    bytes, and 8 hex digits of its full path, so ``b1/new`` and ``b2/new`` differ."""
    images = Path(images).expanduser()
    resolved = images.resolve()
    name = safe_name(resolved.stem) if images.is_file() else dataset_name(images)
    short = name.encode()[:NAME_LIMIT].decode(errors="ignore").rstrip("-.") or "images"
    return f"{short}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}"


def default_csv(dataset: str, model_id: str, images: str | Path, artifacts_dir: str | Path) -> Path:
    """``<artifacts>/predictions/<dataset>/<model id>/<images label>.csv``."""
    return Artifacts(artifacts_dir).predictions_csv(dataset, model_id, images_label(images))


def is_predictions_csv(path: Path) -> bool:
    """Whether ``path`` starts with the header :meth:`Predictions.columns` writes."""
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            columns = next(csv.reader([handle.readline()]), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return (
        columns[:1] == ["path"]
        and "predicted" in columns
        and bool({"probability", "score"} & set(columns))
    )


def is_folder(out: str | Path) -> bool:
    """``OUT=`` names a folder: an existing one, or a path ending in ``/``."""
    return Path(out).expanduser().is_dir() or str(out).endswith(("/", "\\"))


def check_out(out: str | Path | None) -> None:
    """Refuse ``OUT=`` an existing file that is not a predictions CSV (before any work)."""
    if not out or is_folder(out):
        return
    path = Path(out).expanduser()
    if path.exists() and not (path.is_file() and is_predictions_csv(path)):
        raise PredictError(
            f"OUT={out} exists and is not a predictions CSV, so it is left as it is; give a new "
            "file name, or a folder (the CSV is then written inside it)"
        )


def output_path(out: str | Path | None, default: Path, model_id: str) -> Path:
    """The CSV to write: ``default`` without ``OUT``; inside a folder ``OUT``, the file
    ``<model id>_<images label>.csv``; else ``OUT`` itself (checked by :func:`check_out`)."""
    if not out:
        return default
    check_out(out)
    if is_folder(out):
        return Path(out).expanduser() / f"{safe_name(model_id)}_{default.name}"
    return Path(out).expanduser()
