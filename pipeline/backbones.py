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

from pipeline.errors import BackboneError, WeightsError, did_you_mean
from pipeline.files import sha256_file

if TYPE_CHECKING:
    import keras

POOLINGS = ("avg", "max", "flatten")

# Preprocessing modes, as keras.applications.imagenet_utils defines them.
# "none" means the model rescales inside itself and wants raw 0..255 RGB.
PREPROCESSING_MODES = ("caffe", "tf", "torch", "none")
_CAFFE_BGR_MEAN = np.array([103.939, 116.779, 123.68], dtype=np.float32)
_TORCH_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_TORCH_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


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

    Matches ``keras.applications.imagenet_utils.preprocess_input`` for
    ``caffe`` (RGB to BGR, minus the BGR means), ``tf`` (scale to [-1, 1]) and
    ``torch`` (scale to [0, 1], ImageNet mean and std); ``none`` returns 0..255.
    """
    x = batch.astype(np.float32)  # a copy: the caller's array is never touched
    if mode == "caffe":
        x = x[..., ::-1] - _CAFFE_BGR_MEAN
    elif mode == "tf":
        x *= 1.0 / 127.5
        x -= 1.0
    elif mode == "torch":
        x *= 1.0 / 255.0
        x -= _TORCH_MEAN
        x /= _TORCH_STD
    elif mode != "none":
        raise BackboneError(
            f"unknown preprocessing mode {mode!r}; expected one of {', '.join(PREPROCESSING_MODES)}"
        )
    return np.ascontiguousarray(x, dtype=np.float32)


def _spec(name, builder, prep, default, minimum, channels, grid, params, **kwargs) -> BackboneSpec:
    return BackboneSpec(name, builder, prep, default, minimum, channels, grid, params, kwargs)


# Parameters and grids are those of the headless Keras models; the test suite
# builds every entry with weights=None and checks these numbers against it.
_REGISTRY: tuple[BackboneSpec, ...] = (
    _spec("xception", "Xception", "tf", 299, 71, 2048, 10, 20861480),
    _spec("vgg16", "VGG16", "caffe", 224, 32, 512, 7, 14714688),
    _spec("vgg19", "VGG19", "caffe", 224, 32, 512, 7, 20024384),
    _spec("resnet50", "ResNet50", "caffe", 224, 32, 2048, 7, 23587712),
    _spec("resnet101", "ResNet101", "caffe", 224, 32, 2048, 7, 42658176),
    _spec("resnet152", "ResNet152", "caffe", 224, 32, 2048, 7, 58370944),
    _spec("resnet50_v2", "ResNet50V2", "tf", 224, 32, 2048, 7, 23564800),
    _spec("resnet101_v2", "ResNet101V2", "tf", 224, 32, 2048, 7, 42626560),
    _spec("resnet152_v2", "ResNet152V2", "tf", 224, 32, 2048, 7, 58331648),
    _spec("inception_v3", "InceptionV3", "tf", 299, 75, 2048, 8, 21802784),
    _spec("inception_resnet_v2", "InceptionResNetV2", "tf", 299, 75, 1536, 8, 54336736),
    _spec("mobilenet", "MobileNet", "tf", 224, 32, 1024, 7, 3228864),
    _spec("mobilenet_025", "MobileNet", "tf", 224, 32, 256, 7, 218544, alpha=0.25),
    _spec("mobilenet_v2", "MobileNetV2", "tf", 224, 32, 1280, 7, 2257984),
    _spec("mobilenet_v3_small", "MobileNetV3Small", "none", 224, 32, 576, 7, 939120),
    _spec("mobilenet_v3_large", "MobileNetV3Large", "none", 224, 32, 960, 7, 2996352),
    _spec("densenet121", "DenseNet121", "torch", 224, 32, 1024, 7, 7037504),
    _spec("densenet169", "DenseNet169", "torch", 224, 32, 1664, 7, 12642880),
    _spec("densenet201", "DenseNet201", "torch", 224, 32, 1920, 7, 18321984),
    _spec("nasnet_mobile", "NASNetMobile", "tf", 224, 32, 1056, 7, 4269716),
    _spec("nasnet_large", "NASNetLarge", "tf", 331, 32, 4032, 11, 84916818),
    _spec("efficientnet_b0", "EfficientNetB0", "none", 224, 32, 1280, 7, 4049571),
    _spec("efficientnet_b1", "EfficientNetB1", "none", 240, 32, 1280, 8, 6575239),
    _spec("efficientnet_b2", "EfficientNetB2", "none", 260, 32, 1408, 9, 7768569),
    _spec("efficientnet_b3", "EfficientNetB3", "none", 300, 32, 1536, 10, 10783535),
    _spec("efficientnet_b4", "EfficientNetB4", "none", 380, 32, 1792, 12, 17673823),
    _spec("efficientnet_b5", "EfficientNetB5", "none", 456, 32, 2048, 15, 28513527),
    _spec("efficientnet_b6", "EfficientNetB6", "none", 528, 32, 2304, 17, 40960143),
    _spec("efficientnet_b7", "EfficientNetB7", "none", 600, 32, 2560, 19, 64097687),
    _spec("efficientnet_v2_b0", "EfficientNetV2B0", "none", 224, 32, 1280, 7, 5919312),
    _spec("efficientnet_v2_b1", "EfficientNetV2B1", "none", 240, 32, 1280, 8, 6931124),
    _spec("efficientnet_v2_b2", "EfficientNetV2B2", "none", 260, 32, 1408, 9, 8769374),
    _spec("efficientnet_v2_b3", "EfficientNetV2B3", "none", 300, 32, 1536, 10, 12930622),
    _spec("efficientnet_v2_s", "EfficientNetV2S", "none", 384, 32, 1280, 12, 20331360),
    _spec("efficientnet_v2_m", "EfficientNetV2M", "none", 480, 32, 1280, 15, 53150388),
    _spec("efficientnet_v2_l", "EfficientNetV2L", "none", 480, 32, 1280, 15, 117746848),
    _spec("convnext_tiny", "ConvNeXtTiny", "none", 224, 32, 768, 7, 27820128),
    _spec("convnext_small", "ConvNeXtSmall", "none", 224, 32, 768, 7, 49454688),
    _spec("convnext_base", "ConvNeXtBase", "none", 224, 32, 1024, 7, 87566464),
    _spec("convnext_large", "ConvNeXtLarge", "none", 224, 32, 1536, 7, 196230336),
    _spec("convnext_xlarge", "ConvNeXtXLarge", "none", 224, 32, 2048, 7, 348147968),
)
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
        try:
            return builder(weights="imagenet", **kwargs)
        except Exception as exc:  # Keras raises a bare Exception for a failed download
            raise _download_error(spec, exc) from None
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
