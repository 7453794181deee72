"""The few-shot curve (``make curve``): the N-per-class protocol for several N, on one cache.

Each N is :func:`pipeline.heads.protocol_run.run_protocol` (the same seeds, the same
heads); ``all`` is the cache's own split, train and val pooled for training, test
scored (val when the cache has no test), the same rows for every seed. Writes
``artifacts/protocols/<dataset>/<cache stem>/curve.{json,md,png}``: per head the
headline metric's mean and std at each N, the plot showing the mean and its spread.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.artifacts import now_iso
from pipeline.core.errors import HeadError
from pipeline.core.files import write_atomic
from pipeline.features.cache import FeatureSet, load_features
from pipeline.heads.protocol_run import (
    DEFAULT_HEADS,
    evaluate_split,
    protocols_dir,
    resolve_protocol_heads,
    run_protocol,
)
from pipeline.report.figures import curve_figure
from pipeline.report.plotting import png_bytes


@dataclass
class CurveResult:
    """The curve's record and the files written."""

    record: dict[str, Any]
    paths: tuple[Path, Path, Path]

    def format(self) -> str:
        """The table, then the files."""
        return curve_table(self.record) + "\nwrote " + ", ".join(map(str, self.paths))


def parse_shots(text: str | Sequence[Any]) -> list[int | str]:
    """``"1,2,5,all"`` -> ``[1, 2, 5, "all"]``, in increasing order.

    Raises
    ------
    HeadError
        A value that is neither a whole number of at least 1 nor ``all``.
    """
    items = text.replace(" ", "").split(",") if isinstance(text, str) else list(text)
    shots: list[int | str] = []
    for item in (i for i in items if str(i)):
        if str(item).lower() == "all":
            shots.append("all")
        elif str(item).isdigit() and int(item) >= 1:
            shots.append(int(item))
        else:
            raise HeadError(f"SHOTS={text!r}: {item!r} is not a whole number >= 1 or all")
    if not shots:
        raise HeadError("SHOTS= is empty; e.g. SHOTS=1,2,5,10,all")
    numbers = sorted({s for s in shots if s != "all"})
    return [*numbers, *(["all"] if "all" in shots else [])]


def run_curve(
    cache: str | Path | FeatureSet,
    shots: str | Sequence[Any] = "1,2,5,10,all",
    seeds: Sequence[int] = (0, 1, 2),
    heads: str | Sequence[str] = DEFAULT_HEADS,
    metric: str = "balanced_accuracy",
    *,
    cv: int = 3,
    artifacts_dir: str | Path = "artifacts",
    log: Any = None,
) -> CurveResult:
    """The protocol at each N of ``shots`` (and ``all``), timed; writes the table and plot.

    Raises
    ------
    HeadError
        Bad ``SHOTS``, or any refusal of :func:`run_protocol` (a class smaller than N + 1).
    """
    fs = cache if isinstance(cache, FeatureSet) else load_features(cache)
    shots, names = parse_shots(shots), resolve_protocol_heads(heads)
    started, points = time.perf_counter(), []
    for n in shots:
        if n == "all":
            point = _all_point(fs, names, seeds, metric, cv)
        else:
            result = run_protocol(
                fs, n, seeds, names, metric, cv=cv, artifacts_dir=artifacts_dir, part_of="curve"
            )
            point = {"shots": n, "seconds": result.record["seconds"], "heads": {
                h: {"mean": r["mean"][metric], "std": r["std"][metric],
                    "n_train": r["seeds"][0]["n_train"]}
                for h, r in result.record["heads"].items()}}  # fmt: skip
        points.append(point)
        if log is not None:
            log(f"N={n}: " + ", ".join(
                f"{h} {v['mean']:.3f} +- {v['std']:.3f}" for h, v in point["heads"].items()
            ) + f" ({point['seconds']:.1f} s)")  # fmt: skip
    record = {
        "dataset": fs.attrs.get("dataset"), "cache": str(Path(fs.path).resolve()),
        "metric": metric, "seeds": list(seeds), "heads": list(names), "points": points,
        "seconds": time.perf_counter() - started, "stage_one_seconds": fs.attrs.get("seconds"),
        "created": now_iso(),
    }  # fmt: skip
    out = protocols_dir(artifacts_dir, fs)
    paths = (out / "curve.json", out / "curve.md", out / "curve.png")
    write_atomic(paths[0], lambda t: t.write_text(json.dumps(record, indent=2)))
    write_atomic(paths[1], lambda t: t.write_text(curve_table(record) + "\n"))
    png = png_bytes(curve_figure(record), dpi=110)
    write_atomic(paths[2], lambda t: t.write_bytes(png))
    return CurveResult(record, paths)


def _all_point(
    fs: FeatureSet, names: Sequence[str], seeds: Sequence[int], metric: str, cv: int
) -> dict[str, Any]:
    """``all``: the cache's own split (train + val to train on; test, else val, scored)."""
    scored = "test" if "test" in fs.splits else "val"
    if scored not in fs.splits or "train" not in fs.splits:
        raise HeadError(
            f"SHOTS=all needs the cache's own train and a val or test split; {fs.path} has "
            f"{', '.join(fs.splits)}: leave all out of SHOTS"
        )
    split = np.where(fs.split == scored, "test", "train").astype(object)
    if scored == "test":
        split[fs.split == "val"] = "train"
    split[fs.split == "unused"] = ""  # a split file left them out of every split
    started = time.perf_counter()
    runs = [evaluate_split(fs, split, names, seed, cv, metric) for seed in seeds]
    return {"shots": "all", "seconds": time.perf_counter() - started, "scored": scored,
            "heads": {h: {"mean": float(np.mean([r[h][metric] for r in runs])),
                          "std": float(np.std([r[h][metric] for r in runs])),
                          "n_train": runs[0][h]["n_train"]} for h in names}}  # fmt: skip


def curve_table(record: dict[str, Any]) -> str:
    """Markdown: a row per N, a column per head (mean +- std), and the time of each N."""
    heads = record["heads"]
    lines = [
        f"{record['metric']} on {record['dataset']} by training images per class, "
        f"{len(record['seeds'])} seeds, mean +- std; curve {record['seconds']:.1f} s"
        + (
            f", stage one {record['stage_one_seconds']:.1f} s"
            if record.get("stage_one_seconds")
            else ""
        ),  # fmt: skip
        "",
        "| per class | " + " | ".join(heads) + " | s |",
        "|---:|" + "---:|" * (len(heads) + 1),
    ]
    for p in record["points"]:
        cells = [f"{p['heads'][h]['mean']:.3f} +- {p['heads'][h]['std']:.3f}" for h in heads]
        lines.append(f"| {p['shots']} | " + " | ".join(cells) + f" | {p['seconds']:.1f} |")
    return "\n".join(lines)
