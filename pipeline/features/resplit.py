"""Another split of a finished cache, without extracting anything.

A cache's identity (its name and ``config_json``) holds only what changes the features.
The split lives beside them: the ``split`` column of its rows (and of its skipped
images), its split attributes (:func:`split_attrs`) and its ``fingerprint`` (the images
with their splits, which heads, audits and reports key on, so they take another split for
new work). The images alone are its ``images_fingerprint``. So ``make features SEED=1``
after ``make features`` finds the cache of the same features and the same images and
rewrites only its split (:func:`resplit_cache`), each group of exact copies still in one
split (the folder's scan draws it: :func:`pipeline.data.splits.stratified_split`).

Caches written before recorded the split in ``config_json`` and no ``images_fingerprint``:
their features identity is read without the split
(:func:`pipeline.features.cache.same_features`), and their images are checked by drawing
the split they record again and comparing the fingerprint (:func:`same_images`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.core.artifacts import now_iso
from pipeline.core.errors import CacheError, PipelineError
from pipeline.data.folders import ImageFolder, SplitConfig, scan_folder
from pipeline.features import cache, cache_writer


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
    }


def recorded_split(attrs: Mapping[str, Any]) -> SplitConfig | None:
    """The stratified split a cache records (``None`` for split folders)."""
    if attrs.get("split_source") != "stratified":
        return None
    return SplitConfig(
        seed=int(attrs["split_seed"]),
        val_fraction=float(attrs["val_fraction"]),
        test_fraction=float(attrs["test_fraction"]),
    )


def split_record(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The split of a cache as heads' manifests record it: ``{"source": "folders"}`` or
    ``{"source": "stratified", "seed", "val_fraction", "test_fraction", "groups"}``."""
    split = recorded_split(attrs)
    if split is None:
        return {"source": str(attrs.get("split_source") or "folders")}
    groups = str(attrs.get("split_groups") or "")
    return {"source": "stratified", **vars(split), "groups": groups}


def split_words(record: Any) -> str:
    """A :func:`split_record` in words: ``SEED=1, VAL_FRACTION=0.2, TEST_FRACTION=0.2``,
    ``split folders``, or ``not recorded`` (heads fit before manifests recorded it)."""
    if not isinstance(record, Mapping) or "source" not in record:
        return "not recorded"
    if record["source"] != "stratified":
        return "split folders"
    try:
        split = SplitConfig(
            seed=int(record["seed"]),
            val_fraction=float(record["val_fraction"]),
            test_fraction=float(record["test_fraction"]),
        )
    except (KeyError, TypeError, ValueError, PipelineError):  # a manifest anyone can edit
        return "not recorded"
    return split.words()


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
    another stratified split (so :func:`resplit_cache` gives the cache ``folder`` asks for)."""
    if folder.split_source != "stratified" or not path.is_file():
        return False
    try:
        attrs = cache.read_attrs(path)
    except CacheError:
        return False
    return (
        attrs.get("split_source") == "stratified"
        and attrs.get("data_root") == data_root
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
