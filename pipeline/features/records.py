"""What a stage-one cache records, shared by both engines.

The local engine (:mod:`pipeline.features.extract`) and the Ray engine
(:mod:`pipeline.features.ray_engine`) write the same cache: the same identity (what makes
an image's features what they are, :func:`extractor_identity`, and the string a
finished cache is matched by, :func:`cache_config_json`), the same attributes
(:func:`extraction_attrs`) and the same :class:`ExtractionSummary` of a run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.features import cache, cache_writer, runtimes

if TYPE_CHECKING:
    from pipeline.data.folders import ImageFolder
    from pipeline.features.config import ResolvedFeatures


@dataclass
class ExtractionSummary:
    """What a stage-one run did (printed by the CLI)."""

    cache_path: Path
    status: str  # "built", "resumed", "up to date"
    images: int
    extracted: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    file_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.extracted / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        lines = [*self.notes]
        if self.status == "up to date":
            lines.append(
                f"{self.cache_path} is up to date ({self.extracted} images); nothing to do"
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
    }
    if resolved.views is not None:  # the plain view adds nothing: today's caches stay valid
        identity["views"] = resolved.views.identity()
    return identity


def cache_config_json(folder: ImageFolder, resolved: ResolvedFeatures) -> str:
    """Everything that changes the features, as one comparable string (a cache's ``config_json``)."""
    identity = {
        "format_version": cache.FORMAT_VERSION,
        **extractor_identity(resolved),
        "split_source": folder.split_source,
        "split": asdict(folder.split) if folder.split else None,
    }
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
        "split_source": folder.split_source,
        "split_seed": folder.split.seed if folder.split else -1,
        "val_fraction": folder.split.val_fraction if folder.split else -1.0,
        "test_fraction": folder.split.test_fraction if folder.split else -1.0,
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
