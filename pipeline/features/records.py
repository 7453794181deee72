"""What a stage-one cache records, shared by both engines.

The local engine (:mod:`pipeline.features.extract`) and the Ray engine
(:mod:`pipeline.features.ray_engine`) write the same cache: the same identity (what makes
an image's features what they are, :func:`extractor_identity`, and the string a
finished cache is matched by, :func:`cache_config_json`), the same attributes
(:func:`extraction_attrs`) and the same :class:`ExtractionSummary` of a run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.core.artifacts import Artifacts, dataset_name, real_root
from pipeline.core.errors import CacheError
from pipeline.data import images
from pipeline.data.folders import ImageFolder, cross_split_copies
from pipeline.features import cache, cache_writer, runtimes
from pipeline.features.config import FeatureConfig, ResolvedFeatures, resolve_features
from pipeline.features.resplit import recorded_folder, split_attrs


@dataclass
class ExtractionSummary:
    """What a stage-one run did (printed by the CLI)."""

    cache_path: Path
    status: str  # "built", "resumed", "up to date", "re-split"
    images: int
    extracted: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    file_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    split: str = ""  # re-split: the new split in words
    moved: int = 0  # re-split: images whose split changed

    @property
    def images_per_second(self) -> float:
        return self.extracted / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        lines = [*self.notes]
        if self.status == "up to date":
            lines.append(
                f"{self.cache_path} is up to date ({self.extracted} images); nothing to do"
            )
        elif self.status == "re-split":
            lines.append(
                f"re-split {self.images} images with {self.split}: 0 extracted, {self.moved} "
                f"moved to another split, {self.seconds:.2f} s ({self.cache_path})"
            )
        else:
            lines.append(
                f"{self.status} {self.cache_path}: {self.extracted} images, {len(self.skipped)} skipped, "
                f"{self.seconds:.1f} s, {self.images_per_second:.1f} images/s, "
                f"{self.file_bytes / 1e6:.1f} MB"
            )
        lines.extend(f"  skipped {path}: {reason}" for path, reason in self.skipped)
        return "\n".join(lines)


def up_to_date_summary(path: Path, folder: ImageFolder, notes: list[str]) -> ExtractionSummary:
    """The summary of a run that found the finished cache at ``path`` up to date."""
    attrs = cache.read_attrs(path)
    return ExtractionSummary(
        path,
        "up to date",
        len(folder.records),
        int(attrs["n_images"]),
        cache.read_skipped(path),
        float(attrs["seconds"]),
        path.stat().st_size,
        notes,
    )


def extractor_identity(resolved: ResolvedFeatures) -> dict[str, Any]:
    """What makes an image's features what they are: backbone, weights identity, size,
    pooling, cut layer, preprocessing, dtype, precision, views (the part of a cache's
    ``config_json`` that :mod:`pipeline.predict` rebuilds and checks)."""
    config, spec = resolved.config, resolved.spec
    identity = {
        "backbone": spec.name,
        "weights": resolved.weights_id,
        "input_size": resolved.input_size,
        "pooling": config.pooling,
        "layer": config.layer or "",
        "preprocessing": spec.preprocessing,
        "dtype": resolved.dtype,
        "precision": resolved.runtime.precision,  # the compute precision, whichever runtime
        "resize": images.RESIZE,
    }
    if resolved.views is not None:  # the plain view adds nothing: today's caches stay valid
        identity["views"] = resolved.views.identity()
    return identity


def cache_config_json(resolved: ResolvedFeatures) -> str:
    """Everything that changes the features, as one comparable string (a cache's ``config_json``).

    The split is not in it: another split re-splits a cache's rows
    (:mod:`pipeline.features.resplit`); the images are its fingerprints.
    """
    identity = {"format_version": cache.FORMAT_VERSION, **extractor_identity(resolved)}
    return json.dumps(identity, sort_keys=True)


def extraction_attrs(
    folder: ImageFolder, resolved: ResolvedFeatures, width: int, writer: cache_writer.CacheWriter
) -> dict[str, Any]:
    """The attributes a finished cache records: options, data, versions, counts, seconds."""
    import importlib.metadata

    config, spec = resolved.config, resolved.spec
    if resolved.runtime.runtime == "keras":
        import keras

        keras_backend = keras.backend.backend()
    else:  # the runtime ran the model Keras exported; Keras itself was not imported
        keras_backend = str((resolved.store.meta() or {}).get("keras_backend", ""))
    n_skipped = len(writer.skipped)
    return {
        "backbone": spec.name,
        "weights": resolved.weights_id,
        "weights_source": config.weights,
        "input_size": resolved.input_size,
        "pooling": config.pooling,
        "layer": config.layer or "",
        "preprocessing": spec.preprocessing,
        "precision": resolved.runtime.precision,
        "dtype": resolved.dtype,
        "feature_width": width,
        "class_names": list(folder.class_names),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data_root": str(folder.root.resolve()),
        "dataset": folder.name,
        **split_attrs(folder),
        "keras_version": importlib.metadata.version("keras"),
        "keras_backend": keras_backend,
        "runtime": resolved.runtime.runtime,
        "openvino_version": runtimes.openvino_version()
        if resolved.runtime.runtime == "openvino"
        else "",
        "views": resolved.views.text() if resolved.views else "",
        "views_combine": resolved.views.combine if resolved.views else "",
        "n_images": len(folder.records) - n_skipped,
        "n_skipped": n_skipped,
        "seconds": writer.seconds,
    }


# --------------------------------------------------------------------------- checking a cache

# config_json keys -> the variable a user sets (what a mismatch names).
_OPTION_WORDS = {
    "backbone": "BACKBONE",
    "weights": "WEIGHTS",
    "input_size": "INPUT_SIZE",
    "pooling": "POOLING",
    "layer": "LAYER",
    "preprocessing": "BACKBONE (preprocessing)",
    "dtype": "STORAGE",
    "precision": "PRECISION",
    "views": "VIEWS",
    "resize": "the image resize (Pillow's antialiased before this version)",
}


def legacy_owner(artifacts_dir: str | Path, name: str) -> str | None:
    """The folder a finished cache of data set ``name`` was made from, for artifacts written
    before stage one recorded names' owners (:meth:`Artifacts.claim_dataset`)."""
    for path in sorted(Artifacts(artifacts_dir).features_dir(name).glob("*.h5")):
        try:
            attrs = cache.read_attrs(path)
        except CacheError:  # a work file or a damaged cache says nothing about the owner
            continue
        if attrs.get("dataset") == name and isinstance(attrs.get("data_root"), str):
            return attrs["data_root"]
    return None


def claim_dataset(
    folder: ImageFolder, artifacts_dir: str | Path
) -> tuple[ImageFolder, str, Callable[[], None]]:
    """``folder`` with the data set name stage one gives it; a note when that name is
    ``<name>-<hash6>`` because the plain one belongs to another folder (``""`` otherwise);
    and what records the owner of the plain name (called once a cache is written)."""
    layout = Artifacts(artifacts_dir)
    plain = dataset_name(folder.root)
    legacy = legacy_owner(artifacts_dir, plain) if layout.dataset_owner(plain) is None else None
    name, note = layout.claim_dataset(folder.root, legacy)
    return replace(folder, dataset=name), note, lambda: layout.record_dataset(folder.root, legacy)


def check_cache_for(
    path: str | Path,
    data: str | Path,
    config: FeatureConfig | None = None,
    *,
    artifacts_dir: str | Path = "artifacts",
) -> list[str]:
    """Check that the finished cache at ``path`` was made from the images in ``data`` as they
    are now, and (given ``config``) with these options; return warnings for the user (exact
    copies of images across splits: :func:`pipeline.data.folders.cross_split_copies`).

    Cheap: a scan of the folder (names, sizes, modification times), no decoding; the
    identity is stage one's own (:func:`cache_config_json` and the folder's fingerprint).

    Raises
    ------
    CacheError
        One line saying what differs and to re-run ``make features``.
    """
    attrs = cache.read_attrs(path)
    try:
        recorded = json.loads(attrs.get("config_json") or "")
    except ValueError:
        recorded = None
    if not isinstance(recorded, dict):
        raise CacheError(f"{path} records no configuration; delete it and re-run `make features`")
    differ = []
    if config is not None:
        resolved = resolve_features(config, artifacts_dir=artifacts_dir, choose_runtime=False)
        differ += _option_differences(recorded, resolved)
    root, made_from = Path(real_root(data)), attrs.get("data_root")
    folder = recorded_folder(path, data, attrs)
    if made_from is not None and made_from != str(root):
        differ.append(f"it was made from {made_from}, not {root}")
    elif folder.fingerprint() != attrs.get("fingerprint"):
        differ.append(_image_changes(path, folder))
    if differ:
        raise CacheError(
            f"{path} does not match DATA={data} and the options: {'; '.join(differ)}; "
            "re-run `make features`"
        )
    notes = [cross_split_copies(folder)]
    if not {r.split for r in folder.records} & {"val", "test"}:
        notes.append(
            "no val or test images: heads are compared on cross-validation only and "
            "`make report` has no held-out predictions to rank (see the split line of "
            "`make features`)"
        )
    return [f"warning: {note}" for note in notes if note]


def _option_differences(recorded: Mapping[str, Any], resolved: ResolvedFeatures) -> list[str]:
    expected = extractor_identity(resolved)
    allowed = runtimes.compute_precisions(resolved.config.precision)
    if recorded.get("precision") in allowed:  # PRECISION=auto accepts what stage one chose
        expected["precision"] = recorded["precision"]
    return [
        f"{_OPTION_WORDS.get(key, key)} is {_shown(recorded.get(key))} in the cache, "
        f"{_shown(expected.get(key))} asked"
        for key in sorted(set(expected) | (set(recorded) & set(_OPTION_WORDS)))
        if recorded.get(key) != expected.get(key)
    ]


def _shown(value: Any) -> str:
    return "unset" if value in (None, "") else str(value)


def _image_changes(path: str | Path, folder: ImageFolder) -> str:
    """What differs between the images a cache holds and those in the folder now."""
    fs_paths = cache.read_paths(path)
    now = {r.path: (folder.class_names[r.label], r.split) for r in folder.records}
    added, removed = len(set(now) - set(fs_paths)), len(set(fs_paths) - set(now))
    moved = sum(1 for p, where in fs_paths.items() if p in now and now[p] != where)
    parts = [f"{n} {what}" for n, what in ((added, "added"), (removed, "removed"),
                                          (moved, "relabelled or moved to another split")) if n]  # fmt: skip
    if not parts:
        return "images were edited since it was made (sizes or modification times differ)"
    return f"images changed since it was made ({', '.join(parts)})"
