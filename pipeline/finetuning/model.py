"""The stage-three model: images -> augmentation -> preprocessing -> backbone -> avg -> head.

Also its warm start (the stage-two softmax head, copied by layer name when it
was fit on this cache), its compilation, and saving and loading it. Keras is
imported inside the functions: importing this module builds nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.artifacts import ArtifactError, read_manifest
from pipeline.core.errors import FinetuneError
from pipeline.core.files import sha256_file, write_atomic
from pipeline.heads.softmax import build_softmax_head

if TYPE_CHECKING:
    from collections.abc import Callable

    import keras

    from pipeline.features.backbones import BackboneSpec
    from pipeline.features.cache import FeatureSet
    from pipeline.finetuning.config import FinetuneConfig


def build_finetune_model(
    spec: BackboneSpec,
    base: keras.Model,
    head: keras.Model,
    *,
    size: int,
    augmentation: keras.layers.Layer | None = None,
) -> keras.Model:
    """Images (float32 RGB 0..255) -> augmentation -> preprocessing -> base -> avg -> head."""
    import keras

    from pipeline.finetuning.layers import ImagePreprocessing

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
    seed = config.split.seed
    layers = []
    if config.flip != "none":
        layers.append(keras.layers.RandomFlip(config.flip, seed=seed))
    if config.rotation > 0:
        layers.append(keras.layers.RandomRotation(config.rotation, seed=seed + 1))
    if config.zoom > 0:
        layers.append(keras.layers.RandomZoom(config.zoom, seed=seed + 2))
    return keras.Sequential(layers, name="augmentation") if layers else None


def compile_model(model: keras.Model, learning_rate: float, *, sigmoid: bool) -> None:
    """Adam at ``learning_rate``, cross-entropy and an ``accuracy`` metric for either output.

    Compile after setting which layers train: the optimizer is built on the
    trainable weights of that moment.
    """
    import keras

    if sigmoid:
        loss, metric = "binary_crossentropy", keras.metrics.BinaryAccuracy(name="accuracy")
    else:
        loss = "sparse_categorical_crossentropy"
        metric = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, metrics=[metric])
    # Built now, not inside the first traced step: a step that creates variables is traced
    # twice (about 3 s of a whole network's train step on 2 cores).
    model.optimizer.build(model.trainable_variables)


def save_model(model: keras.Model, path: Path) -> None:
    """Save it uncompiled: no optimizer state in the file, nothing to warn about on loading.

    The saved model is a new, never compiled model over the same layers: no layer
    is rebuilt and no weight copied (a clone from the config cost about a second).
    """
    import keras

    clean = keras.Model(model.input, model.output, name=model.name)
    write_atomic(path, lambda tmp: clean.save(str(tmp)))


def load_finetuned(path: str | Path) -> keras.Model:
    """Load a model saved by :func:`~pipeline.finetuning.run.finetune` (registers its layers first)."""
    import keras

    import pipeline.finetuning.layers  # noqa: F401  (registers ImagePreprocessing)

    return keras.saving.load_model(str(path), compile=False)


# --- the warm start --------------------------------------------------------------------------


def starting_head(
    features: FeatureSet,
    head_path: Path,
    *,
    resumed_source: str | None,
    note: Callable[[str], None],
) -> tuple[keras.Model, str]:
    """The stage-two head at ``head_path`` when it fits this cache, else a fresh one.

    Returns the head and its source, ``"stage two"`` or ``"scratch"`` (to be
    trained in phase one). A resumed run rebuilds the head its checkpoint was
    made with (its weights come from the checkpoint).
    """

    width, n_classes = int(features.features.shape[1]), len(features.class_names)
    resumed = resumed_source is not None
    if resumed_source == "scratch":
        return build_softmax_head(width, n_classes), "scratch"
    reason = stage_two_mismatch(head_path, features)
    if resumed and reason is not None:
        raise FinetuneError(
            f"the unfinished run started from the stage-two head {head_path}, which is gone or "
            f"changed ({reason}); pass RESTART=1 to start over"
        )
    if reason is None:
        head = copy_stage_two_head(head_path, width, n_classes)
        if not resumed:
            note(f"phase 1: starting from the stage-two head {head_path}")
        return head, "stage two"
    if not resumed:
        note(f"phase 1: {reason}; training the head here on the cached features, backbone frozen")
    return build_softmax_head(width, n_classes), "scratch"


def stage_two_mismatch(path: Path, features: FeatureSet) -> str | None:
    """Why the stage-two head at ``path`` cannot start this run, or ``None`` when it can."""

    manifest_path = path.with_suffix(".json")
    if not path.is_file():
        return f"no stage-two head at {path}"
    try:
        manifest = read_manifest(manifest_path, kind="head")
    except ArtifactError as exc:
        return f"the stage-two head {path} has no usable manifest ({exc})"
    if manifest.get("fingerprint") != features.attrs.get("fingerprint"):
        return f"the stage-two head {path} was fit on other images (fingerprint differs)"
    if list(manifest["class_names"]) != list(features.class_names):
        return f"the stage-two head {path} has other classes"
    if manifest.get("norm", "none") != "none" or manifest.get("pca"):
        # Stage three feeds the head raw pooled features: a head fit after a
        # normalisation or PCA step would start from badly scaled inputs.
        return (
            f"the stage-two head {path} was fit with NORM={manifest.get('norm')} "
            f"PCA={manifest.get('pca')}, not on raw features"
        )
    hashes = manifest.get("sha256", {})
    expected = hashes.get("keras", hashes.get("model"))
    if expected and sha256_file(path) != expected:
        return f"the stage-two head {path} does not match the sha256 in {manifest_path.name}"
    return None


def copy_stage_two_head(path: str | Path, width: int, n_classes: int) -> keras.Model:
    """A new :func:`~pipeline.heads.softmax.build_softmax_head` holding a saved head's weights.

    The ``head_dense`` and ``head_output`` weights are copied by layer name
    (the contract of :mod:`pipeline.heads.softmax`); hidden width, dropout and
    sigmoid output follow the saved head.
    """
    import keras

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
