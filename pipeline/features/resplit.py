"""Another split of a finished cache, without extracting anything.

A cache's identity (its name and ``config_json``) holds only what changes the features.
The split lives beside them: the ``split`` column of its rows (and of its skipped
images), its split attributes (:func:`split_attrs`) and its ``fingerprint`` (the images
with their splits, which heads, audits and reports key on, so they take another split for
new work). The images alone are its ``images_fingerprint``. So ``make features SEED=1``
after ``make features`` finds the cache of the same features and the same images and
rewrites only its split (:func:`resplit_cache`), each group of exact copies still in one
split (the folder's scan draws it: :func:`pipeline.data.splits.stratified_split`).
``make features TRAIN_PER_CLASS=30 SEED=1`` and ``make features SPLIT_FILE=a.csv`` re-split
it the same way (:func:`pipeline.data.folders.apply_split`; split folders pooled); the
cache records the source (``split_source``, ``train_per_class``, ``split_file`` and its
``split_file_sha256``), and a run with no split option gives the default split back.

Caches written before recorded the split in ``config_json`` and no ``images_fingerprint``:
their features identity is read without the split
(:func:`pipeline.features.cache.same_features`), and their images are checked by drawing
the split they record again and comparing the fingerprint (:func:`same_images`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.core.artifacts import dataset_name, now_iso
from pipeline.core.errors import CacheError, PipelineError
from pipeline.data.folders import ImageFolder, SplitConfig, scan_folder
from pipeline.features import cache, cache_writer
from pipeline.features.config import cache_path_for


def split_attrs(folder: ImageFolder) -> dict[str, Any]:
    """The attributes that record a cache's split and the images it was made from (written
    by stage one, rewritten by :func:`resplit_cache`)."""
    return {
        "split_source": folder.split_source,
        "split_seed": folder.split.seed if folder.split else -1,
        "val_fraction": folder.split.val_fraction if folder.split else -1.0,
        "test_fraction": folder.split.test_fraction if folder.split else -1.0,
        # copies kept in one split; the check rescans old caches (no attribute) without groups
        "split_groups": folder.split_groups,
        "split_copy_groups": folder.copy_groups,
        "images_fingerprint": folder.fingerprint(splits=False),  # the images, not their split
        # Every key always written: a re-split back to the default clears them.
        "train_per_class": int(folder.split.train_per_class or 0) if folder.split else 0,
        "split_file": _where(folder.split.split_file) if folder.split else "",
        "split_file_sha256": folder.split_sha256,
        "split_pooled": folder.pooled,
    }


def _where(spec: str | None) -> str:
    """A split file's absolute path; a ``train=a.txt,test=b.txt`` spec with each list's."""
    if not spec:
        return ""
    if "=" in spec and not Path(spec).is_file():
        parts = [p.partition("=") for p in spec.split(",") if p.strip()]
        return ",".join(f"{s.strip()}={_where(f.strip())}" for s, _, f in parts)
    return str(Path(spec).expanduser().resolve())


def recorded_split(attrs: Mapping[str, Any]) -> SplitConfig | None:
    """The stratified split a cache records (``None`` for split folders)."""
    if attrs.get("split_source") != "stratified":
        return None
    return SplitConfig(
        seed=int(attrs["split_seed"]),
        val_fraction=float(attrs["val_fraction"]),
        test_fraction=float(attrs["test_fraction"]),
    )


def cache_split(attrs: Mapping[str, Any]) -> SplitConfig | None:
    """The split options that give the split a cache holds (``None``: its split folders).

    What commands other than ``make features`` (fine-tuning, ``make auto``) pass to stage one,
    so that they read the cache as it is split rather than splitting it back to their own
    defaults."""
    return _split_config(split_record(attrs))


def split_in_use(
    data_dir: str | Path, config: Any, split: SplitConfig | None, artifacts_dir: str | Path
) -> SplitConfig | None:
    """The split a command that is not ``make features`` reads ``data_dir`` with: that of
    stage one's cache for ``config`` (a :class:`~pipeline.features.config.FeatureConfig`)
    when there is one, so a cache ``make features SEED=1`` re-split stays so; else ``split``."""
    path = cache_path_for(dataset_name(data_dir, artifacts_dir), config, artifacts_dir)
    try:
        attrs = cache.read_attrs(path) if path.is_file() else None
    except CacheError:  # stage one says what is wrong with it
        attrs = None
    return (cache_split(attrs) if attrs else None) or split


def split_record(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The split of a cache as heads' manifests record it: ``{"source": "folders"}``,
    ``{"source": "stratified", "seed", "val_fraction", "test_fraction", "groups"}``,
    ``{"source": "per_class", "train_per_class", "seed"}`` or
    ``{"source": "split_file", "file", "sha256"}``."""
    source = str(attrs.get("split_source") or "folders")
    if source == "per_class":
        n, seed = int(attrs.get("train_per_class") or 0), int(attrs.get("split_seed") or 0)
        return {"source": source, "train_per_class": n, "seed": seed}
    if source == "split_file":
        file, sha = str(attrs.get("split_file") or ""), str(attrs.get("split_file_sha256") or "")
        return {"source": source, "file": file, "sha256": sha}
    split = recorded_split(attrs)
    if split is None:
        return {"source": source}
    groups = str(attrs.get("split_groups") or "")
    return {"source": "stratified", "seed": split.seed, "val_fraction": split.val_fraction,
            "test_fraction": split.test_fraction, "groups": groups}  # fmt: skip


def split_words(record: Any) -> str:
    """A :func:`split_record` in words: ``SEED=1, VAL_FRACTION=0.2, TEST_FRACTION=0.2``,
    ``TRAIN_PER_CLASS=30, SEED=1``, ``SPLIT_FILE=a.csv (sha256 1a2b3c4d5e6f)``, ``split
    folders``, or ``not recorded`` (heads fit before manifests recorded it)."""
    if not isinstance(record, Mapping) or "source" not in record:
        return "not recorded"
    try:
        split = _split_config(record)
        sha = str(record["sha256"]) if record["source"] == "split_file" else ""
    except (KeyError, TypeError, ValueError, PipelineError):  # a manifest anyone can edit
        return "not recorded"
    return "split folders" if split is None else split.words(sha)


def _split_config(record: Mapping[str, Any]) -> SplitConfig | None:
    """The split options of a :func:`split_record` (``None``: split folders)."""
    source = record["source"]
    if source == "per_class":
        return SplitConfig(seed=int(record["seed"]), train_per_class=int(record["train_per_class"]))
    if source == "split_file":
        return SplitConfig(split_file=str(record["file"]))
    if source == "stratified":
        return SplitConfig(
            seed=int(record["seed"]),
            val_fraction=float(record["val_fraction"]),
            test_fraction=float(record["test_fraction"]),
        )
    return None


def recorded_folder(path: str | Path, data: str | Path, attrs: Mapping[str, Any]) -> ImageFolder:
    """``data`` scanned as the cache at ``path`` (its attributes ``attrs``) split it, so its ``fingerprint`` is the
    cache's while the images are unchanged. ``TRAIN_PER_CLASS=`` and ``SPLIT_FILE=`` splits
    are taken from the cache's rows (a split file may have moved since)."""
    grouped = attrs.get("split_groups") == "exact-copies"
    source = attrs.get("split_source")
    if source not in ("per_class", "split_file"):
        return scan_folder(data, recorded_split(attrs), group_copies=grouped)
    folder = scan_folder(data, SplitConfig(), group_copies=False)
    split, config = split_record(attrs), cache_split(attrs)
    held = cache.read_paths(path)
    records = tuple(replace(r, split=held.get(r.path, ("", r.split))[1]) for r in folder.records)
    return replace(folder, records=records, split_source=source, split=config,
                   split_groups="", split_sha256=split.get("sha256", ""),
                   pooled=str(attrs.get("split_pooled") or ""))  # fmt: skip


def same_images(attrs: Mapping[str, Any], folder: ImageFolder) -> bool:
    """Whether a cache (its attributes) was made from exactly the images of ``folder``,
    whatever their split: its ``images_fingerprint``, or for caches written before it, the
    split it records drawn again over ``folder`` and compared by ``fingerprint``."""
    recorded = attrs.get("images_fingerprint")
    if recorded is not None:
        return recorded == folder.fingerprint(splits=False)
    split = recorded_split(attrs)
    if split is None:
        return False
    grouped = attrs.get("split_groups") == "exact-copies"
    then = scan_folder(folder.root, split, group_copies=grouped)
    return then.fingerprint() == attrs.get("fingerprint")


def can_resplit(
    path: Path, folder: ImageFolder, config_json: str, *, data_root: str, dataset: str
) -> bool:
    """Whether the finished cache at ``path`` holds these features of these images under
    another split (so :func:`resplit_cache` gives the cache ``folder`` asks for)."""
    if not path.is_file():
        return False
    try:
        attrs = cache.read_attrs(path)
    except CacheError:
        return False
    return (
        attrs.get("data_root") == data_root
        and attrs.get("dataset") == dataset
        and cache.same_features(attrs.get("config_json"), config_json)
        and same_images(attrs, folder)
    )


def resplit_cache(path: Path, folder: ImageFolder, config_json: str, fingerprint: str) -> int:
    """Rewrite the split of the cache at ``path`` to ``folder``'s (under the cache's lock:
    :func:`pipeline.features.cache_writer.cache_lock`); its features are copied untouched.

    ``config_json`` replaces an identity that still records a split (caches written before);
    ``fingerprint`` is ``folder``'s. Returns how many images changed split.
    """
    attrs = {
        **split_attrs(folder),
        "fingerprint": fingerprint,
        "config_json": config_json,
        "resplit": now_iso(),
    }
    return cache_writer.rewrite_split(path, {r.path: r.split for r in folder.records}, attrs)
