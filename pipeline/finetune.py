"""Stage three: fine-tune the last layers of a backbone under the softmax head.

:func:`finetune` is what ``make finetune`` and ``python -m pipeline finetune``
call. It works in two phases, as the Keras transfer-learning guide does:

1. **Head.** The backbone is frozen, so the head sees exactly the stage-one
   features; it starts from the stage-two head fit on the cached features
   (``artifacts/heads/<dataset>/<cache stem>/softmax.keras``) when that head
   exists and was fit on this cache, and costs nothing then. Otherwise it is
   trained from scratch here, on the cached features (identical to training
   it on images through the frozen base, without augmentation, at a
   hundredth of the cost), and the run says so.
2. **Fine-tuning.** The last ``layers`` layers of the backbone become
   trainable (BatchNormalization never: it stays frozen and in inference mode,
   the base is called with ``training=False``), the model is recompiled and
   trained on images at a low learning rate (Adam, 1e-5) with augmentation
   and class weights, early stopping on validation accuracy and the best
   weights kept. Phase one's model is the first candidate, so fine-tuning
   never ends below the head on the validation split.

The images, their split and the skipped files come from the stage-one cache
(built first when missing), so every stage sees the same images. A checkpoint
is written after each epoch; running the same command again continues an
interrupted run, and a checkpoint made with other options is refused.

Outputs (``artifacts/finetune/<dataset>/``): ``<name>.keras`` (preprocessing,
backbone and head in one model taking float32 RGB 0..255 images),
``<name>.json`` (manifest, ``"kind": "finetuned"``),
``<name>.predictions.json`` (val and test predictions), ``<name>.history.json``
and ``.csv`` (per-epoch log) and ``<name>.curves.png`` (training curves).

Everything goes through the ``keras`` namespace and NumPy batches from
:mod:`pipeline.images`, so the same code runs with ``KERAS_BACKEND=jax``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import backbones
from pipeline.errors import FinetuneError, did_you_mean
from pipeline.files import sha256_file, write_atomic, write_bytes_atomic, write_json_atomic
from pipeline.images import default_workers

if TYPE_CHECKING:
    import keras

    from pipeline.cache import FeatureSet

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
LAYER_WORDS = ("all", "block")
CLASS_WEIGHTS = ("balanced", "none")
FLIPS = ("horizontal", "vertical", "horizontal_and_vertical", "none")
CHECKPOINT_VERSION = 1
# Layer names that mark a block in keras.applications models (mobilenet_v2
# "block_16_...", resnet "conv5_block3_...", efficientnet "block7a_...",
# densenet "conv5_block16_...", mobilenet "conv_pw_13...", inception "mixed10").
_BLOCK_NAME = re.compile(r"(?:^|_)(block_?\d+[a-z]?)(?:_|$)|conv_(?:dw|pw|pad)_(\d+)|^(mixed_?\d+)")


@dataclass(frozen=True)
class FinetuneConfig:
    """Options of stage three (the ``make finetune`` variables).

    Parameters
    ----------
    backbone, weights, input_size
        As in stage one; the stage-one cache of these (``avg`` pooling) gives
        the split and, with stage two, the starting head.
    layers : int or {"all", "block"}
        Backbone layers to unfreeze in phase two, counted from the end over
        every Keras layer of the headless backbone (weightless ones too, as
        the Keras guide counts them): ``0`` trains the head only, ``"all"``
        every layer, ``"block"`` the backbone's last block.
    epochs : int
        Most phase-two epochs (early stopping may end sooner).
    learning_rate : float
        Adam learning rate of phase two.
    head_epochs, head_learning_rate
        Phase one, when there is no stage-two head to start from.
    patience : int
        Epochs without a better validation accuracy before stopping.
    batch_size : int
        Images per training step.
    augment : bool
        Random flip, rotation and zoom (Keras preprocessing layers) in training.
    flip, rotation, zoom
        Their settings: flip mode, and rotation and zoom as fractions.
    class_weight : {"balanced", "none"}
        Weight each class by ``n / (k * n_class)`` on the training split.
    precision : {"float32", "mixed_float16", "mixed_bfloat16"}
        Compute precision (mixed pays off on GPUs; the head's output stays float32).
    seed, val_fraction, test_fraction
        The stratified split of stage one, and the seed of shuffling.
    workers : int, optional
        Image decoding threads.
    name : str, optional
        Output name (default ``<backbone>_<size>_<weights>_layers-<layers>``).
    restart : bool
        Discard an unfinished run's checkpoint instead of continuing it.
    """

    backbone: str = "mobilenet_v2"
    weights: str = "imagenet"
    input_size: int | None = None
    layers: int | str = "block"
    epochs: int = 10
    learning_rate: float = 1e-5
    head_epochs: int = 50
    head_learning_rate: float = 1e-3
    patience: int = 3
    batch_size: int = 32
    augment: bool = True
    flip: str = "horizontal"
    rotation: float = 0.1
    zoom: float = 0.1
    class_weight: str = "balanced"
    precision: str = "float32"
    seed: int = 0
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    workers: int | None = None
    name: str | None = None
    restart: bool = False

    def validate(self) -> backbones.BackboneSpec:
        """Check every option without building anything; return the backbone spec."""
        spec = backbones.get_backbone(self.backbone)
        backbones.resolve_input_size(spec, self.input_size)
        parse_layers(self.layers)
        _check_int("EPOCHS", self.epochs, 0)
        _check_int("HEAD_EPOCHS", self.head_epochs, 0)
        _check_int("PATIENCE", self.patience, 1)
        _check_int("BATCH", self.batch_size, 1)
        for label, value in (("LR", self.learning_rate), ("HEAD_LR", self.head_learning_rate)):
            if not isinstance(value, int | float) or not 0 < value < 1:
                raise FinetuneError(f"{label} must be a number in (0, 1); got {value!r}")
        for label, value in (("ROTATION", self.rotation), ("ZOOM", self.zoom)):
            if not isinstance(value, int | float) or not 0 <= value < 1:
                raise FinetuneError(f"{label} must be a fraction in [0, 1); got {value!r}")
        _check_choice("FLIP", self.flip, FLIPS)
        _check_choice("CLASS_WEIGHT", self.class_weight, CLASS_WEIGHTS)
        _check_choice("PRECISION", self.precision, PRECISIONS)
        if self.workers is not None:
            _check_int("WORKERS", self.workers, 1)
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise FinetuneError(
                f"NAME must be letters, digits, '.', '_' or '-' (a file name); got {self.name!r}"
            )
        return spec

    def identity(self) -> dict[str, Any]:
        """The options a checkpoint must share to be continued (not epochs or patience)."""
        keep = (
            "backbone", "weights", "input_size", "layers", "learning_rate", "head_epochs",
            "head_learning_rate", "batch_size", "augment", "flip", "rotation", "zoom",
            "class_weight", "precision", "seed", "val_fraction", "test_fraction",
        )  # fmt: skip
        return {key: getattr(self, key) for key in keep}


def _check_int(label: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise FinetuneError(f"{label} must be a whole number >= {minimum}; got {value!r}")


def _check_choice(label: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise FinetuneError(
            f"{label} must be one of {', '.join(choices)}; got {value!r}"
            f"{did_you_mean(str(value), choices)}"
        )


def parse_layers(value: int | str) -> int | str:
    """``LAYERS`` as a count (``int >= 0``) or one of ``"all"``, ``"block"``.

    Raises
    ------
    FinetuneError
        Negative, fractional or not a number.
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if text in LAYER_WORDS:
            return text
        if re.fullmatch(r"[+-]?\d+", text):
            value = int(text)
        else:
            raise FinetuneError(
                f"LAYERS must be a whole number >= 0, 'all' or 'block'; got {value!r}"
                f"{did_you_mean(text, LAYER_WORDS)}"
            )
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise FinetuneError(f"LAYERS must be a whole number >= 0, 'all' or 'block'; got {value!r}")
    if value < 0:
        raise FinetuneError(
            f"LAYERS must be >= 0 (0 trains the head only, 'all' every layer); got {value}"
        )
    return int(value)


# --- the model -------------------------------------------------------------------------------


def backbone_layers(base: keras.Model) -> list[keras.layers.Layer]:
    """The layers ``LAYERS`` counts: every layer of the headless backbone but its input."""
    import keras

    return [layer for layer in base.layers if not isinstance(layer, keras.layers.InputLayer)]


def last_block_size(base: keras.Model) -> int:
    """How many layers, counted from the end, make up the backbone's last block.

    Layers after the last named block (``Conv_1``, ``top_conv``...) belong to it.
    Falls back to a tenth of the depth for models without block names.
    """
    layers = backbone_layers(base)
    block = None
    count = 0
    for layer in reversed(layers):
        key = _block_key(layer.name)
        if block is None:
            block = key
        elif key is not None and key != block:
            break
        count += 1
    return count if block is not None else max(1, len(layers) // 10)


def _block_key(name: str) -> str | None:
    match = _BLOCK_NAME.search(name)
    return next((g for g in match.groups() if g), None) if match else None


def resolve_layers(layers: int | str, base: keras.Model, backbone: str) -> int:
    """The number of backbone layers ``layers`` unfreezes, checked against the depth."""
    layers = parse_layers(layers)
    depth = len(backbone_layers(base))
    if layers == "all":
        return depth
    if layers == "block":
        return last_block_size(base)
    if layers > depth:
        raise FinetuneError(
            f"LAYERS={layers} is more than the depth of {backbone} ({depth} layers); "
            f"use 0..{depth}, 'block' ({last_block_size(base)} layers) or 'all'"
        )
    return layers


def set_trainable(base: keras.Model, layers: int) -> list[str]:
    """Make exactly the last ``layers`` layers of ``base`` trainable, BatchNormalization never.

    Returns the names of the trainable layers. Recompile the model afterwards.
    """
    import keras

    candidates = backbone_layers(base)
    base.trainable = True  # the flag propagates: set it first, then each layer
    cut = len(candidates) - layers
    names = []
    for index, layer in enumerate(candidates):
        trainable = index >= cut and not isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = trainable
        if trainable:
            names.append(layer.name)
    return names


def build_finetune_model(
    spec: backbones.BackboneSpec,
    base: keras.Model,
    head: keras.Model,
    *,
    size: int,
    augmentation: keras.layers.Layer | None = None,
) -> keras.Model:
    """Images (float32 RGB 0..255) -> augmentation -> preprocessing -> base -> avg -> head."""
    import keras

    from pipeline.layers import ImagePreprocessing

    inputs = keras.Input(shape=(size, size, 3), dtype="float32", name="image")
    x = augmentation(inputs) if augmentation is not None else inputs
    x = ImagePreprocessing(spec.preprocessing, name="preprocessing")(x)
    x = base(x, training=False)  # BatchNormalization stays in inference mode
    x = keras.layers.GlobalAveragePooling2D(name="features_avg")(x)
    outputs = head(x)
    return keras.Model(inputs, outputs, name=f"{spec.name}_finetuned")


def build_augmentation(config: FinetuneConfig) -> keras.layers.Layer | None:
    """The training-only augmentation layers of ``config`` (``None`` when off)."""
    import keras

    if not config.augment:
        return None
    layers = []
    if config.flip != "none":
        layers.append(keras.layers.RandomFlip(config.flip, seed=config.seed))
    if config.rotation > 0:
        layers.append(keras.layers.RandomRotation(config.rotation, seed=config.seed + 1))
    if config.zoom > 0:
        layers.append(keras.layers.RandomZoom(config.zoom, seed=config.seed + 2))
    return keras.Sequential(layers, name="augmentation") if layers else None


def load_finetuned(path: str | Path) -> keras.Model:
    """Load a model saved by :func:`finetune` (registers its preprocessing layer first)."""
    import keras

    import pipeline.layers  # noqa: F401  (registers ImagePreprocessing)

    return keras.saving.load_model(str(path), compile=False)


# --- data ------------------------------------------------------------------------------------


def image_sequence(
    root: Path,
    paths: Sequence[str],
    labels: np.ndarray,
    *,
    size: int,
    batch_size: int,
    sigmoid: bool = False,
    sample_weights: np.ndarray | None = None,
    shuffle_seed: int | None = None,
    workers: int = 1,
):
    """A ``keras.utils.PyDataset`` of NumPy batches decoded by :mod:`pipeline.images`.

    Yields ``(x, y)`` or ``(x, y, sample_weight)``; ``x`` is float32 RGB 0..255
    (preprocessing happens inside the model). ``set_epoch(e)`` shuffles, the
    same way for the same epoch, so a resumed run sees the order it would have.
    """
    import keras

    from pipeline.images import ImageError, load_image

    class _Sequence(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=4)
            self.order = np.arange(len(paths))

        def set_epoch(self, epoch: int) -> None:
            """Shuffle for ``epoch`` (the same order when a run resumes)."""
            if shuffle_seed is not None:
                self.order = np.random.default_rng([shuffle_seed, epoch]).permutation(len(paths))

        def __len__(self) -> int:
            return math.ceil(len(paths) / batch_size)

        def __getitem__(self, index: int):
            rows = self.order[index * batch_size : (index + 1) * batch_size]
            images = []
            for row in rows:
                try:
                    images.append(load_image(root / paths[row], size))
                except ImageError as exc:  # readable when stage one ran: it changed since
                    raise FinetuneError(
                        f"{paths[row]} can no longer be read ({exc}); re-run `make features`"
                    ) from None
            x = np.stack(images).astype(np.float32)
            y = labels[rows]
            y = y.astype(np.float32).reshape(-1, 1) if sigmoid else y.astype(np.int32)
            if sample_weights is None:
                return x, y
            return x, y, sample_weights[rows].astype(np.float32)

    return _Sequence()


def class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """``n / (k * n_c)`` per class over ``labels`` (1 for a class with no image)."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.ones(n_classes)
    weights[present] = len(labels) / (present.sum() * counts[present])
    return weights


# --- results ---------------------------------------------------------------------------------


@dataclass
class FinetuneResult:
    """What a stage-three run produced (printed by the CLI)."""

    model_path: Path
    manifest_path: Path
    predictions_path: Path
    history_path: Path
    plot_path: Path
    layers: int
    depth: int
    head_source: str
    val_accuracy: float
    test_accuracy: float | None
    best_epoch: int
    history: list[dict[str, Any]]
    seconds: float
    resumed_from: int | None = None
    notes: list[str] = field(default_factory=list)
    model: Any = field(default=None, repr=False)

    def format(self, *, notes: bool = True) -> str:
        """The run's summary; ``notes=False`` leaves out the notes already echoed during it."""
        lines = [*self.notes] if notes else []
        test = f", test accuracy {self.test_accuracy:.4f}" if self.test_accuracy is not None else ""
        phase_two = [h for h in self.history if h["phase"] == 2]
        per_epoch = np.mean([h["seconds"] for h in phase_two]) / 60 if phase_two else 0.0
        lines.append(
            f"fine-tuned {self.layers} of {self.depth} backbone layers: val accuracy "
            f"{self.val_accuracy:.4f}{test} (best epoch {self.best_epoch} of phase two, "
            f"{len(phase_two)} run, {per_epoch:.2f} min/epoch, {self.seconds / 60:.1f} min in all)"
        )
        lines.append(f"saved {self.model_path} (manifest {self.manifest_path.name})")
        lines.append(
            f"  predictions {self.predictions_path.name}, log {self.history_path.name}, "
            f"curves {self.plot_path.name}"
        )
        return "\n".join(lines)


def output_paths(out_dir: Path, name: str) -> dict[str, Path]:
    """Every file a run named ``name`` writes in ``out_dir``."""
    return {
        "model": out_dir / f"{name}.keras",
        "manifest": out_dir / f"{name}.json",
        "predictions": out_dir / f"{name}.predictions.json",
        "history": out_dir / f"{name}.history.json",
        "history_csv": out_dir / f"{name}.history.csv",
        "plot": out_dir / f"{name}.curves.png",
        "checkpoint": out_dir / f"{name}.checkpoint",
    }


def stage_two_head_path(artifacts_dir: str | Path, dataset: str, cache_path: Path) -> Path:
    """Where stage two saves the softmax head fit on ``cache_path``."""
    return Path(artifacts_dir) / "heads" / dataset / cache_path.stem / "softmax.keras"


# --- the run ---------------------------------------------------------------------------------


def finetune(
    data: str | Path,
    config: FinetuneConfig | None = None,
    *,
    artifacts_dir: str | Path = "artifacts",
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> FinetuneResult:
    """Fine-tune a backbone and its softmax head on an image folder.

    Parameters
    ----------
    data : path
        Folder of class subfolders (as in stage one), or a stage-one cache
        (``.h5``, ``avg`` pooling) whose backbone, weights, size and split are used.
    config : FinetuneConfig, optional
        Options (defaults: MobileNetV2, ImageNet, last block, 10 epochs at 1e-5).
    artifacts_dir : path
        Root of the outputs: reads ``features/`` and ``heads/``, writes ``finetune/``.
    progress : bool
        Show Keras's progress bar during epochs.
    echo : callable
        Receives one line per note and per epoch (default ``print``).

    Returns
    -------
    FinetuneResult
        Paths of the outputs, accuracies, the per-epoch log and the model.

    Raises
    ------
    FinetuneError
        Bad ``layers`` (negative, not a number, deeper than the backbone), a
        checkpoint of another configuration, no training or validation images.

    Examples
    --------
    >>> from pipeline.finetune import FinetuneConfig, finetune
    >>> result = finetune("data/hymenoptera_data", FinetuneConfig(layers="block", epochs=3))
    >>> print(result.format())
    """
    started = time.perf_counter()
    config = config or FinetuneConfig()
    notes: list[str] = []

    def note(line: str) -> None:
        notes.append(line)
        echo(line)

    data_dir, config, given_cache = _resolve_data(Path(data), config, note)
    spec = config.validate()
    size = backbones.resolve_input_size(spec, config.input_size)

    from pipeline import cache
    from pipeline.features import FeatureConfig, cache_path_for, extract_features
    from pipeline.images import SplitConfig, scan_folder

    split = SplitConfig(config.seed, config.val_fraction, config.test_fraction)
    folder = scan_folder(data_dir, split)
    feature_config = FeatureConfig(
        backbone=spec.name, weights=config.weights, input_size=size, pooling="avg",
        batch_size=config.batch_size, workers=config.workers,
    )  # fmt: skip
    if given_cache is not None:  # the cache's own storage and numerics, or it would be rebuilt
        made = json.loads(cache.read_attrs(given_cache)["config_json"])
        feature_config = replace(
            feature_config, float16=made["dtype"] == "float16", precision=made["precision"]
        )
    cache_path = given_cache or cache_path_for(folder.name, feature_config, artifacts_dir)
    name = config.name or _default_name(spec.name, size, cache_path, config.layers)
    out_dir = Path(artifacts_dir) / "finetune" / folder.name
    paths = output_paths(out_dir, name)

    with backbones.dtype_policy(config.precision):
        base = backbones.build_base(spec, weights=config.weights, input_size=size)
    depth = len(backbone_layers(base))
    n_layers = resolve_layers(config.layers, base, spec.name)

    identity = {
        "checkpoint_version": CHECKPOINT_VERSION,
        "data_root": str(folder.root.resolve()),
        "fingerprint": folder.fingerprint(),
        "weights_id": backbones.weights_identity(config.weights),
        "layers_resolved": n_layers,
        **config.identity(),
    }
    checkpoint = _Checkpoint(paths["checkpoint"])
    state = checkpoint.open(identity, restart=config.restart, note=note)

    summary = extract_features(
        data_dir, feature_config, split=split, artifacts_dir=artifacts_dir,
        cache_path=given_cache, progress=progress,
    )  # fmt: skip
    for line in summary.notes:
        note(line)
    if summary.status != "up to date":
        note(f"stage one: {summary.status} {summary.cache_path}")
    features = cache.load_features(summary.cache_path)
    splits = _check_splits(features)
    n_classes = len(features.class_names)
    root = Path(features.attrs.get("data_root", folder.root))
    workers = config.workers or default_workers()

    import keras

    keras.utils.set_random_seed(config.seed)
    with backbones.dtype_policy(config.precision):
        head, head_source = _starting_head(
            features, artifacts_dir, folder.name, n_classes,
            resumed_source=state["head_source"] if state else None, note=note,
        )  # fmt: skip
        augmentation = build_augmentation(config)
        model = build_finetune_model(spec, base, head, size=size, augmentation=augmentation)
    sigmoid = int(head.output_shape[-1]) == 1
    train_labels = features.labels[splits["train"]]
    weights = class_weights(train_labels, n_classes) if config.class_weight == "balanced" else None

    history: list[dict[str, Any]] = []
    resumed_from = None
    earlier_seconds = float(state.get("seconds", 0.0)) if state else 0.0
    if state is None:
        if head_source == "scratch":
            history += _train_head(head, features, splits, config, weights, sigmoid, echo)
        base_val = _head_accuracy(head, features, splits["val"], sigmoid)
        echo(f"phase 1: val accuracy {base_val:.4f} with the backbone frozen ({head_source} head)")
        state = checkpoint.start(model, identity, history, base_val, head_source)
    else:
        resumed_from = int(state["epoch"])
        head_source = state["head_source"]
        history = list(state["history"])
        note(f"resuming {paths['checkpoint']} after phase-two epoch {resumed_from}")

    # Phase two: unfreeze, recompile, train on images.
    set_trainable(base, n_layers)
    _compile(model, keras.optimizers.Adam(config.learning_rate), sigmoid)
    checkpoint.restore(model, state)
    train_rows = np.flatnonzero(splits["train"])
    val_rows = np.flatnonzero(splits["val"])
    common = dict(size=size, batch_size=config.batch_size, sigmoid=sigmoid, workers=workers)
    train_seq = image_sequence(
        root, features.paths[train_rows], features.labels[train_rows],
        sample_weights=None if weights is None else weights[features.labels[train_rows]],
        shuffle_seed=config.seed, **common,
    )  # fmt: skip
    val_seq = image_sequence(root, features.paths[val_rows], features.labels[val_rows], **common)
    for epoch in range(int(state["epoch"]) + 1, config.epochs + 1):
        if state["wait"] >= config.patience:
            break
        train_seq.set_epoch(epoch)
        tick = time.perf_counter()
        logs = _fit_one_epoch(model, train_seq, val_seq, epoch, progress)
        row = _epoch_row(2, epoch, logs, time.perf_counter() - tick, config.learning_rate)
        history.append(row)
        echo(_format_row(row, config.epochs))
        seconds = time.perf_counter() - started + earlier_seconds
        state = checkpoint.save(model, state, row, history, seconds)
        if state["wait"] >= config.patience:
            echo(f"early stopping: no better val accuracy for {config.patience} epochs")
    checkpoint.load_best(model, state)

    # Outputs.
    out_dir.mkdir(parents=True, exist_ok=True)
    predictions = _predict_splits(model, features, root, splits, config, sigmoid, workers)
    correct = predictions["pred"] == predictions["labels"]
    accuracy = {
        s: float(np.mean(correct[predictions["split"] == s]))
        for s in ("val", "test") if np.any(predictions["split"] == s)
    }  # fmt: skip
    write_json_atomic(paths["predictions"], _predictions_json(predictions, features.class_names))
    _write_history(paths["history"], paths["history_csv"], history)
    plot_curves(history, paths["plot"], title=f"{folder.name}: {name}")
    _save_model(model, paths["model"])
    seconds = time.perf_counter() - started + earlier_seconds
    manifest = {
        "kind": "finetuned",
        "format_version": 1,
        "name": name,
        "model": paths["model"].name,
        "class_names": list(features.class_names),
        "input_size": size,
        "input": "float32 RGB images (n, input_size, input_size, 3), values 0..255",
        "output": "sigmoid: (n, 1) probability of class 1" if sigmoid else "softmax: (n, classes)",
        "preprocessing": f"{spec.preprocessing} (inside the model, layer 'preprocessing')",
        "backbone": spec.name,
        "weights": config.weights,
        "weights_id": identity["weights_id"],
        "layers": n_layers,
        "layers_option": str(config.layers),
        "depth": depth,
        "trainable_layers": [layer.name for layer in backbone_layers(base) if layer.trainable],
        "head_source": head_source,
        "dataset": folder.name,
        "data_root": str(root),
        "cache": str(summary.cache_path),
        "fingerprint": features.attrs.get("fingerprint"),
        "val_accuracy": accuracy.get("val"),
        "test_accuracy": accuracy.get("test"),
        "phase_one_val_accuracy": state["phase_one_val_accuracy"],
        "best_epoch": int(state["best_epoch"]),
        "epochs_run": sum(1 for h in history if h["phase"] == 2),
        "predictions": paths["predictions"].name,
        "history": paths["history"].name,
        "curves": paths["plot"].name,
        "config": asdict(config),
        "params": int(model.count_params()),
        "fit_seconds": round(seconds, 1),
        "predict_seconds_per_image": round(predictions["seconds_per_image"], 5),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "keras_version": keras.__version__,
        "keras_backend": keras.backend.backend(),
    }
    write_json_atomic(paths["manifest"], manifest)
    checkpoint.remove()
    return FinetuneResult(
        model_path=paths["model"], manifest_path=paths["manifest"],
        predictions_path=paths["predictions"], history_path=paths["history"],
        plot_path=paths["plot"], layers=n_layers, depth=depth, head_source=head_source,
        val_accuracy=accuracy["val"], test_accuracy=accuracy.get("test"),
        best_epoch=int(state["best_epoch"]), history=history, seconds=seconds,
        resumed_from=resumed_from, notes=notes, model=model,
    )  # fmt: skip


def _resolve_data(
    data: Path, config: FinetuneConfig, note: Callable[[str], None]
) -> tuple[Path, FinetuneConfig, Path | None]:
    """A data folder as is; a stage-one cache gives its folder, backbone, weights and split."""
    if not (data.suffix == ".h5" and data.is_file()):
        return data, config, None
    from pipeline import cache

    attrs = cache.read_attrs(data)
    if attrs.get("pooling") != "avg" or attrs.get("layer"):
        raise FinetuneError(
            f"{data} was made with POOLING={attrs.get('pooling')} LAYER={attrs.get('layer') or ''}; "
            "fine-tuning puts the head on avg-pooled features of the last layer: run "
            "`make features POOLING=avg` and pass that cache or the data folder"
        )
    changes = {
        "backbone": attrs["backbone"], "weights": attrs["weights_source"],
        "input_size": int(attrs["input_size"]),
    }  # fmt: skip
    if int(attrs.get("split_seed", -1)) >= 0:
        changes.update(
            seed=int(attrs["split_seed"]), val_fraction=float(attrs["val_fraction"]),
            test_fraction=float(attrs["test_fraction"]),
        )  # fmt: skip
    differ = [f"{k}={v}" for k, v in changes.items() if getattr(config, k) != v]
    if differ:
        note(f"using the cache's {', '.join(differ)}")
    return Path(attrs["data_root"]), replace(config, **changes), data


def _default_name(backbone: str, size: int, cache_path: Path, layers: int | str) -> str:
    weights_tag = cache_path.stem.split("_avg_", 1)[-1]
    return f"{backbone}_{size}_{weights_tag}_layers-{parse_layers(layers)}"


def _check_splits(features: FeatureSet) -> dict[str, np.ndarray]:
    masks = {s: features.split == s for s in ("train", "val", "test")}
    for required in ("train", "val"):
        if not masks[required].any():
            raise FinetuneError(
                f"the stage-one cache {features.path} has no {required!r} images; fine-tuning "
                "needs both (add a val/ folder, or use a folder without split folders, "
                "which is split by VAL_FRACTION)"
            )
    return masks


def _starting_head(
    features: FeatureSet,
    artifacts_dir: str | Path,
    dataset: str,
    n_classes: int,
    *,
    resumed_source: str | None,
    note: Callable[[str], None],
) -> tuple[keras.Model, str]:
    """The stage-two head when it fits this cache, else a fresh one to train in phase one.

    A resumed run rebuilds the head its checkpoint was made with (its weights
    come from the checkpoint).
    """
    from pipeline.softmax import build_softmax_head

    width = int(features.features.shape[1])
    path = stage_two_head_path(artifacts_dir, dataset, features.path)
    resumed = resumed_source is not None
    if resumed_source == "scratch":
        return build_softmax_head(width, n_classes), "scratch"
    reason = _stage_two_mismatch(path, features)
    if resumed and reason is not None:
        raise FinetuneError(
            f"the unfinished run started from the stage-two head {path}, which is gone or "
            f"changed ({reason}); pass RESTART=1 to start over"
        )
    if reason is None:
        head = copy_stage_two_head(path, width, n_classes)
        if not resumed:
            note(f"phase 1: starting from the stage-two head {path}")
        return head, "stage two"
    if not resumed:
        note(f"phase 1: {reason}; training the head here on the cached features, backbone frozen")
    return build_softmax_head(width, n_classes), "scratch"


def _stage_two_mismatch(path: Path, features: FeatureSet) -> str | None:
    manifest_path = path.with_suffix(".json")
    if not path.is_file():
        return f"no stage-two head at {path}"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return f"the stage-two head {path} has no readable manifest {manifest_path.name}"
    if manifest.get("fingerprint") != features.attrs.get("fingerprint"):
        return f"the stage-two head {path} was fit on other images (fingerprint differs)"
    if list(manifest.get("class_names", [])) != list(features.class_names):
        return f"the stage-two head {path} has other classes"
    if manifest.get("norm", "none") != "none" or manifest.get("pca"):
        # Stage three feeds the head raw pooled features: a head fit after a
        # normalisation or PCA step would start from badly scaled inputs.
        return (
            f"the stage-two head {path} was fit with NORM={manifest.get('norm')} "
            f"PCA={manifest.get('pca')}, not on raw features"
        )
    expected = manifest.get("sha256", {}).get("keras")
    if expected and sha256_file(path) != expected:
        return f"the stage-two head {path} does not match the sha256 in {manifest_path.name}"
    return None


def copy_stage_two_head(path: str | Path, width: int, n_classes: int) -> keras.Model:
    """A new :func:`~pipeline.softmax.build_softmax_head` holding a saved head's weights.

    The ``head_dense`` and ``head_output`` weights are copied by layer name
    (the contract of :mod:`pipeline.softmax`); hidden width, dropout and
    sigmoid output follow the saved head.
    """
    import keras

    from pipeline.softmax import build_softmax_head

    saved = keras.saving.load_model(str(path), compile=False)
    try:
        dense, output = saved.get_layer("head_dense"), saved.get_layer("head_output")
    except ValueError:
        raise FinetuneError(
            f"{path} is not a stage-two softmax head (no head_dense/head_output layers)"
        ) from None
    kernel = dense.get_weights()[0]
    units = output.get_weights()[0].shape[1]
    if kernel.shape[0] != width or units not in (n_classes, 1) or (units == 1 and n_classes != 2):
        raise FinetuneError(
            f"{path} maps {kernel.shape[0]} features to {units} outputs, but this cache has "
            f"{width} features and {n_classes} classes; re-fit stage two"
        )
    try:
        dropout = float(saved.get_layer("head_dropout").rate)
    except ValueError:
        dropout = 0.25
    head = build_softmax_head(
        width, n_classes, hidden=kernel.shape[1], dropout=dropout, sigmoid=units == 1
    )
    head.get_layer("head_dense").set_weights(dense.get_weights())
    head.get_layer("head_output").set_weights(output.get_weights())
    return head


def _compile(model: keras.Model, optimizer, sigmoid: bool) -> None:
    import keras

    if sigmoid:
        loss, metric = "binary_crossentropy", keras.metrics.BinaryAccuracy(name="accuracy")
    else:
        loss = "sparse_categorical_crossentropy"
        metric = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    model.compile(optimizer=optimizer, loss=loss, metrics=[metric])


def _train_head(head, features, splits, config, weights, sigmoid, echo) -> list[dict[str, Any]]:
    """Phase one from scratch: the head on the cached (frozen-backbone) features."""
    import keras

    _compile(head, keras.optimizers.Adam(config.head_learning_rate), sigmoid)
    x_train, y_train = features.features[splits["train"]], features.labels[splits["train"]]
    x_val, y_val = features.features[splits["val"]], features.labels[splits["val"]]
    if sigmoid:
        y_train, y_val = y_train.reshape(-1, 1), y_val.reshape(-1, 1)
    sample_weight = None if weights is None else weights[features.labels[splits["train"]]]
    rows, best, best_weights, wait = [], -1.0, head.get_weights(), 0
    patience = max(5, config.patience)
    for epoch in range(1, config.head_epochs + 1):
        tick = time.perf_counter()
        fitted = head.fit(
            x_train, y_train, sample_weight=sample_weight, batch_size=config.batch_size,
            validation_data=(x_val, y_val), initial_epoch=epoch - 1, epochs=epoch, verbose=0,
            shuffle=True,
        )  # fmt: skip
        logs = {k: float(v[-1]) for k, v in fitted.history.items()}
        row = _epoch_row(1, epoch, logs, time.perf_counter() - tick, config.head_learning_rate)
        rows.append(row)
        if row["val_accuracy"] > best:
            best, best_weights, wait = row["val_accuracy"], head.get_weights(), 0
        else:
            wait += 1
            if wait >= patience:
                break
    head.set_weights(best_weights)
    if rows:
        echo(
            f"phase 1: trained the head for {len(rows)} epochs on cached features "
            f"({sum(r['seconds'] for r in rows):.1f} s)"
        )
    return rows


def _head_accuracy(head, features, mask: np.ndarray, sigmoid: bool) -> float:
    proba = np.asarray(head.predict(features.features[mask], verbose=0, batch_size=256))
    pred = (proba[:, 0] > 0.5).astype(int) if sigmoid else proba.argmax(axis=1)
    return float(np.mean(pred == features.labels[mask]))


def _fit_one_epoch(model, train_seq, val_seq, epoch: int, progress: bool) -> dict[str, float]:
    fitted = model.fit(
        train_seq, validation_data=val_seq, initial_epoch=epoch - 1, epochs=epoch,
        verbose=1 if progress else 0,
    )  # fmt: skip
    return {k: float(v[-1]) for k, v in fitted.history.items()}


def _epoch_row(phase: int, epoch: int, logs: dict[str, float], seconds: float, lr: float) -> dict:
    return {
        "phase": phase,
        "epoch": epoch,
        "loss": logs.get("loss"),
        "accuracy": logs.get("accuracy"),
        "val_loss": logs.get("val_loss"),
        "val_accuracy": logs.get("val_accuracy"),
        "seconds": round(seconds, 2),
        "learning_rate": lr,
    }


def _format_row(row: dict, epochs: int) -> str:
    return (
        f"phase {row['phase']} epoch {row['epoch']}/{epochs}: loss {row['loss']:.4f}, "
        f"accuracy {row['accuracy']:.4f}, val accuracy {row['val_accuracy']:.4f}, "
        f"{row['seconds']:.1f} s"
    )


def _predict_splits(model, features, root, splits, config, sigmoid, workers) -> dict[str, Any]:
    mask = splits["val"] | splits["test"]
    rows = np.flatnonzero(mask)
    seq = image_sequence(
        root, features.paths[rows], features.labels[rows], size=int(model.input_shape[1]),
        batch_size=config.batch_size, sigmoid=sigmoid, workers=workers,
    )  # fmt: skip
    tick = time.perf_counter()
    proba = np.asarray(model.predict(seq, verbose=0), dtype=np.float64)
    seconds = time.perf_counter() - tick
    if sigmoid:
        proba = np.concatenate([1.0 - proba, proba], axis=1)
    return {
        "paths": features.paths[rows],
        "split": features.split[rows],
        "labels": features.labels[rows],
        "pred": proba.argmax(axis=1),
        "proba": proba,
        "seconds_per_image": seconds / max(1, len(rows)),
    }


def _predictions_json(predictions: dict[str, Any], class_names: Sequence[str]) -> dict:
    """The results contract of :mod:`pipeline.report`: one entry per val/test image."""
    names = list(class_names)
    entries = {
        str(path): {
            "split": str(split),
            "label": names[int(label)],
            "pred": names[int(pred)],
            "proba": [round(float(p), 6) for p in proba],
        }
        for path, split, label, pred, proba in zip(
            predictions["paths"], predictions["split"], predictions["labels"],
            predictions["pred"], predictions["proba"], strict=True,
        )
    }  # fmt: skip
    return {"class_names": names, "predictions": entries}


def _save_model(model, path: Path) -> None:
    import keras

    # An uncompiled copy: no optimizer state in the file, nothing to warn about on loading.
    clean = keras.Model.from_config(model.get_config())
    clean.set_weights(model.get_weights())
    write_atomic(path, lambda tmp: clean.save(str(tmp)))


_HISTORY_COLUMNS = (
    "phase", "epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds", "learning_rate",
)  # fmt: skip


def _write_history(json_path: Path, csv_path: Path, history: list[dict]) -> None:
    write_json_atomic(json_path, history)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=_HISTORY_COLUMNS)
    writer.writeheader()
    writer.writerows(history)
    write_bytes_atomic(csv_path, table.getvalue())


def plot_curves(history: list[dict], path: str | Path, *, title: str = "") -> Path:
    """Loss and accuracy per epoch of both phases, as a PNG (matplotlib, no pyplot state)."""
    figure = curves_figure(history, title=title)
    return write_atomic(path, lambda tmp: figure.savefig(tmp, format="png"))


def curves_figure(history: list[dict], *, title: str = "") -> Any:
    """The training-curve figure of :func:`plot_curves` (also drawn by the report)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), dpi=100)
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    steps = np.arange(1, len(history) + 1)
    for key, axes, style in (
        ("loss", loss_axes, "-"), ("val_loss", loss_axes, "--"),
        ("accuracy", accuracy_axes, "-"), ("val_accuracy", accuracy_axes, "--"),
    ):  # fmt: skip
        values = [np.nan if h.get(key) is None else h[key] for h in history]
        axes.plot(steps, values, style, marker=".", label=key.replace("_", " "))
    phase_one = sum(1 for h in history if h["phase"] == 1)
    for axes, label in ((loss_axes, "loss"), (accuracy_axes, "accuracy")):
        if 0 < phase_one < len(history):
            axes.axvline(phase_one + 0.5, color="grey", linewidth=0.8)
            axes.text(phase_one + 0.6, 0.02, "fine-tuning", transform=axes.get_xaxis_transform())
        axes.set_xlabel("epoch (phase one on cached features, then phase two)")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


# --- checkpoints -----------------------------------------------------------------------------


class _Checkpoint:
    """A folder holding the state of an unfinished run, replaced file by file, atomically.

    ``state.json`` is written last and names the weight files it belongs to,
    so a run killed mid-save resumes from the previous complete epoch.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @property
    def state_path(self) -> Path:
        return self.folder / "state.json"

    def open(self, identity: dict, *, restart: bool, note: Callable[[str], None]) -> dict | None:
        """The saved state when it belongs to ``identity``; refuse one that does not."""
        if not self.state_path.is_file():
            return None
        if restart:
            shutil.rmtree(self.folder)
            note(f"RESTART: discarded the unfinished run in {self.folder}")
            return None
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError) as exc:
            raise FinetuneError(
                f"checkpoint {self.state_path} is unreadable ({exc}); delete {self.folder} "
                "or pass RESTART=1 to start over"
            ) from None
        saved = state.get("identity", {})
        differ = [
            f"{key} {saved.get(key)!r} (now {value!r})"
            for key, value in identity.items() if saved.get(key) != value
        ]  # fmt: skip
        if differ:
            raise FinetuneError(
                f"the unfinished run in {self.folder} used another configuration "
                f"({'; '.join(differ[:3])}); run it again with its options to finish it, "
                "or pass RESTART=1 (or NAME=other) to start a new one"
            )
        return state

    def start(self, model, identity: dict, history: list, val_accuracy: float, head_source: str):
        """Record the end of phase one: epoch 0 of phase two, the first best candidate."""
        self.folder.mkdir(parents=True, exist_ok=True)
        weights = self._save_weights(model, "epoch-0")
        state = {
            "identity": identity,
            "epoch": 0,
            "best_epoch": 0,
            "best_val_accuracy": val_accuracy,
            "phase_one_val_accuracy": val_accuracy,
            "wait": 0,
            "head_source": head_source,
            "history": history,
            "last": weights,
            "best": weights,
            "optimizer": None,
            "seconds": 0.0,
        }
        self._write_state(state)
        return state

    def restore(self, model, state: dict) -> None:
        """Load the last epoch's weights and, after phase two started, the optimizer state."""
        _load_weights(model, self.folder / state["last"])
        if not state.get("optimizer"):
            return
        optimizer = model.optimizer
        optimizer.build(model.trainable_variables)
        with np.load(self.folder / state["optimizer"]) as saved:
            values = [saved[f"v{i}"] for i in range(len(saved.files))]
        if len(values) != len(optimizer.variables) or any(
            tuple(v.shape) != value.shape
            for v, value in zip(optimizer.variables, values, strict=True)
        ):
            raise FinetuneError(
                f"the optimizer state in {self.folder} does not fit this model; "
                "pass RESTART=1 to start over"
            )
        for variable, value in zip(optimizer.variables, values, strict=True):
            variable.assign(value)

    def save(self, model, state: dict, row: dict, history: list, seconds: float) -> dict:
        """Checkpoint after a phase-two epoch; keep the best weights by val accuracy."""
        from keras import ops

        epoch = int(row["epoch"])
        state = dict(state)
        state["last"] = self._save_weights(model, f"epoch-{epoch}")
        # Rounded: float32 metrics against a float64 baseline must not tie-break by noise.
        if round(row["val_accuracy"], 6) > round(state["best_val_accuracy"], 6):
            state.update(
                best=state["last"], best_epoch=epoch, best_val_accuracy=row["val_accuracy"], wait=0
            )
        else:
            state["wait"] = int(state["wait"]) + 1
        optimizer_file = f"optimizer-{epoch}.npz"
        values = {f"v{i}": ops.convert_to_numpy(v) for i, v in enumerate(model.optimizer.variables)}
        write_atomic(self.folder / optimizer_file, lambda tmp: np.savez(tmp, **values))
        state.update(epoch=epoch, optimizer=optimizer_file, history=history, seconds=seconds)
        self._write_state(state)
        return state

    def load_best(self, model, state: dict) -> None:
        _load_weights(model, self.folder / state["best"])

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def _save_weights(self, model, stem: str) -> str:
        name = f"{stem}.weights.h5"
        write_atomic(self.folder / name, lambda tmp: model.save_weights(str(tmp)))
        return name

    def _write_state(self, state: dict) -> None:
        write_json_atomic(self.state_path, state)
        keep = {state["last"], state["best"], state.get("optimizer"), "state.json"}
        for path in self.folder.iterdir():  # files of superseded epochs
            if path.name not in keep:
                path.unlink(missing_ok=True)


def _load_weights(model, path: Path) -> None:
    import warnings

    with warnings.catch_warnings():
        # Keras also stores the optimizer of the moment; ours is restored on its own.
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(str(path))


# --- benchmark -------------------------------------------------------------------------------


def bench_finetune(
    data: str | Path,
    *,
    backbone: str = "mobilenet_v2",
    weights: str = "imagenet",
    input_size: int | None = None,
    batch_size: int = 32,
    n_images: int = 256,
    out: str | Path | None = "artifacts/bench/finetune.json",
) -> dict[str, Any]:
    """Time one phase-two epoch (last block unfrozen) against one stage-one pass.

    Both run over the same ``n_images`` training images, decoded by
    :mod:`pipeline.images`; each is warmed up with one batch first, so tracing
    and compilation are not counted.

    Returns
    -------
    dict
        Seconds and images per second of both, their ratio, layers unfrozen.
    """
    import keras

    from pipeline.images import iter_batches, scan_folder
    from pipeline.softmax import build_softmax_head

    spec = backbones.get_backbone(backbone)
    size = backbones.resolve_input_size(spec, input_size)
    folder = scan_folder(data)
    train = [r for r in folder.records if r.split == "train"] or list(folder.records)
    order = np.random.default_rng(0).permutation(len(train))[:n_images]
    records = [train[i] for i in sorted(order)]
    paths = [r.path for r in records]
    labels = np.array([r.label for r in records])

    extractor = backbones.build_feature_extractor(spec, weights=weights, input_size=size)
    with contextlib.closing(
        iter_batches(folder.root, paths[:batch_size], size=size, batch_size=batch_size,
                     preprocess=spec.preprocess)
    ) as warmup:  # fmt: skip
        first = next(warmup)
    extractor.predict_on_batch(first.x)
    tick = time.perf_counter()
    for batch in iter_batches(folder.root, paths, size=size, batch_size=batch_size,
                              preprocess=spec.preprocess):  # fmt: skip
        extractor.predict_on_batch(batch.x)
    forward_seconds = time.perf_counter() - tick

    base = backbones.build_base(spec, weights=weights, input_size=size)
    layers = last_block_size(base)
    head = build_softmax_head(int(extractor.output_shape[-1]), len(folder.class_names))
    model = build_finetune_model(
        spec, base, head, size=size, augmentation=build_augmentation(FinetuneConfig())
    )
    set_trainable(base, layers)
    _compile(model, keras.optimizers.Adam(1e-5), sigmoid=False)
    seq = image_sequence(folder.root, paths, labels, size=size, batch_size=batch_size,
                        shuffle_seed=0, workers=default_workers())  # fmt: skip
    x, y = seq[0]
    model.train_on_batch(x, y)
    tick = time.perf_counter()
    model.fit(seq, epochs=1, verbose=0)
    train_seconds = time.perf_counter() - tick

    result = {
        "backbone": spec.name,
        "weights": weights,
        "input_size": size,
        "images": len(paths),
        "batch_size": batch_size,
        "layers_unfrozen": layers,
        "depth": len(backbone_layers(base)),
        "trainable_params": int(sum(np.prod(v.shape) for v in model.trainable_weights)),
        "stage_one_seconds": round(forward_seconds, 2),
        "stage_one_images_per_second": round(len(paths) / forward_seconds, 1),
        "finetune_epoch_seconds": round(train_seconds, 2),
        "finetune_images_per_second": round(len(paths) / train_seconds, 1),
        "ratio": round(train_seconds / forward_seconds, 2),
        "keras_backend": keras.backend.backend(),
        "cpu_count": os.cpu_count(),
    }
    print(
        f"stage one: {len(paths)} images in {forward_seconds:.1f} s "
        f"({result['stage_one_images_per_second']} images/s); phase-two epoch, last block "
        f"({layers} layers) trainable: {train_seconds:.1f} s "
        f"({result['finetune_images_per_second']} images/s); ratio {result['ratio']}"
    )
    if out:
        write_json_atomic(Path(out), result)
        print(f"wrote {out}")
    return result


# --- command line ----------------------------------------------------------------------------
