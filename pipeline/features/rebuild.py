"""Rebuilding from images the features a head was fit on, when they are more than one
backbone pass: multi-view caches (``VIEWS=``) and joined caches (``FEATURES=a+b``),
``make auto``'s winners.

Each part is rebuilt from the configuration its cache recorded (read back from the
head's manifest, validated), checked against that record
(:func:`pipeline.features.records.extractor_identity`), run over the images through stage
one's view machinery (:mod:`pipeline.features.views`; a plain part is one view), normalised
as :mod:`pipeline.features.joins` normalised it, and concatenated in the join's order.
:mod:`pipeline.predict` applies the head.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.artifacts import Artifacts, safe_name
from pipeline.core.errors import PredictError
from pipeline.data.images import skipped_images
from pipeline.features import views as views_module
from pipeline.features.cache import load_features
from pipeline.features.config import PRECISION_WORDS, FeatureConfig, resolve_features
from pipeline.features.extractor import build_extractor
from pipeline.features.joins import normalise_part, shared_paths, train_statistics
from pipeline.features.records import extractor_identity


def feature_parts(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The stage-one configurations a head's features were made from: one per joined part
    (``[{"stem", "config_json", "fingerprint"}]`` of a joined cache), or the cache's own."""
    try:
        identity = json.loads(manifest.get("config_json") or "{}")
    except (TypeError, ValueError):
        identity = {}
    if not isinstance(identity, dict):
        identity = {}
    if "parts" in identity:
        out = []
        for part in identity["parts"] if isinstance(identity["parts"], list) else []:
            try:
                config = json.loads(part["config_json"])
            except (TypeError, ValueError, KeyError):
                config = None
            if not isinstance(config, dict):
                raise PredictError(
                    f"the joined cache's identity of head {manifest.get('name')!r} is damaged; "
                    "re-run `make head` on the joined cache"
                )
            out.append({"stem": part.get("stem"), "fingerprint": part.get("fingerprint"), **config})
        return out
    return [identity]


def is_plain(parts: Sequence[Mapping[str, Any]]) -> bool:
    """One part without views: stage one's plain extractor (the fast path)."""
    return len(parts) == 1 and not parts[0].get("views")


def parts_extractor(
    head: Any, parts: Sequence[Mapping[str, Any]], source: str, artifacts_dir: str | Path
) -> Callable[..., tuple[list[str], np.ndarray | None, list[tuple[str, str]]]]:
    """The features a head fit on multi-view or joined features (``make auto``'s winners)
    takes, computed from images: ``(root, paths, batch_size, log) -> (kept paths, features,
    skipped (path, reason) pairs)``.

    Each part's extractor is rebuilt from its recorded configuration (backbone, input
    size, pooling, cut layer, views) with the head's weights, checked against that
    configuration (:func:`pipeline.features.records.extractor_identity`: another Keras version
    or weights file is refused), run over the images as stage one runs it
    (:mod:`pipeline.features.views`; a plain part is one view), normalised as the join
    normalised it and concatenated in the join's order.
    """

    m = head.manifest
    try:
        identity = json.loads(m.get("config_json") or "{}")
    except (TypeError, ValueError):
        identity = {}
    joined = isinstance(identity, dict) and "parts" in identity
    norm = identity.get("join_norm") if joined else None
    if joined and norm not in ("l2", "standard"):
        raise PredictError(
            f"head {head.path}: its joined cache records JOIN_NORM={norm!r}, not l2 or standard; "
            "re-run `make head` on the joined cache"
        )
    if len({str(part.get("weights")) for part in parts}) > 1:
        raise PredictError(
            f"head {head.path} joins parts of different weights ({source}), which `make predict` "
            "cannot tell apart; join parts of one weights source"
        )
    extractors = [
        _rebuild_part(head, n, part, source, artifacts_dir) for n, part in enumerate(parts)
    ]
    statistics = (
        _join_statistics(parts, m, artifacts_dir) if norm == "standard" else [None] * len(parts)
    )
    width = sum(int(multi.output_shape[-1]) for _, _, multi in extractors)
    if width != int(m["feature_width"]):
        raise PredictError(
            f"the rebuilt features of head {head.path} are {width} wide, the head takes "
            f"{m['feature_width']}; re-run `make features` and `make head` for it"
        )

    def extract(root: Path, paths: Sequence[str], batch_size: int, log: Any = None):
        rows: list[dict[str, np.ndarray]] = []
        skipped: dict[str, str] = {}
        for resolved, view_list, multi in extractors:
            multi.batch_size = batch_size
            found: dict[str, np.ndarray] = {}
            for batch in views_module.iter_view_batches(
                root, paths, view_list, batch_size=batch_size, preprocess=resolved.spec.preprocess
            ):
                for path, reason in skipped_images(batch, paths, log if not rows else None):
                    skipped.setdefault(path, reason)
                if batch.ok.any():
                    features = multi.features(batch.inputs)
                    for i, vector in zip(np.flatnonzero(batch.ok), features, strict=True):
                        found[paths[batch.start + i]] = vector
            rows.append(found)
        kept = [p for p in paths if all(p in found for found in rows)]
        gone = [(p, skipped[p]) for p in paths if p in skipped]
        if not kept:
            return kept, None, gone
        blocks = []
        for found, stats in zip(rows, statistics, strict=True):
            block = np.stack([found[p] for p in kept])
            blocks.append(normalise_part(block, norm, stats) if norm else block)
        return kept, np.concatenate(blocks, axis=1), gone

    return extract


def _rebuild_part(
    head: Any, number: int, part: Mapping[str, Any], source: str, artifacts_dir: str | Path
) -> tuple[Any, Any, Any]:
    """One part's extractor, from its recorded configuration, checked against it:
    ``(resolved features, views, a model with .features(inputs))``."""

    where = f"part {number + 1} ({part.get('stem') or 'its cache'}) of head {head.path}"
    try:
        if "parts" in part:
            raise PredictError(f"{where} is itself a join; join plain or multi-view caches")
        views = part.get("views") or None
        config = FeatureConfig(
            backbone=str(part["backbone"]),
            weights=source,
            input_size=int(part["input_size"]),
            pooling=str(part["pooling"]),
            layer=str(part.get("layer") or "") or None,
            precision=PRECISION_WORDS.get(str(part.get("precision")), "float32"),
            storage=str(part.get("dtype") or "float32"),
            views=views_module.Views.from_identity(views).text() if views else None,
            combine=str(views.get("combine", "mean")) if isinstance(views, dict) else "mean",
            runtime="keras",  # every runtime was checked against Keras when used
        )
        resolved = resolve_features(config, artifacts_dir=artifacts_dir)
    except PredictError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PredictError(
            f"the recorded configuration of {where} is damaged ({exc}); re-run `make head`"
        ) from None
    rebuilt = extractor_identity(resolved)
    differs = [
        f"{key} {part.get(key)!r} (rebuilt here: {value!r})"
        for key, value in rebuilt.items()
        if part.get(key) != value
    ]
    if differs:
        raise PredictError(
            f"{where} cannot be rebuilt as it was made: {'; '.join(differs)}; re-run "
            "`make features` and `make head` here"
        )
    view_list = resolved.views or views_module.Views(scales=(resolved.input_size,))
    model = build_extractor(resolved)
    if resolved.views is None:  # a plain part is its one view
        model = views_module.MultiViewModel({resolved.input_size: model}, view_list, 32)
    return resolved, view_list, model


def _join_statistics(
    parts: Sequence[Mapping[str, Any]], manifest: Mapping[str, Any], artifacts_dir: str | Path
) -> list[tuple[np.ndarray, np.ndarray]]:
    """A ``JOIN_NORM=standard`` join's train mean and deviation per part, as the join computed
    them: from the parts' own caches (checked against the fingerprints it recorded), over
    the train images every part holds."""

    dataset = manifest.get("dataset")
    sets = []
    for part in parts:
        stem = part.get("stem")
        if not stem or not dataset:
            raise PredictError("a standardised join names no part caches; re-run `make head` on it")
        path = Artifacts(artifacts_dir).cache_path(safe_name(str(dataset)), safe_name(str(stem)))
        if not path.is_file():
            raise PredictError(
                f"{path} is missing: a JOIN_NORM=standard head needs its parts' train statistics; "
                "re-run the `make features` that made it"
            )
        fs = load_features(path)
        if fs.attrs.get("fingerprint") != part.get("fingerprint"):
            raise PredictError(
                f"{path} changed since the join was made; re-run `make head FEATURES=...` on the join"
            )
        sets.append(fs)
    common = shared_paths(sets)
    out = []
    for fs in sets:
        rows = np.array([p in common for p in fs.paths.tolist()])
        out.append(train_statistics(fs.features[rows], fs.split[rows] == "train"))
    return out
