"""A curve's section of the protocols page (:mod:`pipeline.report.protocols`).

The headline first (each head from the smallest N to the largest, the cache's own split,
where the best head levels off), what was run, the plot, a row per N, the time beside stage
one's, and every seed's figure and hyper-parameters at each N (from the protocols the curve
ran). ``curve`` is checked by :func:`pipeline.report.protocol_records.read_curve`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.report.cells import fmt, listing
from pipeline.report.protocol_sections import (
    cost,
    figure_text,
    location,
    metric_name,
    params_text,
)
from pipeline.report.render import Block, Table

PLATEAU = 0.01  # a curve has levelled off once its means stay this close to the last one


def numbers_of(curve: dict[str, Any]) -> list[dict[str, Any]]:
    """The points of a whole number of images per class (not ``all``)."""
    return [p for p in curve["points"] if p["shots"] != "all"]


def _plateau(means: Sequence[tuple[int, float]]) -> int:
    """The smallest N from which every mean stays within :data:`PLATEAU` of the last one."""
    last = means[-1][1]
    start = means[-1][0]
    for n, mean in reversed(means):
        if abs(mean - last) > PLATEAU + 1e-9:  # 0.91 - 0.90 is 0.01 and a little more
            break
        start = n
    return start


def curve_headline(curve: dict[str, Any]) -> str:
    """Each head from the smallest N to the largest, the shipped split's level, and where
    the best head levels off."""
    metric, heads, numbers = curve["metric"], curve["heads"], numbers_of(curve)
    parts = []
    for h in heads if numbers else []:
        first, last = numbers[0], numbers[-1]
        parts.append(
            f"{h} {first['heads'][h]['mean']:.3f} at {first['shots']} to "
            f"{last['heads'][h]['mean']:.3f} at {last['shots']}"
            if len(numbers) > 1
            else f"{h} {first['heads'][h]['mean']:.3f} at {first['shots']}"
        )
    shipped = [p for p in curve["points"] if p["shots"] == "all"]
    if shipped:
        level = ", ".join(f"{h} {shipped[0]['heads'][h]['mean']:.3f}" for h in heads)
        parts.append(f"on the cache's own split {level}")
    n = len(curve["seeds"])
    sentence = (
        f"{metric_name(metric).capitalize()} by training images per class, over {n} "
        f"seed{'s' * (n != 1)}: {'; '.join(parts)}"
    )
    if len(numbers) >= 3:
        best = max(heads, key=lambda h: numbers[-1]["heads"][h]["mean"])
        start = _plateau([(p["shots"], p["heads"][best]["mean"]) for p in numbers])
        if start < numbers[-1]["shots"]:
            sentence += (
                f"; {best} stays within {PLATEAU} of its {numbers[-1]['shots']}-per-class "
                f"mean from {start} per class on"
            )
        else:
            sentence += f"; {best} has not levelled off at {numbers[-1]['shots']} per class"
    return sentence + "."


def curve_described(curve: dict[str, Any]) -> list[str]:
    """What the curve ran, one fact a line."""
    shots = ", ".join(str(p["shots"]) for p in curve["points"])
    facts = [
        f"The N-per-class protocol at each N of {shots}: N training images per class drawn "
        "for each seed from all of the class's images, every other image test.",
        f"Seeds: {', '.join(map(str, curve['seeds']))}. Heads: {listing(curve['heads'])}.",
        "Hyper-parameters: chosen as make protocol chooses them (cross-validation on the "
        "training images when every class has at least 5 of them, else fixed defaults).",
    ]
    shipped = [p for p in curve["points"] if p["shots"] == "all"]
    if shipped:
        facts.append(
            f"all: the cache's own split, its train and val images to train on, its "
            f"{shipped[0]['scored']} images scored, the same images on every seed (its spread "
            "is the heads' own randomness only); the dashed lines of the plot."
        )
    return facts


def curve_table(curve: dict[str, Any]) -> Table:
    """A row per N: the training images, each head's mean +- std, the seconds."""
    heads = curve["heads"]
    rows = [
        [str(p["shots"]), fmt(p["heads"][heads[0]]["n_train"])]
        + [f"{p['heads'][h]['mean']:.3f} +- {p['heads'][h]['std']:.3f}" for h in heads]
        + [fmt(p["seconds"], 1)]
        for p in curve["points"]
    ]
    header = ["per class", "training images", *heads, "s (all seeds)"]
    return f"{metric_name(curve['metric']).capitalize()}, mean +- std over the seeds", header, rows


def curve_seed_tables(curve: dict[str, Any], runs: dict[int, dict[str, Any]]) -> list[Table]:
    """Every seed's figure at each N, and the hyper-parameters chosen there, from the
    protocols the curve ran (none when their files are gone)."""
    if not runs:
        return []
    metric, heads, seeds = curve["metric"], curve["heads"], curve["seeds"]
    figures, params = [], []
    for n, record in sorted(runs.items()):
        for h in heads:
            entry = record["heads"][h]
            figures.append(
                [str(n), h, *[fmt(r["scores"][metric]) for r in entry["runs"]]]
                + [figure_text(entry, metric, len(seeds))]
            )
        chosen = [" / ".join(params_text(r) for r in record["heads"][h]["runs"]) for h in heads]
        params.append([str(n), *chosen])
    order = " / ".join(map(str, seeds))
    return [
        (
            f"{metric_name(metric).capitalize()} of each seed at each N",
            ["per class", "head", *[f"seed {s}" for s in seeds], "mean +- std"],
            figures,
        ),
        (f"Hyper-parameters chosen at each N (seeds {order})", ["per class", *heads], params),
    ]


def _missing_runs(curve: dict[str, Any], runs: dict[int, dict[str, Any]]) -> str | None:
    """Which N have no per-seed figures here, and why."""
    missing = [str(p["shots"]) for p in numbers_of(curve) if p["shots"] not in runs]
    if not missing:
        return None
    return (
        f"No per-seed figures for N = {', '.join(missing)}: the curve's files for "
        f"{'it' if len(missing) == 1 else 'them'} were written over by a later make protocol "
        "(shown in its own section) or are gone."
    )


def curve_blocks(
    curve: dict[str, Any], runs: dict[int, dict[str, Any]], figure: str | None
) -> list[Block]:
    """A curve's section: headline, what it ran, the plot, the table, the time, each seed."""
    fits = f"{len(curve['points'])} values of N on {len(curve['seeds'])} seeds"
    blocks: list[Block] = [("verdict", [curve_headline(curve)]), ("list", curve_described(curve))]
    blocks += [("image", ("few-shot curve", figure))] if figure else []
    blocks += [
        ("table", curve_table(curve)),
        ("p", cost(curve["seconds"], curve["stage_one_seconds"], "The curve", fits)),
    ]
    blocks += [("table", t) for t in curve_seed_tables(curve, runs)]
    blocks += [("p", note) for note in [_missing_runs(curve, runs)] if note]
    return blocks + [("p", location(curve["file"], curve["created"]))]
