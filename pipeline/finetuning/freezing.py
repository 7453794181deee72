"""Which backbone layers stage three trains: ``UNFREEZE`` parsing, block detection, freezing.

``UNFREEZE`` counts every Keras layer of the headless backbone from its end,
weightless ones too, as the Keras transfer-learning guide's
``base_model.layers[fine_tune_at:]`` does. BatchNormalization layers are never
made trainable: they stay frozen and, with the base called with
``training=False``, in inference mode.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np

from pipeline.core.errors import FinetuneError, did_you_mean
from pipeline.core.options import LAYER_WORDS

if TYPE_CHECKING:
    import keras

# Layer names that mark a block in keras.applications models (mobilenet_v2
# "block_16_...", resnet "conv5_block3_...", efficientnet "block7a_...",
# densenet "conv5_block16_...", mobilenet "conv_pw_13...", inception "mixed10").
_BLOCK_NAME = re.compile(r"(?:^|_)(block_?\d+[a-z]?)(?:_|$)|conv_(?:dw|pw|pad)_(\d+)|^(mixed_?\d+)")


def parse_layers(value: int | str) -> int | str:
    """``UNFREEZE`` as a count (``int >= 0``) or one of ``"all"``, ``"block"``.

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
                f"UNFREEZE must be a whole number >= 0, 'all' or 'block'; got {value!r}"
                f"{did_you_mean(text, LAYER_WORDS)}"
            )
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise FinetuneError(
            f"UNFREEZE must be a whole number >= 0, 'all' or 'block'; got {value!r}"
        )
    if value < 0:
        raise FinetuneError(
            f"UNFREEZE must be >= 0 (0 trains the head only, 'all' every layer); got {value}"
        )
    return int(value)


def backbone_layers(base: keras.Model) -> list[keras.layers.Layer]:
    """The layers ``UNFREEZE`` counts: every layer of the headless backbone but its input."""
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
            f"UNFREEZE={layers} is more than the depth of {backbone} ({depth} layers); "
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
