"""The stratified split keeps exact copies in one split and changes nothing else (issue 21)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.data.folders import ImageRecord, SplitConfig, describe_folder, scan_folder


def _todays_split(by_class: dict[str, list[str]], split: SplitConfig) -> list[ImageRecord]:
    """The per-image split every cache was made with before copies were grouped (verbatim)."""
    rng = np.random.default_rng(split.seed)
    records = []
    for label, (_, paths) in enumerate(by_class.items()):
        order = rng.permutation(len(paths))
        n_test = int(round(len(paths) * split.test_fraction))
        n_val = int(round(len(paths) * split.val_fraction))
        for rank, i in enumerate(order):
            name = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
            records.append(ImageRecord(paths[i], label, name))
    records.sort(key=lambda r: r.path)
    return records


def _folder(root: Path, sizes: dict[str, int], copies: dict[str, list[str]]) -> Path:
    """``root/<class>/<i>.png`` of distinct bytes (some of one size), plus byte copies."""
    for name, n in sizes.items():
        for i in range(n):
            path = root / name / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(f"{name}-{i:03d}".encode())  # same length: same size, other bytes
    for source, targets in copies.items():
        for target in targets:
            (root / target).write_bytes((root / source).read_bytes())
    return root


def _by_class(folder) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {name: [] for name in folder.class_names}
    for record in folder.records:
        out[folder.class_names[record.label]].append(record.path)
    return {name: sorted(paths) for name, paths in out.items()}


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 7])
def test_copies_land_in_one_split(tmp_path: Path, seed: int) -> None:
    copies = {
        "cat/000.png": ["cat/c0a.png", "cat/c0b.png", "cat/c0c.png"],
        "cat/001.png": ["cat/c1a.png"],
        "dog/002.png": ["dog/c2a.png", "dog/c2b.png", "cat/x2.png"],  # across classes too
        "dog/003.png": ["dog/c3a.png", "dog/c3b.png"],
    }
    root = _folder(tmp_path / "pets", {"cat": 20, "dog": 20}, copies)
    folder = scan_folder(root, SplitConfig(seed=seed))
    split_of = {r.path: r.split for r in folder.records}
    for source, targets in copies.items():
        assert {split_of[p] for p in [source, *targets]} == {split_of[source]}, source
    assert folder.split_groups == "exact-copies" and folder.copy_groups == 4
    assert "4 group(s) of exact copies each kept in one split" in describe_folder(folder)
    counts = folder.counts()  # still roughly the fractions asked
    assert counts["test"] >= 6 and counts["val"] >= 6 and counts["train"] >= 20


@pytest.mark.parametrize(
    ("seed", "val", "test"), [(0, 0.2, 0.2), (1, 0.2, 0.2), (5, 0.1, 0.3), (9, 0.0, 0.25)]
)
def test_without_copies_the_split_is_todays(
    tmp_path: Path, seed: int, val: float, test: float
) -> None:
    root = _folder(tmp_path / "plain", {"a": 17, "b": 9, "c": 30}, {})
    split = SplitConfig(seed=seed, val_fraction=val, test_fraction=test)
    folder = scan_folder(root, split)
    assert list(folder.records) == _todays_split(_by_class(folder), split)
    assert folder.copy_groups == 0 and "exact copies" not in describe_folder(folder)


def test_caches_made_before_groups_rescan_to_their_split(tmp_path: Path) -> None:
    """A cache without ``split_groups`` is checked against the per-image split it was made with."""
    root = _folder(tmp_path / "old", {"a": 12, "b": 12}, {"a/000.png": ["a/d1.png", "a/d2.png"]})
    folder = scan_folder(root, SplitConfig(seed=3), group_copies=False)
    assert list(folder.records) == _todays_split(_by_class(folder), SplitConfig(seed=3))
    assert folder.split_groups == ""
