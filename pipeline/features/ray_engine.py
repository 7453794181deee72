"""Stage one and the head search on Ray (``ENGINE=ray``): from a laptop to a cluster.

Stage one as a Ray Data job (:func:`extract_features_ray`, reached through
``extract_features(..., engine="ray")``):

1. the driver scans, splits and fingerprints the folder exactly as the local
   engine does, builds the backbone once (it checks the options and gives the
   feature width) and ships its weights to the workers through the object
   store, so every actor computes with the very same weights (also with
   ``WEIGHTS=none``, and without each node downloading ImageNet files);
2. the records are cut into *blocks* of consecutive records; images are
   decoded in Ray tasks (``map_batches`` with a function) and the backbone runs
   in a pool of ``concurrency`` actors (``map_batches`` with a callable class;
   one GPU per actor where the cluster has GPUs, CPU actors otherwise);
3. the driver collects each block's features and writes them to an HDF5
   *shard* (a finished cache of that block, :mod:`pipeline.features.cache`'s format)
   beside the cache, in ``<cache stem>.shards/<start>-<stop>.h5`` (blocks and
   shards: :mod:`pipeline.features.ray_shards`);
4. once every block has its shard, the driver joins them into the same cache
   file, format and attributes as the local engine (plus ``engine = "ray"``),
   then removes the shards.

Failure and resume: a worker process that dies is restarted by Ray and its
batch retried (Ray Data's defaults for actor pools: ``max_restarts=-1``,
``max_task_retries=-1``; Ray 2.60 deprecates setting them per call); a killed
driver leaves its finished shards, and the next run with the same images and options reuses
them (each shard records the cache's identity and the block's fingerprint)
and computes only the rest. Unreadable images are skipped with their reason,
as locally.

The head search (:func:`joblib_on_ray`): scikit-learn's searches run their fits
through joblib, and Ray provides a joblib backend, so ``ENGINE=ray`` on
``make head`` wraps the same :func:`pipeline.heads.fit.fit_heads` call in it.

Ray is an optional dependency (``pip install '.[ray]'``); nothing here imports
it before it is used.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.data.folders import SplitConfig
from pipeline.data.images import ImageError, load_image
from pipeline.features import cache, cache_writer
from pipeline.features import records as feature_records
from pipeline.features.config import FeatureConfig, ResolvedFeatures
from pipeline.features.extractor import (
    PreparedExtraction,
    build_extractor,
    forward_batch,
    prepare_extraction,
)
from pipeline.features.ray_session import RayConfig, ray_session
from pipeline.features.ray_shards import Block, BlockCollector, Shards, plan_blocks, shard_dir_of

# Blocks hold this many batches: large enough that a shard's file costs little next to
# its forward passes, small enough that a killed driver loses little.
BLOCK_BATCHES = 8


# --------------------------------------------------------------------------- workers


def decode_images(batch: dict[str, np.ndarray], *, size: int) -> dict[str, np.ndarray]:
    """Ray task: decode a batch of image paths to uint8 ``(n, size, size, 3)`` arrays.

    Unreadable images become zeros with ``ok`` false and their reason in ``error``
    (the same :func:`pipeline.data.images.load_image` as the local engine).
    """
    paths = batch["path"]
    images = np.zeros((len(paths), size, size, 3), np.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    errors = np.full(len(paths), "", dtype=object)
    for i, path in enumerate(paths):
        try:
            images[i] = load_image(str(path), size)
            ok[i] = True
        except ImageError as exc:
            errors[i] = str(exc)
    return {"index": batch["index"], "image": images, "ok": ok, "error": errors}


class EmbedBatches:
    """Ray actor: the frozen backbone, built once per actor, applied to decoded batches.

    Parameters
    ----------
    resolved : ResolvedFeatures
        The driver's resolved configuration (backbone, size, pooling, precision).
    weights : list of ndarray or ObjectRef, optional
        The driver model's weights; the actor builds the same architecture and
        loads them (so random weights are the driver's too). ``None``: build
        from ``resolved`` (runtimes other than Keras load their converted model).
    """

    def __init__(self, resolved: ResolvedFeatures, weights: Any = None) -> None:
        if weights is not None:
            import ray

            if isinstance(weights, ray.ObjectRef):
                weights = ray.get(weights)
            blank = replace(resolved, config=replace(resolved.config, weights="none"))
            self.model = build_extractor(blank)
            self.model.set_weights(weights)
        else:
            self.model = build_extractor(resolved)
        self.preprocess = resolved.spec.preprocess
        self.batch_size = resolved.config.batch_size
        self.width = int(self.model.output_shape[-1])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray(batch["ok"], dtype=bool)
        out = np.zeros((len(ok), self.width), np.float32)
        if ok.any():
            x = self.preprocess(np.asarray(batch["image"])[ok])  # a new float array
            out[ok] = forward_batch(self.model, x, self.batch_size)
        return {"index": batch["index"], "features": out, "ok": ok, "error": batch["error"]}


# --------------------------------------------------------------------------- stage one


def extract_features_ray(
    data_dir: str | Path,
    config: FeatureConfig | None = None,
    *,
    split: SplitConfig | None = None,
    artifacts_dir: str | Path = "artifacts",
    cache_path: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], Any] | None = None,
    ray_config: RayConfig | None = None,
    on_shard: Callable[[Path], Any] | None = None,
    embedder: type = EmbedBatches,
) -> feature_records.ExtractionSummary:
    """Stage one on Ray: the same cache as :func:`pipeline.features.extract.extract_features`.

    Parameters are those of :func:`~pipeline.features.extract.extract_features`, and:

    ray_config : RayConfig, optional
        Cluster address, actors, GPUs per actor, block size.
    on_shard : callable, optional
        Called with each shard's path once it is written (progress hooks).
    embedder : type
        The callable class the actors run (:class:`EmbedBatches`; a subclass
        may add instrumentation).

    Returns
    -------
    ExtractionSummary
        As the local engine's; ``notes`` say how many shards were reused.
    """
    ray_config = ray_config or RayConfig()
    ray_config.validate()
    run = prepare_extraction(
        data_dir, config, split=split, artifacts_dir=artifacts_dir, cache_path=cache_path, log=log
    )
    if run.cache_state():
        return run.up_to_date()
    resplit = run.resplit()  # the same features under another split: nothing to extract
    if resplit is not None:
        return resplit
    width, keras_weights = _driver_model(run.resolved)
    with cache_writer.cache_lock(run.path):
        done = run.finished_meanwhile()
        if done is not None:
            return done
        records = run.folder.records
        shards = _shards_of(run, width)
        blocks, finished, todo = _plan_shards(run, shards, ray_config)
        timings: dict[str, Any] = {}
        if todo:
            shards.folder.mkdir(parents=True, exist_ok=True)
            timings = _run_blocks(
                run.folder, run.resolved, shards, todo, ray_config, keras_weights,
                progress=progress, initial=len(records) - sum(b.stop - b.start for b in todo),
                total=len(records), on_shard=on_shard, embedder=embedder,
            )  # fmt: skip
        started = time.perf_counter()
        status = _join(run, shards, blocks, width, timings)
        joined = time.perf_counter() - started
    if timings:
        run.notes.append(_timings_note(timings, joined))
    seconds = float(cache.read_attrs(run.path)["seconds"])
    return run.summary("resumed" if finished or status == "resumed" else "built", seconds)


def _driver_model(resolved: ResolvedFeatures) -> tuple[int, list[np.ndarray] | None]:
    """Build the backbone on the driver once; return its feature width and (Keras) weights.

    Options and weights are so refused before any lock or Ray start, and the workers get
    these exact weights (``None``: other runtimes load their converted model themselves).
    """
    model = build_extractor(resolved)
    width = int(model.output_shape[-1])
    keras_weights = model.get_weights() if resolved.runtime.runtime == "keras" else None
    del model
    return width, keras_weights


def _shards_of(run: PreparedExtraction, width: int) -> Shards:
    """The shard files of this cache, with the identity each of them records."""
    records = run.folder.records
    return Shards(
        folder=shard_dir_of(run.path),
        config_json=run.config_json,
        fingerprint=run.fingerprint,
        paths=[r.path for r in records],
        labels=[r.label for r in records],
        splits=[r.split for r in records],
        width=width,
        dtype=run.resolved.dtype,
        class_names=list(run.folder.class_names),
    )


def _plan_shards(
    run: PreparedExtraction, shards: Shards, ray_config: RayConfig
) -> tuple[list[Block], set[str], list[Block]]:
    """Cut the records into blocks; keep an earlier run's finished shards, discard the others.

    Returns the blocks, the names of those already done and the blocks left to compute;
    the notes say what was reused or discarded.
    """
    block_size = ray_config.block_size or run.resolved.config.batch_size * BLOCK_BATCHES
    blocks = plan_blocks(len(run.folder.records), block_size)
    finished = {b.name for b in blocks if shards.is_done(b)}
    removed = shards.remove_others(finished)
    if removed:
        run.notes.append(f"discarded {removed} shard files of other blocks, options or images")
    todo = [b for b in blocks if b.name not in finished]
    if finished:
        run.notes.append(f"reusing {len(finished)} of {len(blocks)} shards from an earlier run")
    return blocks, finished, todo


def _timings_note(timings: dict[str, Any], joined: float) -> str:
    """The summary's line on a Ray run: actors, start-up, first features, join."""
    return (
        f"ray: {timings['ray_actors']} actors, Ray up in {timings['ray_start_seconds']:.1f} s, "
        f"first features after {timings['warmup_seconds']:.1f} s, shards joined in "
        f"{joined:.1f} s"
    )


def _run_blocks(
    folder, resolved, shards: Shards, todo: list[Block], ray_config: RayConfig, keras_weights,
    *, progress: bool, initial: int, total: int, on_shard, embedder,
) -> dict[str, float]:  # fmt: skip
    """Decode and embed the records of ``todo`` on Ray; write one shard per block."""
    from tqdm.auto import tqdm

    config, size = resolved.config, resolved.input_size
    root = folder.root.resolve()  # workers may start elsewhere: absolute paths
    items = [
        {"index": i, "path": str(root / shards.paths[i])}
        for block in todo
        for i in range(block.start, block.stop)
    ]
    actors = ray_config.concurrency
    local_cpus = max(os.cpu_count() or 1, int(np.ceil(actors * ray_config.cpus_per_actor)) + 1)
    started = time.perf_counter()
    with ray_session(ray_config.address, num_cpus=local_cpus) as ray:
        ray_started = time.perf_counter() - started
        import ray.data

        logging.getLogger("ray.data").setLevel(logging.ERROR)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        context.wait_for_min_actors_s = ray_config.actor_start_seconds  # not for ever
        gpus = ray_config.gpus_per_actor
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        weights_ref = ray.put(keras_weights) if keras_weights is not None else None
        batch = config.batch_size
        dataset = (
            # One input block per batch: features stream back batch by batch.
            ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // batch)))
            .map_batches(decode_images, batch_size=batch, fn_kwargs={"size": size}, num_cpus=1)
            .map_batches(
                embedder,
                batch_size=batch,
                fn_constructor_kwargs={"resolved": resolved, "weights": weights_ref},
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=ray_config.cpus_per_actor,
                num_gpus=gpus,
            )
        )
        collector = BlockCollector(todo, shards, shards.width)  # its clock starts now
        submitted = time.perf_counter()
        warmup = None
        bar = tqdm(
            total=total, initial=initial, unit="img", disable=not progress,
            desc=f"{resolved.spec.name} features (ray, {actors} actors)", dynamic_ncols=True,
        )  # fmt: skip
        with bar:
            try:
                for out in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                    if warmup is None:
                        warmup = time.perf_counter() - submitted
                    for index, row, ok, error in zip(
                        out["index"], out["features"], out["ok"], out["error"], strict=True
                    ):
                        if not ok:
                            bar.write(f"skipped {shards.paths[int(index)]}: {error}")
                        block = collector.add(int(index), row, bool(ok), str(error))
                        if block is not None and on_shard is not None:
                            on_shard(shards.h5(block))
                    bar.update(len(out["index"]))
            except Exception as exc:
                user_error = _in_chain(exc, PipelineError)
                if user_error is not None:
                    raise user_error from None
                if _in_chain(exc, ray.exceptions.GetTimeoutError) is not None:
                    raise _actors_not_started(ray, ray_config, actors, gpus) from None
                raise
    return {
        "ray_actors": actors,
        "ray_gpus_per_actor": gpus,
        "ray_start_seconds": ray_started,
        "warmup_seconds": warmup or 0.0,
    }


def _actors_not_started(ray: Any, ray_config: RayConfig, actors: int, gpus: float) -> PipelineError:
    """The one-line error of a pool of backbone actors that did not start in time."""
    have = ray.cluster_resources()
    asked = f"{ray_config.cpus_per_actor:g} CPU" + (f" and {gpus:g} GPU" if gpus else "")
    return PipelineError(
        f"Ray did not start {actors} backbone actor(s) of {asked} each within "
        f"{ray_config.actor_start_seconds:g} s; the cluster has {have.get('CPU', 0):g} CPUs "
        f"and {have.get('GPU', 0):g} GPUs (one more CPU goes to decoding): lower CONCURRENCY, "
        "or add nodes to the cluster"
    )


def _in_chain(exc: BaseException, kind: type) -> Any:
    """The first exception of type ``kind`` in ``exc``'s chain, through Ray's wrappers
    (``cause``), or ``None``: a worker's :class:`PipelineError`, Ray Data's start timeout."""
    seen = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kind):
            return current
        stack += [current.__cause__, current.__context__, getattr(current, "cause", None)]
    return None


def _join(run: PreparedExtraction, shards: Shards, blocks, width: int, timings) -> str:
    """Join the shards into the cache (resuming a join the driver did not finish)."""
    writer, note = cache_writer.CacheWriter.open(
        run.path,
        config_json=shards.config_json,
        fingerprint=shards.fingerprint,
        paths=shards.paths,
        labels=shards.labels,
        splits=shards.splits,
        width=width,
        dtype=run.resolved.dtype,
    )
    if note:
        run.notes.append(note)
    status = "resumed" if writer.next_index > 0 else "built"
    try:
        for block in blocks:
            if block.stop <= writer.next_index:
                continue
            rows, ok, errors, seconds = shards.read(block)
            cut = max(0, writer.next_index - block.start)  # a join stopped inside this block
            if cut:
                rows = rows[int(ok[:cut].sum()) :]
                ok = ok[cut:]
                errors = {i - cut: r for i, r in errors.items() if i >= cut}
            writer.write_batch(block.start + cut, rows, ok, errors, seconds)
        attrs = feature_records.extraction_attrs(run.folder, run.resolved, width, writer)
        attrs.update(_ray_attrs(blocks, timings))
        writer.finalize(attrs)
    finally:
        writer.close()
    shutil.rmtree(shards.folder, ignore_errors=True)
    return status


def _ray_attrs(blocks: list[Block], timings: dict[str, Any]) -> dict[str, Any]:
    """What the cache records of a Ray run (timings of this run; none when all was reused)."""
    import importlib.metadata

    return {
        "engine": "ray",
        "ray_version": importlib.metadata.version("ray"),
        "ray_blocks": len(blocks),
        **timings,
    }


# --------------------------------------------------------------------------- stage two
