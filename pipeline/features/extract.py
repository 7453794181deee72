"""Stage one: run a frozen backbone over an image folder and cache the features.

:func:`extract_features` is what ``make features`` and
``python -m pipeline features`` call. It streams: images are decoded a few
batches ahead on a thread pool while the backbone runs, and each batch of
features is written to the HDF5 cache as it comes, so memory does not grow with
the data set. An interrupted run resumes from its last finished batch.

This module owns the engine choice and the local loop. Both engines (the Ray one:
:mod:`pipeline.features.ray_engine`) start alike with
:func:`~pipeline.features.extractor.prepare_extraction` (options resolved into
:class:`ResolvedFeatures`, folder scanned, runtime settled, cache named) and compute with
:func:`~pipeline.features.extractor.build_extractor` and
:func:`~pipeline.features.extractor.forward_batch`; what a cache records (identity,
attributes, the run's summary) is :mod:`pipeline.features.records`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.core.errors import PipelineError
from pipeline.core.options import check_options
from pipeline.data.folders import SplitConfig
from pipeline.data.images import default_workers, iter_batches
from pipeline.features import cache_writer
from pipeline.features import views as views_module
from pipeline.features.config import FeatureConfig, ResolvedFeatures
from pipeline.features.extractor import (
    PreparedExtraction,
    build_extractor,
    forward_batch,
    prepare_extraction,
)
from pipeline.features.ray_engine import extract_features_ray
from pipeline.features.records import ExtractionSummary, extraction_attrs


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
        a pool of Ray actors (:mod:`pipeline.features.ray_engine`); the same cache.
    ray_config : pipeline.features.ray_session.RayConfig, optional
        Cluster address and actors, for ``engine="ray"``.

    Returns
    -------
    ExtractionSummary
        Cache path, counts, skipped images with reasons, timing.

    Examples
    --------
    >>> from pipeline.features.extract import FeatureConfig, extract_features
    >>> summary = extract_features("data/flowers", FeatureConfig(backbone="vgg16"))
    >>> print(summary.format())
    """
    check_options({"engine": engine})
    if engine == "ray" and config is not None and config.views:
        raise PipelineError("VIEWS= runs with ENGINE=local only; drop ENGINE=ray or VIEWS=")
    if engine == "ray":
        return extract_features_ray(
            data_dir, config, split=split, artifacts_dir=artifacts_dir, cache_path=cache_path,
            progress=progress, log=log, ray_config=ray_config,
        )  # fmt: skip
    run = prepare_extraction(
        data_dir, config, split=split, artifacts_dir=artifacts_dir, cache_path=cache_path, log=log
    )
    # Up to date: read only, no lock (a finished cache is replaced atomically), so a
    # read-only artifacts folder works. Otherwise build the model first: a bad layer or
    # weights file is refused before any lock or work file exists.
    if run.cache_state():
        return run.up_to_date()
    resplit = run.resplit()  # the same features under another split: nothing to extract
    if resplit is not None:
        return resplit
    model = build_extractor(run.resolved)
    with cache_writer.cache_lock(run.path):
        done = run.finished_meanwhile()
        if done is not None:
            return done
        status, seconds = _write_cache(model, run, progress)
    return run.summary(status, seconds)


def _write_cache(model, run: PreparedExtraction, progress: bool) -> tuple[str, float]:
    """Open or resume the cache's work file, extract what remains and finalize the cache;
    return whether it was built or resumed, and the seconds the cache records."""
    width = int(model.output_shape[-1])
    writer, status = _open_writer(run, width)
    try:
        warmup = _run(model, writer, run.folder, run.resolved, progress)
        attrs = extraction_attrs(run.folder, run.resolved, width, writer)
        attrs["warmup_seconds"] = warmup
        writer.finalize(attrs)
    finally:
        writer.close()
    return status, float(attrs["seconds"])


def _open_writer(run: PreparedExtraction, width: int) -> tuple[cache_writer.CacheWriter, str]:
    """Open the cache's work file, resuming an interrupted run's; return it and the status."""
    records = run.folder.records
    writer, note = cache_writer.CacheWriter.open(
        run.path,
        config_json=run.config_json,
        fingerprint=run.fingerprint,
        paths=[r.path for r in records],
        labels=[r.label for r in records],
        splits=[r.split for r in records],
        width=width,
        dtype=run.resolved.dtype,
    )
    if note:
        run.notes.append(note)
    return writer, "resumed" if writer.next_index > 0 else "built"


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
