"""Stage two: every requested head chosen on train, fitted and evaluated on cached features.

:func:`fit_heads` runs the sweep: the heads of :mod:`pipeline.heads.registry`, one
after another, each searched by cross-validation on train (:mod:`pipeline.heads.search`),
refitted, evaluated on val and test, and saved by :mod:`pipeline.heads.store` in the
folder :class:`pipeline.core.artifacts.Artifacts` names
(``artifacts/heads/<dataset>/<cache stem>/``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.pipeline import Pipeline

from pipeline.core import artifacts
from pipeline.core.errors import HeadError
from pipeline.core.options import check_options
from pipeline.features.cache import load_features
from pipeline.features.config import FeatureConfig
from pipeline.features.records import check_cache_for
from pipeline.features.resplit import split_record
from pipeline.heads import scoring
from pipeline.heads import search as head_search
from pipeline.heads.leaks import audit_leak_note
from pipeline.heads.registry import (
    HEADS,
    build_head,
    named_heads,
    parse_grid,
    planned_fits,
    resolve_heads,
    search_jobs,
)
from pipeline.heads.results import HeadResultAccess, HeadResultsAccess
from pipeline.heads.reuse import library_versions, reusable_manifests, reuse_key
from pipeline.heads.softmax import SoftmaxClassifier
from pipeline.heads.store import head_outputs, save_head
from pipeline.heads.summary import grid_move_lines, short, summary_table

# --------------------------------------------------------------------------- fitting


@dataclass
class HeadResult(HeadResultAccess):
    """One fitted and saved head (what :func:`fit_heads` returns per head).

    Scores and the fitted estimator are attributes (``val_accuracy``, ``test_accuracy``,
    ``cv_score``, ``params``, ``cv_results_``, ``estimator_``:
    :class:`pipeline.heads.results.HeadResultAccess`).
    """

    head: str
    manifest_path: Path
    manifest: dict[str, Any] = field(repr=False)
    reused: bool = False  # an earlier run's head: same cache, options and code (FORCE=1 refits)

    def format(self) -> str:
        """One line for the CLI: head, chosen values, CV and held-out scores in the metric
        it was chosen by (named unless accuracy), timing."""
        m, metric = self.manifest, self.metric
        params = ", ".join(f"{k}={short(v)}" for k, v in m["params"].items())
        scores = [f"cv {m['cv']['score']:.3f}" if m["cv"]["score"] is not None else "cv -"]
        scores += [f"{s} {v[metric]:.3f}" for s, v in m["metrics"].items() if metric in v]
        if metric != scoring.DEFAULT_METRIC:
            scores.append(f"({scoring.words(metric)})")
        startup = m.get("keras_import_seconds") or 0.0
        loaded = f" (after loading Keras, {startup:.1f} s)" if startup >= 0.05 else ""
        reused = " (reused)" if self.reused else ""
        return (
            f"{self.head:<8} {params:<24} {'  '.join(scores):<32} "
            f"fit {m['fit_seconds']:6.2f} s{loaded}{reused}  -> {self.manifest_path}"
        )


class HeadResults(HeadResultsAccess, list):
    """What :func:`fit_heads` returns: a :class:`HeadResult` per head, in the order asked.

    Heads are looked up by name too (``results["svm"]``); ``best_`` is the head the summary
    marks and ``best_estimator_`` its fitted pipeline
    (:class:`pipeline.heads.results.HeadResultsAccess`).

    ``fits_seconds`` sums the heads' ``fit_seconds`` (searches and final fits), of the
    heads fitted in this run (not those reused).
    ``keras_import_seconds`` is Keras's import when the sweep paid it: start-up, left
    out of every head's ``fit_seconds`` as stage one's time leaves it out.
    """

    def __init__(self, results: Iterable[HeadResult], *, keras_import_seconds: float = 0.0) -> None:
        super().__init__(results)
        self.keras_import_seconds = float(keras_import_seconds)

    @property
    def fits_seconds(self) -> float:
        """The searches of this run (reused heads' recorded times left out)."""
        return float(sum(r.manifest["fit_seconds"] for r in self if not r.reused))

    def format(self) -> str:
        """The heads side by side, the best marked (:func:`summary_table`)."""
        return summary_table(self)


def fit_heads(
    cache_path: str | Path,
    heads: str | Sequence[str] = ("all",),
    *,
    data: str | Path | None = None,
    features: FeatureConfig | None = None,
    artifacts_dir: str | Path = "artifacts",
    norm: str | None = None,
    pca: int | None = None,
    cv: int = 3,
    seed: int = 0,
    jobs: int = 0,
    grid: str | Mapping[str, Mapping[str, Sequence]] | None = None,
    force: bool = False,
    metric: str = scoring.DEFAULT_METRIC,
    log: Any = None,
) -> HeadResults:
    """Fit heads on the train split of a feature cache, one after another, and save them.

    Each head's hyper-parameters are chosen by stratified ``cv``-fold cross-validation
    (scored by ``metric``) on the train split (the softmax head has none to choose: it is
    fitted once and scored on its 15% early-stopping hold-out of train); the head is refitted
    on the whole train split, evaluated on ``val`` and ``test`` when the cache has them
    and saved with its manifest in :meth:`pipeline.core.artifacts.Artifacts.heads_dir`.

    Parameters
    ----------
    cache_path : path
        A stage-one feature cache (``artifacts/features/<dataset>/<config>.h5``).
    heads : str or sequence of str
        Head names (:data:`HEADS`), comma-separated names, or ``"all"``.
    data, features : path and FeatureConfig, optional
        The folder and options the cache must come from (checked, warnings to ``log``).
    artifacts_dir : path
        Output root.
    norm, pca : {"l2", "standard", "none"} and int, optional
        Override every head's normalisation step; keep this many principal components.
    cv, seed, jobs : int
        Folds of the search (fewer when a class is smaller); seed of every random step;
        parallel fits of each search (``-1`` all cores, ``0``: :func:`.registry.search_jobs`).
    grid, force : str or mapping, bool
        ``GRID=`` (:func:`~pipeline.heads.registry.parse_grid`); refit all (:mod:`.reuse`).
    metric : {"accuracy", "balanced_accuracy", "macro_f1"}
        ``METRIC=``: what the searches score and the heads rank by (:mod:`.scoring`).
    log : callable, optional
        Called with each head's progress and result lines (e.g. ``print``).

    Returns
    -------
    HeadResults
        One :class:`HeadResult` per head, in the order given.

    Raises
    ------
    HeadError
        Unknown head, a bad ``GRID``, an option out of bounds (``NORM``, ``PCA``, ``CV``,
        ``SEED``, ``--jobs``, ``METRIC``), one class in train, a val/test class not in
        train: none writes.
    CacheError
        A missing or unreadable cache, or one not made from ``data`` with ``features``.
    """
    options = {"norm": norm, "pca": pca, "cv": cv, "seed": seed, "metric": metric}
    check_options({**options, "jobs": jobs}, error=HeadError)
    grids = _grids_for(grid, names := resolve_heads(heads))
    fs, X_train, y_train, out_dir = _open_cache(cache_path, pca, artifacts_dir, data, features, log)
    names = _scalable(names, named_heads(heads), len(y_train), log)
    keys = {n: reuse_key(fs, n, grids.get(n), **options) for n in names}
    reused = {} if force else reusable_manifests(out_dir, keys, metric)
    plan = {n: planned_fits(HEADS[n], cv, grids.get(n)) for n in names if n not in reused}
    progress, results = _SweepProgress(plan, log), HeadResults([])
    for name in names:
        if name in reused:
            results.append(HeadResult(name, *reused[name], reused=True))
        else:
            progress.start(name)
            search = (X_train, y_train, cv, seed, jobs, grids.get(name), progress, metric)
            results.append(_fit_one(fs, name, search, out_dir, results, norm, pca, keys[name]))
        _log(log, "\n".join([results[-1].format(), *grid_move_lines(results[-1].manifest)]))
    _log_end(log, results, reused)
    return results


def _fit_one(
    fs: Any, name: str, search: tuple, out_dir: Path, results: HeadResults,
    norm: str | None, pca: int | None, key: str,
) -> HeadResult:  # fmt: skip
    """Search, evaluate and save one head; ``search`` is ``(X, y, cv, seed, jobs, grid,
    progress, metric)``."""
    X_train, y_train, cv, seed, jobs, grid, progress, metric = search
    # Keras's import (about 4 s on 2 cores, once per process) is start-up, not this head's
    # fit: paid before its clock starts and recorded apart, as stage one's time excludes it.
    startup = _import_keras() if HEADS[name].keras else None
    results.keras_import_seconds += startup or 0.0
    pipe = build_head(name, norm=norm, pca=pca, seed=seed)
    jobs = search_jobs(HEADS[name], jobs, y_train)
    searched = head_search.timed_search(
        HEADS[name], pipe, X_train, y_train, cv, seed, jobs, grid=grid, progress=progress,
        metric=metric,
    )  # fmt: skip
    given = {"search_key": key, "grid_source": "head" if grid is None else "GRID", "metric": metric}
    return _record(fs, name, searched, y_train, out_dir, norm=norm, pca=pca, seed=seed,
                   keras_import_seconds=startup, extra=given)  # fmt: skip


def _grids_for(grid: Any, names: Sequence[str]) -> dict[str, dict]:
    """``GRID=`` parsed, each head it names among those fitted."""
    grids = parse_grid(grid)
    unfitted = sorted(set(grids) - set(names))
    if unfitted:
        raise HeadError(
            f"GRID names {', '.join(unfitted)}, which HEAD={','.join(names)} does not fit; "
            "add it to HEAD or leave it out of GRID"
        )
    return grids


def _log_end(log: Any, results: HeadResults, reused: Mapping[str, HeadResult]) -> None:
    """The line that says which heads were reused, and the table."""
    if reused:
        heads = f"{len(reused)} head{'s' if len(reused) > 1 else ''} ({', '.join(reused)})"
        _log(log, f"reused {heads} fitted earlier on this cache with these options; "
                  "FORCE=1 (--force) refits")  # fmt: skip
    if len(results) > 1:
        _log(log, summary_table(results))


def _scalable(names: Sequence[str], named: set[str], rows: int, log: Any) -> tuple[str, ...]:
    """``names`` less the heads ``all`` brought in whose cost outgrows this train split."""
    kept = []
    for name in names:
        limit = HEADS[name].max_rows
        if limit is not None and rows > limit and name not in named:
            _log(log, f"{name} left out: {rows:,} train images is more than the {limit:,} it "
                      f"searches in reasonable time; HEAD={name} fits it anyway")  # fmt: skip
        else:
            kept.append(name)
    return tuple(kept)


def _log(log: Any, line: str) -> None:
    if log is not None:
        log(line)


def _open_cache(
    cache_path: str | Path,
    pca: int | None,
    artifacts_dir: str | Path,
    data: str | Path | None = None,
    features: FeatureConfig | None = None,
    log: Any = None,
) -> tuple[Any, np.ndarray, np.ndarray, Path]:
    """The cache (checked against ``data`` and ``features`` when ``data`` is given), its
    checked train split and the heads' folder (made here)."""
    if data is not None:  # before anything is fitted: heads of stale features mislead
        for note in check_cache_for(cache_path, data, features, artifacts_dir=artifacts_dir):
            if log is not None:
                log(note)

    fs = load_features(cache_path)
    X_train, y_train = _check_cache(fs, pca)
    leak = audit_leak_note(artifacts_dir, fs.attrs)  # beside the exact copies' warning
    if leak and log is not None:
        log(f"warning: {leak}")
    dataset = str(fs.attrs.get("dataset") or "unknown")
    out_dir = artifacts.Artifacts(artifacts_dir).heads_dir(dataset, Path(fs.path).stem)
    out_dir.mkdir(parents=True, exist_ok=True)
    return fs, X_train, y_train, out_dir


PROGRESS_EVERY = 3.0  # seconds between a search's fit-count lines


class _SweepProgress(head_search.Progress):
    """The sweep's fit count: ``[fits 11/48] knn: 10 fits planned ...`` as each head starts,
    then a line each few seconds while a search runs (a grid that moves adds its fits)."""

    def __init__(self, plan: Mapping[str, int], log: Any) -> None:
        self.plan, self.log, self.every = dict(plan), log, PROGRESS_EVERY
        self.total, self.done, self.head, self.last = sum(plan.values()), 0, "", 0.0

    def start(self, name: str) -> None:
        self.head, self.last = name, time.monotonic()
        fits = f"{self.plan[name]} fit{'' if self.plan[name] == 1 else 's'}"
        _log(self.log, f"[fits {self.done}/{self.total}] {name}: {fits} planned ...")

    def planned(self, fits: int) -> None:
        self.total += fits

    def fitted(self) -> None:
        self.done += 1
        if time.monotonic() - self.last >= self.every and self.done < self.total:
            self.last = time.monotonic()
            _log(self.log, f"[fits {self.done}/{self.total}] {self.head} ...")


def _check_cache(fs: Any, pca: int | None) -> tuple[np.ndarray, np.ndarray]:
    if "train" not in fs.splits:
        raise HeadError(
            f"cache {fs.path} has no train split (splits: {', '.join(fs.splits)}); heads fit on train"
        )
    X_train, y_train = fs.select("train")
    present = np.unique(y_train)
    if len(present) < 2:
        only = fs.class_names[int(present[0])] if len(present) else "none"
        raise HeadError(
            f"cache {fs.path} has only one class in train ({only!r}); a classifier needs at least "
            "two: add images of another class and re-run `make features`"
        )
    for split in artifacts.EVAL_SPLITS:
        if split in fs.splits:
            missing = sorted(set(np.unique(fs.select(split)[1]).tolist()) - set(present.tolist()))
            if missing:
                names = ", ".join(repr(fs.class_names[i]) for i in missing)
                raise HeadError(
                    f"class {names} appears in {split} but not in train of {fs.path}; "
                    f"add training images of it or remove it from {split}"
                )
    if pca is not None and pca > min(X_train.shape):
        raise HeadError(
            f"PCA={pca} exceeds what the train split supports (at most {min(X_train.shape)} "
            f"components: {X_train.shape[0]} images of width {X_train.shape[1]})"
        )
    return X_train, y_train


def _record(
    fs: Any,
    name: str,
    searched: head_search.Searched,
    y_train: np.ndarray,
    out_dir: Path,
    *,
    norm: str | None,
    pca: int | None,
    seed: int,
    keras_import_seconds: float | None,
    extra: Mapping[str, Any] | None = None,
) -> HeadResult:
    """Evaluate a searched head on val and test, and save it with its manifest."""
    spec, fitted, cv_info = HEADS[name], searched.fitted, searched.cv_info
    predictions, metrics, predict_seconds = _evaluate(fitted, fs)
    n_predicted = sum(len(p.labels) for p in predictions.values())
    attrs = fs.attrs
    last = fitted.steps[-1][1]
    manifest = artifacts.new_manifest(
        "head",
        name=name,
        dataset=attrs.get("dataset"),
        class_names=fs.class_names,
        features=artifacts.feature_identity(attrs),
        fingerprint=attrs.get("fingerprint"),
        split=split_record(attrs),  # what it was fit and scored on (a re-split makes another)
        head=name,  # the version-1 key, for readers that still look for it
        description=spec.description,
        cache=str(Path(fs.path).resolve()),
        cache_stem=Path(fs.path).stem,
        config_json=attrs.get("config_json"),
        feature_width=int(fs.features.shape[1]),
        n_train=int(len(y_train)),
        norm=spec.norm if norm is None else norm,
        pca=pca,
        seed=seed,
        params=head_search.unprefixed(searched.params),
        grid=cv_info.pop("grid", None) or {k: list(v) for k, v in spec.grid.items()},
        grid_moves=cv_info.get("grid_moves", {}),  # {param: {from, searched, direction, stopped}}
        cv=cv_info,
        estimator=repr(last),
        has_proba=hasattr(last, "predict_proba"),
        fit_seconds=searched.seconds,  # search and final fit
        keras_import_seconds=keras_import_seconds,  # None: no Keras; 0.0: imported already
        refit_seconds=cv_info["refit_seconds"],  # the final fit alone
        predict_seconds_per_image=predict_seconds / n_predicted if n_predicted else None,
        extraction_seconds=attrs.get("seconds"),
        metrics=metrics,
        warnings=searched.notes,
        versions=library_versions(),
        **_estimator_fields(last),
        **(extra or {}),
    )
    manifest_path = save_head(fitted, manifest, out_dir, predictions=predictions)
    return HeadResult(name, manifest_path, json.loads(manifest_path.read_text()))


def _import_keras() -> float:
    """Import Keras (and its backend) now; the seconds it took (0.0 when already imported)."""
    if "keras" in sys.modules:
        return 0.0
    started = time.perf_counter()
    import keras  # noqa: F401

    return time.perf_counter() - started


def _estimator_fields(estimator: Any) -> dict[str, Any]:
    """What a classifier learnt that belongs in the manifest (the softmax head's epochs)."""
    if isinstance(estimator, SoftmaxClassifier):
        return {"n_epochs": int(estimator.n_epochs_), "sigmoid": bool(estimator.sigmoid)}
    return {}


def _evaluate(
    fitted: Pipeline, fs: Any
) -> tuple[dict[str, artifacts.SplitPredictions], dict[str, Any], float]:
    """Predictions and every metric (:func:`pipeline.heads.scoring.scores`) on ``val`` and
    ``test``, and the seconds predicting took."""
    predictions, metrics, seconds = {}, {}, 0.0
    for split in artifacts.EVAL_SPLITS:
        if split not in fs.splits:
            continue
        mask = fs.split == split
        X, y = fs.features[mask], fs.labels[mask]
        started = time.perf_counter()
        pred, scores, is_proba = head_outputs(fitted, X, len(fs.class_names))
        seconds += time.perf_counter() - started
        metrics[split] = {**scoring.scores(y, pred), "n": int(len(y))}
        predictions[split] = artifacts.SplitPredictions(
            paths=np.asarray(fs.paths[mask], dtype=object),
            labels=np.asarray(y, dtype=np.int64),
            pred=pred,
            scores=scores,
            is_proba=is_proba,
        )
    return predictions, metrics, seconds
