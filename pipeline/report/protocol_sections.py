"""A protocol's section of the protocols page (:mod:`pipeline.report.protocols`): words and tables.

The headline sentence first (each head's mean +- std, and whether any head is ahead by more
than the seeds' spread), then what was run, the per-seed figures, every metric, the
hyper-parameters chosen on each seed, and the time beside stage one's. ``record`` is a
protocol checked by :func:`pipeline.report.protocol_records.read_protocol`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.report.cells import fmt, listing
from pipeline.report.protocol_records import METRIC_WORDS
from pipeline.report.render import Block, Table

FEW_SEEDS = 5  # the papers' count of splits; fewer make a lead a hint only


def metric_name(metric: str) -> str:
    """``balanced accuracy`` for ``balanced_accuracy``."""
    return METRIC_WORDS[metric]


def protocol_title(record: dict[str, Any]) -> str:
    """``30 per class`` or ``split list mit67``."""
    split = record["split"]
    if split["kind"] == "per_class":
        return f"{split['train_per_class']} per class"
    return f"split list {Path(split['file'].split('=')[-1]).stem}"


def figure_text(head: dict[str, Any], metric: str, n_seeds: int) -> str:
    """``0.979 +- 0.004`` (one seed: ``0.979``)."""
    mean, std = head["mean"][metric], head["std"][metric]
    return f"{mean:.3f}" if n_seeds == 1 else f"{mean:.3f} +- {std:.3f}"


def headline(record: dict[str, Any]) -> str:
    """``30 per class over 5 seeds: logreg 0.979 +- 0.004 balanced accuracy, svm 0.977 +-
    0.003; no head ahead by more than the seeds' spread (...)``."""
    metric, heads, n = record["metric"], record["heads"], len(record["seeds"])
    ranked = sorted(heads, key=lambda h: -heads[h]["mean"][metric])
    figures = [f"{h} {figure_text(heads[h], metric, n)}" for h in ranked]
    figures[0] += f" {metric_name(metric)}"
    over = f"over {n} seeds" if n > 1 else "on one seed"
    sentence = f"{protocol_title(record)} {over}: {', '.join(figures)}"
    if len(ranked) > 1:
        sentence += "; " + comparison(record, ranked)
    return sentence + "."


def comparison(record: dict[str, Any], ranked: Sequence[str]) -> str:
    """The leader against each other head, seed by seed (the same split for all heads).

    A head is behind the leader when it is below it on every seed and the mean gap is
    larger than either head's spread over the seeds; otherwise it is within the spread.
    """
    metric, heads, n = record["metric"], record["heads"], len(record["seeds"])
    if n == 1:
        return "one seed gives no spread: repeat with SEEDS=0,1,2,3,4 before calling a difference"
    lead = ranked[0]

    def gaps(other: str) -> np.ndarray:
        runs = zip(heads[lead]["runs"], heads[other]["runs"], strict=True)
        return np.array([a["scores"][metric] - b["scores"][metric] for a, b in runs])

    def behind(other: str) -> bool:
        spread = max(heads[lead]["std"][metric], heads[other]["std"][metric])
        return bool(gaps(other).min() > 0 and gaps(other).mean() > spread)

    tied = [h for h in ranked[1:] if not behind(h)]
    back = [h for h in ranked[1:] if behind(h)]
    if not back:
        d = gaps(ranked[1])
        return (
            f"no head ahead by more than the seeds' spread ({lead} leads {ranked[1]} by "
            f"{d.mean():.3f} on average, ahead on {int((d > 0).sum())} of {n} seeds)"
        )
    few = f"; {n} seeds are few for that (the papers use {FEW_SEEDS})" if n < FEW_SEEDS else ""
    if not tied:
        by = gaps(back[0]).mean() if len(back) == 1 else min(gaps(h).mean() for h in back)
        return (
            f"{lead} ahead of {listing(back)} on every seed, by more than the seeds' spread "
            f"(by {by:.3f}{' or more' * (len(back) > 1)} on average){few}"
        )
    return (
        f"{listing(tied)} within the seeds' spread of {lead}; {listing(back)} behind "
        f"{lead} on every seed by more than it{few}"
    )


def _how_chosen(record: dict[str, Any]) -> str:
    """How each head's hyper-parameters were chosen, from the runs' ``scheme``."""

    def phrase(schemes: list[str]) -> str:
        words = [
            f"{s} cross-validation on each seed's training images"
            if s.endswith("-fold") and s[:-5].isdigit()
            else s or "not recorded"
            for s in dict.fromkeys(schemes)
        ]
        return words[0] if len(words) == 1 else "by seed: " + "; ".join(words)

    heads_of: dict[str, list[str]] = {}  # phrase -> the heads chosen that way
    for head, entry in record["heads"].items():
        heads_of.setdefault(phrase([r["scheme"] for r in entry["runs"]]), []).append(head)
    if len(heads_of) == 1:
        return next(iter(heads_of))
    return "; ".join(f"{listing(heads)}: {words}" for words, heads in heads_of.items())


def params_text(run: dict[str, Any]) -> str:
    """``C=0.1`` (every plain hyper-parameter a run recorded), ``-`` when none."""
    return ", ".join(f"{k}={v}" for k, v in run["params"].items()) or "-"


def described(record: dict[str, Any]) -> list[str]:
    """What the protocol was, one fact a line: split, seeds and heads, choice, metric."""
    split, seeds, first = record["split"], record["seeds"], next(iter(record["heads"].values()))
    run = first["runs"][0]
    sizes = f" ({run['n_train']} training and {run['n_test']} test images per seed)"
    sizes = sizes if run["n_train"] is not None and run["n_test"] is not None else ""
    if split["kind"] == "per_class":
        what = (
            f"Split: {split['train_per_class']} training images per class, drawn for each seed "
            "from all of the class's images (the cache's train, val and test pooled: shipped "
            f"split folders are not kept); every other image is test{sizes}."
        )
    else:
        what = (
            f"Split: the list {split['file']}, its train and val images to train on, its test "
            f"images scored{sizes}; the same images on every seed (the seeds vary only the "
            "folds and the heads' randomness)."
        )
    classes = f", on {record['classes']} classes" if record["classes"] else ""
    balanced = " (the mean of the per-class accuracies)" * (record["metric"] == "balanced_accuracy")
    return [
        what,
        f"Seeds: {', '.join(map(str, seeds))}. Heads: {listing(list(record['heads']))}{classes}.",
        f"Hyper-parameters: {_how_chosen(record)} (the values are below).",
        f"Metric: {metric_name(record['metric'])}{balanced}, on the test images only.",
    ]


def cost(seconds: float | None, stage_one: float | None, subject: str, fits: str) -> str:
    """``The protocol took 0.6 s for 6 head fits; stage one of this cache took 4.9 s, so the
    protocol cost 0.13 of one stage-one pass.``"""
    if seconds is None:
        return f"{subject}'s time is not recorded."
    took = f"{subject} took {seconds:.1f} s for {fits}"
    if not stage_one:
        return f"{took}; stage one's time is not recorded in the cache."
    return (
        f"{took}; stage one of this cache took {stage_one:.1f} s, so {subject.lower()} cost "
        f"{seconds / stage_one:.2f} of one stage-one pass."
    )


# --------------------------------------------------------------------------- tables


def seeds_table(record: dict[str, Any]) -> Table:
    """Each head's mean +- std of the headline metric and its figure on every seed."""
    metric, heads, seeds = record["metric"], record["heads"], record["seeds"]
    ranked = sorted(heads, key=lambda h: -heads[h]["mean"][metric])
    header = ["head", "mean +- std", *[f"seed {s}" for s in seeds], "fit s (all seeds)"]
    rows = [
        [h, figure_text(heads[h], metric, len(seeds))]
        + [fmt(r["scores"][metric]) for r in heads[h]["runs"]]
        + [fmt(heads[h]["fit_seconds"], 2)]
        for h in ranked
    ]
    return f"{metric_name(metric).capitalize()} on the test images, per seed", header, rows


def metrics_table(record: dict[str, Any]) -> Table:
    """Every metric recorded, mean +- std over the seeds."""
    heads = record["heads"]
    keys = [m for m in METRIC_WORDS if all(m in e["mean"] for e in heads.values())]
    ranked = sorted(heads, key=lambda h: -heads[h]["mean"][record["metric"]])
    n = len(record["seeds"])
    rows = [[h] + [figure_text(heads[h], m, n) for m in keys] for h in ranked]
    title = "Every metric" + (", mean +- std over the seeds" if n > 1 else "")
    return title, ["head", *map(metric_name, keys)], rows


def params_table(record: dict[str, Any]) -> Table:
    """The hyper-parameters each head used on each seed."""
    heads = record["heads"]
    rows = [
        [str(seed), *[params_text(e["runs"][i]) for e in heads.values()]]
        for i, seed in enumerate(record["seeds"])
    ]
    return "Hyper-parameters chosen on each seed", ["seed", *heads], rows


def location(path: Path, created: str) -> str:
    """Which file, and when it was written."""
    when = f", written {created}" if created else ""
    return f"Results: {path.parent.name}/{path.name}{when}."


def protocol_blocks(record: dict[str, Any]) -> list[Block]:
    """A protocol's section: headline first, then what it was, the tables and the time."""
    fits = f"{sum(len(e['runs']) for e in record['heads'].values())} head fits"
    return [
        ("verdict", [headline(record)]),
        ("list", described(record)),
        ("table", seeds_table(record)),
        ("table", metrics_table(record)),
        ("table", params_table(record)),
        ("p", cost(record["seconds"], record["stage_one_seconds"], "The protocol", fits)),
        ("p", location(record["file"], record["created"])),
    ]
