"""Several views of each image in one pass of stage one: scales, flips, jitter crops.

``VIEWS=224,320,448+flip COMBINE=mean|concat`` (``--views``, ``--combine``) runs the
backbone on each image at every listed scale, and on its horizontal mirror with
``+flip``; ``+crops`` adds Razavian et al.'s (2014) jitter: the four corner crops
of the image resized to 8/7 of the scale (256 px for 224), beside the whole image.

How views become one vector: the views of one scale (flip, crops) are always
averaged (they are the same geometry jittered; concatenating them would tie a
feature to "the mirrored copy"); the scales are then averaged (``mean``: the
backbone's width) or concatenated in the order given (``concat``: width times the
number of scales). The mean of raw (not normalised) vectors keeps a single view
exactly what stage one computes without views.

A view list that is just the backbone's input size with no flip and no crops
resolves to ``None``: no views, today's code path, today's cache name and
identity. Anything else is recorded in the cache's ``config_json``, its
``views`` attributes and its name (``..._<pooling>_views-224-320-448-flip-mean_...``).

Images are decoded once per scale by :func:`pipeline.data.images.iter_batches` (one
stream per size, all advancing together), so the folder is read in one pass and
every view goes through the same robust decoding; an image unreadable at any
scale is skipped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.options import MAX_INPUT_SIZE, check_options
from pipeline.data.images import default_workers, iter_batches
from pipeline.features import backbones

CROP_ENLARGE = 8 / 7  # 256 px for 224: the resize before Keras/Caffe's centre crops
_WORDS = ("flip", "crops")


@dataclass(frozen=True)
class Views:
    """A resolved view list.

    Parameters
    ----------
    scales : tuple of int
        Square input sides, in order (the order of ``concat``).
    flip : bool
        Add each view's horizontal mirror (averaged with it).
    crops : bool
        Add the four corner crops of the image resized to ``CROP_ENLARGE`` times
        the scale (averaged with the whole image).
    combine : {"mean", "concat"}
        How the scales' vectors become one.
    """

    scales: tuple[int, ...]
    flip: bool = False
    crops: bool = False
    combine: str = "mean"

    @property
    def per_scale(self) -> int:
        """Views averaged within one scale."""
        return (2 if self.flip else 1) * (5 if self.crops else 1)

    @property
    def count(self) -> int:
        """Forward passes per image."""
        return len(self.scales) * self.per_scale

    def text(self) -> str:
        """As the user types it: ``224,320,448+flip``."""
        words = [w for w, on in zip(_WORDS, (self.flip, self.crops), strict=True) if on]
        return "+".join([",".join(map(str, self.scales)), *words])

    @property
    def tag(self) -> str:
        """The cache name's part: ``views-224-320-448-flip-mean``."""
        words = [w for w, on in zip(_WORDS, (self.flip, self.crops), strict=True) if on]
        return "-".join(["views", *map(str, self.scales), *words, self.combine])

    def identity(self) -> dict[str, Any]:
        """What goes into the cache's ``config_json``."""
        return {
            "scales": list(self.scales),
            "flip": self.flip,
            "crops": self.crops,
            "combine": self.combine,
            "crop_enlarge": round(CROP_ENLARGE, 6) if self.crops else None,
        }

    @classmethod
    def from_identity(cls, identity: Any) -> Views:
        """The views a cache recorded (:meth:`identity`), checked: it was read from disk."""
        try:
            scales = tuple(int(s) for s in identity["scales"])
            views = cls(
                scales, bool(identity["flip"]), bool(identity["crops"]), identity["combine"]
            )
        except (TypeError, KeyError, ValueError):
            raise PipelineError(f"recorded views {identity!r} are damaged") from None
        if not scales or views.combine not in ("mean", "concat") or min(scales) < 1:
            raise PipelineError(f"recorded views {identity!r} are damaged")
        if views.crops and identity.get("crop_enlarge") != round(CROP_ENLARGE, 6):
            raise PipelineError(
                f"recorded views crop at {identity.get('crop_enlarge')}, this version at "
                f"{round(CROP_ENLARGE, 6)}; re-run `make features` and `make head`"
            )
        return views

    def width(self, view_width: int) -> int:
        """The combined vector's width, for a backbone giving ``view_width`` per view."""
        return view_width * (len(self.scales) if self.combine == "concat" else 1)


def parse_views(
    text: str | None,
    *,
    combine: str = "mean",
    input_size: int,
    minimum: int = 1,
    pooling: str = "avg",
) -> Views | None:
    """Resolve ``VIEWS=`` text; ``None`` for the plain single view (today's stage one).

    Parameters
    ----------
    text : str or None
        ``"224,320,448+flip"``, ``"+flip"`` (the input size, mirrored),
        ``"224+flip+crops"``; ``None`` or ``""``: no views.
    combine : {"mean", "concat"}
        How scales become one vector.
    input_size : int
        The resolved input size: the scale when ``text`` lists none.
    minimum : int
        The backbone's smallest input side.
    pooling : str
        ``flatten`` gives a width that depends on the scale: only one scale then.

    Raises
    ------
    PipelineError
        A malformed list, a scale out of bounds, an unknown word or ``COMBINE``.

    Examples
    --------
    >>> parse_views("224,320+flip", input_size=224).tag
    'views-224-320-flip-mean'
    >>> parse_views("224", input_size=224) is None
    True
    """

    check_options({"combine": combine})
    if text is None or not str(text).strip():
        return None
    parts = [p.strip().lower() for p in str(text).split("+")]
    scales_text, words = parts[0], parts[1:]
    for word in words:
        if word not in _WORDS:
            raise PipelineError(
                f"VIEWS= (--views) takes scales and +flip, +crops; got {word!r} in {text!r} "
                "(e.g. VIEWS=224,320,448+flip)"
            )
    scales: list[int] = []
    for item in filter(None, re.split(r"[,\s]+", scales_text)):
        if not item.isdigit() or not minimum <= int(item) <= MAX_INPUT_SIZE:
            raise PipelineError(
                f"VIEWS= (--views) scales must be whole numbers in [{minimum}, {MAX_INPUT_SIZE}]; "
                f"got {item!r} in {text!r}"
            )
        if int(item) not in scales:
            scales.append(int(item))
    views = Views(
        scales=tuple(scales) or (input_size,),
        flip="flip" in words,
        crops="crops" in words,
        combine=combine,
    )
    if views.scales == (input_size,) and views.per_scale == 1:
        return None  # the plain view: today's features, name and identity
    if pooling == "flatten" and len(views.scales) > 1 and combine == "mean":
        raise PipelineError(
            "POOLING=flatten gives a width per scale; several VIEWS scales need COMBINE=concat "
            "or POOLING=avg"
        )
    return views


# --------------------------------------------------------------------------- the model


class MultiViewModel:
    """One frozen feature extractor per scale, and how their views become one vector.

    ``output_shape`` is that of the combined vector, as for a Keras model, so
    stage one sizes its cache the same way.
    """

    def __init__(self, models: dict[int, Any], views: Views, batch_size: int) -> None:
        self.models = models
        self.views = views
        self.batch_size = batch_size
        view_width = int(next(iter(models.values())).output_shape[-1])
        self.output_shape = (None, views.width(view_width))

    def features(self, inputs: dict[int, np.ndarray]) -> np.ndarray:
        """Combined features of a batch: ``inputs`` maps each decoded size to its batch.

        A size is a scale (the whole image) or, with crops, the enlarged
        image the corner crops are cut from.
        """
        per_scale = []
        for scale in self.views.scales:
            views = [inputs[scale]]
            if self.views.crops:
                big = inputs[crop_source(scale)]
                views += list(corner_crops(big, scale))
            if self.views.flip:
                views += [v[:, :, ::-1, :] for v in views]
            model = self.models[scale]
            total = sum(_forward(model, v, self.batch_size) for v in views)
            per_scale.append(total / len(views) if len(views) > 1 else total)
        if self.views.combine == "concat":
            return np.concatenate(per_scale, axis=1)
        return per_scale[0] if len(per_scale) == 1 else sum(per_scale) / len(per_scale)


def crop_source(scale: int) -> int:
    """The side of the image the corner crops of ``scale`` are cut from."""
    return int(round(scale * CROP_ENLARGE))


def corner_crops(x: np.ndarray, side: int) -> Iterator[np.ndarray]:
    """The four ``side`` x ``side`` corner crops of a batch ``(n, h, w, c)``."""
    h, w = x.shape[1:3]
    for top in (0, h - side):
        for left in (0, w - side):
            yield x[:, top : top + side, left : left + side, :]


def _forward(model: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
    """As :func:`pipeline.features.extractor.forward_batch`: short batches zero-padded to one compiled shape."""
    n = len(x)
    if n == 0:
        return np.zeros((0, model.output_shape[-1]), np.float32)
    x = np.ascontiguousarray(x)
    if n < batch_size:
        x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), x.dtype)])
    return np.asarray(model.predict_on_batch(x), dtype=np.float32)[:n]


def build_model(resolved: Any) -> MultiViewModel:
    """The per-scale Keras extractors of a resolved stage-one config with views."""

    config, views = resolved.config, resolved.views
    models = {}
    with backbones.dtype_policy(resolved.runtime.keras_policy):
        for scale in views.scales:
            models[scale] = backbones.build_feature_extractor(
                resolved.spec,
                weights=config.weights,
                input_size=scale,
                pooling=config.pooling,
                layer=config.layer,
            )
    return MultiViewModel(models, views, config.batch_size)


# --------------------------------------------------------------------------- the pass


@dataclass
class ViewBatch:
    """One batch of records decoded at every size the views need."""

    start: int
    inputs: dict[int, np.ndarray]
    ok: np.ndarray
    errors: dict[int, str]

    @property
    def size(self) -> int:
        return len(self.ok)


def sizes_needed(views: Views) -> list[int]:
    """Every decoded size: the scales, and the crops' enlarged sources."""
    sizes = list(views.scales)
    if views.crops:
        sizes += [crop_source(s) for s in views.scales if crop_source(s) not in sizes]
    return sizes


def iter_view_batches(
    root: str | Path,
    paths: Sequence[str],
    views: Views,
    *,
    batch_size: int,
    preprocess: Any,
    start: int = 0,
    workers: int | None = None,
) -> Iterator[ViewBatch]:
    """Batches of ``paths[start:]`` decoded at every size of ``views``, in step.

    One :func:`pipeline.data.images.iter_batches` stream per size; an image that fails
    at any size is skipped (with the first reason), so all views cover the same
    images.
    """

    sizes = sizes_needed(views)
    workers = max(1, (workers or default_workers()) // len(sizes))
    streams = [
        iter_batches(
            root,
            paths,
            size=size,
            batch_size=batch_size,
            preprocess=preprocess,
            start=start,
            workers=workers,
        )
        for size in sizes
    ]
    for batches in zip(*streams, strict=True):
        ok = np.logical_and.reduce([b.ok for b in batches])
        errors: dict[int, str] = {}
        for b in batches:
            for offset, reason in b.errors.items():
                errors.setdefault(offset, reason)
        inputs = {}
        for size, b in zip(sizes, batches, strict=True):
            keep = ok[np.flatnonzero(b.ok)]  # rows of b.x readable at every size
            inputs[size] = b.x if keep.all() else b.x[keep]
        for offset in np.flatnonzero(~ok):
            errors.setdefault(int(offset), "unreadable at one of the VIEWS scales")
        yield ViewBatch(batches[0].start, inputs, ok, dict(sorted(errors.items())))


def batches(
    model: MultiViewModel, folder: Any, resolved: Any, start: int
) -> tuple[Iterator[ViewBatch], Callable[[ViewBatch], np.ndarray], str]:
    """Stage one with views: the remaining batches, the forward pass over one, a progress label.

    :func:`pipeline.features.extract.extract_features` runs its one loop over them.
    """
    config, spec, views = resolved.config, resolved.spec, resolved.views
    found = iter_view_batches(
        folder.root,
        [r.path for r in folder.records],
        views,
        batch_size=config.batch_size,
        preprocess=spec.preprocess,
        start=start,
        workers=config.workers,
    )
    return (
        found,
        lambda batch: model.features(batch.inputs),
        f"{spec.name} features, {views.count} views",
    )
