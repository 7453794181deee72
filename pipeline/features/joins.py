"""Joined caches: several stage-one caches of the same images as one feature set.

``make head FEATURES=a.h5+b.h5`` (``python -m pipeline head --features a.h5+b.h5``)
joins caches of the same images (other scales, layers or backbones) by image
path: each part is normalised (``JOIN_NORM=l2``, per image, or ``standard``,
with the mean and deviation of its train split only), then the parts are
concatenated, so one part's scale cannot drown another's. Images missing from a
part are dropped, with a note; an image whose class or split differs between
parts is refused (they were not made from the same folder and split).

The result is an ordinary cache file written by :class:`pipeline.features.cache_writer.CacheWriter`
under ``artifacts/features/<dataset>/join_<stem a>+<stem b>_<norm>.h5``, so stage
two, the report and its checks read it like any other; its ``backbone`` and
``cache_parts`` attributes name every part, and a second run with the same parts
(same fingerprints and configurations) reuses it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.artifacts import Artifacts, safe_name
from pipeline.core.errors import CacheError
from pipeline.core.options import check_options
from pipeline.features import cache, cache_writer


@dataclass
class JoinResult:
    """A joined cache and what joining dropped."""

    path: Path
    status: str  # "built" or "up to date"
    parts: list[Path]
    n_images: int
    width: int
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        head = f"{self.status} {self.path}: {len(self.parts)} caches joined, "
        return "\n".join([*self.notes, head + f"{self.n_images} images, width {self.width}"])


def split_features_arg(text: str) -> list[str]:
    """``"a.h5+b.h5"`` (or commas) -> ``["a.h5", "b.h5"]``."""
    return [p for p in (s.strip() for s in text.replace(",", "+").split("+")) if p]


def resolve_parts(items: Sequence[str | Path], features_dir: Path | None = None) -> list[Path]:
    """Cache files from paths or stems (``mobilenet_v2_320_avg_imagenet``) under ``features_dir``.

    Raises
    ------
    CacheError
        Fewer than two parts, or a part that is not a file.
    """
    paths = []
    for item in items:
        path = Path(item)
        if not path.is_file() and features_dir is not None:
            stem = path.name[:-3] if path.name.endswith(".h5") else path.name
            path = features_dir / f"{stem}.h5"
        if not path.is_file():
            where = f" or in {features_dir}" if features_dir else ""
            raise CacheError(
                f"FEATURES= part {item!r} is not a cache file{where}; run `make features` "
                "for it first"
            )
        paths.append(path)
    if len(paths) < 2:
        raise CacheError("FEATURES= joins two caches or more: FEATURES=a.h5+b.h5")
    return paths


def train_statistics(x: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and deviation of a part over its train rows (``JOIN_NORM=standard``)."""
    x = np.asarray(x, dtype=np.float32)
    return x[train].mean(axis=0), x[train].std(axis=0)  # train only: val and test stay unseen


def normalise_part(
    x: np.ndarray, norm: str, statistics: tuple[np.ndarray, np.ndarray] | None = None
) -> np.ndarray:
    """One part of a join, normalised as the join did: L2 per image, or standardised with
    ``statistics`` (:func:`train_statistics` of the part's train rows)."""
    x = np.asarray(x, dtype=np.float32)
    if norm == "l2":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.maximum(norms, 1e-12)
    if statistics is None:
        raise ValueError("JOIN_NORM=standard needs the train statistics of the part")
    mean, std = statistics
    return (x - mean) / np.where(std > 1e-12, std, 1.0)


def shared_paths(sets: Sequence[cache.FeatureSet]) -> set[str]:
    """The image paths every set holds: the rows of their join."""
    common = set(sets[0].paths.tolist())
    for other in sets[1:]:
        common &= set(other.paths.tolist())
    return common


def join_features(
    sets: Sequence[cache.FeatureSet], norm: str = "l2"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Join loaded feature sets by image path.

    Returns ``(features, labels, paths, split, notes)``, rows in the first set's
    order, restricted to the paths every set holds.

    Raises
    ------
    CacheError
        Other class lists, or an image whose class or split differs between sets.
    """
    check_options({"join_norm": norm}, error=CacheError)
    first = sets[0]
    for other in sets[1:]:
        if tuple(other.class_names) != tuple(first.class_names):
            raise CacheError(
                f"{other.path} has classes {list(other.class_names)}, {first.path} "
                f"{list(first.class_names)}: join caches of the same image folder"
            )
    common = shared_paths(sets)
    notes = []
    for fs in sets:
        missing = len(fs.paths) - len(common)
        if missing:
            notes.append(f"note: {missing} images of {fs.path.name} are not in every part; dropped")
    if not common:
        raise CacheError("the caches share no image path; join caches of the same image folder")
    order = [p for p in first.paths.tolist() if p in common]
    index_first = {p: i for i, p in enumerate(first.paths.tolist())}
    ref = np.array([index_first[p] for p in order], dtype=np.int64)
    labels, split = first.labels[ref], first.split[ref]
    blocks = []
    for fs in sets:
        index = {p: i for i, p in enumerate(fs.paths.tolist())}
        rows = np.array([index[p] for p in order], dtype=np.int64)
        bad = (fs.labels[rows] != labels) | (fs.split[rows] != split)
        if bad.any():
            where = order[int(np.flatnonzero(bad)[0])]
            raise CacheError(
                f"image {where} has another class or split in {fs.path.name} than in "
                f"{first.path.name}: join caches made with the same split (SEED=, fractions)"
            )
        statistics = train_statistics(fs.features[rows], split == "train") if norm != "l2" else None
        blocks.append(normalise_part(fs.features[rows], norm, statistics))
    features = np.concatenate(blocks, axis=1)
    return features, labels, first.paths[ref], split, notes


def joined_stem(parts: Sequence[Path], norm: str) -> str:
    """``join_<stem a>+<stem b>_<norm>`` (hashed when too long for a file name)."""
    stem = "join_" + "+".join(p.stem for p in parts) + f"_{norm}"
    if len(stem) > 200:
        digest = hashlib.sha256(stem.encode()).hexdigest()[:12]
        stem = f"join_{parts[0].stem}+{len(parts) - 1}more_{digest}_{norm}"
    return safe_name(stem)


def join_caches(
    parts: Sequence[str | Path],
    *,
    norm: str = "l2",
    artifacts_dir: str | Path = "artifacts",
    output: str | Path | None = None,
    log: Callable[[str], Any] | None = None,
) -> JoinResult:
    """Write (or reuse) the joined cache of ``parts``.

    Parameters
    ----------
    parts : sequence of path
        Two caches or more of the same images.
    norm : {"l2", "standard"}
        Each part's normalisation before concatenation.
    artifacts_dir : path
        Output root; the file goes under ``features/<dataset>/``.
    output : path, optional
        Explicit file instead of the default name.
    log : callable, optional
        Called with the notes (dropped images).

    Examples
    --------
    >>> result = join_caches(["a_224.h5", "a_320.h5"])  # doctest: +SKIP
    >>> fit_heads(result.path, "svm,logreg")  # doctest: +SKIP
    """
    check_options({"join_norm": norm}, error=CacheError)
    paths = [Path(p) for p in parts]
    attrs = [cache.read_attrs(p) for p in paths]
    dataset = str(attrs[0].get("dataset") or "unknown")
    target = (
        Path(output)
        if output
        else Artifacts(artifacts_dir).cache_path(dataset, joined_stem(paths, norm))
    )
    config_json, fingerprint = _join_identity(paths, attrs, norm)
    if cache.cache_matches(target, config_json, fingerprint):
        done = cache.read_attrs(target)
        return JoinResult(
            target, "up to date", paths, int(done["n_images"]), int(done["feature_width"])
        )
    sets = [cache.load_features(p) for p in paths]
    features, labels, rel, split, notes = join_features(sets, norm)
    if log is not None:
        for note in notes:
            log(note)
    target.parent.mkdir(parents=True, exist_ok=True)
    with cache_writer.cache_lock(target):
        _write_joined(
            target, config_json, fingerprint, features, labels, rel, split,
            _attrs(attrs, paths, norm, features, len(labels)),
        )  # fmt: skip
    return JoinResult(target, "built", paths, len(labels), int(features.shape[1]), notes)


def _join_identity(paths: list[Path], attrs: list[dict[str, Any]], norm: str) -> tuple[str, str]:
    """The joined cache's ``config_json`` and fingerprint: the norm and every part's identity."""
    identity = {
        "format_version": cache.FORMAT_VERSION,
        "join_norm": norm,
        "parts": [
            {
                "stem": p.stem,
                "config_json": a.get("config_json"),
                "fingerprint": a.get("fingerprint"),
            }
            for p, a in zip(paths, attrs, strict=True)
        ],
    }
    config_json = json.dumps(identity, sort_keys=True)
    fingerprint = hashlib.sha256(
        "".join(str(a.get("fingerprint")) for a in attrs).encode()
    ).hexdigest()
    return config_json, fingerprint


def _write_joined(
    target: Path, config_json: str, fingerprint: str, features: np.ndarray, labels: np.ndarray,
    rel: np.ndarray, split: np.ndarray, attrs: dict[str, Any],
) -> None:  # fmt: skip
    """Write the joined rows to ``target`` (resuming an interrupted write) and finalize it."""
    writer, _ = cache_writer.CacheWriter.open(
        target,
        config_json=config_json,
        fingerprint=fingerprint,
        paths=list(rel),
        labels=labels.tolist(),
        splits=list(split),
        width=features.shape[1],
        dtype="float32",
    )
    try:
        n = len(labels)
        start = writer.next_index
        writer.write_batch(start, features[start:], np.ones(n - start, bool), {}, 0.0)
        writer.finalize(attrs)
    finally:
        writer.close()


def _attrs(attrs: list[dict[str, Any]], paths: list[Path], norm: str, features, n: int) -> dict:
    first = attrs[0]
    joined = {
        key: first[key]
        for key in (
            "class_names",
            "data_root",
            "dataset",
            "split_source",
            "split_seed",
            "val_fraction",
            "test_fraction",
            "split_groups",
            "split_copy_groups",
            "train_per_class",
            "split_file",
            "split_file_sha256",
            "split_pooled",
            "keras_version",
            "keras_backend",
        )
        if key in first
    }
    same = {key: first.get(key) for key in ("weights", "weights_source", "preprocessing")}
    for key in same:  # shared values stay, differing ones name every part
        if any(a.get(key) != first.get(key) for a in attrs):
            same[key] = "+".join(str(a.get(key)) for a in attrs)
    joined.update(same)
    joined.update(
        backbone="+".join(p.stem for p in paths),  # the report and manifests name every part
        input_size=int(first.get("input_size") or 1),
        pooling="+".join(sorted({str(a.get("pooling")) for a in attrs})),
        layer="+".join(str(a.get("layer") or "last") for a in attrs),
        precision=str(first.get("precision", "fp32")),
        dtype="float32",
        feature_width=int(features.shape[1]),
        cache_parts=[str(p.resolve()) for p in paths],
        part_widths=",".join(str(a.get("feature_width") or "") for a in attrs),
        join_norm=norm,
        n_images=n,
        n_skipped=0,
        seconds=float(sum(float(a.get("seconds") or 0.0) for a in attrs)),
        runtime="join",
        views="",
    )
    return joined
