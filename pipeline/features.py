"""Stage one: run a frozen backbone over an image folder and cache the features.

:func:`extract_features` is what ``make features`` and
``python -m pipeline features`` call. It streams: images are decoded a few
batches ahead on a thread pool while the backbone runs, and each batch of
features is written to the HDF5 cache as it comes, so memory does not grow with
the data set. An interrupted run resumes from its last finished batch.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline import backbones, cache
from pipeline.errors import PipelineError
from pipeline.images import ImageFolder, SplitConfig, default_workers, iter_batches, scan_folder

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


@dataclass(frozen=True)
class FeatureConfig:
    """Options of stage one (the ``make features`` variables).

    Parameters
    ----------
    backbone : str
        Registry name, e.g. ``"vgg16"`` (``python -m pipeline backbones``).
    weights : str
        ``"imagenet"``, ``"none"`` (random init) or a local weights file.
    input_size : int, optional
        Square input side; the backbone's default when omitted.
    pooling : {"avg", "max", "flatten"}
        How the last feature map becomes a vector.
    layer : str, optional
        Cut the backbone at this named layer.
    batch_size : int
        Images per forward pass.
    float16 : bool
        Store features as float16 (half the disk; the model still runs in float32).
    precision : {"float32", "mixed_float16", "mixed_bfloat16"}
        Compute precision; the mixed ones pay off on GPUs only.
    workers : int, optional
        Decoding threads (default one per core, at most 8).
    """

    backbone: str = "mobilenet_v2"
    weights: str = "imagenet"
    input_size: int | None = None
    pooling: str = "avg"
    layer: str | None = None
    batch_size: int = 32
    float16: bool = False
    precision: str = "float32"
    workers: int | None = None

    def validate(self) -> backbones.BackboneSpec:
        """Check every option without building anything; return the backbone spec."""
        spec = backbones.get_backbone(self.backbone)
        backbones.resolve_input_size(spec, self.input_size)
        backbones.check_pooling(self.pooling)
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise PipelineError(f"BATCH must be a positive integer; got {self.batch_size!r}")
        if self.precision not in PRECISIONS:
            raise PipelineError(
                f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}"
            )
        if self.workers is not None and self.workers < 1:
            raise PipelineError(f"workers must be at least 1; got {self.workers}")
        return spec


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


def cache_path_for(
    dataset: str, config: FeatureConfig, artifacts_dir: str | Path = "artifacts"
) -> Path:
    """Where the cache of ``dataset`` under ``config`` lives.

    ``artifacts/features/<dataset>/<backbone>_<size>_<pooling>[_<layer>]_<weights>[_f16][_<precision>].h5``;
    data changes rebuild the same file, other weights or options get another.
    """
    spec = backbones.get_backbone(config.backbone)
    size = backbones.resolve_input_size(spec, config.input_size)
    if config.weights in ("imagenet", "none"):
        weights_tag = "imagenet" if config.weights == "imagenet" else "random"
    else:
        weights_tag = "w-" + backbones.weights_identity(config.weights).split(":")[1][:10]
    parts = [spec.name, str(size), config.pooling]
    if config.layer:
        parts.append("".join(c if c.isalnum() else "-" for c in config.layer))
    parts.append(weights_tag)
    if config.float16:
        parts.append("f16")
    if config.precision != "float32":  # other numerics: another file, never a rebuild over this one
        parts.append(config.precision.replace("_", "-"))
    return Path(artifacts_dir) / "features" / dataset / ("_".join(parts) + ".h5")


def extract_features(
    data_dir: str | Path,
    config: FeatureConfig | None = None,
    *,
    split: SplitConfig | None = None,
    artifacts_dir: str | Path = "artifacts",
    cache_path: str | Path | None = None,
    progress: bool = True,
) -> ExtractionSummary:
    """Extract and cache the features of every image in ``data_dir``.

    Parameters
    ----------
    data_dir : path
        Folder of class subfolders, optionally under ``train/``, ``val/``
        (or ``validation/``) and ``test/``.
    config : FeatureConfig, optional
        Backbone and options (defaults: MobileNetV2, ImageNet, 224, avg).
    split : SplitConfig, optional
        Stratified split for folders without split folders.
    artifacts_dir : path
        Root of the outputs; the cache goes under ``features/<dataset>/``.
    cache_path : path, optional
        Explicit cache file instead of the default name.
    progress : bool
        Show a progress bar.

    Returns
    -------
    ExtractionSummary
        Cache path, counts, skipped images with reasons, timing.

    Examples
    --------
    >>> from pipeline.features import FeatureConfig, extract_features
    >>> summary = extract_features("data/flowers", FeatureConfig(backbone="vgg16"))
    >>> print(summary.format())
    """
    config = config or FeatureConfig()
    spec = config.validate()
    size = backbones.resolve_input_size(spec, config.input_size)
    folder = scan_folder(data_dir, split)
    weights_id = backbones.weights_identity(config.weights)
    path = Path(cache_path) if cache_path else cache_path_for(folder.name, config, artifacts_dir)
    config_json = _config_json(folder, config, spec, size, weights_id)
    fingerprint = folder.fingerprint()
    notes = [f"warning: {w}" for w in folder.warnings]

    with cache.cache_lock(path):
        state = cache.cache_matches(path, config_json, fingerprint)
        if state:
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
        if state is False:
            notes.append(f"{path} was made from other images or options; rebuilding it")

        model = _build_model(config, spec, size)
        width = int(model.output_shape[-1])
        records = folder.records
        writer, note = cache.CacheWriter.open(
            path,
            config_json=config_json,
            fingerprint=fingerprint,
            paths=[r.path for r in records],
            labels=[r.label for r in records],
            splits=[r.split for r in records],
            width=width,
            dtype="float16" if config.float16 else "float32",
        )
        if note:
            notes.append(note)
        status = "resumed" if writer.next_index > 0 else "built"
        try:
            warmup = _run(model, writer, folder, spec, size, config, progress)
            attrs = _attrs(folder, config, spec, size, weights_id, width, writer)
            attrs["warmup_seconds"] = warmup
            writer.finalize(attrs)
        finally:
            writer.close()

    skipped = cache.read_skipped(path)
    return ExtractionSummary(
        path,
        status,
        len(records),
        len(records) - len(skipped),
        skipped,
        float(attrs["seconds"]),
        path.stat().st_size,
        notes,
    )


def _config_json(
    folder: ImageFolder,
    config: FeatureConfig,
    spec: backbones.BackboneSpec,
    size: int,
    weights_id: str,
) -> str:
    """Everything that changes the features, as one comparable string."""
    identity = {
        "format_version": cache.FORMAT_VERSION,
        "backbone": spec.name,
        "weights": weights_id,
        "input_size": size,
        "pooling": config.pooling,
        "layer": config.layer or "",
        "preprocessing": spec.preprocessing,
        "dtype": "float16" if config.float16 else "float32",
        "precision": config.precision,
        "split_source": folder.split_source,
        "split": asdict(folder.split) if folder.split else None,
    }
    return json.dumps(identity, sort_keys=True)


def _build_model(config: FeatureConfig, spec: backbones.BackboneSpec, size: int):
    with backbones.dtype_policy(config.precision):
        return backbones.build_feature_extractor(
            spec,
            weights=config.weights,
            input_size=size,
            pooling=config.pooling,
            layer=config.layer,
        )


def _run(model, writer, folder, spec, size, config, progress) -> float:
    """Extract every remaining batch; return the first batch's seconds (graph compilation)."""
    from tqdm.auto import tqdm

    records = folder.records
    paths = [r.path for r in records]
    batches = iter_batches(
        folder.root,
        paths,
        size=size,
        batch_size=config.batch_size,
        preprocess=spec.preprocess,
        start=writer.next_index,
        workers=config.workers or default_workers(),
    )
    bar = tqdm(
        total=len(records),
        initial=writer.next_index,
        unit="img",
        disable=not progress,
        desc=f"{spec.name} features",
        dynamic_ncols=True,
    )
    warmup = None
    with bar:
        started = time.perf_counter()
        for batch in batches:
            features = _forward(model, batch.x, config.batch_size)
            elapsed, started = time.perf_counter() - started, time.perf_counter()
            warmup = elapsed if warmup is None else warmup
            writer.write_batch(batch.start, features, batch.ok, batch.errors, elapsed)
            for offset, reason in batch.errors.items():
                bar.write(f"skipped {paths[batch.start + offset]}: {reason}")
            bar.update(batch.size)
    return warmup or 0.0


def _forward(model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Features of ``x``; short batches are zero-padded so the compiled shape never changes."""
    n = len(x)
    if n == 0:
        return np.zeros((0, model.output_shape[-1]), np.float32)
    if n < batch_size:
        x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), x.dtype)])
    return np.asarray(model.predict_on_batch(x), dtype=np.float32)[:n]


def _attrs(folder, config, spec, size, weights_id, width, writer) -> dict:
    import importlib.metadata

    import keras

    n_skipped = len(writer.skipped)
    return {
        "backbone": spec.name,
        "weights": weights_id,
        "weights_source": config.weights,
        "input_size": size,
        "pooling": config.pooling,
        "layer": config.layer or "",
        "preprocessing": spec.preprocessing,
        "precision": config.precision,
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
        "keras_backend": keras.backend.backend(),
        "n_images": len(folder.records) - n_skipped,
        "n_skipped": n_skipped,
        "seconds": writer.seconds,
    }
