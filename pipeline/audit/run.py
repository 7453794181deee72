"""``make audit``: duplicates, leaks, likely label errors, outliers and balance of a data set.

:func:`audit` reads a stage-one cache and writes ``artifacts/audit/<dataset>/audit.{html,md,json}``
with thumbnails and a map; :func:`audit_folder` runs stage one first when the folder has no
cache yet. Each finding's rule is in its module (:mod:`.neighbours`, :mod:`.calibrate`,
:mod:`.labels`, :mod:`.outliers`) and in ``docs/audit.md``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.audit import calibrate, figures, labels, neighbours, outliers, render
from pipeline.core.artifacts import now_iso, safe_name
from pipeline.core.errors import PipelineError
from pipeline.core.files import write_json_atomic
from pipeline.core.options import check_options
from pipeline.features.cache import FeatureSet, load_features

LISTED = 60  # label issues and outliers shown with thumbnails (all are in audit.json)


class AuditError(PipelineError):
    """An audit that cannot run: too few images, a bad threshold."""


def audit_dir(artifacts_dir: str | Path, dataset: str) -> Path:
    """``<artifacts>/audit/<dataset>/``."""
    return Path(artifacts_dir) / "audit" / safe_name(dataset)


@dataclass
class AuditResult:
    """What :func:`audit` found and wrote; ``summary`` is ``audit.json``'s content."""

    folder: Path
    summary: dict[str, Any] = field(repr=False)

    @property
    def html(self) -> Path:
        return self.folder / "audit.html"

    def lines(self) -> list[str]:
        """One line per finding class, then where the pages are."""
        return render.terminal_lines(self.summary) + [f"wrote {self.html} (also .md, .json)"]

    def format(self) -> str:
        return "\n".join(self.lines())


def audit(
    cache_path: str | Path,
    *,
    artifacts_dir: str | Path = "artifacts",
    cv: int = 3,
    seed: int = 0,
    threshold: float | None = None,
    calibration: str = "copies",
    embed: Callable[[list], np.ndarray] | None = None,
    log: Callable[[str], Any] | None = None,
) -> AuditResult:
    """Audit the images of a feature cache; write the pages under ``artifacts/audit/<dataset>/``.

    Parameters
    ----------
    cache_path : path
        A stage-one cache (``make features``).
    cv : int
        Folds of the cross-validated head behind the label audit.
    seed : int
        Seed of the folds, the copies' sample and the map.
    threshold : float, optional
        Near-duplicate cosine threshold; by default calibrated (``calibration``).
    calibration : {"copies", "neighbours"}
        ``copies``: copies of a sample of the images through the cache's backbone
        (:mod:`pipeline.audit.calibrate`); ``neighbours``: the upper fence of the
        nearest-neighbour similarities, no backbone run.
    embed : callable, optional
        Images (uint8 arrays) to features for ``copies``; default: the cache's backbone.
    log : callable, optional
        Called with each finding class's line.

    Raises
    ------
    AuditError
        Fewer than 3 images, a threshold outside (0, 1], an unknown calibration.
    CacheError
        A missing or unreadable cache.
    """
    check_audit_options(cv=cv, seed=seed, threshold=threshold, calibration=calibration)
    fs = load_features(cache_path)
    if len(fs.labels) < 3:
        raise AuditError(f"{cache_path} holds {len(fs.labels)} images; an audit needs 3 or more")
    clock = _Clock()
    # Files are read only inside the data root the cache records; none recorded, none read.
    root = Path(str(fs.attrs["data_root"])) if fs.attrs.get("data_root") else None
    hashes = clock.run("hashes", neighbours.content_hashes, root, list(fs.paths))
    exact = neighbours.exact_groups(hashes)
    near = clock.run("neighbours", neighbours.nearest, fs.features, 10)
    calib = clock.run(
        "calibration", _calibrate, fs, root, near, threshold, calibration, embed, seed
    )
    near_dups = neighbours.near_groups(near, calib.threshold, exact)
    scores = outliers.outlier_scores(near, exact)
    flagged, fence = outliers.flag_outliers(scores)
    lab = clock.run("labels", labels.audit_labels, fs.features, fs.labels, cv, seed)
    out = audit_dir(artifacts_dir, str(fs.attrs.get("dataset") or Path(fs.path).parent.name))
    marks = {
        "label issue": lab.issues.tolist(),
        "near duplicate": sorted({i for g in near_dups for i in g}),
        "exact duplicate": sorted({i for g in exact for i in g}),
        "outlier": flagged.tolist(),
    }
    shown = clock.run("map", _draw_map, fs, marks, seed, out / "map.png")
    summary = _summary(fs, exact, near_dups, near, calib, lab, scores, flagged, fence, cv)
    summary["map_images"] = shown
    clock.run("thumbnails", _add_thumbnails, summary, root, out / "thumbs")
    summary["seconds"] = clock.seconds
    _save_predictions(fs, lab, out / "oof.npz")
    write_json_atomic(out / "audit.json", summary)
    render.write_pages(summary, out)
    result = AuditResult(out, summary)
    if log is not None:
        for line in result.lines():
            log(line)
    return result


def check_audit_options(
    *, cv: int = 3, seed: int = 0, threshold: float | None = None, calibration: str = "copies"
) -> None:
    """Refuse an option out of bounds (before stage one's minutes, where it runs first)."""
    check_options({"cv": cv, "seed": seed}, error=AuditError)
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise AuditError(f"THRESHOLD={threshold} is not a cosine in (0, 1]; try 0.95")
    if calibration not in ("copies", "neighbours"):
        raise AuditError(f"calibration {calibration!r} is not one of: copies, neighbours")


class _Clock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds[name] = round(time.perf_counter() - started, 3)


def _draw_map(fs: FeatureSet, marks: dict[str, list[int]], seed: int, path: Path) -> int:
    """The map (every finding on it; a sample of the rest past ``MAP_MAX``); images shown."""
    rows = figures.map_rows(len(fs.labels), [i for m in marks.values() for i in m], seed)
    position = {int(r): p for p, r in enumerate(rows)}
    xy = figures.embed_2d(fs.features[rows], seed)
    title = "t-SNE of the features (PCA to 50 first), coloured by class"
    if len(rows) < len(fs.labels):
        title += f"\n{len(rows):,} of {len(fs.labels):,} images: every finding, a random sample"
    mapped = {k: [position[i] for i in v] for k, v in marks.items()}
    figures.draw_map(xy, fs.labels[rows], fs.class_names, mapped, path, title)
    return len(rows)


def _calibrate(
    fs: FeatureSet,
    root: Path | None,
    near: neighbours.Neighbours,
    threshold: float | None,
    how: str,
    embed: Callable[[list], np.ndarray] | None,
    seed: int,
) -> calibrate.Calibration:
    """The given threshold, else the copies' calibration, else the neighbour rule."""
    if threshold is not None:
        return calibrate.Calibration(float(threshold), "given (THRESHOLD=)", [])
    why = ""
    if how == "copies":
        embed = embed or calibrate.backbone_embedder(fs.attrs)
        originals, copies = calibrate.copy_pixels(root, list(fs.paths), seed)
        if embed is not None and len(originals) >= 3:
            try:
                found = calibrate.calibrate_on_copies(originals, copies, embed)
            except PipelineError as exc:  # weights gone, a backbone this version lacks
                why = f" (the copies' rule could not run: {exc})"
            else:
                # Copies must be more alike than distinct images usually are (tiny or very
                # uniform images: digits' copies sit below most nearest neighbours).
                bulk = float(np.percentile(near.similarity[:, 0], calibrate.NEIGHBOUR_PERCENTILE))
                if found.threshold > bulk:
                    return found
                why = (
                    f" (copies of these images, {found.threshold:.3f}, are less alike than "
                    f"the {calibrate.NEIGHBOUR_PERCENTILE:g}th percentile of nearest "
                    f"neighbours, {bulk:.3f})"
                )
        else:
            why = " (no backbone to run copies through, or too few readable images)"
    rule = (
        "neighbours: the upper fence Q3 + 3 IQR of each image's cosine to its nearest "
        f"other image, capped at 0.999{why}"
    )
    return calibrate.Calibration(round(neighbours.neighbour_threshold(near), 4), rule, [])


def _item(fs: FeatureSet, i: int, **extra: Any) -> dict[str, Any]:
    return {
        "index": int(i),
        "path": str(fs.paths[i]),
        "class": fs.class_names[int(fs.labels[i])],
        "split": str(fs.split[i]),
        **extra,
    }


def _group(fs: FeatureSet, members: list[int], near: neighbours.Neighbours | None) -> dict:
    """One duplicate group: its members and where they sit (label conflict, leak)."""
    classes = {int(fs.labels[i]) for i in members}
    splits = {str(fs.split[i]) for i in members}
    where = []
    if len(classes) > 1:
        where.append("label conflict")
    if len(splits) > 1:
        where.append("leak across splits")
    group: dict[str, Any] = {
        "members": [_item(fs, i) for i in members],
        "where": where or ["same class, same split"],
    }
    if near is not None:  # the lowest similarity that holds the group together
        inside = set(members)
        sims = [
            float(s)
            for i in members
            for j, s in zip(near.index[i], near.similarity[i], strict=True)
            if int(j) in inside
        ]
        group["similarity"] = round(min(sims), 4) if sims else None
    return group


def _summary(fs, exact, near_dups, near, calib, lab, scores, flagged, fence, cv) -> dict:
    names = fs.class_names
    row = np.searchsorted(lab.audited, lab.issues)  # audited is sorted: each issue's row
    issues = [
        _item(
            fs,
            i,
            self_confidence=round(float(lab.self_confidence[r]), 4),
            suggested=names[int(np.argmax(lab.pred_probs[r]))],
        )
        for i, r in zip(lab.issues, row, strict=True)
    ]
    return {
        "kind": "audit",
        "created": now_iso(),
        "dataset": fs.attrs.get("dataset"),
        "cache": str(Path(fs.path).resolve()),
        "cache_stem": Path(fs.path).stem,
        "fingerprint": fs.attrs.get("fingerprint"),
        "data_root": fs.attrs.get("data_root"),
        "backbone": fs.attrs.get("backbone"),
        "n_images": int(len(fs.labels)),
        "class_names": list(names),
        "classes": render.class_table(fs, cv),
        "exact_duplicates": [_group(fs, g, None) for g in exact],
        "near_duplicates": {
            "calibration": calib.as_dict(),
            "groups": [_group(fs, g, near) for g in near_dups],
        },
        "label_issues": {
            "method": f"logistic regression (C={labels.C}) on standardised features, "
            f"{lab.folds}-fold out-of-fold probabilities, cleanlab find_label_issues",
            "folds": lab.folds,
            "audited": int(len(lab.audited)),
            "left_out_classes": [names[c] for c in lab.left_out],
            "items": issues,
        },
        "outliers": {
            "rule": f"mean cosine distance to the {outliers.K} nearest other images above "
            f"median + {outliers.Z} x 1.4826 MAD",
            "fence": round(float(fence), 4),
            "items": [_item(fs, i, score=round(float(scores[i]), 4)) for i in flagged],
        },
        "map": "map.png",
    }


def _add_thumbnails(summary: dict, root: Path | None, folder: Path) -> None:
    """A thumbnail for every image the pages show."""
    items = [m for g in summary["exact_duplicates"] for m in g["members"]]
    items += [m for g in summary["near_duplicates"]["groups"] for m in g["members"]]
    items += summary["label_issues"]["items"][:LISTED] + summary["outliers"]["items"][:LISTED]
    for item in items:
        name = figures.thumbnail(root, item["path"], folder)
        item["thumb"] = f"thumbs/{name}" if name else None


def _save_predictions(fs: FeatureSet, lab: labels.LabelAudit, path: Path) -> None:
    """The out-of-fold probabilities by image path, for ``make export``."""
    from pipeline.core.files import write_atomic

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.savez(
                f,
                paths=np.asarray(fs.paths[lab.audited], dtype=str),
                pred_probs=lab.pred_probs.astype(np.float32),
                class_names=np.asarray(fs.class_names, dtype=str),
                fingerprint=np.asarray(str(fs.attrs.get("fingerprint") or "")),
            )

    write_atomic(path, write)
