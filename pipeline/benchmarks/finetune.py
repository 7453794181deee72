"""``make bench-finetune``: one phase-two epoch against one stage-one pass, on the same images."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.images import scan_folder


def bench_finetune(
    data: str | Path,
    *,
    backbone: str = "mobilenet_v2",
    weights: str = "imagenet",
    input_size: int | None = None,
    batch_size: int = 32,
    n_images: int = 256,
    aug_views: int = 8,
    out: str | Path | None = "artifacts/bench/finetune.json",
) -> dict:
    """Time one phase-two epoch (last block unfrozen) against one stage-one pass.

    ``make bench-finetune``. All run over the same ``n_images`` training
    images, decoded by :mod:`pipeline.images`; each is warmed up with one batch
    first, so tracing and compilation are not counted. Phase two as
    ``make finetune`` runs it: the top of the network on activations cached at
    the cut (:mod:`pipeline.activations`, ``aug_views`` augmented views per
    image, one drawn per image); the one-off cost of that cache is reported
    apart. For comparison, the epoch of the whole network on images
    (``AUG_VIEWS=0``). Stage one is timed before and after the epochs, and
    the ratios use the mean, so a change of load during the run moves both.

    Returns
    -------
    dict
        Seconds and images per second of each, the ratios, layers unfrozen.
    """
    import contextlib

    import keras

    from pipeline import activations, backbones
    from pipeline.cache import FeatureRows
    from pipeline.features import FeatureConfig, resolve_features
    from pipeline.files import write_json_atomic
    from pipeline.finetune import FinetuneConfig
    from pipeline.finetune_model import build_augmentation, build_finetune_model, compile_model
    from pipeline.freezing import backbone_layers, last_block_size, set_trainable
    from pipeline.image_feed import image_sequence
    from pipeline.images import default_workers, iter_batches
    from pipeline.softmax import build_softmax_head

    resolved = resolve_features(
        FeatureConfig(backbone=backbone, weights=weights, input_size=input_size)
    )
    spec, size = resolved.spec, resolved.input_size
    folder = scan_folder(data)
    train = [r for r in folder.records if r.split == "train"] or list(folder.records)
    order = np.random.default_rng(0).permutation(len(train))[:n_images]
    records = [train[i] for i in sorted(order)]
    paths = [r.path for r in records]
    labels = np.array([r.label for r in records])

    extractor = backbones.build_feature_extractor(spec, weights=weights, input_size=size)
    batches = dict(size=size, batch_size=batch_size, preprocess=spec.preprocess)
    with contextlib.closing(iter_batches(folder.root, paths[:batch_size], **batches)) as warmup:
        extractor.predict_on_batch(next(warmup).x)

    def stage_one() -> float:
        tick = time.perf_counter()
        for batch in iter_batches(folder.root, paths, **batches):
            extractor.predict_on_batch(batch.x)
        return time.perf_counter() - tick

    forward_before = stage_one()

    base = backbones.build_base(spec, weights=weights, input_size=size)
    layers = last_block_size(base)
    head = build_softmax_head(int(extractor.output_shape[-1]), len(folder.class_names))
    finetune_config = FinetuneConfig(aug_views=aug_views)
    augmentation = build_augmentation(finetune_config)
    model = build_finetune_model(spec, base, head, size=size, augmentation=augmentation)
    set_trainable(base, layers)
    compile_model(model, 1e-5, sigmoid=False)
    seq = image_sequence(
        folder.root, paths, labels, size=size, batch_size=batch_size, shuffle_seed=0,
        workers=default_workers(),
    )  # fmt: skip
    model.train_on_batch(*seq[0])
    tick = time.perf_counter()
    model.fit(seq, epochs=1, verbose=0)
    train_seconds = time.perf_counter() - tick

    # Phase two on cached activations: the cache once, then the epochs.
    cut = activations.find_cut(base, layers)
    views = max(1, aug_views)
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
    cached_seconds = float(np.mean(epochs))
    forward_after = stage_one()
    forward_seconds = (forward_before + forward_after) / 2

    result = {
        "backbone": spec.name,
        "weights": weights,
        "input_size": size,
        "images": len(paths),
        "batch_size": batch_size,
        "layers_unfrozen": layers,
        "depth": len(backbone_layers(base)),
        "cut_layer": cut.layer,
        "aug_views": aug_views,
        "trainable_params": int(sum(np.prod(v.shape) for v in top.trainable_weights)),
        "stage_one_seconds": round(forward_seconds, 2),
        "stage_one_seconds_before_after": [round(forward_before, 2), round(forward_after, 2)],
        "stage_one_images_per_second": round(len(paths) / forward_seconds, 1),
        "finetune_epoch_seconds": round(cached_seconds, 2),
        "finetune_epoch_seconds_each": [round(e, 2) for e in epochs],
        "finetune_images_per_second": round(len(paths) / cached_seconds, 1),
        "ratio": round(cached_seconds / forward_seconds, 3),
        "activation_cache_seconds": round(cache_seconds, 2),
        "activation_cache_ratio": round(cache_seconds / forward_seconds, 2),
        "activation_cache_bytes": cache_bytes,
        "full_forward_epoch_seconds": round(train_seconds, 2),
        "full_forward_ratio": round(train_seconds / forward_seconds, 2),
        "keras_backend": keras.backend.backend(),
        "cpu_count": os.cpu_count(),
    }
    print(
        f"stage one: {len(paths)} images in {forward_seconds:.1f} s "
        f"({result['stage_one_images_per_second']} images/s); phase-two epoch, last block "
        f"({layers} layers) trainable, on activations cached at {cut.layer}: "
        f"{cached_seconds:.2f} s ({result['finetune_images_per_second']} images/s); "
        f"ratio {result['ratio']}\n"
        f"  one-off activation cache ({views} views per image): {cache_seconds:.1f} s "
        f"({result['activation_cache_ratio']} stage-one passes, {cache_bytes / 1e6:.0f} MB); "
        f"full forward pass per epoch (AUG_VIEWS=0): {train_seconds:.1f} s, "
        f"ratio {result['full_forward_ratio']}"
    )
    if out:
        write_json_atomic(Path(out), result)
        print(f"wrote {out}")
    return result
