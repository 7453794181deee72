"""Phase two's input: the activations cached at the cut, or the images every epoch.

:func:`cache_activations` decides what phase two trains on and builds its
caches (:mod:`pipeline.finetuning.activations` does the work): the unaugmented
activations at the cut, a stage-one cache made by
:func:`pipeline.features.extract.extract_features`, and, with augmentation, the
``AUG_COPIES`` augmented copies of every training image. Phase two runs on the
images (a full forward pass every epoch) when ``AUG_COPIES=0`` or no backbone
layer is frozen, and the run says so.

:func:`training_feeds` gives the ``PyDataset`` pair phase two fits on;
:func:`image_feed` the images (predictions are always made by the whole
network, on images); :func:`describe_input` the one line the summary prints.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.core.errors import FinetuneError
from pipeline.data.images import default_workers
from pipeline.features import cache
from pipeline.features.cache import FeatureRows
from pipeline.features.extract import extract_features
from pipeline.features.extractor import prepare_extraction
from pipeline.finetuning import activations, costs
from pipeline.finetuning.activations import activation_sequence
from pipeline.finetuning.image_feed import class_weights, image_sequence
from pipeline.finetuning.model import build_augmentation

if TYPE_CHECKING:
    import keras

    from pipeline.finetuning.activations import Cut
    from pipeline.finetuning.config import FinetuneRun

# Attributes of the cut cache the views cache repeats (it is read without it).
_VIEWS_ATTRS = (
    "class_names", "backbone", "weights", "weights_source", "input_size", "layer",
    "preprocessing", "precision", "data_root", "dataset",
)  # fmt: skip


def cache_activations(run: FinetuneRun) -> None:
    """Cache phase two's input at the cut (stage one's cut cache; the augmented copies).

    Sets ``run.cut`` (``None`` when phase two runs on images: ``AUG_COPIES=0``,
    ``PHASE_TWO=images``, no layer frozen, or the images cost less for this many
    epochs: :func:`choose_input`) and ``run.activations`` (what the manifest
    records as ``phase_two_input``: the mode, the cut, the caches and their seconds).
    """

    config = run.config
    cut, reason = None, "AUG_COPIES=0"
    if config.aug_copies > 0:
        cut = activations.find_cut(run.base, run.layers)
        reason = "no backbone layer is frozen"
    if cut is not None:
        mode, reason, line = choose_input(run, cut)
        run.identity["phase_two_mode"] = mode  # a resumed run continues on the same input
        if line:
            run.note(line)
        if mode == "images":
            cut = None
    if cut is None:
        run.activations = {"mode": "images", "reason": reason}
        if reason in ("AUG_COPIES=0", "no backbone layer is frozen"):
            run.note(f"phase 2: a full forward pass over the images every epoch ({reason})")
        return
    frozen = activations.frozen_part(run.base, cut)
    cut_cache, cut_seconds, cut_attrs = _cut_cache(run, cut, frozen)
    run.cut = cut
    run.activations = {
        "mode": "cached activations", "cut_layer": cut.layer, "cut_shape": list(cut.shape),
        "cut_cache": str(cut_cache), "cut_cache_seconds": round(cut_seconds, 1),
        "copies": 0, "copies_cache": None, "copies_cache_seconds": 0.0, "chosen": reason,
    }  # fmt: skip
    augmentation = build_augmentation(config)
    if augmentation is None:
        run.note(f"phase 2: trains the top on the activations at {cut.layer} (no augmentation)")
        return
    spec, path = _views_cache(run, cut_cache, cut_attrs)
    train, resolved = run.splits["train"], run.resolved
    tick = time.perf_counter()
    status, seconds = activations.write_views(
        path, run.root, list(run.features.paths[train]), run.features.labels[train], spec=spec,
        fingerprint=str(cut_attrs["fingerprint"]), frozen=frozen,
        augmentation=augmentation, preprocessing=resolved.spec.preprocessing,
        size=resolved.input_size, batch_size=config.features.batch_size, dtype="float16",
        attrs={key: cut_attrs[key] for key in _VIEWS_ATTRS if key in cut_attrs},
        workers=config.features.workers or default_workers(), progress=run.progress,
    )  # fmt: skip
    if status != "up to date":
        run.note(
            f"phase 2: {status} {config.aug_copies} augmented copies per training image at "
            f"{cut.layer} in {time.perf_counter() - tick:.1f} s ({path})"
        )
    run.activations.update(copies=config.aug_copies, copies_cache=str(path))
    run.activations["copies_cache_seconds"] = round(seconds, 1)


def choose_input(run: FinetuneRun, cut: Cut) -> tuple[str, str, str]:
    """``("activations" | "images", why, the line to print)`` for phase two with ``cut``.

    A resumed run keeps the input it started on; ``PHASE_TWO=activations`` or
    ``images`` is taken as given; ``auto`` estimates both
    (:func:`pipeline.finetuning.costs.estimate_paths`) from stage one's seconds per
    image and the caches already on disk, and takes the cheaper.
    """
    config = run.config
    wanted = config.phase_two
    if run.state is not None:
        # Checkpoints from before the choice trained on the activations whenever they could.
        saved = str(run.state["identity"].get("phase_two_mode", "activations"))
        if wanted not in ("auto", saved):
            raise FinetuneError(
                f"the unfinished run in {run.files.checkpoint} trains on {saved}; finish it "
                f"with PHASE_TWO={saved} (or auto), or pass RESTART=1 to start over on {wanted}"
            )
        return saved, "as the interrupted run", ""
    if wanted != "auto":
        line = (
            f"phase 2: trains the top on the activations at {cut.layer} (PHASE_TWO=activations)"
            if wanted == "activations"
            else "phase 2: a full forward pass over the images every epoch (PHASE_TWO=images)"
        )
        return wanted, f"PHASE_TWO={wanted}", line
    copies = config.aug_copies if build_augmentation(config) is not None else 0
    cut_cached, views_cached = _caches_on_disk(run, cut)
    splits = run.splits
    estimate = costs.estimate_paths(
        costs.PathCosts.from_stage_one(_stage_one_seconds_per_image(run.features.attrs)),
        n_train=int(splits["train"].sum()), n_val=int(splits["val"].sum()),
        n_images=len(run.features.paths), epochs=config.epochs, copies=copies,
        cut_cached=cut_cached, views_cached=views_cached,
    )  # fmt: skip
    mode = costs.choose_path(estimate)
    other = "cached activations" if mode == "images" else "the images"
    low, high = sorted((estimate.images, estimate.activations))
    why = f"faster for EPOCHS={config.epochs}: about {low:.0f} s against {high:.0f} s on {other}"
    return mode, why, costs.describe_choice(estimate, mode, copies=copies)


def _stage_one_seconds_per_image(attrs: dict[str, Any]) -> float:
    """Stage one's seconds per image, as its cache records them (0.03 s when it does not)."""
    try:
        seconds = float(attrs.get("seconds", 0.0))
        images = int(attrs.get("n_images", 0)) - int(attrs.get("n_skipped", 0))
    except (TypeError, ValueError):
        seconds, images = 0.0, 0
    return seconds / images if seconds > 0 and images > 0 else 0.03


def _caches_on_disk(run: FinetuneRun, cut: Cut) -> tuple[bool, bool]:
    """Whether the cut cache and the augmented copies are already up to date on disk."""
    config = run.config
    prepared = prepare_extraction(
        run.data_dir, activations.cut_config(config.features, cut), split=config.split,
        artifacts_dir=run.artifacts_dir, cache_path=None, log=None,
    )  # fmt: skip
    if not prepared.cache_state():
        return False, False
    if build_augmentation(config) is None:
        return True, True
    attrs = cache.read_attrs(prepared.path)
    spec, path = _views_cache(run, prepared.path, attrs)
    paths = list(run.features.paths[run.splits["train"]])
    views = cache.cache_matches(path, spec.config_json(paths), str(attrs["fingerprint"]))
    return True, bool(views)


def _views_cache(
    run: FinetuneRun, cut_cache: Path, cut_attrs: dict[str, Any]
) -> tuple[activations.ViewsSpec, Path]:
    """What the augmented copies hold, and their file beside the cut cache."""
    config = run.config
    spec = activations.ViewsSpec(
        stage_one=str(cut_attrs["config_json"]), views=config.aug_copies, seed=config.split.seed,
        augmentation={"flip": config.flip, "rotation": config.rotation, "zoom": config.zoom},
    )  # fmt: skip
    return spec, cut_cache.with_name(f"{cut_cache.stem}_{spec.tag()}.h5")


def _cut_cache(
    run: FinetuneRun, cut: Cut, frozen: keras.Model
) -> tuple[Any, float, dict[str, Any]]:
    """Stage one's cache of the activations at ``cut``: its path, seconds and attributes.

    Made by :func:`pipeline.features.extract.extract_features` (resume, lock,
    fingerprint), always on Keras (:func:`pipeline.finetuning.activations.cut_config`).
    A cache that is not ``frozen``'s output (other random weights) is rebuilt once.
    """
    import keras

    config = run.config
    for attempt in (1, 2):
        keras.utils.set_random_seed(config.split.seed)  # WEIGHTS=none: the run's base
        summary = extract_features(
            run.data_dir, activations.cut_config(config.features, cut), split=config.split,
            artifacts_dir=run.artifacts_dir, progress=run.progress,
        )  # fmt: skip
        with cache.FeatureRows(summary.cache_path) as reader:
            if list(reader.paths) != list(run.features.paths):
                raise FinetuneError(
                    f"{summary.cache_path} and {run.features.path} hold other images (the "
                    "data changed while they were made); run the command again to rebuild them"
                )
            problem = activations.cut_cache_problem(
                reader, frozen, run.root, preprocess=run.resolved.spec.preprocess,
                size=run.resolved.input_size,
            )  # fmt: skip
        if not problem:
            break
        if attempt == 2:
            raise FinetuneError(
                f"{summary.cache_path} does not hold the activations of this backbone at "
                f"{cut.layer} ({problem}); delete it and run again"
            )
        run.note(f"phase 2: {summary.cache_path} was made by other weights ({problem}); rebuilding")
        summary.cache_path.unlink()
    if summary.status != "up to date":
        run.note(f"phase 2: cached the activations at {cut.layer} in {summary.cache_path}")
    return summary.cache_path, summary.seconds, cache.read_attrs(summary.cache_path)


# --- the feeds -------------------------------------------------------------------------------


def training_feeds(
    run: FinetuneRun, sigmoid: bool, *, validation: bool = True
) -> tuple[Any, Any, list]:
    """Phase two's training and validation ``PyDataset``, and the readers to close after ``fit``.

    On the images when ``run.cut`` is ``None``; else on the cut cache
    (validation) and the views cache (training; the cut cache without views).
    ``validation=False`` gives ``None`` for validation (a callback validates).
    """

    train_rows, val_rows = np.flatnonzero(run.splits["train"]), np.flatnonzero(run.splits["val"])
    if run.cut is None:
        train = image_feed(run, train_rows, sigmoid, shuffle=True)
        return train, image_feed(run, val_rows, sigmoid) if validation else None, []
    readers = [FeatureRows(run.activations["cut_cache"])]
    if run.activations["copies_cache"]:
        readers.append(FeatureRows(run.activations["copies_cache"]))
    train = _activation_feed(run, readers[-1], train_rows, sigmoid, shuffle=True)
    val = _activation_feed(run, readers[0], val_rows, sigmoid) if validation else None
    return train, val, readers


def _activation_feed(run: FinetuneRun, reader, rows: np.ndarray, sigmoid: bool, *, shuffle=False):
    """The cached activations of cache ``rows`` (training: augmented copies, class weights, shuffled)."""

    labels = run.features.labels[rows]
    copies = int(run.activations["copies"]) if shuffle else 0
    if copies:  # the copies cache holds the training images only, in cache order
        rows = np.arange(len(rows))
    return activation_sequence(
        reader, rows, labels, views=max(1, copies), batch_size=run.config.features.batch_size,
        sigmoid=sigmoid, sample_weights=sample_weights(run, labels) if shuffle else None,
        shuffle_seed=run.config.split.seed if shuffle else None,
    )  # fmt: skip


def image_feed(run: FinetuneRun, rows: np.ndarray, sigmoid: bool, *, shuffle: bool = False):
    """The images of cache ``rows`` as a PyDataset (training: class weights, shuffled)."""

    labels = run.features.labels[rows]
    return image_sequence(
        run.root, run.features.paths[rows], labels, size=run.resolved.input_size,
        batch_size=run.config.features.batch_size, sigmoid=sigmoid,
        sample_weights=sample_weights(run, labels) if shuffle else None,
        shuffle_seed=run.config.split.seed if shuffle else None,
        workers=run.config.features.workers or default_workers(),
        decoded=run.decoded if _fits_in_memory(run) else None,
    )  # fmt: skip


# Decoded images kept in memory for the run's image feeds, at most this many bytes.
DECODED_BYTES = 1 << 30


def _fits_in_memory(run: FinetuneRun) -> bool:
    """Whether every image, decoded (uint8), fits in :data:`DECODED_BYTES`."""
    size = run.resolved.input_size
    return len(run.features.paths) * size * size * 3 <= DECODED_BYTES


def sample_weights(run: FinetuneRun, labels: np.ndarray) -> np.ndarray | None:
    """Balanced class weights of the training split, per image of ``labels``."""

    if run.config.class_weight != "balanced":
        return None
    train_labels = run.features.labels[run.splits["train"]]
    return class_weights(train_labels, len(run.features.class_names))[labels]


def describe_input(activations: dict[str, Any]) -> str:
    """One line on what phase two trained on."""
    if activations.get("mode") != "cached activations":
        return f"images, a full forward pass every epoch ({activations.get('reason', '')})"
    copies = activations["copies"]
    what = f"{copies} augmented copies per training image" if copies else "no augmentation"
    return f"cached activations at {activations['cut_layer']} ({what})"
