"""The stage-two report: every head (and fine-tuned model) of a data set, compared.

:func:`write_report` reads results files only (manifests and per-image
predictions; it never unpickles a head and never runs a model) and writes,
under ``artifacts/reports/<dataset>/``::

    report.md        Markdown, figures as PNG files in figures/
    report.html      one self-contained page (figures embedded as base64 PNG)
    report.json      every number of the report
    figures/*.png

Contents: per run and evaluated split (``val``, ``test``), accuracy, balanced
accuracy and macro F1 with 95% percentile-bootstrap intervals, top-5 accuracy
when there are more than five classes, log loss where the run gives
probabilities, fit time and prediction time per image; an exact McNemar test of
linear SVM against softmax on the same images (with the counts each gets right
that the other gets wrong); confusion matrices, per-class F1, accuracy against
fit time; a leaderboard across every backbone cache of the data set; the
configuration of every run.

Results contract (what a run must leave for the report)
-------------------------------------------------------
Heads (stage two) and fine-tuned models (stage three) share one format.

*Manifest*: a JSON object.

- Heads: ``artifacts/heads/<dataset>/<cache stem>/<head>.json`` with
  ``"kind": "head"`` (written by :func:`pipeline.heads.fit_heads`).
- Fine-tuned models: any ``*.json`` under ``artifacts/finetune/<dataset>/``
  (searched recursively) with ``"kind": "finetuned"``. Keys:

  ============================  ========  ===============================================
  key                           required  meaning
  ============================  ========  ===============================================
  ``kind``                      yes       ``"finetuned"``
  ``class_names``               yes       class names, in the cache's order
  ``predictions``               yes       file name of the predictions JSON, relative to
                                          the manifest's folder
  ``name``                      no        row label (default: the manifest's file stem)
  ``backbone``, ``weights``,    no        shown in the configuration table
  ``input_size``, ``params``
  ``fit_seconds``               no        training time (plotted against accuracy)
  ``predict_seconds_per_image`` no        inference time per image
  ``fingerprint``               no        stage-one fingerprint of the images it used
  ``history``                   no        file name of the per-epoch log (a JSON list of
                                          ``{phase, epoch, loss, accuracy, val_loss,
                                          val_accuracy}``), drawn as training curves
  ============================  ========  ===============================================

  The same manifest sits beside the model ``<stem>.keras`` for
  ``make predict`` (which also needs ``input_size``; see :mod:`pipeline.predict`).

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

import base64
import html
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import stats
from pipeline.errors import ReportError, did_you_mean
from pipeline.files import write_bytes_atomic

EVAL_SPLITS = ("val", "test")


@dataclass
class Run:
    """One head or fine-tuned model with its predictions on the evaluated splits."""

    name: str  # row label, e.g. "svm" or the fine-tuned model's name
    kind: str  # "head" | "finetuned"
    group: str  # cache stem for heads, "finetuned" for stage three
    manifest: dict[str, Any]
    class_names: tuple[str, ...]
    # split -> (paths, true index, predicted index, scores (n, k) or None, scores are probabilities)
    splits: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, bool]] = field(
        default_factory=dict
    )
    history: list[dict[str, Any]] = field(default_factory=list)  # fine-tuned: per-epoch log

    @property
    def run_id(self) -> str:
        return f"{self.group}/{self.name}"


@dataclass
class ReportResult:
    """Where :func:`write_report` wrote, and its headline lines."""

    markdown: Path
    html: Path
    json: Path
    lines: list[str]

    def format(self) -> str:
        return "\n".join([*self.lines, f"wrote {self.markdown}, {self.html}, {self.json}"])


# --------------------------------------------------------------------------- reading results


def read_predictions(path: str | Path, class_names: Sequence[str]) -> dict[str, tuple]:
    """Read a predictions JSON (see the module docstring) into per-split arrays.

    Raises
    ------
    ReportError
        Unreadable file, other class names, or malformed entries.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        names = tuple(data["class_names"])
        entries = data["predictions"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ReportError(f"predictions file {path} is not readable ({exc})") from None
    if names != tuple(class_names):
        raise ReportError(
            f"predictions file {path} has classes {list(names)}, expected {list(class_names)}"
        )
    index = {c: i for i, c in enumerate(names)}
    k = len(names)
    rows: dict[str, list] = {s: [] for s in EVAL_SPLITS}
    try:
        for rel, entry in sorted(entries.items()):
            split = entry.get("split")
            if split not in rows:
                continue
            values = entry.get("proba", entry.get("scores"))
            if values is not None and len(values) != k:
                raise ValueError(f"{rel}: {len(values)} scores for {k} classes")
            rows[split].append(
                (rel, index[entry["label"]], index[entry["pred"]], values, "proba" in entry)
            )
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise ReportError(f"predictions file {path} has a malformed entry: {exc}") from None
    out = {}
    for split, items in rows.items():
        if not items:
            continue
        paths = np.array([r[0] for r in items], dtype=object)
        y = np.array([r[1] for r in items], dtype=np.int64)
        pred = np.array([r[2] for r in items], dtype=np.int64)
        has_scores = all(r[3] is not None for r in items)
        scores = np.array([r[3] for r in items], dtype=np.float64) if has_scores else None
        is_proba = has_scores and all(r[4] for r in items)
        out[split] = (paths, y, pred, scores, is_proba)
    return out


def collect_runs(
    dataset: str, artifacts_dir: str | Path = "artifacts"
) -> tuple[list[Run], list[str]]:
    """Every head and fine-tuned run of ``dataset`` with readable predictions.

    Returns the runs and notes on what was skipped and why.
    """
    root = Path(artifacts_dir)
    runs, notes = [], []
    head_root = root / "heads" / dataset
    manifests = sorted(head_root.glob("*/*.json")) if head_root.is_dir() else []
    finetune_root = root / "finetune" / dataset
    manifests += sorted(finetune_root.rglob("*.json")) if finetune_root.is_dir() else []
    for path in manifests:
        if path.name.endswith(".predictions.json") or path.name.startswith("."):
            continue
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            notes.append(f"skipped {path}: not readable JSON ({exc})")
            continue
        if not isinstance(manifest, dict) or manifest.get("kind") not in ("head", "finetuned"):
            continue
        kind = manifest["kind"]
        if kind == "head":
            name, group = str(manifest.get("head", path.stem)), path.parent.name
            pred_file = manifest.get("files", {}).get("predictions")
        else:
            name, group = str(manifest.get("name") or path.stem), "finetuned"
            pred_file = manifest.get("predictions")
        if not pred_file:
            notes.append(f"skipped {path}: no predictions file (no val or test split?)")
            continue
        try:
            class_names = tuple(manifest["class_names"])
            splits = read_predictions(path.parent / pred_file, class_names)
        except (ReportError, KeyError, TypeError) as exc:
            notes.append(f"skipped {path}: {exc}")
            continue
        if not splits:
            notes.append(f"skipped {path}: no val or test predictions")
            continue
        history = (
            _read_history(path.parent / manifest["history"]) if manifest.get("history") else []
        )
        runs.append(Run(name, kind, group, manifest, class_names, splits, history))
    _note_stale(runs, notes)
    return runs, notes


def _read_history(path: Path) -> list[dict[str, Any]]:
    """A fine-tuned run's per-epoch log, or ``[]`` when it is missing or unreadable."""
    try:
        history = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return history if isinstance(history, list) else []


def _note_stale(runs: list[Run], notes: list[str]) -> None:
    from pipeline.cache import read_attrs
    from pipeline.errors import CacheError

    seen: dict[str, str | None] = {}
    for run in runs:
        cache = run.manifest.get("cache")
        if run.kind != "head" or not cache:
            continue
        if cache not in seen:
            try:
                seen[cache] = (
                    read_attrs(cache).get("fingerprint") if Path(cache).is_file() else None
                )
            except CacheError:
                seen[cache] = None
        if seen[cache] is not None and seen[cache] != run.manifest.get("fingerprint"):
            notes.append(f"{run.run_id} was fit before {cache} was rebuilt; re-run `make head`")


# --------------------------------------------------------------------------- computing


def evaluate_run(run: Run, *, n_resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Metrics of one run per split, with bootstrap intervals (see :mod:`pipeline.stats`)."""
    k = len(run.class_names)
    out = {}
    for split, (_, y, pred, scores, is_proba) in run.splits.items():
        cm = stats.confusion(y, pred, k)
        point = {m: float(v) for m, v in stats.metrics_from_confusion(cm).items()}
        ci = stats.bootstrap_metrics(y, pred, k, n_resamples=n_resamples, seed=seed)
        entry: dict[str, Any] = {"n": int(len(y))}
        for m in stats.METRICS:
            entry[m] = point[m]
            entry[f"{m}_ci"] = list(ci[m])
        if k > 5 and scores is not None:
            entry["top5_accuracy"] = stats.top_k_accuracy(y, scores, 5)
        if is_proba and scores is not None:
            entry["log_loss"] = stats.log_loss(y, scores)
        entry["confusion"] = cm.tolist()
        entry["per_class_f1"] = stats.per_class_f1(y, pred, k).tolist()
        out[split] = entry
    return out


def _config(run: Run) -> dict[str, Any]:
    m = run.manifest
    keys = ("backbone", "weights", "input_size", "pooling", "layer", "preprocessing")
    config = {key: m.get(key) for key in keys if m.get(key) not in (None, "")}
    if run.kind == "head":
        config.update(
            norm=m.get("norm"),
            pca=m.get("pca"),
            params=m.get("params"),
            cv_folds=m.get("cv", {}).get("folds"),
            cv_accuracy=m.get("cv", {}).get("score"),
            seed=m.get("seed"),
            estimator=m.get("estimator"),
        )
        if "n_epochs" in m:
            config["n_epochs"] = m["n_epochs"]
    else:  # stage three: its options (a dict under "config"), or whatever "params" holds
        options = m.get("config") if isinstance(m.get("config"), dict) else None
        shown = ("layers", "learning_rate", "lr", "epochs", "augment", "batch_size", "seed")
        config["params"] = (
            {key: options[key] for key in shown if key in options} if options else m.get("params")
        )
    return config


def _mcnemar(a: Run, b: Run, split: str) -> dict[str, Any] | None:
    """McNemar of two runs on one split, when both predicted exactly the same images."""
    if split not in a.splits or split not in b.splits:
        return None
    paths_a, y_a, pred_a = a.splits[split][:3]
    paths_b, y_b, pred_b = b.splits[split][:3]
    if (
        len(paths_a) != len(paths_b)
        or not np.array_equal(paths_a, paths_b)
        or not np.array_equal(y_a, y_b)
    ):
        return None
    result = stats.mcnemar_exact(pred_a == y_a, pred_b == y_b)
    return {
        "split": split,
        "a": a.run_id,
        "b": b.run_id,
        "n": result.n,
        "only_a": result.only_a,
        "only_b": result.only_b,
        "both": result.both,
        "neither": result.neither,
        "p_value": result.p_value,
    }


def _selection_score(row: dict[str, Any], run: Run) -> float:
    if "val" in row["splits"]:
        return float(row["splits"]["val"]["accuracy"])
    return float(run.manifest.get("cv", {}).get("score") or 0.0)


def primary_split(runs: Sequence[Run]) -> str:
    """``test`` when any run has it, else ``val``."""
    return "test" if any("test" in r.splits for r in runs) else "val"


def build_report_data(
    dataset: str,
    runs: Sequence[Run],
    notes: Sequence[str],
    *,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Everything the report shows, as plain JSON-ready data."""
    primary = primary_split(runs)
    rows = []
    for run in runs:
        m = run.manifest
        rows.append(
            {
                "run": run.run_id,
                "name": run.name,
                "kind": run.kind,
                "group": run.group,
                "class_names": list(run.class_names),
                "fit_seconds": m.get("fit_seconds"),
                "predict_seconds_per_image": m.get("predict_seconds_per_image"),
                "extraction_seconds": m.get("extraction_seconds"),
                "config": _config(run),
                "history": run.history,
                "splits": evaluate_run(run, n_resamples=n_resamples, seed=seed),
            }
        )
    by_id = {r.run_id: r for r in runs}
    comparisons = []
    groups = sorted({r.group for r in runs if r.kind == "head"})
    for group in groups:
        a, b = by_id.get(f"{group}/svm"), by_id.get(f"{group}/softmax")
        for split in EVAL_SPLITS:
            if a and b and (c := _mcnemar(a, b, split)):
                comparisons.append(c)
    for run in runs:
        if run.kind != "finetuned":
            continue
        for group in groups:
            heads = [r for r in rows if r["group"] == group and r["kind"] == "head"]
            if not heads:
                continue
            # Chosen without the test images (val accuracy, else cross-validation on
            # train), so the McNemar test on test is not run against a test-picked head.
            best = max(heads, key=lambda r: _selection_score(r, by_id[r["run"]]))
            for split in EVAL_SPLITS:
                if c := _mcnemar(run, by_id[best["run"]], split):
                    comparisons.append(c)
    leaderboard = sorted(
        (
            {
                "run": r["run"],
                "kind": r["kind"],
                "split": split,
                "accuracy": s["accuracy"],
                "accuracy_ci": s["accuracy_ci"],
                "balanced_accuracy": s["balanced_accuracy"],
                "macro_f1": s["macro_f1"],
                "fit_seconds": r["fit_seconds"],
            }
            for r in rows
            for split, s in r["splits"].items()
            if split == primary
        ),
        key=lambda e: (
            -e["accuracy"],
            e["fit_seconds"] if e["fit_seconds"] is not None else np.inf,
        ),
    )
    return {
        "dataset": dataset,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "primary_split": primary,
        "bootstrap": {"resamples": n_resamples, "confidence": 0.95, "seed": seed},
        "runs": rows,
        "mcnemar": comparisons,
        "leaderboard": leaderboard,
        "notes": list(notes),
    }


# --------------------------------------------------------------------------- figures


def _figures(data: dict[str, Any]) -> dict[str, bytes]:
    """PNG bytes of every figure, by file name."""

    primary = data["primary_split"]
    figures: dict[str, bytes] = {}
    groups: dict[str, list[dict]] = {}
    for row in data["runs"]:
        if primary in row["splits"]:
            groups.setdefault(row["group"], []).append(row)

    for group, rows in groups.items():
        # Runs of a rebuilt cache may have another class list: plot the commonest one
        # (the tables still show every run).
        lists = [tuple(r["class_names"]) for r in rows]
        names = list(max(set(lists), key=lists.count))
        rows = [r for r in rows if r["class_names"] == names]
        k = len(names)
        cols = min(4, len(rows))
        nrows = -(-len(rows) // cols)
        side = 2.2 + 0.25 * k
        fig, axes = _subplots(nrows, cols, figsize=(side * cols, side * nrows), squeeze=False)
        for ax in axes.ravel()[len(rows) :]:
            ax.axis("off")
        for ax, row in zip(axes.ravel(), rows, strict=False):
            cm = np.array(row["splits"][primary]["confusion"])
            ax.imshow(cm, cmap="Blues")
            ax.set_title(f"{row['name']} ({primary})", fontsize=9)
            ax.set_xticks(range(k), names, rotation=90, fontsize=7)
            ax.set_yticks(range(k), names, fontsize=7)
            ax.set_xlabel("predicted", fontsize=8)
            ax.set_ylabel("true", fontsize=8)
            if k <= 15:
                for (i, j), v in np.ndenumerate(cm):
                    ax.text(
                        j,
                        i,
                        str(v),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if v > cm.max() / 2 else "black",
                    )
        fig.tight_layout()
        figures[f"confusion_{group}.png"] = _png(fig)

        fig, ax = _subplots(figsize=(max(7, 0.25 * k * len(rows) + 2), 3.4))
        width = 0.8 / len(rows)
        for i, row in enumerate(rows):
            ax.bar(
                np.arange(k) + i * width,
                row["splits"][primary]["per_class_f1"],
                width,
                label=row["name"],
            )
        ax.set_xticks(
            np.arange(k) + 0.4 - width / 2, names, rotation=45 if k > 4 else 0, fontsize=8
        )
        ax.set_ylabel(f"F1 ({primary})")
        ax.set_ylim(0, 1.2)  # headroom for the legend
        ax.legend(fontsize=7, ncol=min(len(rows), 3), loc="upper center")
        ax.set_title(f"per-class F1: {group}", fontsize=9)
        figures[f"per_class_f1_{group}.png"] = _png(fig)

    points = [
        (row["group"], row["name"], row["fit_seconds"], row["splits"][primary]["accuracy"])
        for row in data["runs"]
        if primary in row["splits"] and row["fit_seconds"]
    ]
    if points:
        fig, ax = _subplots(figsize=(7, 4.5))
        for group in sorted({p[0] for p in points}):  # one colour per cache (and fine-tuned)
            mine = [p for p in points if p[0] == group]
            ax.scatter([p[2] for p in mine], [p[3] for p in mine], label=group)
            for _, name, seconds, accuracy in mine:
                ax.annotate(name, (seconds, accuracy), fontsize=7, xytext=(4, 2),
                            textcoords="offset points")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("fit time (s, with the hyper-parameter search)")
        ax.set_ylabel(f"accuracy ({primary})")
        ax.set_title("accuracy against fit time", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        figures["accuracy_vs_fit_time.png"] = _png(fig)

    from pipeline.finetune import curves_figure

    for row in data["runs"]:
        if row["kind"] == "finetuned" and row["history"]:
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in row["name"])
            title = f"training curves: {row['name']}"
            figures[f"curves_{safe}.png"] = _png(curves_figure(row["history"], title=title))
    return figures


def _subplots(nrows: int = 1, ncols: int = 1, **kwargs: Any) -> tuple[Any, Any]:
    """``plt.subplots`` without pyplot: no global figure registry, the user's backend untouched."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=kwargs.pop("figsize", None))
    return figure, figure.subplots(nrows, ncols, **kwargs)


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return buffer.getvalue()


# --------------------------------------------------------------------------- rendering


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ci(entry: dict[str, Any], metric: str) -> str:
    low, high = entry[f"{metric}_ci"]
    return f"{entry[metric]:.3f} [{low:.3f}, {high:.3f}]"


def _tables(data: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """``(title, header, rows)`` of every table, shared by Markdown and HTML."""
    tables = []
    primary = data["primary_split"]
    header = ["rank", "run", "accuracy [95% CI]", "balanced acc.", "macro F1", "fit s"]
    rows = [
        [
            str(i + 1),
            e["run"],
            f"{e['accuracy']:.3f} [{e['accuracy_ci'][0]:.3f}, {e['accuracy_ci'][1]:.3f}]",
            _fmt(e["balanced_accuracy"]),
            _fmt(e["macro_f1"]),
            _fmt(e["fit_seconds"], 2),
        ]
        for i, e in enumerate(data["leaderboard"])
    ]
    tables.append((f"Leaderboard ({primary} split, every backbone cache)", header, rows))

    for split in EVAL_SPLITS:
        runs = [r for r in data["runs"] if split in r["splits"]]
        if not runs:
            continue
        many = any("top5_accuracy" in r["splits"][split] for r in runs)
        header = [
            "run",
            "n",
            "accuracy [95% CI]",
            "balanced accuracy [95% CI]",
            "macro F1 [95% CI]",
        ]
        header += ["top-5"] if many else []
        header += ["log loss", "fit s", "predict ms/image"]
        rows = []
        for r in runs:
            s = r["splits"][split]
            row = [
                r["run"],
                str(s["n"]),
                _ci(s, "accuracy"),
                _ci(s, "balanced_accuracy"),
                _ci(s, "macro_f1"),
            ]
            row += [_fmt(s.get("top5_accuracy"))] if many else []
            per_image = r["predict_seconds_per_image"]
            row += [
                _fmt(s.get("log_loss")),
                _fmt(r["fit_seconds"], 2),
                _fmt(per_image * 1e3 if per_image is not None else None, 4),
            ]
            rows.append(row)
        tables.append((f"Metrics on {split}", header, rows))

    header = [
        "split",
        "a",
        "b",
        "n",
        "a right, b wrong",
        "b right, a wrong",
        "both right",
        "both wrong",
        "p (exact)",
    ]
    rows = [
        [
            c["split"],
            c["a"],
            c["b"],
            str(c["n"]),
            str(c["only_a"]),
            str(c["only_b"]),
            str(c["both"]),
            str(c["neither"]),
            f"{c['p_value']:.4g}",
        ]
        for c in data["mcnemar"]
    ]
    tables.append(("McNemar's exact test (same images)", header, rows))

    header = [
        "run",
        "backbone",
        "weights",
        "input",
        "pooling",
        "layer",
        "norm",
        "pca",
        "chosen",
        "CV acc.",
        "seed",
    ]
    rows = []
    for r in data["runs"]:
        c = r["config"]
        params = c.get("params") or {}
        chosen = (
            ", ".join(f"{k}={v}" for k, v in params.items())
            if isinstance(params, dict)
            else str(params)
        )
        if "n_epochs" in c:
            chosen += f", epochs={c['n_epochs']}"
        rows.append(
            [
                r["run"],
                _fmt(c.get("backbone")),
                _fmt(c.get("weights")),
                _fmt(c.get("input_size")),
                _fmt(c.get("pooling")),
                _fmt(c.get("layer")),
                _fmt(c.get("norm")),
                _fmt(c.get("pca")),
                chosen or "-",
                _fmt(c.get("cv_accuracy")),
                _fmt(c.get("seed")),
            ]
        )
    tables.append(("Configuration of each run", header, rows))
    return tables


def _selection_note(data: dict[str, Any]) -> str:
    note = "Heads' hyper-parameters were chosen by cross-validation on the train split only."
    if any(r["kind"] == "finetuned" for r in data["runs"]):
        note += (
            " Fine-tuned runs picked their best epoch on val, so their val figures (and McNemar"
            " tests on val) lean optimistic; test figures, where present, do not."
        )
    return note


def _markdown(data: dict[str, Any], figures: Sequence[str]) -> str:
    lines = [
        f"# Heads report: {data['dataset']}",
        "",
        f"Created {data['created']}. Intervals: 95% percentile bootstrap over images "
        f"({data['bootstrap']['resamples']} resamples, seed {data['bootstrap']['seed']}). "
        f"{_selection_note(data)}",
        "",
    ]
    for title, header, rows in _tables(data):
        lines += [f"## {title}", ""]
        if not rows:
            lines += ["(none: needs both an svm and a softmax head, or a fine-tuned run)", ""]
            continue
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        lines += [
            "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows
        ]
        lines.append("")
    lines += ["## Figures", ""]
    lines += [f"![{name}](figures/{name})" for name in figures]
    if data["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in data["notes"]]
    return "\n".join(lines) + "\n"


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}"
    "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f2f2f2}"
    "img{max-width:100%;margin:1em 0}"
)


def _html(data: dict[str, Any], figures: dict[str, bytes]) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>Heads report: {esc(data['dataset'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>Heads report: {esc(data['dataset'])}</h1>",
        f"<p>Created {esc(data['created'])}. Intervals: 95% percentile bootstrap over images "
        f"({data['bootstrap']['resamples']} resamples). {esc(_selection_note(data))}</p>",
    ]
    for title, header, rows in _tables(data):
        parts.append(f"<h2>{esc(title)}</h2>")
        if not rows:
            parts.append("<p>(none: needs both an svm and a softmax head, or a fine-tuned run)</p>")
            continue
        parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    parts.append("<h2>Figures</h2>")
    for name, png in figures.items():
        encoded = base64.b64encode(png).decode("ascii")
        parts.append(
            f"<figure><img alt='{esc(name)}' src='data:image/png;base64,{encoded}'></figure>"
        )
    if data["notes"]:
        parts.append(
            "<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in data["notes"]) + "</ul>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


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
    ReportError
        No head and no fine-tuned run of ``dataset`` with predictions.

    Examples
    --------
    >>> print(write_report("hymenoptera_data").format())
    """
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise ReportError(f"RESAMPLES must be a positive whole number; got {n_resamples!r}")
    runs, notes = collect_runs(dataset, artifacts_dir)
    if not runs:
        heads = Path(artifacts_dir) / "heads"
        known = sorted(p.name for p in heads.iterdir() if p.is_dir()) if heads.is_dir() else []
        hint = did_you_mean(dataset, known) if known else ""
        extra = f" ({'; '.join(notes)})" if notes else ""
        raise ReportError(
            f"nothing to report for {dataset!r}: no heads with predictions under {heads / dataset}"
            f"{hint}; run `make head DATA=...` first{extra}"
        )
    classes = {r.class_names for r in runs}
    if len(classes) > 1:
        notes.append("runs disagree on the class list; each is scored on its own classes")
    data = build_report_data(dataset, runs, notes, n_resamples=n_resamples, seed=seed)
    figures = _figures(data)

    out = Path(out_dir) if out_dir else Path(artifacts_dir) / "reports" / dataset
    (out / "figures").mkdir(parents=True, exist_ok=True)
    for name, png in figures.items():
        write_bytes_atomic(out / "figures" / name, png)
    for stale in (out / "figures").glob("*.png"):  # figures of runs no longer reported
        if stale.name not in figures:
            stale.unlink()
    paths = out / "report.md", out / "report.html", out / "report.json"
    write_bytes_atomic(paths[0], _markdown(data, list(figures)))
    write_bytes_atomic(paths[1], _html(data, figures))
    write_bytes_atomic(paths[2], json.dumps(data, indent=1) + "\n")

    lines = [f"{dataset}: {len(runs)} runs, ranked on {data['primary_split']}:"]
    lines += [
        f"  {i + 1}. {e['run']:<48} {e['accuracy']:.3f} [{e['accuracy_ci'][0]:.3f}, {e['accuracy_ci'][1]:.3f}]"
        for i, e in enumerate(data["leaderboard"][:10])
    ]
    lines += [
        f"  McNemar {c['a']} vs {c['b']} ({c['split']}): {c['only_a']} vs {c['only_b']} discordant, "
        f"p = {c['p_value']:.3g}"
        for c in data["mcnemar"]
    ]
    lines += [f"  note: {n}" for n in notes]
    return ReportResult(*paths, lines)
