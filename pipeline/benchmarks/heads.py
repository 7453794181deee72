"""``make bench-heads``: the default head sweep, search included, against stage one's time."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.files import write_json_atomic
from pipeline.features.cache import read_attrs
from pipeline.features.extract import extract_features
from pipeline.heads.fit import fit_heads
from pipeline.heads.registry import DEFAULT_HEADS
from pipeline.heads.softmax import SoftmaxClassifier


def _ratio_text(value: float | None) -> str:
    return "n/a (no extraction time in the cache)" if value is None else f"{value:.3f}"


def bench_heads_on_folders(
    data_dirs: list[str | Path],
    config: Any,
    *,
    split: Any = None,
    out: str | Path | None = None,
    cv: int = 3,
    seed: int = 0,
    repeats: int = 3,
    log: Any = None,
) -> dict:
    """:func:`bench_heads` on caches that stage one extracts in this run, into a temporary folder.

    ``make bench-heads``. Both sides of the ratio are then timed in one run on the same
    machine: a cache's recorded ``seconds`` come from whenever it was built, possibly on
    a quieter or busier machine. ``config`` is a :class:`pipeline.features.config.FeatureConfig`,
    ``split`` a :class:`pipeline.data.folders.SplitConfig`. The user's caches are not touched.
    """

    _check_repeats(repeats)  # before stage one's minutes, not after
    with tempfile.TemporaryDirectory() as tmp:
        caches = [
            extract_features(
                data, config, artifacts_dir=tmp, split=split, progress=False
            ).cache_path
            for data in data_dirs
        ]
        return bench_heads(caches, out=out, cv=cv, seed=seed, repeats=repeats, log=log)


def bench_heads_synthetic(
    classes: int,
    rows: str | list[int],
    *,
    reference: str | Path | None = None,
    config: Any = None,
    width: int = 1280,
    out: str | Path | None = None,
    cv: int = 3,
    seed: int = 0,
    repeats: int = 3,
    log: Any = None,
) -> dict:
    """``make bench-heads CLASSES=100 ROWS=3000,30000``: the default sweep on synthetic
    features of ``classes`` classes (:mod:`pipeline.benchmarks.synthetic`), ``rows`` train
    images each time (a list, or ``"3000,30000"``), and a fifth as many val images.

    The ratio's denominator is what stage one would take on as many real images: its time
    per image on the ``reference`` folder, extracted in this run with ``config``, times the
    rows (no ratio without a reference). Each row also records the process's peak memory.
    """
    from pipeline.benchmarks.synthetic import write_synthetic_cache

    _check_repeats(repeats)
    rows = parse_rows(rows) if isinstance(rows, str) else list(rows)
    if classes < 2 or not rows or min(rows) < 2 * classes:
        raise PipelineError(
            f"CLASSES={classes} ROWS={','.join(map(str, rows))}: give at least 2 classes and "
            "at least twice as many rows as classes"
        )
    per_image = _stage_one_per_image(reference, config) if reference is not None else None
    if log is not None and per_image is not None:
        log(f"stage one on {Path(reference).name}: {per_image * 1000:.1f} ms per image")
    _warm_up(seed)
    found = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in rows:
            seconds = per_image * n if per_image is not None else None
            cache = write_synthetic_cache(
                Path(tmp) / f"synthetic_{classes}x{n}.h5", n, classes, width, seconds=seconds
            )
            row = _bench_cache(cache, cv, seed, repeats)
            row.update(rows=n, classes=classes, width=width, max_rss_mb=_max_rss_mb())
            found.append(row)
            if log is not None:
                log(f"{classes} classes x {n:,} rows: " + _row_line(row))
    summary = {"target": 0.2, "heads": list(DEFAULT_HEADS), "cv": cv, "caches": found,
               "stage_one_seconds_per_image": per_image, "cpu_count": os.cpu_count()}  # fmt: skip
    if out is not None:
        write_json_atomic(out, summary)
    return summary


def parse_rows(text: str) -> list[int]:
    """``ROWS=3000,30000`` -> ``[3000, 30000]``."""
    try:
        rows = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        rows = []
    if not rows or min(rows) < 1:
        raise PipelineError(
            f"ROWS={text!r} is not a comma list of row counts, e.g. ROWS=3000,30000"
        )
    return rows


def _stage_one_per_image(folder: str | Path, config: Any) -> float:
    """Stage one's extraction seconds per image on ``folder``, timed now."""
    with tempfile.TemporaryDirectory() as tmp:
        summary = extract_features(folder, config, artifacts_dir=tmp, progress=False)
        attrs = read_attrs(summary.cache_path)
    return float(attrs["seconds"]) / max(1, int(attrs["n_images"]))


def _max_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_heads(
    cache_paths: list[str | Path],
    *,
    out: str | Path | None = None,
    cv: int = 3,
    seed: int = 0,
    repeats: int = 3,
    log: Any = None,
) -> dict:
    """Fit time of the default heads over stage-one extraction time, per cache.

    ``make bench-heads`` (through :func:`bench_heads_on_folders`). The heads are
    fitted into a temporary folder (the user's heads are not touched); Keras is
    started first, as stage one's time excludes start-up too. ``ratio`` is the time
    of the heads' searches (final fits included, one head after another), divided by
    the cache's ``seconds`` attribute (stage one's extraction time, its graph
    compilation included); ``ratio_sweep`` divides the wall-clock time of the whole
    :func:`~pipeline.heads.fit.fit_heads` call (evaluation and saved files too);
    ``ratio_final_fit`` counts only the fit that made each kept head. Each cache is
    swept ``repeats`` times; the row is the sweep with the median searches' time
    (every sweep's in ``searches_seconds_each_sweep``).

    Returns
    -------
    dict
        ``{"target": 0.1, "caches": [{"cache", "dataset", "extraction_seconds",
        "searches_seconds", "searches_seconds_each_sweep", "sweep_seconds",
        "fit_seconds": {head: s}, "refit_seconds": {head: s}, "total_fit_seconds", "ratio",
        "ratio_sweep", "ratio_final_fit", "accuracy": {...}}]}``, also
        written to ``out`` as JSON when given.
    """

    _check_repeats(repeats)
    _warm_up(seed)
    rows = []
    for cache_path in cache_paths:
        row = _bench_cache(cache_path, cv, seed, repeats)
        rows.append(row)
        if log is not None:
            log(_row_line(row))
    summary = {
        "target": 0.1,
        "heads": list(DEFAULT_HEADS),
        "cv": cv,
        "caches": rows,
        "cpu_count": os.cpu_count(),
    }
    if out is not None:
        write_json_atomic(out, summary)
    return summary


def _warm_up(seed: int) -> None:
    """Start Keras before any timing."""
    # Stage one's seconds exclude start-up (TensorFlow initialisation, model building); a
    # one-epoch fit on noise pays the Keras start-up here, outside the timing. Each sweep
    # still builds and traces its own models.
    X, y = np.random.default_rng(seed).normal(size=(8, 4)), np.arange(8) % 2
    SoftmaxClassifier(max_epochs=1, validation_fraction=0.0).fit(X, y)


def _bench_cache(cache_path: str | Path, cv: int, seed: int, repeats: int) -> dict[str, Any]:
    """Sweep one cache ``repeats`` times; the row of the median sweep, with its ratios."""
    attrs = read_attrs(cache_path)
    sweeps = [_timed_sweep(cache_path, cv, seed) for _ in range(repeats)]
    # The median sweep by the searches' time: a sweep of half a second feels a moment's
    # noise on a shared machine that stage one's seconds average out.
    results, sweep = sorted(sweeps, key=lambda run: run[0].fits_seconds)[len(sweeps) // 2]
    fit = {r.head: r.manifest["fit_seconds"] for r in results}
    refit = {r.head: r.manifest["refit_seconds"] for r in results}
    total, total_refit = float(sum(fit.values())), float(sum(refit.values()))
    searches = results.fits_seconds
    extraction = float(attrs.get("seconds") or 0.0)
    return {
        "cache": Path(cache_path).name,
        "dataset": attrs.get("dataset"),
        "n_images": attrs.get("n_images"),
        "extraction_seconds": extraction,
        "fit_seconds": fit,
        "refit_seconds": refit,
        "searches_seconds": searches,
        "searches_seconds_each_sweep": [run.fits_seconds for run, _ in sweeps],
        "sweep_seconds": sweep,
        "total_fit_seconds": total,
        "total_refit_seconds": total_refit,
        "ratio": searches / extraction if extraction > 0 else None,
        "ratio_sweep": sweep / extraction if extraction > 0 else None,
        "ratio_final_fit": total_refit / extraction if extraction > 0 else None,
        "accuracy": {r.head: r.manifest["metrics"] for r in results},
    }


def _row_line(row: dict[str, Any]) -> str:
    """One cache's line: the ratios against the target, and each head's fit time."""
    return (
        f"{row['dataset']}: heads' searches {row['searches_seconds']:.2f} s / extraction "
        f"{row['extraction_seconds']:.1f} s = ratio {_ratio_text(row['ratio'])} "
        f"(target <= {0.2 if 'classes' in row else 0.1}; "
        f"whole sweep with evaluation and files "
        f"{row['sweep_seconds']:.1f} s, {_ratio_text(row['ratio_sweep'])}; final fits "
        f"{row['total_refit_seconds']:.1f} s, {_ratio_text(row['ratio_final_fit'])}); "
        + ", ".join(f"{h} {s:.2f} s" for h, s in row["fit_seconds"].items())
    )


def _check_repeats(repeats: int) -> None:
    if repeats < 1:
        raise PipelineError(f"--repeats must be at least 1 (sweeps per data set); got {repeats}")


def _timed_sweep(cache_path: str | Path, cv: int, seed: int) -> tuple[Any, float]:
    """One default sweep into a temporary folder, as a fresh process runs it; its results
    and its wall time."""

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        results = fit_heads(cache_path, DEFAULT_HEADS, artifacts_dir=tmp, cv=cv, seed=seed)
        return results, time.perf_counter() - started
