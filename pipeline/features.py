"""Stage one: run a frozen backbone over an image folder and cache the features.

:func:`extract_features` is what ``make features`` and
``python -m pipeline features`` call. It streams: images are decoded a few
batches ahead on a thread pool while the backbone runs, and each batch of
features is written to the HDF5 cache as it comes, so memory does not grow with
the data set. An interrupted run resumes from its last finished batch.

This module owns the options (:class:`FeatureConfig`, resolved once into
:class:`ResolvedFeatures`), the cache's name, the extractor and the local loop;
what a cache records (identity, attributes, the run's summary) is
:mod:`pipeline.feature_records`, shared with the Ray engine (:mod:`pipeline.ray_engine`),
which also calls :func:`settle_runtime`, :func:`build_extractor` and :func:`forward_batch`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import backbones, cache, runtimes
from pipeline import views as views_module
from pipeline.artifacts import Artifacts
from pipeline.errors import PipelineError
from pipeline.feature_records import (
    ExtractionSummary,
    cache_config_json,
    extraction_attrs,
    up_to_date_summary,
)
from pipeline.images import ImageFolder, SplitConfig, default_workers, iter_batches, scan_folder
from pipeline.options import check_options
from pipeline.views import Views


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
    runtime : {"auto", "keras", "openvino"}
        Who runs the backbone (:mod:`pipeline.runtimes`); ``auto`` takes the
        fastest one whose features pass the check, else ``keras``.
    runtime_precision : {"auto", "fp32", "bf16"}
        The runtime's compute precision (OpenVINO's ``INFERENCE_PRECISION_HINT``);
        ``auto`` is ``bf16`` where the CPU has it and the check passes.
    views : str, optional
        Several views per image (:mod:`pipeline.views`): scales, ``+flip``,
        ``+crops``, e.g. ``"224,320,448+flip"``; unset (or the input size alone)
        is today's single view.
    combine : {"mean", "concat"}
        How the views' scales become one vector.
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
    runtime: str = "auto"
    runtime_precision: str = "auto"
    views: str | None = None
    combine: str = "mean"

    def validate(self) -> backbones.BackboneSpec:
        """Check every option without building anything; return the backbone spec."""
        return resolve_features(self).spec

    @classmethod
    def from_cache_attrs(cls, attrs: Mapping[str, Any], **overrides: Any) -> FeatureConfig:
        """The configuration a finished cache was made with (from its attributes).

        ``overrides`` replace fields that do not change the features
        (``batch_size``, ``workers``).
        """
        config = cls(
            backbone=str(attrs["backbone"]),
            weights=str(attrs["weights_source"]),
            input_size=int(attrs["input_size"]),
            pooling=str(attrs["pooling"]),
            layer=str(attrs.get("layer") or "") or None,
            float16=str(attrs.get("dtype", "float32")) == "float16",
            precision=str(attrs.get("precision", "float32")),
            runtime=str(attrs.get("runtime", "keras")),
            runtime_precision=str(attrs.get("runtime_precision", "fp32")),
            views=str(attrs.get("views") or "") or None,
            combine=str(attrs.get("views_combine") or "mean"),
        )
        return replace(config, **overrides)


@dataclass(frozen=True)
class ResolvedFeatures:
    """A :class:`FeatureConfig` resolved once: what every later step needs, computed here.

    Made by :func:`resolve_features` (as timm's ``resolve_model_data_config``):
    the backbone spec, the input size, the weights' identity and the stored
    dtype, so nothing downstream re-resolves or parses them.
    """

    config: FeatureConfig
    spec: backbones.BackboneSpec
    input_size: int
    weights_id: str
    dtype: str  # how features are stored: "float32" or "float16"
    runtime: runtimes.RuntimeChoice = runtimes.RuntimeChoice()
    store: runtimes.ConversionStore | None = None  # the converted model (runtimes other than keras)
    views: Views | None = None  # several views per image (pipeline.views); None: the plain one

    @property
    def weights_tag(self) -> str:
        """``imagenet``, ``random`` or ``w-<first 10 hex of the weights file's sha256>``."""
        if self.config.weights in ("imagenet", "none"):
            return "imagenet" if self.config.weights == "imagenet" else "random"
        return "w-" + self.weights_id.split(":")[1][:10]

    @property
    def cache_stem(self) -> str:
        """``<backbone>_<size>_<pooling>[_<layer>]_<weights>[_f16][_<precision>][_ov-<fp32|bf16>]``."""
        config = self.config
        parts = [self.spec.name, str(self.input_size), config.pooling]
        if config.layer:
            parts.append("".join(c if c.isalnum() else "-" for c in config.layer))
        if self.views is not None:  # the plain view has no tag: today's names stay
            parts.append(self.views.tag)
        parts.append(self.weights_tag)
        if self.dtype == "float16":
            parts.append("f16")
        if config.precision != "float32":  # other numerics: another file, never a rebuild
            parts.append(config.precision.replace("_", "-"))
        if self.runtime.tag:  # another runtime: another file, never mixed with Keras's
            parts.append(self.runtime.tag)
        return "_".join(parts)


def resolve_features(
    config: FeatureConfig, *, artifacts_dir: str | Path = "artifacts"
) -> ResolvedFeatures:
    """Check ``config`` (one table of constraints, :mod:`pipeline.options`) and resolve it.

    The runtime is chosen from what is installed, the CPU and the checks
    recorded under ``artifacts_dir`` (:func:`pipeline.runtimes.choose`); nothing
    is built or converted here.

    Raises
    ------
    PipelineError
        The first bad option, named as the user types it.
    """
    check_options(
        asdict(config),
        ("pooling", "batch_size", "precision", "workers", "runtime", "runtime_precision"),
    )
    if config.input_size is not None:
        check_options({"input_size": config.input_size})
    spec = backbones.get_backbone(config.backbone)
    size = backbones.resolve_input_size(spec, config.input_size)
    views = resolve_views(config, spec, size)
    resolved = ResolvedFeatures(
        config=config,
        spec=spec,
        input_size=views.scales[0] if views else size,
        weights_id=backbones.weights_identity(config.weights),
        dtype="float16" if config.float16 else "float32",
        views=views,
    )
    if config.runtime == "keras" or views is not None:  # views run on Keras (several sizes)
        return resolved
    store = runtimes.ConversionStore.for_config(
        artifacts_dir,
        backbone=spec.name,
        weights_id=resolved.weights_id,
        weights_tag=resolved.weights_tag,
        input_size=size,
        pooling=config.pooling,
        layer=config.layer,
    )
    choice = runtimes.choose(
        config.runtime,
        config.runtime_precision,
        keras_precision=config.precision,
        store=store,
        random_weights=config.weights == "none",
    )
    return replace(resolved, runtime=choice, store=store)


def resolve_views(config: FeatureConfig, spec: backbones.BackboneSpec, size: int) -> Views | None:
    """``VIEWS=`` resolved (:func:`pipeline.views.parse_views`); ``None`` for the plain view."""
    views = views_module.parse_views(
        config.views,
        combine=config.combine,
        input_size=size,
        minimum=spec.min_size,
        pooling=config.pooling,
    )
    if (
        views is not None
        and config.input_size is not None
        and config.input_size not in views.scales
    ):
        raise PipelineError(
            f"INPUT_SIZE={config.input_size} is not among VIEWS={views.text()}; "
            "give the scales in VIEWS only"
        )
    if views is not None and config.runtime == "openvino":
        raise PipelineError("VIEWS= runs on Keras (one model per scale); use RUNTIME=keras or auto")
    return views


def settle_runtime(resolved: ResolvedFeatures, folder: ImageFolder) -> ResolvedFeatures:
    """Convert and check the chosen runtime once (recorded); fall back where it fails.

    Both engines call it after the scan: the check runs on a few images of ``folder``.
    """
    config = resolved.config
    if resolved.store is None or resolved.runtime.runtime == "keras":
        return resolved

    @functools.cache
    def sample() -> np.ndarray:  # a few images spread over the data set
        records = folder.records
        picks = np.linspace(0, len(records) - 1, min(runtimes.CHECK_IMAGES, len(records)))
        paths = [records[int(i)].path for i in picks]
        spec, size = resolved.spec, resolved.input_size
        batches = iter_batches(
            folder.root, paths, size=size, batch_size=len(paths), preprocess=spec.preprocess
        )
        return np.concatenate([b.x for b in batches])

    choice = runtimes.settle(
        config.runtime,
        config.runtime_precision,
        keras_precision=config.precision,
        store=resolved.store,
        random_weights=config.weights == "none",
        build_keras=lambda: build_extractor(replace(resolved, runtime=runtimes.RuntimeChoice())),
        sample=sample,
        data=folder.name,
    )
    return replace(resolved, runtime=choice)


def cache_path_for(
    dataset: str, config: FeatureConfig | ResolvedFeatures, artifacts_dir: str | Path = "artifacts"
) -> Path:
    """Where the cache of ``dataset`` under ``config`` lives.

    ``artifacts/features/<dataset>/<backbone>_<size>_<pooling>[_<layer>]_<weights>[_f16][_<precision>].h5``;
    data changes rebuild the same file, other weights or options get another.
    """
    resolved = config
    if not isinstance(config, ResolvedFeatures):
        resolved = resolve_features(config, artifacts_dir=artifacts_dir)
    return Artifacts(artifacts_dir).cache_path(dataset, resolved.cache_stem)


def extract_features(
    data_dir: str | Path,
    config: FeatureConfig | None = None,
    *,
    split: SplitConfig | None = None,
    artifacts_dir: str | Path = "artifacts",
    cache_path: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], Any] | None = None,
    engine: str = "local",
    ray_config: Any = None,
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
    log : callable, optional
        Called with :func:`describe_folder`'s line once the folder is scanned,
        before anything is extracted.
    engine : {"local", "ray"}
        ``local``: this process. ``ray``: decoding in Ray tasks and the backbone in
        a pool of Ray actors (:mod:`pipeline.ray_engine`); the same cache.
    ray_config : pipeline.ray_engine.RayConfig, optional
        Cluster address and actors, for ``engine="ray"``.

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
    check_options({"engine": engine})
    if engine == "ray" and config is not None and config.views:
        raise PipelineError("VIEWS= runs with ENGINE=local only; drop ENGINE=ray or VIEWS=")
    if engine == "ray":
        from pipeline.ray_engine import extract_features_ray

        return extract_features_ray(
            data_dir, config, split=split, artifacts_dir=artifacts_dir, cache_path=cache_path,
            progress=progress, log=log, ray_config=ray_config,
        )  # fmt: skip
    resolved = resolve_features(config or FeatureConfig(), artifacts_dir=artifacts_dir)
    folder = scan_folder(data_dir, split)
    if log is not None:
        log(describe_folder(folder))
    resolved = settle_runtime(resolved, folder)
    if log is not None:
        log(runtimes.describe(resolved.runtime))
    path = Path(cache_path) if cache_path else cache_path_for(folder.name, resolved, artifacts_dir)
    config_json = cache_config_json(folder, resolved)
    fingerprint = folder.fingerprint()
    notes = [f"warning: {w}" for w in folder.warnings] + list(resolved.runtime.notes)

    # Up to date: read only, no lock (a finished cache is replaced atomically), so a
    # read-only artifacts folder works. Otherwise build the model first: a bad layer or
    # weights file is refused before any lock or work file exists.
    if cache.cache_matches(path, config_json, fingerprint):
        return up_to_date_summary(path, folder, notes)
    model = build_extractor(resolved)
    with cache.cache_lock(path):
        state = cache.cache_matches(path, config_json, fingerprint)
        if state:  # another run finished it while the model was built
            return up_to_date_summary(path, folder, notes)
        if state is False:
            notes.append(f"{path} was made from other images or options; rebuilding it")

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
            dtype=resolved.dtype,
        )
        if note:
            notes.append(note)
        status = "resumed" if writer.next_index > 0 else "built"
        try:
            warmup = _run(model, writer, folder, resolved, progress)
            attrs = extraction_attrs(folder, resolved, width, writer)
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


def describe_folder(folder: ImageFolder) -> str:
    """What a scan found: classes, images per split and where the split came from.

    Examples
    --------
    >>> print(describe_folder(scan_folder("artifacts/data/digits")))  # doctest: +SKIP
    found 1797 images of 10 classes (0, 1, 2, 3, 4, 5, 6, 7, 8, 9) in artifacts/data/digits
      split: train 1077, val 360, test 360 (stratified by class, SEED=0, VAL_FRACTION=0.2, TEST_FRACTION=0.2)
    """
    names = folder.class_names
    shown = ", ".join(names) if len(names) <= 12 else ", ".join(names[:10]) + f", ... {names[-1]}"
    counts = ", ".join(f"{split} {n}" for split, n in folder.counts().items())
    if folder.split_source == "folders":
        source = "from the split folders " + ", ".join(f"{s}/" for s in folder.counts())
    else:
        s = folder.split
        source = (
            f"stratified by class, SEED={s.seed}, VAL_FRACTION={s.val_fraction:g}, "
            f"TEST_FRACTION={s.test_fraction:g}"
        )
    return (
        f"found {len(folder.records)} images of {len(names)} classes ({shown}) in {folder.root}\n"
        f"  split: {counts} ({source})"
    )


def build_extractor(resolved: ResolvedFeatures):
    """The Keras model, or the runtime's compiled model (both: ``output_shape``, ``predict_on_batch``)."""
    config = resolved.config
    if resolved.views is not None:
        return views_module.build_model(resolved)
    if resolved.runtime.runtime == "openvino" and resolved.store is not None:
        return runtimes.load(resolved.runtime, resolved.store)
    with backbones.dtype_policy(config.precision):
        return backbones.build_feature_extractor(
            resolved.spec,
            weights=config.weights,
            input_size=resolved.input_size,
            pooling=config.pooling,
            layer=config.layer,
        )


def _run(model, writer, folder, resolved: ResolvedFeatures, progress) -> float:
    """Extract every remaining batch; return the first batch's seconds (graph compilation)."""
    from tqdm.auto import tqdm

    config, spec = resolved.config, resolved.spec
    paths = [r.path for r in folder.records]
    if resolved.views is not None:
        batches, forward, desc = views_module.batches(model, folder, resolved, writer.next_index)
    else:
        batches = iter_batches(
            folder.root,
            paths,
            size=resolved.input_size,
            batch_size=config.batch_size,
            preprocess=spec.preprocess,
            start=writer.next_index,
            workers=config.workers or default_workers(),
        )
        desc = f"{spec.name} features"

        def forward(batch):
            return forward_batch(model, batch.x, config.batch_size)

    bar = tqdm(
        total=len(paths),
        initial=writer.next_index,
        unit="img",
        disable=not progress,
        desc=desc,
        dynamic_ncols=True,
    )
    warmup = None
    with bar:
        started = time.perf_counter()
        for batch in batches:
            features = forward(batch)
            elapsed, started = time.perf_counter() - started, time.perf_counter()
            warmup = elapsed if warmup is None else warmup
            writer.write_batch(batch.start, features, batch.ok, batch.errors, elapsed)
            for offset, reason in batch.errors.items():
                bar.write(f"skipped {paths[batch.start + offset]}: {reason}")
            bar.update(batch.size)
    return warmup or 0.0


def forward_batch(model: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Features of ``x`` (float32); short batches are zero-padded so the compiled shape
    never changes (both engines' forward pass)."""
    n = len(x)
    if n == 0:
        return np.zeros((0, model.output_shape[-1]), np.float32)
    if n < batch_size:
        x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), x.dtype)])
    return np.asarray(model.predict_on_batch(x), dtype=np.float32)[:n]
