"""The report: every head (and fine-tuned model) of a data set, compared.

:func:`write_report` reads results files only (manifests and per-image
predictions; it never unpickles a head and never runs a model) and writes,
under ``artifacts/reports/<dataset>/``::

    report.md        Markdown, figures as PNG files in figures/
    report.html      one self-contained page (figures embedded as base64 PNG)
    report.json      every number of the report
    figures/*.png

It works in three steps, one module each:

1. **collect** (here, :func:`collect_runs`): find the manifests through
   :class:`pipeline.core.artifacts.Artifacts` and read them and their predictions
   with :mod:`pipeline.core.artifacts`; a run whose files cannot be read is skipped
   with a note;
2. **evaluate** (:mod:`pipeline.report.evaluation`): metrics per split with bootstrap
   intervals, McNemar comparisons, the leaderboard, as JSON-ready data;
3. **render** (:mod:`pipeline.report.render` for the words and tables, :mod:`pipeline.report.pages`
   for the Markdown and HTML pages,
   :mod:`pipeline.report.plotting` for the figures).

Contents: a verdict in words (the chosen run, ranked on val accuracy, or on
the head's cross-validation score without a val split, never on test; its
untouched test figures; the runs tied with it by exact McNemar and by
overlapping intervals; what each costs, saying whether the times include the
backbone); the leaderboard with a forest plot and accuracy against cost; the
chosen run's errors (row-normalised confusion matrices with counts, per-class
precision / recall / F1 / support, the most-confused class pairs, thumbnails of
its highest-loss val and test images, read only inside the data root the cache
or manifest records); the other runs' confusion matrices, ROC and calibration
curves where there are probabilities, McNemar tests; fine-tuned runs' training
curves; every metric with 95% percentile-bootstrap intervals; random-weight
runs (``weights_source`` ``none``) apart, as baselines; the configuration.

Results contract (what a run must leave for the report)
-------------------------------------------------------
Heads (stage two) and fine-tuned models (stage three) share one manifest
schema, version 2 (owned by :mod:`pipeline.core.artifacts`).

*Manifest*: a JSON object.

- Heads: ``artifacts/heads/<dataset>/<cache stem>/<head>.json`` with
  ``"kind": "head"`` (written by :func:`pipeline.heads.fit.fit_heads`).
- Fine-tuned models: ``artifacts/finetune/<dataset>/<name>.json`` with
  ``"kind": "finetuned"`` (written by :func:`pipeline.finetuning.run.finetune`).

Keys the report uses:

============================  ========  ===============================================
key                           required  meaning
============================  ========  ===============================================
``kind``                      yes       ``"head"`` or ``"finetuned"``
``manifest_version``          yes       ``2`` (version 1 is read, see below)
``class_names``               yes       class names, in the cache's order
``files``                     yes       role -> file name in the manifest's folder:
                                        ``predictions`` (required here), ``model``,
                                        ``history`` (fine-tuned: the per-epoch log, a
                                        JSON list of ``{phase, epoch, loss, accuracy,
                                        val_loss, val_accuracy}``, drawn as training
                                        curves)
``name``                      no        row label (default: the manifest's file stem)
``backbone``, ``input_size``, no        shown in the configuration table
``pooling``, ``layer``
``weights_source``            no        the weights the user passed (``imagenet``,
                                        ``none``, a file): the "weights" column
``weights``                   no        the weights' identity (Keras version, a
                                        file's digest): "weights identity"
``params`` or ``config``      no        chosen hyper-parameters / fine-tuning options
``fit_seconds``               no        training time (plotted against accuracy)
``predict_seconds_per_image`` no        inference time per image
``fingerprint``               no        stage-one fingerprint of the images it used
============================  ========  ===============================================

Version-1 manifests are upgraded in memory by
:func:`pipeline.core.artifacts.read_manifest`: heads named themselves with ``head``;
fine-tuned runs had ``format_version``, ``weights`` = the source and
``weights_id`` = the identity, and top-level ``predictions`` and ``history``
file names, which become ``files.predictions`` and ``files.history``. A file
name that points outside the manifest's folder is refused.

*Predictions*: a JSON object ::

    {"class_names": ["ants", "bees"],
     "predictions": {
        "val/ants/1030023514_aad5c608f9.jpg":
            {"split": "val", "label": "ants", "pred": "bees", "proba": [0.31, 0.69]},
        ...}}

- keys: image paths relative to the data root, POSIX separators, exactly as
  stage one stores them in the cache (``FeatureSet.paths``);
- ``split``: ``"val"`` or ``"test"`` (other splits are ignored);
- ``label`` and ``pred``: true and predicted class names;
- ``proba`` (optional): probabilities of every class in ``class_names`` order
  (gives log loss and top-5); ``scores`` (optional): decision scores, same
  order (gives top-5 only).

A fine-tuned run is compared, by McNemar's test, with the best head of every
cache whose images of that split it covers exactly (same paths).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core import artifacts
from pipeline.core.artifacts import ArtifactError, Artifacts
from pipeline.core.errors import CacheError, ReportError, did_you_mean
from pipeline.core.files import write_bytes_atomic
from pipeline.core.options import check_options
from pipeline.features.cache import read_attrs
from pipeline.features.resplit import split_record, split_words
from pipeline.report import pages
from pipeline.report.audit_note import audit_note
from pipeline.report.evaluation import build_report_data
from pipeline.report.figures import report_figures
from pipeline.report.fonts import class_labels
from pipeline.report.protocols import protocols_link
from pipeline.report.runs import Run

__all__ = ["ReportResult", "Run", "collect_runs", "write_report"]


@dataclass
class ReportResult:
    """Where :func:`write_report` wrote, and its headline lines."""

    markdown: Path
    html: Path
    json: Path
    lines: list[str]

    def format(self) -> str:
        return "\n".join([*self.lines, f"wrote {self.markdown}, {self.html}, {self.json}"])


# --------------------------------------------------------------------------- collect


def read_run(path: Path, attrs_of: Any = None) -> Run:
    """One run from its manifest, its predictions and (fine-tuned) its history.

    ``attrs_of`` maps a cache path to its attributes (or ``None``); by default
    :func:`cache_attrs`. The cache gives a head its data root and image count.

    Raises
    ------
    ReportError
        The manifest or its predictions cannot be used (the message names ``path``).
    """
    try:
        manifest = artifacts.read_manifest(path)
        predictions = artifacts.manifest_file(manifest, path, "predictions")
        if predictions is None:
            raise ReportError("no predictions file (no val or test split?)")
        class_names = tuple(manifest["class_names"])
        splits = artifacts.read_predictions(predictions, class_names)
    except (ArtifactError, ReportError) as exc:
        raise ReportError(f"skipped {path}: {exc}") from None
    if not splits:
        raise ReportError(f"skipped {path}: no val or test predictions")
    kind = manifest["kind"]
    name = str(manifest.get("name") or manifest.get("head") or path.stem)
    group = path.parent.name if kind == "head" else "finetuned"
    history_file = artifacts.manifest_file(manifest, path, "history")
    history = artifacts.read_history(history_file) if history_file else []
    attrs = (attrs_of or cache_attrs)(manifest.get("cache")) or {}
    root = manifest.get("data_root") or attrs.get("data_root")
    n_images = attrs.get("n_images")
    return Run(
        name, kind, group, manifest, class_names, splits, history,
        data_root=str(root) if root else None,
        cache_images=int(n_images) if isinstance(n_images, int | float) and n_images else None,
    )  # fmt: skip


def cache_attrs(cache: Any) -> dict[str, Any] | None:
    """The attributes of the cache a manifest names, or ``None`` (no cache, unreadable)."""

    if not isinstance(cache, str) or not Path(cache).is_file():
        return None
    try:
        return read_attrs(cache)
    except CacheError:
        return None


def collect_runs(
    dataset: str, artifacts_dir: str | Path = "artifacts"
) -> tuple[list[Run], list[str]]:
    """Every head and fine-tuned run of ``dataset`` with readable predictions.

    Returns
    -------
    runs : list of Run
        In the order of :meth:`pipeline.core.artifacts.Artifacts.run_manifests`.
    notes : list of str
        What was skipped and why, and heads fit before their cache was rebuilt.
    """
    seen: dict[Any, dict[str, Any] | None] = {}

    def attrs_of(cache: Any) -> dict[str, Any] | None:  # each cache read once
        key = cache if isinstance(cache, str) else None
        if key not in seen:
            seen[key] = cache_attrs(cache)
        return seen[key]

    runs, notes = [], []
    for path in Artifacts(artifacts_dir).run_manifests(dataset):
        try:
            runs.append(read_run(path, attrs_of))
        except ReportError as exc:
            notes.append(str(exc))
    runs, dropped = _other_splits(runs, attrs_of)
    notes += dropped + _stale_notes(runs, attrs_of)
    return runs, notes


def _other_splits(runs: list[Run], attrs_of: Any) -> tuple[list[Run], list[str]]:
    """``runs`` less the heads fit on another split than their cache holds now (it was
    re-split since: their test images are not the others'), and one line per cache saying so."""
    kept: list[Run] = []
    left: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        attrs = attrs_of(run.manifest.get("cache")) if run.kind == "head" else None
        fit_on = run.manifest.get("split")
        if attrs and isinstance(fit_on, dict) and fit_on != split_record(attrs):
            left.setdefault((run.manifest["cache"], split_words(fit_on)), []).append(run)
        else:
            kept.append(run)
    notes = [
        f"left out {len(group)} head(s) fit on another split of {cache} ({words}) than it "
        f"holds now ({split_words(split_record(attrs_of(cache)))}): "
        f"{', '.join(r.run_id for r in group)}; re-run `make head`"
        for (cache, words), group in left.items()
    ]
    return kept, notes


def _stale_notes(runs: list[Run], attrs_of: Any) -> list[str]:
    """A note per head whose cache was rebuilt (other fingerprint) after it was fit."""
    notes = []
    for run in runs:
        cache = run.manifest.get("cache")
        if run.kind != "head" or not cache:
            continue
        fingerprint = (attrs_of(cache) or {}).get("fingerprint")
        if fingerprint is not None and fingerprint != run.manifest.get("fingerprint"):
            notes.append(
                f"{run.run_id} was fit before {cache} was rebuilt or re-split; re-run `make head`"
            )
    return notes


# --------------------------------------------------------------------------- thumbnails


THUMBNAIL_SIDE = 112  # pixels, the longer side


def image_under(root: str | Path, relative: str) -> Path:
    """``root / relative`` for a plain relative path that stays inside ``root``.

    Raises
    ------
    ReportError
        ``relative`` is absolute or has a ``..`` part.
    """
    parts = Path(relative).parts
    if not relative or Path(relative).is_absolute() or ".." in parts or relative.startswith("~"):
        raise ReportError(f"{relative!r} is not a path inside the data root {root}")
    return Path(root) / relative


def thumbnail(path: Path, side: int = THUMBNAIL_SIDE) -> bytes:
    """A PNG of the image at ``path`` with its longer side ``side`` pixels.

    Small images (the 8x8 digits) are enlarged with nearest-neighbour
    resampling so their pixels stay sharp; large ones are reduced with Lanczos.

    Raises
    ------
    OSError
        The file is gone or is not an image Pillow reads.
    """
    import io

    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = side / max(image.size)
        size = tuple(max(1, round(v * scale)) for v in image.size)
        method = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
        buffer = io.BytesIO()
        image.resize(size, method).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def thumbnails(data: dict[str, Any], runs: list[Run]) -> tuple[dict[str, bytes], list[str]]:
    """PNG thumbnails of the error analysis's images (the worst, and the nearest training
    images beside them), by image path, and notes.

    Images are opened only inside the winner's data root (from its cache's
    attributes or its manifest); an image that is gone or unreadable is left
    out with a note.
    """
    errors = data.get("errors")
    if not errors:
        return {}, []
    run = next(r for r in runs if r.run_id == errors["run"])
    worst = [e for s in errors["splits"].values() for e in s["top_losses"]]
    wanted = [p for e in worst for p in [e["path"], *(n["path"] for n in e.get("nearest", []))]]
    first = [errors["nearest_note"]] if errors.get("nearest_note") else []
    if not wanted:
        return {}, first
    if not run.data_root or not Path(run.data_root).is_dir():
        where = run.data_root or "not recorded (its cache is gone?)"
        return {}, [*first, f"no thumbnails of the worst images: data root {where} is not a folder"]
    out, missing = {}, []
    for relative in dict.fromkeys(wanted):
        try:
            out[relative] = thumbnail(image_under(run.data_root, relative))
        except (ReportError, OSError, ValueError) as exc:
            missing.append(f"{relative} ({type(exc).__name__})")
    notes = (
        [f"thumbnails left out, image gone or unreadable: {', '.join(missing)}"] if missing else []
    )
    return out, first + notes


# --------------------------------------------------------------------------- write


def _nothing_to_report(dataset: str, artifacts_dir: str | Path, notes: list[str]) -> ReportError:
    art = Artifacts(artifacts_dir)
    known = art.datasets_with_heads()
    extra = f" ({'; '.join(notes)})" if notes else ""
    another = [note for note in notes if "fit on another split" in note]
    if another:  # every head was fit before a re-split: not a split without val or test
        return ReportError(f"nothing to report for {dataset!r}: {'; '.join(another)}")
    if dataset in known:  # heads exist, but the split gave them no val or test images to score
        return ReportError(
            f"nothing to report for {dataset!r}: its heads under {art.heads_root() / dataset} have "
            "no val or test predictions (the split left val and test empty); give each class more "
            "images, or ship val/ and test/ folders, then re-run `make features` and `make head`"
            f"{extra}"
        )
    hint = did_you_mean(dataset, known) if known else ""
    return ReportError(
        f"nothing to report for {dataset!r}: no heads with predictions under "
        f"{art.heads_root() / dataset}{hint}; run `make head DATA=...` first{extra}"
    )


def _write_pngs(folder: Path, pngs: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, png in pngs.items():
        write_bytes_atomic(folder / name, png)
    for stale in folder.glob("*.png"):  # figures of runs no longer reported
        if stale.name not in pngs:
            stale.unlink()


def _write_files(
    out: Path, data: dict[str, Any], figures: dict[str, bytes], thumbs: dict[str, bytes]
) -> tuple[Path, ...]:
    _write_pngs(out / "figures", figures)
    names = pages.thumbnail_names(thumbs)
    _write_pngs(out / "thumbnails", {names[path]: png for path, png in thumbs.items()})
    paths = out / "report.md", out / "report.html", out / "report.json"
    write_bytes_atomic(paths[0], pages.markdown(data, list(figures), names))
    write_bytes_atomic(paths[1], pages.html_page(data, figures, thumbs))
    write_bytes_atomic(paths[2], json.dumps(data, indent=1) + "\n")
    return paths


def write_report(
    dataset: str,
    *,
    artifacts_dir: str | Path = "artifacts",
    out_dir: str | Path | None = None,
    n_resamples: int = 2000,
    seed: int = 0,
) -> ReportResult:
    """Write the Markdown, HTML and JSON report of every head of ``dataset``.

    Parameters
    ----------
    dataset : str
        Data set name (the data folder's name, e.g. ``"hymenoptera_data"``).
    artifacts_dir : path
        Root holding ``heads/<dataset>/`` and ``finetune/<dataset>/``.
    out_dir : path, optional
        Output folder (default ``<artifacts>/reports/<dataset>``).
    n_resamples : int
        Bootstrap resamples for the intervals.
    seed : int
        Seed of the bootstrap.

    Returns
    -------
    ReportResult
        Paths written and a short summary.

    Raises
    ------
    PipelineError
        ``n_resamples`` out of range.
    ReportError
        No head and no fine-tuned run of ``dataset`` with predictions.

    Examples
    --------
    >>> print(write_report("hymenoptera_data").format())
    """
    check_options({"n_resamples": n_resamples})
    runs, notes = collect_runs(dataset, artifacts_dir)
    if not runs:  # protocols alone still get their page, and the error says where
        link, _ = protocols_link(artifacts_dir, dataset, Path.cwd())
        where = [f"its protocol results are on {link['path']}"] if link else []
        raise _nothing_to_report(dataset, artifacts_dir, notes + where)
    if len({r.class_names for r in runs}) > 1:
        notes.append("runs disagree on the class list; each is scored on its own classes")
    data = build_report_data(dataset, runs, notes, n_resamples=n_resamples, seed=seed)
    thumbs, thumb_notes = thumbnails(data, runs)
    data["notes"] += thumb_notes
    if any(class_labels(r.class_names)[1] for r in runs):
        data["notes"].append(
            "class names drawn as numbers in the figures: no installed font has their glyphs "
            "(install fonts-noto-cjk or fonts-nanum); the report has the key"
        )
    figures = report_figures(data)
    out = Path(out_dir) if out_dir else Artifacts(artifacts_dir).reports_dir(dataset)
    data["audit"] = audit_note(artifacts_dir, dataset, out)
    data["protocols"], protocol_notes = protocols_link(artifacts_dir, dataset, out)
    data["notes"] += protocol_notes
    try:
        paths = _write_files(out, data, figures, thumbs)
    except OSError as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise ReportError(
            f"cannot write the report into {out}: {why}; make the folder writable "
            "(or remove it) or choose another with --out"
        ) from None
    return ReportResult(*paths, pages.summary_lines(data))
