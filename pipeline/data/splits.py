"""The stratified split of a folder without split folders: its options (:class:`SplitConfig`),
the split itself (seeded, stratified by class, each group of exact copies in one split) and
the lines about splits the fractions leave thin. A cache's split can be drawn again without
extracting (:mod:`pipeline.features.resplit`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from pipeline.core.errors import DataError
from pipeline.core.options import check_options, option_label

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitConfig:
    """How to split a folder that has no ``train/``, ``val/``, ``test/`` folders.

    The split is stratified by class and fixed by ``seed``; both are recorded in
    the cache, so later stages see exactly the same images in each split. They are not
    part of the cache's identity: another split re-splits the cache's rows, nothing is
    extracted again (:mod:`pipeline.features.resplit`).
    """

    seed: int = 0
    val_fraction: float = 0.2
    test_fraction: float = 0.2

    def words(self) -> str:
        """The split as a user sets it: ``SEED=1, VAL_FRACTION=0.2, TEST_FRACTION=0.2``."""
        return (
            f"SEED={self.seed}, VAL_FRACTION={self.val_fraction:g}, "
            f"TEST_FRACTION={self.test_fraction:g}"
        )

    def __post_init__(self) -> None:
        check_options(asdict(self), error=DataError)
        if self.val_fraction + self.test_fraction >= 1.0:
            raise DataError(
                f"{option_label('val_fraction')} + {option_label('test_fraction')} must leave images for "
                f"training; got {self.val_fraction} + {self.test_fraction}"
            )


@dataclass(frozen=True)
class ImageRecord:
    """One image: its path relative to the data root, class index and split."""

    path: str
    label: int
    split: str


def stratified_split(
    by_class: dict[str, list[str]], split: SplitConfig, groups: list[list[str]]
) -> list[ImageRecord]:
    """Per class, a seeded permutation of units filled into test, then val, then train.

    A unit is one image, or a class's members of a group of copies: it goes whole into
    one split, and a group spread over classes takes the split its first class gave it.
    Without copies every unit is one image: the split of caches made before groups.
    """
    rng = np.random.default_rng(split.seed)
    group_of = {path: tuple(group) for group in groups for path in group}
    placed: dict[tuple[str, ...], str] = {}
    records = []
    for label, paths in enumerate(by_class.values()):
        units: dict[object, list[str]] = {}
        for path in paths:
            units.setdefault(group_of.get(path, path), []).append(path)
        keys = list(units)
        n_test = int(round(len(paths) * split.test_fraction))
        n_val = int(round(len(paths) * split.val_fraction))
        taken = {"test": 0, "val": 0, "train": 0}
        for i in rng.permutation(len(keys)):
            key = keys[i]
            name = placed.get(key) if isinstance(key, tuple) else None
            if name is None:
                name = (
                    "test" if taken["test"] < n_test else "val" if taken["val"] < n_val else "train"
                )
                if isinstance(key, tuple):
                    placed[key] = name
            taken[name] += len(units[key])
            records += [ImageRecord(path, label, name) for path in units[key]]
    records.sort(key=lambda r: r.path)
    return records


def thin_splits(
    by_class: dict[str, list[str]], records: list[ImageRecord], split: SplitConfig
) -> list[str]:
    """A line per split the fractions ask for that some classes (or all) get no image of."""
    notes = []
    for name, fraction in (("val", split.val_fraction), ("test", split.test_fraction)):
        if fraction <= 0:
            continue
        present = {r.label for r in records if r.split == name}
        missing = len(by_class) - len(present)
        if not missing:
            continue
        largest = max(len(paths) for paths in by_class.values())
        option = f"{name.upper()}_FRACTION={fraction:g}"
        if not present:
            notes.append(
                f"the {name} split is empty: {option} of at most {largest} images per class "
                f"rounds to 0; add images per class, raise {option.split('=')[0]}, or make "
                f"train/ and {name}/ folders"
            )
        else:
            notes.append(
                f"{missing} of {len(by_class)} classes have no {name} image ({option} of their "
                f"images rounds to 0); {name} accuracy leaves them out"
            )
    return notes
