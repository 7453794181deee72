"""The near-duplicate threshold, calibrated on the user's own images.

A sample of the data set's images is copied the ways a duplicate usually arises (shrunk
and re-encoded as JPEG, cropped by a few percent, re-encoded at low quality); the
backbone the cache was made with computes the features of originals and copies alike,
and the threshold is a low quantile of the cosine between each original and its copies:
a copy made like these would be found with that probability. Where the backbone cannot
run (a joined or multi-view cache, images gone), or where that threshold is not above
most nearest-neighbour similarities (copies of tiny images change too much),
:func:`~pipeline.audit.neighbours.neighbour_threshold` is the rule instead; the audit
records which rule it used and why.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.audit.neighbours import unit_rows
from pipeline.data.images import ImageError

SAMPLE = 16  # images copied; three copies each
QUANTILE = 5.0  # percent of such copies the threshold may miss
# The copies' threshold is used only above this percentile of every image's cosine to its
# nearest other image: else it would join distinct images (a duplicate-heavy set still passes).
NEIGHBOUR_PERCENTILE = 90.0


@dataclass
class Calibration:
    """The threshold and how it was found (recorded in ``audit.json``)."""

    threshold: float
    rule: str
    copy_similarities: list[float]

    def as_dict(self) -> dict[str, Any]:
        sims = np.asarray(self.copy_similarities)
        spread = (
            {"min": float(sims.min()), "median": float(np.median(sims)), "n": len(sims)}
            if len(sims)
            else None
        )
        return {"threshold": self.threshold, "rule": self.rule, "copies": spread}


def _copies(image: Image.Image) -> list[Image.Image]:
    """Three copies of one photo as duplicates usually arise."""
    w, h = image.size

    def jpeg(img: Image.Image, quality: int) -> Image.Image:
        buffer = io.BytesIO()
        img.save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        return Image.open(buffer).convert("RGB")

    shrunk = image.resize((max(1, w // 2), max(1, h // 2)), Image.BILINEAR)
    dx, dy = int(round(w * 0.05)), int(round(h * 0.05))
    cropped = image.crop((dx, dy, w - dx, h - dy)) if w > 20 and h > 20 else image
    return [jpeg(shrunk, 85), jpeg(cropped, 90), jpeg(image, 40)]


def copy_pixels(root: Path | None, paths: Sequence[str], seed: int) -> tuple[list, list]:
    """Originals and their copies as uint8 arrays (a sample of ``paths``, read inside ``root``)."""
    if root is None:
        return [], []
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(paths), size=min(SAMPLE, len(paths)), replace=False)
    root = root.resolve()
    originals, copies = [], []
    for i in sorted(picks.tolist()):
        path = (root / paths[i]).resolve()
        if not path.is_relative_to(root):
            continue
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except (OSError, ValueError, ImageError, Image.DecompressionBombError):
            continue
        originals.append(np.asarray(image))
        copies.append([np.asarray(c) for c in _copies(image)])
    return originals, copies


def calibrate_on_copies(
    originals: list[np.ndarray], copies: list[list[np.ndarray]], embed: Callable[[list], np.ndarray]
) -> Calibration:
    """The ``QUANTILE`` percentile of the cosine between each original and its copies."""
    flat = [c for group in copies for c in group]
    x = unit_rows(embed(originals + flat))
    base, rest = x[: len(originals)], x[len(originals) :]
    sims = []
    for i, group in enumerate(copies):
        for j in range(len(group)):
            sims.append(float(base[i] @ rest[3 * i + j]))
    threshold = float(np.percentile(sims, QUANTILE))
    rule = (
        f"copies: the {QUANTILE:g}th percentile of the feature cosine between {len(originals)} "
        "of your images and 3 copies of each (shrunk to half and saved as JPEG, cropped "
        "by 5% a side, re-encoded at JPEG quality 40)"
    )
    return Calibration(round(threshold, 4), rule, sims)


def backbone_embedder(attrs: dict[str, Any]) -> Callable[[list], np.ndarray] | None:
    """The cache's own backbone over in-memory images, or ``None`` where it cannot be rebuilt."""
    if attrs.get("views") or not attrs.get("backbone") or attrs.get("cache_parts"):
        return None
    from pipeline.features.transformer import ImageFeatures

    layer = str(attrs.get("layer") or "") or None
    model = ImageFeatures(
        str(attrs["backbone"]),
        weights=str(attrs.get("weights_source") or attrs.get("weights") or "imagenet"),
        input_size=int(attrs["input_size"]),
        pooling=str(attrs.get("pooling") or "avg"),
        layer=layer,
        runtime="keras",
    )
    return model.transform
