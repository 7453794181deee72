"""Image folders: class folders, split folders, and the scan that finds every image (no
decoding here: :mod:`pipeline.data.images`; the stratified split: :mod:`pipeline.data.splits`)."""

from __future__ import annotations

import functools
import hashlib
import os
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from pipeline.core.artifacts import dataset_name
from pipeline.core.errors import DataError
from pipeline.data.copies import content_hash, copy_groups
from pipeline.data.splits import (
    SPLITS,
    UNUSED,
    ImageRecord,
    SplitConfig,
    per_class_split,
    split_file,
    split_file_bytes,
    stratified_split,
    thin_splits,
)

__all__ = ["SPLITS", "ImageFolder", "ImageRecord", "SplitConfig", "scan_folder"]

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
    | {".ppm", ".pgm", ".pbm"}
)
# Read only where the installed Pillow decodes it (checked at run time: image_extensions).
AVIF = ".avif"


@functools.cache
def pillow_reads_avif() -> bool:
    """Whether this Pillow decodes AVIF (built in from Pillow 11.2, or a plugin registered)."""
    from PIL import Image, features

    try:
        if features.check_module("avif"):
            return True
    except ValueError:  # a Pillow that does not know the module
        pass
    return Image.registered_extensions().get(AVIF) == "AVIF"


def image_extensions() -> frozenset[str]:
    """The file extensions a scan takes: :data:`IMAGE_EXTENSIONS`, and ``.avif`` where readable."""
    return IMAGE_EXTENSIONS | {AVIF} if pillow_reads_avif() else IMAGE_EXTENSIONS


# Split folder names as users spell them -> the split name stored in caches.
SPLIT_FOLDERS = {"train": "train", "val": "val", "validation": "val", "test": "test"}


@dataclass(frozen=True)
class ImageFolder:
    """A scanned data folder: classes, images and the split of each image."""

    root: Path
    class_names: tuple[str, ...]
    records: tuple[ImageRecord, ...]
    split_source: str  # "folders", "stratified", "per_class" or "split_file"
    split: SplitConfig | None = None  # set unless split_source == "folders"
    warnings: tuple[str, ...] = field(default=())
    dataset: str = ""  # the name stage one claimed (Artifacts.claim_dataset), when it did
    # "exact-copies" when the stratified split kept each group of copies in one split
    split_groups: str = ""
    copy_groups: int = 0  # how many such groups the folder holds
    split_sha256: str = ""  # split_file: the sha256 of the file (its lists)
    pooled: str = ""  # the split folders pooled for TRAIN_PER_CLASS= or SPLIT_FILE=: "train/, val/"

    @property
    def name(self) -> str:
        """The data set's name: the one claimed for it, else the folder's name as typed."""
        return self.dataset or dataset_name(self.root)

    def counts(self) -> dict[str, int]:
        """Number of images per split (``unused``: those a split file does not list)."""
        out = {s: 0 for s in (*SPLITS, UNUSED)}
        for record in self.records:
            out[record.split] += 1
        return {s: n for s, n in out.items() if n}

    def split_words(self) -> str:
        """The split as the user set it (:meth:`SplitConfig.words`), or ``split folders``."""
        if self.split is None or self.split_source == "folders":
            return "split folders"
        return self.split.words(self.split_sha256)

    def fingerprint(self, *, splits: bool = True) -> str:
        """sha256 of every image's path, size, modification time, class and split.

        Any added, removed, edited or relabelled image changes it; so does another split,
        unless ``splits=False`` (the images alone: what a cache's features depend on).
        """
        digest = hashlib.sha256()
        digest.update("\x1f".join(self.class_names).encode())
        for record in self.records:
            stat = _stat_line(self.root / record.path)
            split = f"\x1f{record.split}" if splits else ""
            digest.update(f"{record.path}\x1f{stat}\x1f{record.label}{split}\n".encode())
        if splits and self.split_source == "per_class" and self.split is not None:
            digest.update(f"per_class {self.split.train_per_class} {self.split.seed}".encode())
        elif splits and self.split_source == "split_file":  # the file, wherever it lies
            digest.update(f"split_file {self.split_sha256}".encode())
        return digest.hexdigest()


def _stat_line(path: Path) -> str:
    """Size and modification time; a dangling link or a link loop says so instead."""
    try:
        stat = os.stat(path)
    except OSError as exc:  # skipped at decoding, with the reason; fixing it changes this
        return f"unreadable\x1f{exc.errno}"
    return f"{stat.st_size}\x1f{stat.st_mtime_ns}"


def shown(path: str | Path) -> str:
    """``path`` printable on one line: bytes that are not UTF-8 as ``\\xff`` escapes."""
    text = str(path)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # lone surrogates of a Windows name
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _check_name(path: Path) -> None:
    """Refuse a name that is not valid UTF-8: caches, heads and reports store names as UTF-8."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(
            f"name is not valid UTF-8: {shown(path)}; rename it (for example "
            "`convmv -f latin1 -t utf-8 -r --notest <data folder>`) and run again"
        ) from None


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in image_extensions()


def _unreadable_folder(exc: OSError) -> DataError:
    """A folder the scan cannot list: its images would silently be left out, so stop."""
    where = shown(exc.filename or "a folder")
    return DataError(
        f"cannot read folder {where} ({exc.strerror or exc}); its images would be left out: "
        f"fix its permissions (chmod -R u+rX {where}) or move it out of the data folder"
    )


def _raise(exc: OSError) -> None:
    raise _unreadable_folder(exc)


def images_under(folder: Path, notes: list[str] | None = None) -> list[Path]:
    """Image files under ``folder`` (recursively, hidden entries skipped), sorted.

    Symbolic links to folders are followed, each folder once: a link back to a
    folder already scanned (a loop) is skipped, with a line added to ``notes``.
    Links to files are listed even when dangling or looping; decoding skips
    them with the reason.

    Raises
    ------
    DataError
        A file or folder name that is not valid UTF-8 (the message names it).
    """
    found = []
    avif = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(folder, onerror=_raise, followlinks=True):
        try:
            stat = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (stat.st_dev, stat.st_ino) in seen:
            dirnames[:] = []
            if notes is not None:
                notes.append(f"skipped {shown(dirpath)}: symbolic link to a folder already scanned")
            continue
        seen.add((stat.st_dev, stat.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in dirnames:
            _check_name(Path(dirpath) / name)
        for name in filenames:
            if _is_image_name(name):
                _check_name(Path(dirpath) / name)
                found.append(Path(dirpath) / name)
            elif name.lower().endswith(AVIF) and not name.startswith("."):
                avif += 1
    if avif and notes is not None:
        notes.append(
            f"skipped {avif} .avif file(s) under {shown(folder)}: this Pillow cannot read AVIF "
            "(pip install -U 'pillow>=11.2', or convert them to JPEG or PNG)"
        )
    return sorted(found)


def _class_folders(folder: Path) -> list[Path]:
    try:
        entries = list(folder.iterdir())
    except OSError as exc:
        raise _unreadable_folder(exc) from None
    found = sorted(p for p in entries if p.is_dir() and not p.name.startswith("."))
    for path in found:
        _check_name(path)
    return found


def scan_folder(
    root: str | Path, split: SplitConfig | None = None, *, group_copies: bool = True
) -> ImageFolder:
    """Scan a folder of class subfolders into an :class:`ImageFolder`.

    Two layouts are understood::

        root/<class>/<image>                 stratified split by ``split``
        root/train/<class>/<image>           splits from the folders
        root/val|validation/<class>/<image>  (optional)
        root/test/<class>/<image>            (optional)

    The stratified split keeps exact copies (the same bytes) in one split, so it never
    makes a leak; ``group_copies=False`` gives the per-image split of caches made before.

    Raises
    ------
    DataError
        Missing or empty folder, no class folders, a class folder without
        images, or fewer than two classes.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(
            f"data folder {root} does not exist; pass DATA=<folder of class subfolders>"
        )
    if not root.is_dir():
        raise DataError(f"DATA={root} is a file; pass a folder of class subfolders")
    _check_name(root.resolve())
    split = split or SplitConfig()
    subfolders = _class_folders(root)
    split_folders = [p for p in subfolders if p.name.lower() in SPLIT_FOLDERS]
    if split_folders:
        scanned = _scan_split_folders(root, split_folders)
        others = [p for p in subfolders if p not in split_folders]
        scanned = replace(
            scanned, warnings=scanned.warnings + _ignored_beside(others, split_folders)
        )
        return scanned if split.source == "stratified" else apply_split(scanned, split)

    notes: list[str] = []
    by_class = _scan_classes(root, subfolders, where=str(root), notes=notes)
    if split.source != "stratified":  # its own split: no copy groups to draw around
        records = stratified_split(by_class, SplitConfig(), [])
        folder = ImageFolder(root, tuple(by_class), tuple(records), "stratified", split,
                             tuple(notes))  # fmt: skip
        return apply_split(folder, split)
    groups = copy_groups(root, [p for ps in by_class.values() for p in ps]) if group_copies else []
    records = stratified_split(by_class, split, groups)
    notes += thin_splits(by_class, records, split)
    return ImageFolder(
        root, tuple(by_class), tuple(records), "stratified", split, tuple(notes),
        split_groups="exact-copies" if group_copies else "", copy_groups=len(groups),
    )  # fmt: skip


def apply_split(folder: ImageFolder, split: SplitConfig) -> ImageFolder:
    """``folder`` with the split ``split`` gives (``TRAIN_PER_CLASS=`` or ``SPLIT_FILE=``) in
    place of its own; split folders are pooled (the folder's ``pooled`` says which).

    Raises
    ------
    DataError
        A class with too few images for N, or a bad split file (one line each).
    """
    paths = [r.path for r in folder.records]
    labels = np.array([r.label for r in folder.records], dtype=np.int64)
    digest = ""
    if split.source == "per_class":
        names = per_class_split(labels, int(split.train_per_class or 0), split.seed,
                                folder.class_names)  # fmt: skip
    else:
        spec = str(split.split_file)
        names = split_file(spec, paths, folder.root, labels=labels, class_names=folder.class_names)
        names[names == ""] = UNUSED
        digest = hashlib.sha256(split_file_bytes(spec)).hexdigest()
    pooled = ""
    if folder.split_source == "folders":
        pooled = ", ".join(f"{s}/" for s in folder.counts())
    records = tuple(replace(r, split=str(n)) for r, n in zip(folder.records, names, strict=True))
    return replace(folder, records=records, split_source=split.source, split=split,
                   split_groups="", split_sha256=digest, pooled=pooled)  # fmt: skip


def _ignored_beside(others: list[Path], split_folders: list[Path]) -> tuple[str, ...]:
    """A line per folder of images beside the split folders: the split layout leaves it out."""
    splits = ", ".join(f"{p.name}/" for p in split_folders)
    train = next(
        (p.name for p in split_folders if SPLIT_FOLDERS[p.name.lower()] == "train"), "train"
    )
    notes = []
    for folder in others:
        n = len(images_under(folder))
        if n:
            notes.append(
                f"ignored {shown(folder)} ({n} images) beside {splits}: with split folders, "
                f"class folders go inside them; move it into {train}/ or out of the data folder"
            )
    return tuple(notes)


def _scan_classes(
    root: Path, class_dirs: list[Path], where: str, notes: list[str]
) -> dict[str, list[str]]:
    if not class_dirs:
        loose = [p.name for p in root.iterdir() if p.is_file() and _is_image_name(p.name)]
        hint = (
            f" (found {len(loose)} loose images: move them into one folder per class)"
            if loose
            else ""
        )
        raise DataError(f"no class folders in {where}: expected {where}/<class>/<image>{hint}")
    by_class: dict[str, list[str]] = {}
    for class_dir in class_dirs:
        images = images_under(class_dir, notes)
        if not images:
            raise DataError(
                f"class folder {class_dir} holds no images "
                f"({', '.join(sorted(image_extensions()))}); add images or remove the folder"
            )
        by_class[class_dir.name] = [p.relative_to(root).as_posix() for p in images]
    if len(by_class) < 2:
        only = next(iter(by_class))
        raise DataError(
            f"found only one class folder ({only!r}) in {where}; a classifier needs at least two"
        )
    return by_class


def _scan_split_folders(root: Path, split_folders: list[Path]) -> ImageFolder:
    names = {}
    for folder in split_folders:
        split_name = SPLIT_FOLDERS[folder.name.lower()]
        if split_name in names:
            raise DataError(
                f"{root} has both {names[split_name].name}/ and {folder.name}/; keep one of them"
            )
        names[split_name] = folder
    if "train" not in names:
        raise DataError(
            f"{root} has {', '.join(f.name + '/' for f in split_folders)} but no train/ folder"
        )
    scan_notes: list[str] = []
    per_split = {
        s: _scan_classes(root, _class_folders(f), where=str(f), notes=scan_notes)
        if s == "train"
        else _scan_optional_split(root, f, scan_notes)
        for s, f in names.items()
    }
    class_names = sorted(set().union(*per_split.values()))
    index = {name: i for i, name in enumerate(class_names)}
    notes = scan_notes + [
        f"class {c!r} appears in {s}/ but not in train/"
        for s in ("val", "test")
        if s in per_split
        for c in sorted(set(per_split[s]) - set(per_split["train"]))
    ]
    records = [
        ImageRecord(path, index[c], s)
        for s in SPLITS
        if s in per_split
        for c, paths in sorted(per_split[s].items())
        for path in paths
    ]
    return ImageFolder(root, tuple(class_names), tuple(records), "folders", None, tuple(notes))


def _scan_optional_split(root: Path, folder: Path, notes: list[str]) -> dict[str, list[str]]:
    by_class = {}
    for class_dir in _class_folders(folder):
        images = images_under(class_dir, notes)
        if not images:
            raise DataError(f"class folder {class_dir} holds no images; add images or remove it")
        by_class[class_dir.name] = [p.relative_to(root).as_posix() for p in images]
    if not by_class:
        raise DataError(f"split folder {folder} has no class folders; remove it or fill it")
    return by_class


def describe_folder(folder: ImageFolder) -> str:
    """What a scan found: classes, images per split and where the split came from.

    Examples
    --------
    >>> print(describe_folder(scan_folder("artifacts/data/digits")))  # doctest: +SKIP
    found 1797 images of 10 classes (0, 1, 2, 3, 4, 5, 6, 7, 8, 9) in artifacts/data/digits
      split: train 1077, val 360, test 360 (stratified by class, SEED=0, VAL_FRACTION=0.2, TEST_FRACTION=0.2)
    """
    names = folder.class_names
    shown = ", ".join(names) if len(names) <= 12 else ", ".join(names[:10]) + f", ... {names[-1]}"
    counts = ", ".join(f"{split} {n}" for split, n in folder.counts().items())
    if folder.split_source == "folders":
        source = "from the split folders " + ", ".join(f"{s}/" for s in folder.counts())
    elif folder.split_source != "stratified":
        source = folder.split_words()
        if folder.pooled:
            source += f"; the split folders {folder.pooled} pooled"
        if UNUSED in folder.counts():
            source += f"; {folder.counts()[UNUSED]} image(s) the file does not list are in no split"
    else:
        source = f"stratified by class, {folder.split.words()}"
        if folder.split_groups and folder.copy_groups:
            source += f"; {folder.copy_groups} group(s) of exact copies each kept in one split"
    return (
        f"found {len(folder.records)} images of {len(names)} classes ({shown}) in {folder.root}\n"
        f"  split: {counts} ({source})"
    )


def cross_split_copies(folder: ImageFolder) -> str | None:
    """One line about exact copies (the same bytes) that sit in different splits, or ``None``.

    A copy in val or test of a train image is scored as held out though the head saw
    it. Cheap: only files whose size a file of another split shares are read and hashed
    (measured in ``docs/features.md``).
    """
    by_size: dict[int, list[ImageRecord]] = defaultdict(list)
    for record in folder.records:
        if record.split == UNUSED:  # in no split: no held-out figure to spoil
            continue
        try:
            by_size[os.stat(folder.root / record.path).st_size].append(record)
        except OSError:  # unreadable: stage one skips it with the reason
            continue
    by_hash: dict[str, list[ImageRecord]] = defaultdict(list)
    for group in by_size.values():
        if len({r.split for r in group}) > 1:
            for record in group:
                digest = content_hash(folder.root / record.path)
                if digest is not None:
                    by_hash[digest].append(record)
    crossings: dict[str, int] = defaultdict(int)
    example = ""
    for group in by_hash.values():
        splits = sorted({r.split for r in group}, key=SPLITS.index)
        if len(splits) < 2:
            continue
        anchor = next(r for r in group if r.split == splits[0])
        for record in group:
            if record.split != splits[0]:
                crossings[f"{splits[0]}-{record.split}"] += 1
                example = example or f"{shown(record.path)} = {shown(anchor.path)}"
    if not crossings:
        return None
    n = sum(crossings.values())
    pairs = ", ".join(f"{pair} {count}" for pair, count in sorted(crossings.items()))
    return (
        f"{n} image(s) are exact copies of images in another split ({pairs}; e.g. {example}): "
        "their held-out accuracy is not held out; remove the copies and re-run `make features`"
    )
