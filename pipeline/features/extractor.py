"""The model that computes stage one's features: Keras, the runtime's compiled model, or the
views' model; the runtime settled on a sample of the user's own images; one padded forward pass;
and what both engines do before extracting (:func:`prepare_extraction`)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.artifacts import real_root
from pipeline.data.folders import ImageFolder, SplitConfig, describe_folder, scan_folder
from pipeline.data.images import iter_batches
from pipeline.features import backbones, cache, cache_writer, precisions, resplit, runtimes
from pipeline.features import views as views_module
from pipeline.features.config import (
    FeatureConfig,
    ResolvedFeatures,
    cache_path_for,
    resolve_features,
)
from pipeline.features.records import (
    ExtractionSummary,
    cache_config_json,
    claim_dataset,
    up_to_date_summary,
)


@dataclass
class PreparedExtraction:
    """A stage-one run before its first image: what both engines settle the same way.

    Attributes
    ----------
    resolved : ResolvedFeatures
        The options, with the runtime settled on the folder's images.
    folder : ImageFolder
        The scanned (and split) image folder.
    path : Path
        The cache file.
    config_json, fingerprint : str
        The cache's identity: the options and the images.
    notes : list of str
        The lines the run's summary starts with (the folder's warnings, the runtime's
        notes, and what the run adds).
    """

    resolved: ResolvedFeatures
    folder: ImageFolder
    path: Path
    config_json: str
    fingerprint: str
    notes: list[str]
    record_name: Callable[[], None] = lambda: None  # noqa: E731 (records the data set's name)

    def cache_state(self) -> bool | None:
        """:func:`pipeline.features.cache.cache_matches` for this cache and identity."""
        root, name = real_root(self.folder.root), self.folder.name
        return cache.cache_matches(
            self.path, self.config_json, self.fingerprint, data_root=root, dataset=name
        )

    def up_to_date(self) -> ExtractionSummary:
        """The summary of a run that found the cache up to date."""
        self.record_name()  # artifacts from before names were recorded get their record
        return up_to_date_summary(self.path, self.folder, self.notes)

    def finished_meanwhile(self) -> ExtractionSummary | None:
        """Under the cache's lock: the up-to-date summary if another run finished the cache
        while the model was built, else ``None`` (noting a cache that will be rebuilt)."""
        state = self.cache_state()
        if state:
            return self.up_to_date()
        if state is False:
            self.notes.append(f"{self.path} was made from other images or options; rebuilding it")
        return None

    def resplit(self) -> ExtractionSummary | None:
        """Give the finished cache this folder's split when only the split differs (nothing
        extracted; under the cache's lock), or ``None`` when it holds other features or images.
        """
        root, name = real_root(self.folder.root), self.folder.name
        if not resplit.can_resplit(
            self.path, self.folder, self.config_json, data_root=root, dataset=name
        ):
            return None
        started = time.perf_counter()
        with cache_writer.cache_lock(self.path):
            if self.cache_state():  # another run re-split it meanwhile
                return self.up_to_date()
            if not resplit.can_resplit(
                self.path, self.folder, self.config_json, data_root=root, dataset=name
            ):
                return None
            moved = resplit.resplit_cache(
                self.path, self.folder, self.config_json, self.fingerprint
            )
        self.record_name()
        summary = self.summary("re-split", time.perf_counter() - started)
        summary.extracted, summary.moved = 0, moved
        summary.split = self.folder.split_words()
        return summary

    def summary(self, status: str, seconds: float) -> ExtractionSummary:
        """The summary of a run that wrote the cache (``status``: built or resumed)."""
        self.record_name()  # only now: a refused run leaves nothing behind
        skipped = cache.read_skipped(self.path)
        n = len(self.folder.records)
        size = self.path.stat().st_size
        return ExtractionSummary(
            self.path, status, n, n - len(skipped), skipped, seconds, size, self.notes
        )


def prepare_extraction(
    data_dir: str | Path,
    config: FeatureConfig | None,
    *,
    split: SplitConfig | None,
    artifacts_dir: str | Path,
    cache_path: str | Path | None,
    log: Callable[[str], Any] | None,
) -> PreparedExtraction:
    """Resolve the options, scan the folder, settle the runtime and name the cache.

    Both engines start so (the parameters are those of
    :func:`pipeline.features.extract.extract_features`); ``log`` gets the folder's line,
    then the runtime's.

    Returns
    -------
    PreparedExtraction
        The settled options, the folder, the cache's path and identity, the first notes.
    """
    resolved = resolve_features(config or FeatureConfig(), artifacts_dir=artifacts_dir)
    folder, named, record_name = claim_dataset(scan_folder(data_dir, split), artifacts_dir)
    if log is not None:
        log(describe_folder(folder) + (f"\n{named}" if named else ""))
    resolved = settle_runtime(resolved, folder)
    if log is not None:
        log(runtimes.describe(resolved.runtime))
    path = Path(cache_path) if cache_path else cache_path_for(folder.name, resolved, artifacts_dir)
    return PreparedExtraction(
        resolved,
        folder,
        path,
        cache_config_json(resolved),
        folder.fingerprint(),
        [f"warning: {w}" for w in folder.warnings] + list(resolved.runtime.notes),
        record_name,
    )


def settle_runtime(resolved: ResolvedFeatures, folder: ImageFolder) -> ResolvedFeatures:
    """Convert and check the chosen runtime once (recorded); fall back where it fails.

    Both engines call it after the scan (:func:`prepare_extraction`): the check runs on a
    few images of ``folder``.
    """
    config = resolved.config
    if resolved.store is None or resolved.runtime.runtime == "keras":
        return resolved

    def decode(picks: np.ndarray) -> tuple[np.ndarray, list[str], np.ndarray]:
        records = [folder.records[int(i)] for i in picks]
        paths = [r.path for r in records]
        spec, size = resolved.spec, resolved.input_size
        batches = list(
            iter_batches(folder.root, paths, size=size, batch_size=32, preprocess=spec.preprocess)
        )
        ok = np.concatenate([b.ok for b in batches])  # unreadable images drop out
        x = np.concatenate([b.x for b in batches])
        labels = np.array([r.label for r in records])[ok]
        return x, [p for p, good in zip(paths, ok, strict=True) if good], labels

    def spread(n: int, shift: float = 0.0) -> np.ndarray:  # n images spread over the data set
        count = len(folder.records)
        n = min(n, count)
        return np.unique(((np.arange(n) + shift) * count / max(n, 1)).astype(int) % count)

    @functools.cache
    def sample() -> tuple[np.ndarray, list[str]]:  # the conversion's check: a few images
        x, paths, _ = decode(spread(runtimes.CHECK_IMAGES))
        return x, paths

    @functools.cache
    def reduced_sample() -> precisions.Sample:
        x, paths, labels = decode(spread(precisions.AGREEMENT_IMAGES))
        calibration = None
        if config.precision in ("auto", "int8") and precisions.nncf_installed():
            # Other images than the check's, where the data set has them.
            calibration, _, _ = decode(spread(precisions.CALIBRATION_IMAGES, shift=0.5))
        return precisions.Sample(x, labels, paths, x if calibration is None else calibration)

    choice = runtimes.settle(
        config.runtime,
        config.precision,
        store=resolved.store,
        random_weights=config.weights == "none",
        build_keras=lambda: build_extractor(replace(resolved, runtime=runtimes.RuntimeChoice())),
        sample=sample,
        reduced_sample=reduced_sample,
        data=folder.name,
        images=len(folder.records),
    )
    return replace(resolved, runtime=choice)


def build_extractor(resolved: ResolvedFeatures):
    """The Keras model, or the runtime's compiled model (both: ``output_shape``, ``predict_on_batch``)."""
    config = resolved.config
    if resolved.views is not None:
        return views_module.build_model(resolved)
    if resolved.runtime.runtime == "openvino" and resolved.store is not None:
        return runtimes.load(resolved.runtime, resolved.store)
    with backbones.dtype_policy(resolved.runtime.keras_policy):
        return backbones.build_feature_extractor(
            resolved.spec,
            weights=config.weights,
            input_size=resolved.input_size,
            pooling=config.pooling,
            layer=config.layer,
        )


def forward_batch(model: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Features of ``x`` (float32); short batches are zero-padded so the compiled shape
    never changes (both engines' forward pass)."""
    n = len(x)
    if n == 0:
        return np.zeros((0, model.output_shape[-1]), np.float32)
    if n < batch_size:
        x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), x.dtype)])
    return np.asarray(model.predict_on_batch(x), dtype=np.float32)[:n]
