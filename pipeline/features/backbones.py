"""The backbone registry: every ``keras.applications`` ImageNet model, kept as data.

Each :class:`BackboneSpec` knows its Keras builder, its preprocessing, its input
sizes and its feature width, so callers never choose means, channel order or
sizes themselves. :func:`build_feature_extractor` is the one place that builds a
frozen, headless model (and the one place that touches weight files).

Keras is imported lazily: listing the registry or validating options costs no
TensorFlow import.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.core.errors import BackboneError, WeightsError, did_you_mean
from pipeline.core.files import sha256_file
from pipeline.core.options import POOLINGS
from pipeline.features.preprocessing import MODES, normalise_batch

if TYPE_CHECKING:
    import keras

# Preprocessing modes, as keras.applications.imagenet_utils defines them.
# "none" means the model rescales inside itself and wants raw 0..255 RGB.
PREPROCESSING_MODES = MODES


@dataclass(frozen=True)
class BackboneSpec:
    """One registered backbone.

    Attributes
    ----------
    name : str
        Registry name (lowercase, e.g. ``"resnet50_v2"``).
    builder : str
        Attribute of ``keras.applications`` that builds it.
    preprocessing : str
        ``"caffe"``, ``"tf"``, ``"torch"`` or ``"none"`` (done inside the model).
    default_size, min_size : int
        Default and smallest square input size (pixels).
    channels : int
        Feature width with ``avg`` or ``max`` pooling.
    grid : int
        Side of the last feature map at ``default_size`` (``flatten`` keeps
        ``grid * grid * channels`` values).
    params : int
        Parameters of the headless model (``include_top=False``).
    builder_kwargs : dict
        Extra builder arguments (``{"alpha": 0.25}`` for MobileNet 0.25).
    """

    name: str
    builder: str
    preprocessing: str
    default_size: int
    min_size: int
    channels: int
    grid: int
    params: int
    builder_kwargs: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def feature_width(self, pooling: str = "avg") -> int:
        """Feature width for ``pooling`` at the default input size."""
        check_pooling(pooling)
        return self.grid * self.grid * self.channels if pooling == "flatten" else self.channels

    def preprocess(self, batch: np.ndarray) -> np.ndarray:
        """Turn a uint8 RGB batch ``(n, h, w, 3)`` into the model's float32 input.

        Always returns a new array (Keras's ``preprocess_input`` overwrites float
        input in place; this never does).
        """
        return preprocess(batch, self.preprocessing)


def preprocess(batch: np.ndarray, mode: str) -> np.ndarray:
    """Apply a Keras ImageNet preprocessing ``mode`` to uint8 RGB images.

    Matches ``keras.applications.imagenet_utils.preprocess_input`` (the test
    suite compares them); the arithmetic lives in :mod:`pipeline.features.preprocessing`.
    Returns a new contiguous float32 array; the caller's array is never touched.
    """
    if mode not in PREPROCESSING_MODES:
        raise BackboneError(
            f"unknown preprocessing mode {mode!r}; expected one of {', '.join(PREPROCESSING_MODES)}"
        )
    return normalise_batch(batch, mode)  # normalise's numbers, in place on one copy


# Parameters and grids are those of the headless Keras models; the test suite
# builds every entry with weights=None and checks these numbers against it.
# fmt: off
_REGISTRY: tuple[BackboneSpec, ...] = (
    BackboneSpec(
        name="xception", builder="Xception", preprocessing="tf",
        default_size=299, min_size=71, channels=2048, grid=10, params=20861480,
    ),
    BackboneSpec(
        name="vgg16", builder="VGG16", preprocessing="caffe",
        default_size=224, min_size=32, channels=512, grid=7, params=14714688,
    ),
    BackboneSpec(
        name="vgg19", builder="VGG19", preprocessing="caffe",
        default_size=224, min_size=32, channels=512, grid=7, params=20024384,
    ),
    BackboneSpec(
        name="resnet50", builder="ResNet50", preprocessing="caffe",
        default_size=224, min_size=32, channels=2048, grid=7, params=23587712,
    ),
    BackboneSpec(
        name="resnet101", builder="ResNet101", preprocessing="caffe",
        default_size=224, min_size=32, channels=2048, grid=7, params=42658176,
    ),
    BackboneSpec(
        name="resnet152", builder="ResNet152", preprocessing="caffe",
        default_size=224, min_size=32, channels=2048, grid=7, params=58370944,
    ),
    BackboneSpec(
        name="resnet50_v2", builder="ResNet50V2", preprocessing="tf",
        default_size=224, min_size=32, channels=2048, grid=7, params=23564800,
    ),
    BackboneSpec(
        name="resnet101_v2", builder="ResNet101V2", preprocessing="tf",
        default_size=224, min_size=32, channels=2048, grid=7, params=42626560,
    ),
    BackboneSpec(
        name="resnet152_v2", builder="ResNet152V2", preprocessing="tf",
        default_size=224, min_size=32, channels=2048, grid=7, params=58331648,
    ),
    BackboneSpec(
        name="inception_v3", builder="InceptionV3", preprocessing="tf",
        default_size=299, min_size=75, channels=2048, grid=8, params=21802784,
    ),
    BackboneSpec(
        name="inception_resnet_v2", builder="InceptionResNetV2", preprocessing="tf",
        default_size=299, min_size=75, channels=1536, grid=8, params=54336736,
    ),
    BackboneSpec(
        name="mobilenet", builder="MobileNet", preprocessing="tf",
        default_size=224, min_size=32, channels=1024, grid=7, params=3228864,
    ),
    BackboneSpec(
        name="mobilenet_025", builder="MobileNet", preprocessing="tf",
        default_size=224, min_size=32, channels=256, grid=7, params=218544, builder_kwargs={"alpha": 0.25},
    ),
    BackboneSpec(
        name="mobilenet_v2", builder="MobileNetV2", preprocessing="tf",
        default_size=224, min_size=32, channels=1280, grid=7, params=2257984,
    ),
    BackboneSpec(
        name="mobilenet_v3_small", builder="MobileNetV3Small", preprocessing="none",
        default_size=224, min_size=32, channels=576, grid=7, params=939120,
    ),
    BackboneSpec(
        name="mobilenet_v3_large", builder="MobileNetV3Large", preprocessing="none",
        default_size=224, min_size=32, channels=960, grid=7, params=2996352,
    ),
    BackboneSpec(
        name="densenet121", builder="DenseNet121", preprocessing="torch",
        default_size=224, min_size=32, channels=1024, grid=7, params=7037504,
    ),
    BackboneSpec(
        name="densenet169", builder="DenseNet169", preprocessing="torch",
        default_size=224, min_size=32, channels=1664, grid=7, params=12642880,
    ),
    BackboneSpec(
        name="densenet201", builder="DenseNet201", preprocessing="torch",
        default_size=224, min_size=32, channels=1920, grid=7, params=18321984,
    ),
    BackboneSpec(
        name="nasnet_mobile", builder="NASNetMobile", preprocessing="tf",
        default_size=224, min_size=32, channels=1056, grid=7, params=4269716,
    ),
    BackboneSpec(
        name="nasnet_large", builder="NASNetLarge", preprocessing="tf",
        default_size=331, min_size=32, channels=4032, grid=11, params=84916818,
    ),
    BackboneSpec(
        name="efficientnet_b0", builder="EfficientNetB0", preprocessing="none",
        default_size=224, min_size=32, channels=1280, grid=7, params=4049571,
    ),
    BackboneSpec(
        name="efficientnet_b1", builder="EfficientNetB1", preprocessing="none",
        default_size=240, min_size=32, channels=1280, grid=8, params=6575239,
    ),
    BackboneSpec(
        name="efficientnet_b2", builder="EfficientNetB2", preprocessing="none",
        default_size=260, min_size=32, channels=1408, grid=9, params=7768569,
    ),
    BackboneSpec(
        name="efficientnet_b3", builder="EfficientNetB3", preprocessing="none",
        default_size=300, min_size=32, channels=1536, grid=10, params=10783535,
    ),
    BackboneSpec(
        name="efficientnet_b4", builder="EfficientNetB4", preprocessing="none",
        default_size=380, min_size=32, channels=1792, grid=12, params=17673823,
    ),
    BackboneSpec(
        name="efficientnet_b5", builder="EfficientNetB5", preprocessing="none",
        default_size=456, min_size=32, channels=2048, grid=15, params=28513527,
    ),
    BackboneSpec(
        name="efficientnet_b6", builder="EfficientNetB6", preprocessing="none",
        default_size=528, min_size=32, channels=2304, grid=17, params=40960143,
    ),
    BackboneSpec(
        name="efficientnet_b7", builder="EfficientNetB7", preprocessing="none",
        default_size=600, min_size=32, channels=2560, grid=19, params=64097687,
    ),
    BackboneSpec(
        name="efficientnet_v2_b0", builder="EfficientNetV2B0", preprocessing="none",
        default_size=224, min_size=32, channels=1280, grid=7, params=5919312,
    ),
    BackboneSpec(
        name="efficientnet_v2_b1", builder="EfficientNetV2B1", preprocessing="none",
        default_size=240, min_size=32, channels=1280, grid=8, params=6931124,
    ),
    BackboneSpec(
        name="efficientnet_v2_b2", builder="EfficientNetV2B2", preprocessing="none",
        default_size=260, min_size=32, channels=1408, grid=9, params=8769374,
    ),
    BackboneSpec(
        name="efficientnet_v2_b3", builder="EfficientNetV2B3", preprocessing="none",
        default_size=300, min_size=32, channels=1536, grid=10, params=12930622,
    ),
    BackboneSpec(
        name="efficientnet_v2_s", builder="EfficientNetV2S", preprocessing="none",
        default_size=384, min_size=32, channels=1280, grid=12, params=20331360,
    ),
    BackboneSpec(
        name="efficientnet_v2_m", builder="EfficientNetV2M", preprocessing="none",
        default_size=480, min_size=32, channels=1280, grid=15, params=53150388,
    ),
    BackboneSpec(
        name="efficientnet_v2_l", builder="EfficientNetV2L", preprocessing="none",
        default_size=480, min_size=32, channels=1280, grid=15, params=117746848,
    ),
    BackboneSpec(
        name="convnext_tiny", builder="ConvNeXtTiny", preprocessing="none",
        default_size=224, min_size=32, channels=768, grid=7, params=27820128,
    ),
    BackboneSpec(
        name="convnext_small", builder="ConvNeXtSmall", preprocessing="none",
        default_size=224, min_size=32, channels=768, grid=7, params=49454688,
    ),
    BackboneSpec(
        name="convnext_base", builder="ConvNeXtBase", preprocessing="none",
        default_size=224, min_size=32, channels=1024, grid=7, params=87566464,
    ),
    BackboneSpec(
        name="convnext_large", builder="ConvNeXtLarge", preprocessing="none",
        default_size=224, min_size=32, channels=1536, grid=7, params=196230336,
    ),
    BackboneSpec(
        name="convnext_xlarge", builder="ConvNeXtXLarge", preprocessing="none",
        default_size=224, min_size=32, channels=2048, grid=7, params=348147968,
    ),
)
# fmt: on
BACKBONES: dict[str, BackboneSpec] = {spec.name: spec for spec in _REGISTRY}
# Keras class names are accepted too ("ResNet50V2" resolves to "resnet50_v2").
_ALIASES = {spec.builder.lower(): spec.name for spec in _REGISTRY if not spec.builder_kwargs}


def list_backbones(pattern: str | None = None) -> list[BackboneSpec]:
    """Registered backbones, optionally filtered by a shell pattern (``"resnet*"``)."""
    import fnmatch

    return [s for s in _REGISTRY if pattern is None or fnmatch.fnmatch(s.name, pattern)]


def get_backbone(name: str) -> BackboneSpec:
    """Look up a backbone by registry name or Keras class name.

    Raises
    ------
    BackboneError
        For an unknown name, with the closest registered names suggested.
    """
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, _ALIASES.get(key.replace("_", ""), key))
    if key in BACKBONES:
        return BACKBONES[key]
    raise BackboneError(
        f"unknown backbone {name!r}{did_you_mean(key, BACKBONES)} "
        "(see `python -m pipeline backbones` for the list)"
    )


def check_pooling(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise BackboneError(
            f"POOLING must be one of {', '.join(POOLINGS)}; got {pooling!r}{did_you_mean(pooling, POOLINGS)}"
        )
    return pooling


def resolve_input_size(spec: BackboneSpec, input_size: int | None) -> int:
    """The input size to use: the backbone's default, or a checked user value."""
    if input_size is None:
        return spec.default_size
    if not isinstance(input_size, int) or input_size < spec.min_size:
        raise BackboneError(
            f"INPUT_SIZE={input_size} is below {spec.name}'s minimum of {spec.min_size} pixels; "
            f"use at least {spec.min_size} (default {spec.default_size})"
        )
    return input_size


def keras_cache_dir() -> Path:
    """Where Keras caches downloaded weights (``$KERAS_HOME/models``)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def weights_identity(weights: str) -> str:
    """A string that changes whenever the weights do.

    ``"none"`` for random weights, ``"imagenet (keras X.Y.Z)"`` for Keras's own
    download, ``"sha256:<hex>"`` for a local file.
    """
    if weights == "none":
        return "none"
    if weights == "imagenet":
        return f"imagenet (keras {importlib.metadata.version('keras')})"
    return f"sha256:{sha256_file(_check_weights_path(weights))}"


def _check_weights_path(weights: str) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"WEIGHTS={weights!r} is neither 'imagenet', 'none' nor an existing weights file; "
            "give the path of a Keras .h5/.weights.h5 file"
        )
    if not os.access(path, os.R_OK):
        raise WeightsError(f"weights file {path} is not readable; check its permissions")
    return path


@contextlib.contextmanager
def dtype_policy(precision: str) -> Iterator[None]:
    """Build models under a Keras dtype policy (``"mixed_float16"`` ...), then restore the old one.

    Layers keep the policy they were built with, so the global setting only needs to
    hold while a model is constructed.
    """
    import keras

    previous = keras.config.dtype_policy()
    if precision != "float32":
        keras.config.set_dtype_policy(precision)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def build_feature_extractor(
    backbone: str | BackboneSpec,
    *,
    weights: str = "imagenet",
    input_size: int | None = None,
    pooling: str = "avg",
    layer: str | None = None,
) -> keras.Model:
    """Build a frozen, headless backbone that maps a preprocessed batch to features.

    Parameters
    ----------
    backbone : str or BackboneSpec
        Registry name (``"vgg16"``) or spec.
    weights : str
        ``"imagenet"`` (Keras's download and cache), ``"none"`` (random init) or
        the path of a local weights file for the headless model.
    input_size : int, optional
        Square input side; the backbone's default when omitted.
    pooling : {"avg", "max", "flatten"}
        How the last feature map becomes a vector.
    layer : str, optional
        Cut the backbone at this layer instead of its last one.

    Returns
    -------
    keras.Model
        Non-trainable model with output ``(batch, width)``.

    Examples
    --------
    >>> model = build_feature_extractor("mobilenet_v2", weights="none", input_size=32)
    >>> model.output_shape
    (None, 1280)
    """
    spec = backbone if isinstance(backbone, BackboneSpec) else get_backbone(backbone)
    size = resolve_input_size(spec, input_size)
    check_pooling(pooling)
    base = build_base(spec, weights=weights, input_size=size)

    import keras

    output = base.output
    if layer is not None:
        output = _layer_output(base, layer)
    if len(output.shape) == 4:
        pool = {
            "avg": keras.layers.GlobalAveragePooling2D,
            "max": keras.layers.GlobalMaxPooling2D,
            "flatten": keras.layers.Flatten,
        }[pooling]
        output = pool(name=f"features_{pooling}")(output)
    elif len(output.shape) != 2:
        raise BackboneError(
            f"LAYER={layer!r} has output shape {tuple(output.shape)}; pick a convolutional "
            "layer (4-D output) or a pooled one (2-D)"
        )
    model = keras.Model(base.input, output, name=f"{spec.name}_features")
    model.trainable = False
    return model


def build_base(spec: BackboneSpec, *, weights: str, input_size: int) -> keras.Model:
    """The headless Keras application with its weights loaded (no pooling)."""
    import keras

    builder = getattr(keras.applications, spec.builder)
    kwargs = dict(include_top=False, input_shape=(input_size, input_size, 3), **spec.builder_kwargs)
    if weights == "imagenet":
        import warnings

        try:
            with warnings.catch_warnings():
                # Headless weights fit any input size: Keras loads its 224 file and says so.
                warnings.filterwarnings(
                    "ignore", message=".*input_shape. is undefined or non-square"
                )
                return builder(weights="imagenet", **kwargs)
        except Exception as exc:  # Keras raises a bare Exception for a failed download
            cached = _cached_weights(exc)
            if cached is None:
                raise _download_error(spec, exc) from None
            base = builder(weights=None, **kwargs)  # a read-only ~/.keras that holds the file
            base.load_weights(str(cached))  # (Keras itself looks only in a writable one)
            return base
    if weights == "none":
        return builder(weights=None, **kwargs)
    path = _check_weights_path(weights)
    base = builder(weights=None, **kwargs)
    try:
        base.load_weights(str(path))
    except Exception as exc:
        reason = " ".join(str(exc).split())[:300]
        raise WeightsError(
            f"weights file {path} does not fit backbone {spec.name}: {reason}"
        ) from None
    return base


def _cached_weights(exc: Exception) -> Path | None:
    """The weights file a failed Keras download wanted, when it sits in :func:`keras_cache_dir`."""
    url = re.search(r"https?://\S+?\.h5", " ".join(str(exc).split()))
    if not url:
        return None
    path = keras_cache_dir() / url.group(0).rsplit("/", 1)[-1]
    return path if path.is_file() and os.access(path, os.R_OK) else None


def _download_error(spec: BackboneSpec, exc: Exception) -> WeightsError:
    message = " ".join(str(exc).split())
    url = re.search(r"https?://\S+?\.h5", message)
    if not url:  # not a download problem (a bad size for these weights, say)
        return WeightsError(f"cannot load ImageNet weights for {spec.name}: {message[:300]}")
    filename = url.group(0).rsplit("/", 1)[-1]
    return WeightsError(
        f"cannot download ImageNet weights for {spec.name} (no network?): put {filename} "
        f"in {keras_cache_dir()}/ or pass WEIGHTS=/path/to/{filename}"
    )


def _layer_output(base: keras.Model, layer: str) -> Any:
    names = [lyr.name for lyr in base.layers]
    if layer not in names:
        convolutional = [lyr.name for lyr in base.layers if len(lyr.output.shape) == 4][-6:]
        raise BackboneError(
            f"LAYER={layer!r} is not a layer of {base.name}{did_you_mean(layer, names)}; "
            f"some valid names: {', '.join(convolutional)}"
        )
    return base.get_layer(layer).output
