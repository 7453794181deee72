"""Running a research protocol on one feature cache: heads fitted per seed, mean +- std.

:func:`run_protocol` re-splits the cache's rows (:mod:`pipeline.heads.protocols`) once
per seed, fits each head on the training rows only (hyper-parameters chosen by
cross-validation on them, as ``make head`` chooses them, when every class has at least
:data:`MIN_PER_CLASS_FOR_CV` training images; else the head's fixed defaults), scores
the test rows and writes ``artifacts/protocols/<dataset>/<cache stem>/<protocol>.json``
and ``.md``. :func:`run_curve` (:mod:`pipeline.heads.protocol_curve`) runs it for
several N. No head is saved and the cache is never rewritten: a protocol costs fits only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import balanced_accuracy_score, f1_score, top_k_accuracy_score

from pipeline.core.artifacts import now_iso, safe_name
from pipeline.core.errors import HeadError
from pipeline.core.files import write_atomic
from pipeline.core.options import PROTOCOL_METRICS, check_options
from pipeline.features.cache import FeatureSet, load_features
from pipeline.heads import scoring
from pipeline.heads import search as head_search
from pipeline.heads.linear_eval import NAME as LINEAR_EVAL
from pipeline.heads.linear_eval import fit_linear_eval
from pipeline.heads.protocols import TEST, TRAIN, UNUSED, per_class_split, split_file
from pipeline.heads.registry import HEADS, build_head, resolve_heads, search_jobs
from pipeline.heads.store import head_outputs

METRICS = PROTOCOL_METRICS  # make head's three (METRIC=), and top5
DEFAULT_HEADS = "svm,logreg"  # linear heads, as DeCAF and Razavian et al. report
MIN_PER_CLASS_FOR_CV = 5  # fewer training images in a class: no search, fixed defaults
TOP5_ABOVE = 10  # classes; top-5 accuracy is reported above this many


@dataclass
class ProtocolResult:
    """One protocol's figures: per head, each seed's scores and their mean and std."""

    name: str
    metric: str
    record: dict[str, Any] = field(repr=False)
    json_path: Path | None = None
    md_path: Path | None = None

    def mean(self, head: str, metric: str | None = None) -> float:
        """The mean over seeds of ``metric`` (default: the protocol's) for ``head``."""
        return float(self.record["heads"][head]["mean"][metric or self.metric])

    def std(self, head: str, metric: str | None = None) -> float:
        """The standard deviation over seeds (population, ``ddof=0``)."""
        return float(self.record["heads"][head]["std"][metric or self.metric])

    def format(self) -> str:
        """The Markdown table, then where it was written."""
        lines = [markdown_table(self.record)]
        if self.json_path is not None:
            lines.append(f"wrote {self.json_path} and {self.md_path}")
        return "\n".join(lines)


def run_protocol(
    cache: str | Path | FeatureSet,
    train_per_class: int | None = None,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    heads: str | Sequence[str] = DEFAULT_HEADS,
    metric: str = "balanced_accuracy",
    *,
    split_list: str | Path | None = None,
    data_root: str | Path | None = None,
    cv: int = 3,
    artifacts_dir: str | Path | None = "artifacts",
    log: Any = None,
    part_of: str | None = None,
) -> ProtocolResult:
    """Fit ``heads`` on ``train_per_class`` images per class (or a shipped ``split_list``),
    once per seed, and score the rest.

    Parameters
    ----------
    cache : path or FeatureSet
        A stage-one feature cache; its rows are re-split, the file is not changed.
    train_per_class : int, optional
        N training images per class, drawn per seed from all of a class's rows (the
        cache's train, val and test pooled); every other row is test.
    seeds : sequence of int
        One draw (and one set of fits) per seed. With ``split_list`` the split is the
        same each time; the seeds vary the folds and the heads' own randomness.
    heads, metric : str
        Head names (comma-separated or a list; registered heads, or ``linear_eval``:
        :mod:`pipeline.heads.linear_eval`); the metric the searches choose by and the
        headline reports, one of :data:`METRICS`.
    split_list, data_root : path
        A CSV ``path,split[,label]`` or ``train=a.txt,test=b.txt`` (:func:`split_file`), and
        the image folder its paths are relative to.
    cv : int
        Folds of each head's hyper-parameter search on the training rows.
    artifacts_dir : path or None
        Where ``protocols/<dataset>/<cache stem>/<protocol>.json`` and ``.md`` go (None:
        nothing written).
    part_of : str, optional
        Recorded as ``part_of`` (``"curve"`` when :func:`pipeline.recipes.curve.run_curve`
        runs it): the protocols page shows such a run with its curve.

    Raises
    ------
    HeadError
        Neither or both of ``train_per_class`` and ``split_list``, an unknown metric or
        head, no seeds, a class too small for N, a bad split list, a test class the
        training rows lack.
    """
    fs = cache if isinstance(cache, FeatureSet) else load_features(cache)
    names, _ = _check_request(heads, metric, seeds, train_per_class, split_list)
    if metric == "top5" and len(fs.class_names) <= TOP5_ABOVE:
        raise HeadError(f"METRIC=top5 needs more than {TOP5_ABOVE} classes; this cache has "
                        f"{len(fs.class_names)}")  # fmt: skip
    fixed, name = _listed_split(fs, train_per_class, split_list, data_root)
    started, per_seed = time.perf_counter(), []
    for seed in seeds:
        split = fixed if fixed is not None else _drawn(fs, int(train_per_class), seed)
        per_seed.append(evaluate_split(fs, split, names, seed, cv, metric))
        _log(log, f"{name} seed {seed}: " + ", ".join(
            f"{h} {per_seed[-1][h][metric]:.3f}" for h in names))  # fmt: skip
    record = _summarise(fs, name, metric, names, list(seeds), per_seed)
    record["seconds"] = time.perf_counter() - started
    record["created"] = now_iso()
    if part_of:
        record["part_of"] = part_of
    record["split"] = (
        {"kind": "list", "file": str(split_list)}
        if split_list is not None
        else {"kind": "per_class", "train_per_class": int(train_per_class),
              "pool": "all rows of each class (the cache's train, val and test pooled)"}
    )  # fmt: skip
    result = ProtocolResult(name, metric, record)
    if artifacts_dir is not None:
        out = protocols_dir(artifacts_dir, fs)
        result.json_path = _write(out / f"{name}.json", json.dumps(record, indent=2))
        result.md_path = _write(out / f"{name}.md", markdown_table(record) + "\n")
    return result


def _drawn(fs: FeatureSet, n: int, seed: int) -> np.ndarray:
    """N per class over the cache's rows in a split (rows a split file left ``unused``
    at stage one stay out of the protocol too)."""
    used = fs.split != "unused"
    split = np.full(len(fs.labels), UNUSED, dtype=object)
    split[used] = per_class_split(fs.labels[used], n, seed, fs.class_names)
    return split


def _listed_split(
    fs: FeatureSet, n: int | None, split_list: Any, data_root: Any
) -> tuple[np.ndarray | None, str]:
    """The split list's split (None for N per class) and the protocol's name."""
    if split_list is None:
        return None, f"{n}-per-class"
    root = data_root if data_root is not None else fs.attrs.get("data_root")
    if not root:
        raise HeadError("a split list needs DATA= (the image folder its paths are relative to)")
    fixed = split_file(
        split_list, list(fs.paths), root, labels=fs.labels, class_names=fs.class_names
    )
    return fixed, f"split-{Path(str(split_list).split('=')[-1]).stem}"


def protocols_dir(artifacts_dir: str | Path, fs: FeatureSet) -> Path:
    """``<artifacts>/protocols/<dataset>/<cache stem>/`` (made here; each one safe path part)."""
    dataset = str(fs.attrs.get("dataset") or "unknown")
    out = Path(artifacts_dir) / "protocols" / safe_name(dataset) / safe_name(Path(fs.path).stem)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _check_request(
    heads: Any, metric: str, seeds: Sequence[int], n: int | None, split_list: Any
) -> tuple[tuple[str, ...], str]:
    check_options({"protocol_metric": metric}, error=HeadError)
    if not list(seeds):
        raise HeadError("SEEDS= is empty; give one or more seeds, e.g. SEEDS=0,1,2,3,4")
    if (n is None) == (split_list is None):
        raise HeadError("give one of TRAIN_PER_CLASS= (N per class) and SPLIT_FILE= (a split list)")
    return resolve_protocol_heads(heads), metric


def resolve_protocol_heads(heads: str | Sequence[str]) -> tuple[str, ...]:
    """Registered head names (as ``make head`` takes them) plus ``linear_eval``, the
    protocols' own head (:mod:`pipeline.heads.linear_eval`), in the order given.

    Raises
    ------
    HeadError
        An unknown head name.
    """
    items = [heads] if isinstance(heads, str) else list(heads)
    words = [w for item in items for w in str(item).replace(",", " ").split()]
    if not words:
        return resolve_heads(words)  # refuses: no head given
    out: list[str] = []
    for word in words:
        named = word.strip().lower().replace("-", "_")
        try:
            chosen = (LINEAR_EVAL,) if named == LINEAR_EVAL else resolve_heads(word)
        except HeadError as exc:
            raise HeadError(f"{exc}; protocols also take {LINEAR_EVAL}") from None
        for head in chosen:
            if head not in out:
                out.append(head)
    return tuple(out)


def evaluate_split(
    fs: FeatureSet,
    split: np.ndarray,
    heads: Sequence[str],
    seed: int,
    cv: int = 3,
    metric: str = "balanced_accuracy",
) -> dict[str, dict[str, Any]]:
    """Each head fitted on the rows ``split`` marks train and scored on those it marks test.

    The test rows reach neither the search nor the refit: both see only ``X[train]``. The
    searches score their folds by ``metric`` (by accuracy for ``top5``, which ranks scores
    that not every head has).
    """
    train, test = split == TRAIN, split == TEST
    X, y = fs.features[train], fs.labels[train]
    missing = sorted(set(np.unique(fs.labels[test]).tolist()) - set(np.unique(y).tolist()))
    if missing:
        names = ", ".join(repr(fs.class_names[i]) for i in missing)
        raise HeadError(f"class {names} has test images but no training image in this split")
    searchable = int(np.bincount(y)[np.unique(y)].min()) >= MIN_PER_CLASS_FOR_CV
    out = {}
    for name in heads:
        started = time.perf_counter()
        fitted, params, scheme = _fit(name, X, y, seed, cv, searchable, _choosing(metric))
        scores = _score(fitted, fs.features[test], fs.labels[test], len(fs.class_names))
        out[name] = {
            **scores, "params": params, "scheme": scheme, "n_train": int(train.sum()),
            "n_test": int(test.sum()), "fit_seconds": time.perf_counter() - started,
        }  # fmt: skip
    return out


def _choosing(metric: str) -> str:
    """The metric the searches choose by: the protocol's, or accuracy for ``top5``."""
    return metric if metric in scoring.WORDS and metric != "top5" else scoring.DEFAULT_METRIC


def _fit(
    name: str, X: np.ndarray, y: np.ndarray, seed: int, cv: int, searchable: bool, metric: str
) -> tuple[Any, dict[str, Any], str]:
    """The head chosen by ``make head``'s search on ``(X, y)``, or its fixed defaults;
    ``linear_eval`` chooses its C on a hold-out of ``(X, y)`` whatever the count."""
    if name == LINEAR_EVAL:
        return fit_linear_eval(X, y, seed, metric=metric)
    pipe = build_head(name, seed=seed)
    if searchable:
        jobs = search_jobs(HEADS[name], 0, y)  # every core for a big one-core search
        searched = head_search.timed_search(HEADS[name], pipe, X, y, cv, seed, jobs, metric=metric)
        return searched.fitted, head_search.unprefixed(searched.params), searched.cv_info["scheme"]
    spec = HEADS[name]
    bounded = {
        f"{name}__{key}": min(int(pipe.get_params()[f"{name}__{key}"]), len(y))
        for key in spec.fold_bounded
    }  # k nearest neighbours cannot exceed the training images
    pipe.set_params(**bounded).fit(X, y)
    defaults = {k: v for k, v in pipe.steps[-1][1].get_params().items() if k in spec.grid}
    scheme = f"fixed defaults (a class has fewer than {MIN_PER_CLASS_FOR_CV} training images)"
    return pipe, head_search.unprefixed({f"{name}__{k}": v for k, v in defaults.items()}), scheme


def _score(fitted: Any, X: np.ndarray, y: np.ndarray, n_classes: int) -> dict[str, float]:
    pred, scores, _ = head_outputs(fitted, X, n_classes)
    out = {
        "accuracy": float(np.mean(pred == y)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, average="macro", labels=np.unique(y))),
    }
    if n_classes > TOP5_ABOVE:
        finite = np.where(np.isfinite(scores), scores, np.finfo(np.float64).min)
        out["top5"] = float(top_k_accuracy_score(y, finite, k=5, labels=np.arange(n_classes)))
    return out


def _summarise(
    fs: FeatureSet, name: str, metric: str, heads: Sequence[str], seeds: list[int],
    per_seed: list[dict[str, dict[str, Any]]],
) -> dict[str, Any]:  # fmt: skip
    record: dict[str, Any] = {
        "protocol": name, "metric": metric, "dataset": fs.attrs.get("dataset"),
        "cache": str(Path(fs.path).resolve()), "classes": len(fs.class_names), "seeds": seeds,
        "stage_one_seconds": fs.attrs.get("seconds"), "heads": {},
    }  # fmt: skip
    for head in heads:
        runs = [{"seed": s, **r[head]} for s, r in zip(seeds, per_seed, strict=True)]
        keys = [m for m in METRICS if m in runs[0]]
        record["heads"][head] = {
            "mean": {m: float(np.mean([r[m] for r in runs])) for m in keys},
            "std": {m: float(np.std([r[m] for r in runs])) for m in keys},
            "fit_seconds": float(sum(r["fit_seconds"] for r in runs)),
            "seeds": runs,
        }
    return record


def markdown_table(record: dict[str, Any]) -> str:
    """Per head, each metric as mean +- std over the seeds; the headline metric first."""
    first = next(iter(record["heads"].values()))
    keys = [record["metric"], *(m for m in METRICS if m in first["mean"] and m != record["metric"])]
    lines = [
        f"{record['protocol']} on {record['dataset']}, {len(record['seeds'])} seeds "
        f"({', '.join(map(str, record['seeds']))}), mean +- std",
        "",
        "| head | " + " | ".join(keys) + " | fit s |",
        "|---|" + "---:|" * (len(keys) + 1),
    ]
    for head, h in record["heads"].items():
        cells = [f"{h['mean'][m]:.3f} +- {h['std'][m]:.3f}" for m in keys]
        lines.append(f"| {head} | " + " | ".join(cells) + f" | {h['fit_seconds']:.2f} |")
    return "\n".join(lines)


def _write(path: Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _log(log: Any, line: str) -> None:
    if log is not None:
        log(line)
