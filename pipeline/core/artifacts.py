"""The one owner of everything the stages write for each other under ``artifacts/``.

Every path under the artifacts root is built here, every manifest is made and
read here, and predictions files are written and read here; no other module
joins ``"heads"`` or ``"features"`` to a path. The layout (as Cookiecutter
Data Science's ``config.py`` names its folders)::

    artifacts/
      data/<name>/                              demo data (make demo)
      features/<dataset>/<cache stem>.h5        stage one (pipeline.features.cache)
      features/<dataset>/dataset.json           the folder that owns the name (claim_dataset)
      runtimes/<runtime>/<model stem>/          stage one's converted models (RUNTIME=openvino)
      heads/<dataset>/<cache stem>/<head>.*     stage two: manifest .json, model, predictions
      finetune/<dataset>/<name>.*               stage three: manifest .json, .keras, predictions,
                                                history, curves, checkpoint folder
      reports/<dataset>/report.{md,html,json}   the report, figures/ beside it (auto.{json,md}: make auto)
      predictions/<dataset>/<model>/<images>.csv  make predict
      probe/<dataset>/<stem>.{json,png}          make probe: linear-head accuracy per cut layer
      bench/<name>.json                         benchmarks

One manifest schema serves heads and fine-tuned runs (:data:`MANIFEST_VERSION`):
``kind`` (``"head"`` or ``"finetuned"``), ``manifest_version``, ``name``,
``dataset``, ``class_names``, the feature identity (``backbone``, ``weights`` =
the weights' identity, ``weights_source`` = what the user passed,
``input_size``, ``pooling``, ``layer``, ``preprocessing``), ``fingerprint``,
``files`` (role -> file name in the manifest's folder) and ``sha256`` (role ->
hex digest). Version-1 manifests (heads with ``head``, fine-tuned runs with
``format_version``, ``weights_id``) are read and upgraded in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.files import WriteError, write_json_atomic

MANIFEST_VERSION = 2
KINDS = ("head", "finetuned")
EVAL_SPLITS = ("val", "test")
# What makes two caches' features interchangeable for a head (not the images, not the split).
FEATURE_IDENTITY = ("backbone", "weights", "input_size", "pooling", "layer", "preprocessing")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


class ArtifactError(PipelineError):
    """A results file (manifest, predictions) that is missing, malformed or points outside."""


# --------------------------------------------------------------------------- names


def safe_name(text: str) -> str:
    """``text`` as one safe path component: no separators, no ``..``, no leading dot."""
    name = _UNSAFE.sub("-", str(text)).strip("-.")
    return name or "unnamed"


def dataset_name(data: str | Path, artifacts_dir: str | Path | None = None) -> str:
    """The data set's name: the folder's name as typed (``DATA=.`` and ``DATA=$(pwd)`` agree;
    a symbolic link keeps its own name), and ``<name>-<hash6>`` when ``artifacts_dir``
    records that name as another folder's (:meth:`Artifacts.claim_dataset`)."""
    name = safe_name(Path(os.path.abspath(Path(data).expanduser())).name)
    if artifacts_dir is None:
        return name
    owner = Artifacts(artifacts_dir).dataset_owner(name)
    return name if owner in (None, real_root(data)) else f"{name}-{_path_tag(data)}"


def real_root(data: str | Path) -> str:
    """The folder's resolved path: what caches record as ``data_root``, and names belong to."""
    return str(Path(data).expanduser().resolve())


def _path_tag(data: str | Path) -> str:
    return hashlib.sha256(real_root(data).encode("utf-8", "surrogateescape")).hexdigest()[:6]


def inside(folder: str | Path, name: str) -> Path:
    """``folder / name`` for a plain relative ``name`` that stays inside ``folder``.

    Raises
    ------
    ArtifactError
        ``name`` is absolute, climbs out with ``..``, or is not a string.
    """
    if not isinstance(name, str) or not name:
        raise ArtifactError(f"a file name in {folder} is missing or not a string: {name!r}")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or name.startswith("~"):
        raise ArtifactError(
            f"{name!r} points outside {folder}; results files may only name files beside them"
        )
    return Path(folder) / relative


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class FinetuneFiles:
    """Every file a fine-tuned run named ``name`` writes."""

    model: Path
    manifest: Path
    predictions: Path
    history: Path
    history_csv: Path
    curves: Path
    checkpoint: Path


@dataclass(frozen=True)
class Artifacts:
    """The artifacts folder: every output path of every stage.

    Examples
    --------
    >>> art = Artifacts("artifacts")
    >>> art.heads_dir("flowers", "vgg16_224_avg_imagenet")
    PosixPath('artifacts/heads/flowers/vgg16_224_avg_imagenet')
    """

    root: Path = Path("artifacts")

    def __init__(self, root: str | Path = "artifacts") -> None:
        object.__setattr__(self, "root", Path(root))

    def data_dir(self, name: str) -> Path:
        return self.root / "data" / safe_name(name)

    def features_dir(self, dataset: str) -> Path:
        return self.root / "features" / safe_name(dataset)

    def cache_path(self, dataset: str, stem: str) -> Path:
        return self.features_dir(dataset) / f"{safe_name(stem)}.h5"

    def runtime_dir(self, runtime: str, stem: str) -> Path:
        """A converted model of an inference runtime (stage one's ``RUNTIME=``)."""
        return self.root / "runtimes" / safe_name(runtime) / safe_name(stem)

    def heads_root(self) -> Path:
        return self.root / "heads"

    def heads_dir(self, dataset: str, cache_stem: str) -> Path:
        return self.heads_root() / safe_name(dataset) / safe_name(cache_stem)

    def head_manifest(self, dataset: str, cache_stem: str, head: str) -> Path:
        return self.heads_dir(dataset, cache_stem) / f"{safe_name(head)}.json"

    def stage_two_softmax(self, dataset: str, cache_stem: str) -> Path:
        """The Keras model of the softmax head fit on a cache (stage three starts from it)."""
        return self.heads_dir(dataset, cache_stem) / "softmax.keras"

    def finetune_dir(self, dataset: str) -> Path:
        return self.root / "finetune" / safe_name(dataset)

    def finetune_files(self, dataset: str, name: str) -> FinetuneFiles:
        folder, stem = self.finetune_dir(dataset), safe_name(name)
        return FinetuneFiles(
            model=folder / f"{stem}.keras",
            manifest=folder / f"{stem}.json",
            predictions=folder / f"{stem}.predictions.json",
            history=folder / f"{stem}.history.json",
            history_csv=folder / f"{stem}.history.csv",
            curves=folder / f"{stem}.curves.png",
            checkpoint=folder / f"{stem}.checkpoint",
        )

    def reports_dir(self, dataset: str) -> Path:
        return self.root / "reports" / safe_name(dataset)

    def predictions_csv(self, dataset: str, model: str, images: str) -> Path:
        """``make predict``'s default output for the images ``images`` and a model of ``dataset``.

        ``model`` is unique among the data set's models (``<cache stem>_<head>`` or a
        fine-tuned run's name), so data sets, backbones and heads never share a file.
        """
        folder = self.root / "predictions" / safe_name(dataset) / safe_name(model)
        return folder / f"{safe_name(images)}.csv"

    def probe_files(self, dataset: str, stem: str) -> tuple[Path, Path]:
        """``make probe``'s results: ``probe/<dataset>/<stem>.json`` and its ``.png`` plot."""
        folder = self.root / "probe" / safe_name(dataset)
        return folder / f"{safe_name(stem)}.json", folder / f"{safe_name(stem)}.png"

    def auto_files(self, dataset: str) -> tuple[Path, Path]:
        """``make auto``'s choice: ``reports/<dataset>/auto.json`` and ``auto.md``."""
        folder = self.reports_dir(dataset)
        return folder / "auto.json", folder / "auto.md"

    def bench_file(self, name: str) -> Path:
        return self.root / "bench" / f"{safe_name(name)}.json"

    def dataset_record(self, name: str) -> Path:
        """Which folder owns the data set name ``name`` (written by stage one)."""
        return self.features_dir(name) / "dataset.json"

    def dataset_owner(self, name: str) -> str | None:
        """The resolved folder recorded as owning ``name``, or ``None``."""
        try:
            owner = json.loads(self.dataset_record(name).read_text(encoding="utf-8"))["data_root"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return owner if isinstance(owner, str) else None

    def claim_dataset(self, data: str | Path, legacy_owner: str | None = None) -> tuple[str, str]:
        """Stage one's name for ``data``, and a note when the plain name is another folder's
        (``""`` otherwise). Nothing is written: :meth:`record_dataset` does, once the cache is.

        ``legacy_owner``: the folder an existing cache of the name was made from, for
        artifacts written before owners were recorded (the first folder keeps the name).
        """
        name, root = dataset_name(data), real_root(data)
        owner = self.dataset_owner(name) or legacy_owner or root
        if owner == root:
            return name, ""
        named = f"{name}-{_path_tag(data)}"
        return named, (
            f"data set name {name!r} belongs to {owner} ({self.dataset_record(name)}); "
            f"this folder's artifacts are named {named!r}"
        )

    def record_dataset(self, data: str | Path, legacy_owner: str | None = None) -> None:
        """Record who owns ``data``'s plain name, unless recorded: ``legacy_owner`` or ``data``."""
        name = dataset_name(data)
        if self.dataset_owner(name) is None:
            owner = legacy_owner or real_root(data)
            with contextlib.suppress(OSError, WriteError):  # a read-only artifacts folder
                write_json_atomic(self.dataset_record(name), {"data_root": owner})

    def datasets_with_heads(self) -> list[str]:
        """Data sets that have a heads folder (for "did you mean" hints)."""
        root = self.heads_root()
        return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []

    def run_manifests(self, dataset: str) -> list[Path]:
        """Every head and fine-tuned manifest of ``dataset`` (JSON files that may be one)."""
        found: list[Path] = []
        heads = self.heads_root() / safe_name(dataset)
        if heads.is_dir():
            found += sorted(heads.glob("*/*.json"))
        finetune = self.finetune_dir(dataset)
        if finetune.is_dir():
            found += sorted(finetune.glob("*.json"))
        return [
            p
            for p in found
            if not p.name.startswith(".")
            and not p.name.endswith((".predictions.json", ".history.json"))
        ]


# --------------------------------------------------------------------------- manifests


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def feature_identity(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The feature-identity keys of a cache's attributes (plus ``weights_source``)."""
    identity = {key: attrs.get(key) for key in FEATURE_IDENTITY}
    identity["weights_source"] = attrs.get("weights_source")
    return identity


def new_manifest(
    kind: str,
    *,
    name: str,
    dataset: str,
    class_names: Sequence[str],
    features: Mapping[str, Any],
    fingerprint: str | None,
    **fields: Any,
) -> dict[str, Any]:
    """A manifest of the shared schema; ``features`` holds the feature identity keys."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    manifest: dict[str, Any] = {
        "kind": kind,
        "manifest_version": MANIFEST_VERSION,
        "name": name,
        "dataset": dataset,
        "class_names": [str(c) for c in class_names],
        **{key: features.get(key) for key in (*FEATURE_IDENTITY, "weights_source")},
        "fingerprint": fingerprint,
        "created": now_iso(),
    }
    manifest.update(fields)
    return manifest


def write_manifest(path: str | Path, manifest: Mapping[str, Any]) -> Path:
    """Write a manifest (atomically; written last, after the files it names)."""
    return write_json_atomic(path, dict(manifest))


def _upgrade(manifest: dict[str, Any], path: Path) -> dict[str, Any]:
    """Version-1 manifests in the version-2 schema (in memory)."""
    if manifest.get("manifest_version") == MANIFEST_VERSION:
        return manifest
    upgraded = dict(manifest)
    if manifest.get("kind") == "head":
        upgraded["name"] = manifest.get("head", path.stem)
    else:  # finetuned, format_version 1: weights was the source, weights_id the identity
        upgraded["weights_source"] = manifest.get("weights")
        upgraded["weights"] = manifest.get("weights_id", manifest.get("weights"))
        upgraded.setdefault("name", path.stem)
        files = dict(manifest.get("files") or {})
        for role, key in (("model", "model"), ("predictions", "predictions"),
                          ("history", "history"), ("curves", "curves")):  # fmt: skip
            if isinstance(manifest.get(key), str):
                files.setdefault(role, manifest[key])
        upgraded["files"] = files
    upgraded["manifest_version"] = MANIFEST_VERSION
    return upgraded


def read_manifest(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Read and validate a manifest; version 1 is upgraded in memory.

    Checks the schema (kind, class names, files inside the manifest's folder)
    before anything the manifest names is opened.

    Raises
    ------
    ArtifactError
        Unreadable JSON, another kind than ``kind``, a malformed field, or a
        file name that points outside the manifest's folder.
    """
    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"no manifest {path}") from None
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"manifest {path} is not readable JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") not in KINDS:
        raise ArtifactError(f"{path} is not a head or fine-tuned manifest (no valid 'kind')")
    if kind is not None and manifest["kind"] != kind:
        raise ArtifactError(f"{path} describes a {manifest['kind']!r} run, not a {kind!r} one")
    version = manifest.get("manifest_version", manifest.get("format_version"))
    if version not in (1, MANIFEST_VERSION):
        raise ArtifactError(
            f"{path} has manifest version {version!r}; this pipeline reads 1 and "
            f"{MANIFEST_VERSION}: re-run the stage that wrote it"
        )
    manifest = _upgrade(manifest, path)
    names = manifest.get("class_names")
    if not (isinstance(names, list) and len(names) >= 2 and all(isinstance(c, str) for c in names)):
        raise ArtifactError(f"{path}: 'class_names' must be a list of at least two names")
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise ArtifactError(f"{path}: 'files' must be an object of file names")
    for role, file in files.items():
        inside(path.parent, file)  # refuses absolute paths and '..'
        if not isinstance(role, str):
            raise ArtifactError(f"{path}: 'files' keys must be strings")
    hashes = manifest.get("sha256", {})
    if not isinstance(hashes, dict) or not all(
        isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for v in hashes.values()
    ):
        raise ArtifactError(f"{path}: 'sha256' must map file roles to hex digests")
    if not isinstance(manifest.get("name", ""), str):
        raise ArtifactError(f"{path}: 'name' must be a string")
    return manifest


def manifest_file(manifest: Mapping[str, Any], manifest_path: str | Path, role: str) -> Path | None:
    """The file the manifest names for ``role`` (inside its folder), or ``None``."""
    name = manifest.get("files", {}).get(role)
    return None if name is None else inside(Path(manifest_path).parent, name)


# --------------------------------------------------------------------------- predictions files


@dataclass(frozen=True)
class SplitPredictions:
    """One split's predictions: image paths, true and predicted class indices, scores."""

    paths: np.ndarray  # object array of relative paths
    labels: np.ndarray  # int64
    pred: np.ndarray  # int64
    scores: np.ndarray | None  # (n, k) float64, or None
    is_proba: bool  # scores are probabilities

    def __iter__(self):  # unpacks as (paths, labels, pred, scores, is_proba)
        return iter((self.paths, self.labels, self.pred, self.scores, self.is_proba))


def write_predictions(
    path: str | Path,
    class_names: Sequence[str],
    *,
    paths: Sequence[str],
    split: Sequence[str],
    labels: Sequence[int],
    pred: Sequence[int],
    scores: np.ndarray | None,
    is_proba: bool,
) -> Path:
    """Write per-image predictions in the results format the report reads.

    ``{"class_names": [...], "predictions": {path: {"split", "label", "pred",
    "proba" | "scores"}}}``: paths relative to the data root, ``label`` and
    ``pred`` class names, scores in ``class_names`` order.
    """
    names = [str(c) for c in class_names]
    key = "proba" if is_proba else "scores"
    entries: dict[str, Any] = {}
    for i, rel in enumerate(paths):
        entry: dict[str, Any] = {
            "split": str(split[i]),
            "label": names[int(labels[i])],
            "pred": names[int(pred[i])],
        }
        if scores is not None:
            entry[key] = [round(float(v), 6) for v in scores[i]]
        entries[str(rel)] = entry
    return write_json_atomic(path, {"class_names": names, "predictions": entries})


def read_predictions(path: str | Path, class_names: Sequence[str]) -> dict[str, SplitPredictions]:
    """A predictions file as one :class:`SplitPredictions` per evaluated split.

    Raises
    ------
    ArtifactError
        Unreadable file, other class names, or malformed entries.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        names = tuple(data["class_names"])
        entries = data["predictions"]
        if not isinstance(entries, dict):
            raise TypeError("'predictions' is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"predictions file {path} is not readable ({exc})") from None
    if names != tuple(class_names):
        raise ArtifactError(
            f"predictions file {path} has classes {list(names)}, expected {list(class_names)}"
        )
    index = {c: i for i, c in enumerate(names)}
    k = len(names)
    rows: dict[str, list] = {s: [] for s in EVAL_SPLITS}
    try:
        for rel, entry in sorted(entries.items()):
            split = entry.get("split")
            if split not in rows:
                continue
            values = entry.get("proba", entry.get("scores"))
            if values is not None:
                values = [float(v) for v in values]
                if len(values) != k:
                    raise ValueError(f"{rel}: {len(values)} scores for {k} classes")
            rows[split].append(
                (rel, index[entry["label"]], index[entry["pred"]], values, "proba" in entry)
            )
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise ArtifactError(f"predictions file {path} has a malformed entry: {exc}") from None
    out = {}
    for split, items in rows.items():
        if not items:
            continue
        has_scores = all(r[3] is not None for r in items)
        out[split] = SplitPredictions(
            paths=np.array([r[0] for r in items], dtype=object),
            labels=np.array([r[1] for r in items], dtype=np.int64),
            pred=np.array([r[2] for r in items], dtype=np.int64),
            scores=np.array([r[3] for r in items], dtype=np.float64) if has_scores else None,
            is_proba=has_scores and all(r[4] for r in items),
        )
    return out


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """A fine-tuned run's per-epoch log (a JSON list of objects), or ``[]`` if unusable."""
    try:
        history = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(history, list) or not all(isinstance(row, dict) for row in history):
        return []
    return history
