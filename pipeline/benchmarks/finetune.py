"""``make bench-finetune``: one phase-two epoch against one stage-one pass, on the same images."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.files import write_json_atomic
from pipeline.data.folders import ImageFolder, scan_folder
from pipeline.data.images import default_workers, iter_batches
from pipeline.features import backbones
from pipeline.features.cache import FeatureRows
from pipeline.features.config import FeatureConfig, resolve_features
from pipeline.finetuning import activations, costs
from pipeline.finetuning.config import FinetuneConfig
from pipeline.finetuning.freezing import backbone_layers, last_block_size, set_trainable
from pipeline.finetuning.image_feed import image_sequence
from pipeline.finetuning.model import build_augmentation, build_finetune_model, compile_model
from pipeline.heads.softmax import build_softmax_head


def bench_finetune(
    data: str | Path,
    *,
    backbone: str = "mobilenet_v2",
    weights: str = "imagenet",
    input_size: int | None = None,
    batch_size: int = 32,
    n_images: int = 256,
    aug_copies: int = 8,
    out: str | Path | None = "artifacts/bench/finetune.json",
) -> dict:
    """Time one phase-two epoch (last block unfrozen) against one stage-one pass.

    ``make bench-finetune``. All run over the same ``n_images`` training
    images, decoded by :mod:`pipeline.data.images`; each is warmed up with one batch
    first, so tracing and compilation are not counted. Phase two as
    ``make finetune`` runs it: the top of the network on activations cached at
    the cut (:mod:`pipeline.finetuning.activations`, ``aug_copies`` augmented copies per
    image, one drawn per image); the one-off cost of that cache is reported
    apart. For comparison, the epoch of the whole network on images
    (``AUG_COPIES=0``). Stage one is timed before and after the epochs, and
    the ratios use the mean, so a change of load during the run moves both.

    Returns
    -------
    dict
        Seconds and images per second of each, the ratios, layers unfrozen.
    """
    resolved = resolve_features(
        FeatureConfig(backbone=backbone, weights=weights, input_size=input_size)
    )
    spec, size = resolved.spec, resolved.input_size
    folder, paths, labels = _bench_images(data, n_images)
    extractor, stage_one = _stage_one_pass(spec, weights, size, folder.root, paths, batch_size)
    forward_before = stage_one()

    base = backbones.build_base(spec, weights=weights, input_size=size)
    layers = last_block_size(base)
    head = build_softmax_head(int(extractor.output_shape[-1]), len(folder.class_names))
    finetune_config = FinetuneConfig(aug_copies=aug_copies)
    train_seconds = _full_forward_epoch(
        spec, base, head, layers, finetune_config, folder.root, paths, labels,
        size=size, batch_size=batch_size,
    )  # fmt: skip
    # Phase two on cached activations: the cache once, then the epochs.
    cut = activations.find_cut(base, layers)
    views = max(1, aug_copies)
    cache_seconds, cache_bytes, epochs, top_params = _cached_activation_epochs(
        spec, base, head, cut, finetune_config, folder, paths, labels,
        views=views, size=size, batch_size=batch_size,
    )  # fmt: skip
    timings = _Timings(
        forward_before, stage_one(), train_seconds, cache_seconds, cache_bytes, epochs
    )
    result = _record(
        spec.name, weights, size, len(paths), batch_size, layers, len(backbone_layers(base)),
        cut.layer, aug_copies, top_params, timings,
    )  # fmt: skip
    print(_summary_text(result, timings, len(paths), layers, cut.layer, views))
    if out:
        write_json_atomic(Path(out), result)
        print(f"wrote {out}")
    return result


@dataclass
class _Timings:
    """What :func:`bench_finetune` measures: seconds, and the activation cache's bytes."""

    stage_one_before: float
    stage_one_after: float
    full_forward_epoch: float
    activation_cache: float
    activation_cache_bytes: int
    epochs: list[float]  # the phase-two epochs on cached activations

    @property
    def stage_one(self) -> float:
        """The mean of the passes before and after: a change of load moves both sides."""
        return (self.stage_one_before + self.stage_one_after) / 2

    @property
    def finetune_epoch(self) -> float:
        return float(np.mean(self.epochs))


def _bench_images(data: str | Path, n_images: int) -> tuple[ImageFolder, list[str], np.ndarray]:
    """The folder, and ``n_images`` of its training images (a seeded draw, in folder order)
    with their labels."""
    folder = scan_folder(data)
    train = [r for r in folder.records if r.split == "train"] or list(folder.records)
    order = np.random.default_rng(0).permutation(len(train))[:n_images]
    records = [train[i] for i in sorted(order)]
    return folder, [r.path for r in records], np.array([r.label for r in records])


def _stage_one_pass(
    spec: Any, weights: str, size: int, root: Path, paths: list[str], batch_size: int
) -> tuple[Any, Callable[[], float]]:
    """The stage-one extractor, warmed up on one batch, and a timer of one pass over ``paths``."""
    extractor = backbones.build_feature_extractor(spec, weights=weights, input_size=size)
    batches = dict(size=size, batch_size=batch_size, preprocess=spec.preprocess)
    with contextlib.closing(iter_batches(root, paths[:batch_size], **batches)) as warmup:
        extractor.predict_on_batch(next(warmup).x)

    def stage_one() -> float:
        tick = time.perf_counter()
        for batch in iter_batches(root, paths, **batches):
            extractor.predict_on_batch(batch.x)
        return time.perf_counter() - tick

    return extractor, stage_one


def _full_forward_epoch(
    spec: Any, base: Any, head: Any, layers: int, finetune_config: FinetuneConfig, root: Path,
    paths: list[str], labels: np.ndarray, *, size: int, batch_size: int,
) -> float:  # fmt: skip
    """Seconds of one epoch of the whole network on images, last block trainable
    (``AUG_COPIES=0``), after a warm-up batch."""
    augmentation = build_augmentation(finetune_config)
    model = build_finetune_model(spec, base, head, size=size, augmentation=augmentation)
    set_trainable(base, layers)
    compile_model(model, 1e-5, sigmoid=False)
    seq = image_sequence(
        root, paths, labels, size=size, batch_size=batch_size, shuffle_seed=0,
        workers=default_workers(),
    )  # fmt: skip
    model.train_on_batch(*seq[0])
    tick = time.perf_counter()
    model.fit(seq, epochs=1, verbose=0)
    return time.perf_counter() - tick


def _cached_activation_epochs(
    spec: Any, base: Any, head: Any, cut: Any, finetune_config: FinetuneConfig, folder: ImageFolder,
    paths: list[str], labels: np.ndarray, *, views: int, size: int, batch_size: int,
) -> tuple[float, int, list[float], int]:  # fmt: skip
    """Write the activation cache at ``cut``, then time two epochs of the top on it.

    Returns the cache's seconds and bytes, each epoch's seconds and the top's trainable
    parameters.
    """
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        views_spec = activations.ViewsSpec(
            stage_one="{}", views=views, seed=0,
            augmentation={"flip": "horizontal", "rotation": 0.1, "zoom": 0.1},
        )  # fmt: skip
        tick = time.perf_counter()
        activations.write_views(
            Path(tmp) / "views.h5", folder.root, paths, labels, spec=views_spec, fingerprint="",
            frozen=activations.frozen_part(base, cut), augmentation=build_augmentation(
                finetune_config), preprocessing=spec.preprocessing, size=size,
            batch_size=batch_size, dtype="float16",
            attrs={"class_names": list(folder.class_names)}, progress=False,
        )  # fmt: skip
        cache_seconds = time.perf_counter() - tick
        cache_bytes = (Path(tmp) / "views.h5").stat().st_size
        top = activations.build_top_model(base, head, cut)
        compile_model(top, 1e-5, sigmoid=False)
        with FeatureRows(Path(tmp) / "views.h5") as reader:
            feed = activations.activation_sequence(
                reader, np.arange(len(paths)), labels, views=views, batch_size=batch_size,
                shuffle_seed=0,
            )  # fmt: skip
            top.train_on_batch(*feed[0])
            epochs = []
            for epoch in (1, 2):
                feed.set_epoch(epoch)
                tick = time.perf_counter()
                top.fit(feed, epochs=1, verbose=0, shuffle=False)
                epochs.append(time.perf_counter() - tick)
    top_params = int(sum(np.prod(v.shape) for v in top.trainable_weights))
    return cache_seconds, cache_bytes, epochs, top_params


def _record(
    backbone: str, weights: str, size: int, images: int, batch_size: int, layers: int,
    depth: int, cut_layer: str, aug_copies: int, top_params: int, t: _Timings,
) -> dict:  # fmt: skip
    """The benchmark's figures (``bench/finetune.json``): seconds, images/s, the ratios."""
    import keras

    return {
        "backbone": backbone,
        "weights": weights,
        "input_size": size,
        "images": images,
        "batch_size": batch_size,
        "layers_unfrozen": layers,
        "depth": depth,
        "cut_layer": cut_layer,
        "aug_copies": aug_copies,
        "trainable_params": top_params,
        "stage_one_seconds": round(t.stage_one, 2),
        "stage_one_seconds_before_after": [
            round(t.stage_one_before, 2),
            round(t.stage_one_after, 2),
        ],
        "stage_one_images_per_second": round(images / t.stage_one, 1),
        "finetune_epoch_seconds": round(t.finetune_epoch, 2),
        "finetune_epoch_seconds_each": [round(e, 2) for e in t.epochs],
        "finetune_images_per_second": round(images / t.finetune_epoch, 1),
        "ratio": round(t.finetune_epoch / t.stage_one, 3),
        "activation_cache_seconds": round(t.activation_cache, 2),
        "activation_cache_ratio": round(t.activation_cache / t.stage_one, 2),
        "activation_cache_bytes": t.activation_cache_bytes,
        "full_forward_epoch_seconds": round(t.full_forward_epoch, 2),
        "full_forward_ratio": round(t.full_forward_epoch / t.stage_one, 2),
        **_choice_figures(images, aug_copies, t),
        "keras_backend": keras.backend.backend(),
        "cpu_count": os.cpu_count(),
    }


def _choice_figures(images: int, aug_copies: int, t: _Timings) -> dict:
    """The per-image factors ``make finetune`` chooses its phase-two input with
    (:mod:`pipeline.finetuning.costs`), as measured here, and when the caches pay.

    In stage-one seconds per image; the benchmark has training images only, so the
    break-even counts no validation pass.
    """
    s1 = t.stage_one / images
    measured = costs.PathCosts(
        image_step=t.full_forward_epoch / images, image_eval=s1,
        view=t.activation_cache / (images * max(1, aug_copies)), cut=s1,
        top_step=t.finetune_epoch / images, top_eval=0.0,
    )  # fmt: skip
    estimate = costs.estimate_paths(
        measured, n_train=images, n_val=0, n_images=images, epochs=1, copies=aug_copies
    )
    return {
        "factors": {
            "image_step": round(measured.image_step / s1, 2),
            "view": round(measured.view / s1, 2),
            "top_step": round(measured.top_step / s1, 2),
            "used": {
                "image_step": costs.IMAGE_STEP,
                "view": costs.VIEW,
                "top_step": costs.TOP_STEP,
            },
        },
        "caches_pay_from_epochs": estimate.break_even,
    }


def _summary_text(
    result: dict, t: _Timings, images: int, layers: int, cut_layer: str, views: int
) -> str:
    """The two lines printed: phase two against stage one, then the cache and the full pass."""
    return (
        f"stage one: {images} images in {t.stage_one:.1f} s "
        f"({result['stage_one_images_per_second']} images/s); phase-two epoch, last block "
        f"({layers} layers) trainable, on activations cached at {cut_layer}: "
        f"{t.finetune_epoch:.2f} s ({result['finetune_images_per_second']} images/s); "
        f"ratio {result['ratio']}\n"
        f"  one-off activation cache ({views} augmented copies per image): {t.activation_cache:.1f} s "
        f"({result['activation_cache_ratio']} stage-one passes, "
        f"{t.activation_cache_bytes / 1e6:.0f} MB); "
        f"full forward pass per epoch (AUG_COPIES=0): {t.full_forward_epoch:.1f} s, "
        f"ratio {result['full_forward_ratio']}\n"
        f"  per image, in stage-one passes: a step on images {result['factors']['image_step']}, "
        f"a copy {result['factors']['view']}, a step on the copies "
        f"{result['factors']['top_step']} (make finetune uses {costs.IMAGE_STEP}, {costs.VIEW}, "
        f"{costs.TOP_STEP}); the caches pay from {result['caches_pay_from_epochs']} epochs"
    )
