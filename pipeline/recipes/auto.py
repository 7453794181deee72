"""``make auto``: try a few feature recipes, choose one by cross-validation on train only.

The recipes (:data:`RECIPES`), each with the default linear heads (``svm``,
``logreg``), on the backbone, weights and split the user gave:

==========  ================================================================  ================
name        features                                                          extra passes
==========  ================================================================  ================
default     one view at the input size (today's stage one)                    0 (or 1)
flip        that view and its mirror, averaged (``VIEWS=+flip``)               2
scale320    one view at 320 px (``INPUT_SIZE=320``)                           about 2
224+320     ``default`` and ``scale320`` joined (L2 each, concatenated)       0
mid+last    ``default`` and a middle layer joined (the last layer at 1/16 of  about 0.7
            the input: ``block_13_expand_relu`` for MobileNetV2)
==========  ================================================================  ================

(The 320 scale is ``round(1.43 x`` the input size``)`` for backbones whose input is not 224.)

The choice: every (recipe, head) pair is scored by the head's stratified
``CV``-fold search on the **train split only** (its best grid point's mean fold
accuracy); the highest score wins, ties going to the earlier recipe (simpler,
cheaper) and then to the earlier head. Val and test are read only after the
choice, to report the winner's figures (and the plain default's, for
comparison) with bootstrap intervals; they never decide anything. The usual
report (``make report``) is written too; ``reports/<dataset>/auto.md`` and
``auto.json`` explain the choice.

Every cache is an ordinary stage-one (or joined) cache and every head an
ordinary head, reused when up to date: a second run costs seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.artifacts import Artifacts, manifest_file, read_manifest, read_predictions
from pipeline.core.files import write_bytes_atomic, write_json_atomic
from pipeline.features import backbones
from pipeline.features.cache import read_attrs
from pipeline.features.config import FeatureConfig
from pipeline.features.extract import extract_features
from pipeline.features.joins import join_caches
from pipeline.features.resplit import split_in_use
from pipeline.heads.fit import fit_heads
from pipeline.heads.registry import HEADS
from pipeline.recipes.probe import stage_ends
from pipeline.report.collect import write_report
from pipeline.report.pages import md_escape
from pipeline.report.stats import bootstrap_metrics

AUTO_HEADS = ("svm", "logreg")
DEFAULT_CV = 3  # CV=: the folds of every command


@dataclass(frozen=True)
class Recipe:
    """A named way to make features: one stage-one cache, or several joined.

    ``parts`` are overrides of the user's :class:`~pipeline.features.config.FeatureConfig`
    (``{}``: the plain default); the strings ``"$scale"`` and ``"$middle"`` are
    resolved per backbone (:func:`resolve_part`).
    """

    name: str
    description: str
    parts: tuple[dict[str, Any], ...]


RECIPES: tuple[Recipe, ...] = (
    Recipe("default", "one view at the input size (plain stage one)", ({},)),
    Recipe("flip", "the view and its horizontal mirror, averaged", ({"views": "+flip"},)),
    Recipe("scale320", "one view at a larger scale (320 px for 224)", ({"input_size": "$scale"},)),
    Recipe(
        "224+320",
        "default and scale320 joined (each L2-normalised, concatenated)",
        ({}, {"input_size": "$scale"}),
    ),
    Recipe(
        "mid+last",
        "default and a middle layer (last at 1/16 of the input) joined",
        ({}, {"layer": "$middle"}),
    ),
)


def larger_scale(size: int) -> int:
    """The ``scale320`` recipe's input side: 320 for 224, the same ratio elsewhere."""
    return int(round(size * 320 / 224))


def middle_layer(config: Any) -> str:
    """The last layer at 1/16 of the input (the second-to-last stage end)."""

    spec = backbones.get_backbone(config.backbone)
    size = backbones.resolve_input_size(spec, config.input_size)
    base = backbones.build_base(spec, weights="none", input_size=size)  # names only
    ends = stage_ends(base)
    return ends[-2] if len(ends) >= 2 else ends[-1]


def resolve_part(config: Any, part: dict[str, Any], middle: Callable[[], str]) -> Any:
    """The :class:`FeatureConfig` of one recipe part."""

    values = dict(part)
    if values.get("input_size") == "$scale":
        spec = backbones.get_backbone(config.backbone)
        values["input_size"] = larger_scale(backbones.resolve_input_size(spec, config.input_size))
    if values.get("layer") == "$middle":
        values["layer"] = middle()
    return replace(config, **values)


# --------------------------------------------------------------------------- the choice


@dataclass
class Candidate:
    """One (recipe, head) pair and its scores; only ``cv`` is used to choose."""

    recipe: str
    head: str
    cv: float | None
    manifest_path: Path
    manifest: dict[str, Any] = field(repr=False)


def choose(candidates: Sequence[Candidate]) -> Candidate:
    """The highest cross-validation score on train; ties to the earlier candidate.

    Nothing but ``Candidate.cv`` is read: val and test cannot change the choice.
    """
    scored = [c for c in candidates if c.cv is not None]
    if not scored:
        raise ValueError("no candidate has a cross-validation score (a class with one image?)")
    best = scored[0]
    for c in scored[1:]:
        if c.cv > best.cv + 1e-12:  # strictly better: ties keep the simpler recipe
            best = c
    return best


def fit_recipe_heads(
    recipe: str,
    cache_path: Path,
    *,
    heads: Sequence[str] = AUTO_HEADS,
    cv: int = DEFAULT_CV,
    seed: int = 0,
    artifacts_dir: str | Path = "artifacts",
) -> list[Candidate]:
    """Fit (or reuse) the heads of one recipe's cache; one :class:`Candidate` per head."""

    attrs = read_attrs(cache_path)
    folder = Artifacts(artifacts_dir).heads_dir(
        str(attrs.get("dataset") or "unknown"), cache_path.stem
    )
    out = []
    for head in heads:
        path = folder / f"{head}.json"
        manifest = None
        if path.is_file():
            try:
                m = read_manifest(path, "head")
            except Exception:  # a damaged manifest is refitted
                m = {}
            same = (
                m.get("fingerprint") == attrs.get("fingerprint")
                and m.get("config_json") == attrs.get("config_json")
                and m.get("seed") == seed
                and m.get("pca") is None
                and m.get("norm") == HEADS[head].norm
                and str((m.get("cv") or {}).get("scheme", "")).startswith(f"{cv}-fold")
            )
            manifest = m if same else None
        if manifest is None:
            (result,) = fit_heads(cache_path, head, artifacts_dir=artifacts_dir, cv=cv, seed=seed)
            path, manifest = result.manifest_path, result.manifest
        out.append(Candidate(recipe, head, (manifest.get("cv") or {}).get("score"), path, manifest))
    return out


def held_out_figures(candidate: Candidate, *, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Accuracy per evaluated split with a 95 % bootstrap interval (read after the choice)."""

    m = candidate.manifest
    path = manifest_file(m, candidate.manifest_path, "predictions")
    if path is None:
        return {}
    figures = {}
    for split, p in read_predictions(path, m["class_names"]).items():
        ci = bootstrap_metrics(
            p.labels, p.pred, len(m["class_names"]), n_resamples=n_resamples, seed=seed
        )["accuracy"]
        figures[split] = {
            "accuracy": float(np.mean(p.labels == p.pred)),
            "ci95": [round(ci[0], 4), round(ci[1], 4)],
            "n": int(len(p.labels)),
            "correct": int(np.sum(p.labels == p.pred)),
        }
    return figures


# --------------------------------------------------------------------------- the run


@dataclass
class AutoResult:
    """What ``make auto`` chose and wrote."""

    dataset: str
    winner: Candidate
    default: Candidate
    record: dict[str, Any]
    json_path: Path
    md_path: Path
    report: Any = None

    def format(self) -> str:
        w, d = self.record["winner"], self.record["default"]

        def show(figures: dict) -> str:
            return ", ".join(
                f"{s} {v['accuracy']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"
                for s, v in figures.items()
            )

        lines = [
            f"auto: chose {w['recipe']} + {w['head']} (cv {w['cv']:.4f} on train); "
            f"{show(w['held_out'])}",
            f"      plain default {d['recipe']} + {d['head']} (cv {d['cv']:.4f}); {show(d['held_out'])}",
            f"      {self.record['seconds']:.1f} s in all; wrote {self.md_path}",
        ]
        return "\n".join(lines)


def run_auto(
    data_dir: str | Path,
    config: Any = None,
    *,
    split: Any = None,
    recipes: Sequence[Recipe] = RECIPES,
    heads: Sequence[str] = AUTO_HEADS,
    cv: int = DEFAULT_CV,
    seed: int = 0,
    artifacts_dir: str | Path = "artifacts",
    report: bool = True,
    progress: bool = False,
    log: Callable[[str], Any] | None = print,
) -> AutoResult:
    """Extract every recipe's features (reusing caches), fit its heads, choose by CV on train.

    Parameters
    ----------
    data_dir : path
        Image folder, as stage one.
    config : FeatureConfig, optional
        The user's stage-one options (backbone, weights, input size, ...): the
        ``default`` recipe; the others change one thing each.
    split : SplitConfig, optional
        As stage one.
    recipes : sequence of Recipe
        Default :data:`RECIPES`; the first is the plain default.
    heads : sequence of str
        Heads fit on every recipe (default the linear ``svm`` and ``logreg``).
    cv : int
        Folds of the search on train: the only thing the choice reads.

    Returns
    -------
    AutoResult
        The winner, the plain default, and the files written.
    """

    say = log or (lambda _: None)
    started = time.perf_counter()
    config = config or FeatureConfig()
    caches = _RecipeCaches(
        data_dir, config, split=split, artifacts_dir=artifacts_dir, progress=progress, say=say
    )
    rows, candidates, dataset = [], [], None
    for recipe in recipes:
        t0 = time.perf_counter()
        cache_path, parts, part_seconds = caches.cache_of(recipe)
        found = fit_recipe_heads(
            recipe.name, cache_path, heads=heads, cv=cv, seed=seed, artifacts_dir=artifacts_dir
        )
        candidates += found
        dataset = found[0].manifest.get("dataset")
        for c in found:
            say(
                f"  {recipe.name:<9} {c.head:<7} cv {c.cv:.4f}  width {c.manifest.get('feature_width')}"
            )
        rows.append(
            _recipe_row(recipe, cache_path, parts, part_seconds, found, time.perf_counter() - t0)
        )
    winner = choose(candidates)  # cross-validation on train only
    plain = [c for c in candidates if c.recipe == recipes[0].name]
    default = choose(plain)
    record = _auto_record(
        dataset, config.backbone, heads, cv, rows, winner, default, plain, started
    )
    json_path, md_path = Artifacts(artifacts_dir).auto_files(str(dataset))
    write_json_atomic(json_path, record)
    write_bytes_atomic(md_path, auto_markdown(record))
    result = AutoResult(str(dataset), winner, default, record, json_path, md_path)
    if report:
        result.report = write_report(str(dataset), artifacts_dir=artifacts_dir)
    say(result.format())
    return result


class _RecipeCaches:
    """The recipes' caches: each stage-one part extracted once, joined where a recipe has more."""

    def __init__(
        self, data_dir: str | Path, config: Any, *, split: Any, artifacts_dir: str | Path,
        progress: bool, say: Callable[[str], Any],
    ) -> None:  # fmt: skip
        self.data_dir, self.config = data_dir, config
        # the split stage one's cache holds (make features SEED= / SPLIT_FILE=), not a default
        self.split = split_in_use(data_dir, config, split, artifacts_dir)
        self.artifacts_dir, self.progress, self.say = artifacts_dir, progress, say
        self.caches: dict[str, Path] = {}  # FeatureConfig repr -> cache (a shared part runs once)
        self.middle: str | None = None

    def middle_name(self) -> str:
        """The middle layer of the backbone, looked up the first time a recipe asks."""
        if self.middle is None:
            self.middle = middle_layer(self.config)
        return self.middle

    def part(self, part: dict[str, Any]) -> tuple[Path, float]:
        """The cache of one recipe part, and the seconds extracting it took (0: already made)."""
        part_config = resolve_part(self.config, part, self.middle_name)
        key = repr(part_config)
        if key in self.caches:
            return self.caches[key], 0.0
        summary = extract_features(
            self.data_dir,
            part_config,
            split=self.split,
            artifacts_dir=self.artifacts_dir,
            progress=self.progress,
        )
        self.say(summary.format())
        self.caches[key] = summary.cache_path
        return summary.cache_path, summary.seconds

    def cache_of(self, recipe: Recipe) -> tuple[Path, list[Path], float]:
        """The recipe's cache (its one part, or its parts joined), its parts, their seconds."""
        parts, part_seconds = [], 0.0
        for part in recipe.parts:
            path, seconds = self.part(part)
            parts.append(path)
            part_seconds += seconds
        if len(parts) == 1:
            return parts[0], parts, part_seconds
        joined = join_caches(parts, norm="l2", artifacts_dir=self.artifacts_dir, log=self.say)
        self.say(joined.format())
        return joined.path, parts, part_seconds


def _recipe_row(
    recipe: Recipe, cache_path: Path, parts: list[Path], part_seconds: float,
    found: list[Candidate], wall_seconds: float,
) -> dict[str, Any]:  # fmt: skip
    """``auto.json``'s line on one recipe: its cache, width, seconds and heads' scores."""
    return {
        "recipe": recipe.name,
        "description": recipe.description,
        "cache": str(cache_path),
        "parts": [str(p) for p in parts],
        "feature_width": found[0].manifest.get("feature_width"),
        "extraction_seconds_of_recorded_caches": part_seconds,
        "wall_seconds_this_run": wall_seconds,
        "heads": {c.head: {"cv": c.cv, "params": c.manifest.get("params")} for c in found},
    }


def _auto_record(
    dataset: Any, backbone: str, heads: Sequence[str], cv: int, rows: list[dict[str, Any]],
    winner: Candidate, default: Candidate, default_heads: list[Candidate], started: float,
) -> dict[str, Any]:  # fmt: skip
    """``auto.json``: the rule, the recipes, the choice and the held-out figures."""
    return {
        "dataset": dataset,
        "rule": (
            f"highest mean {cv}-fold cross-validation accuracy on the train split "
            "(each head's best grid point); ties to the earlier recipe, then the earlier head; "
            "val and test are never read before the choice"
        ),
        "backbone": backbone,
        "heads": list(heads),
        "recipes": rows,
        "winner": _summary(winner),
        "default": _summary(default),
        # every head of the plain default, for comparison (read after the choice)
        "default_heads": [_summary(c) for c in default_heads],
        "seconds": time.perf_counter() - started,
    }


def _summary(c: Candidate) -> dict[str, Any]:
    return {
        "recipe": c.recipe,
        "head": c.head,
        "cv": c.cv,
        "params": c.manifest.get("params"),
        "manifest": str(c.manifest_path),
        "backbone": c.manifest.get("backbone"),
        "held_out": held_out_figures(c),  # read after the choice, for the record
    }


def auto_markdown(record: dict[str, Any]) -> str:
    """``auto.md``: the recipes, the rule, the choice and its untouched held-out figures."""

    w, d = record["winner"], record["default"]
    lines = [
        f"# make auto: {md_escape(str(record['dataset']))}",
        "",
        f"**Chosen: `{w['recipe']}` + `{w['head']}`** ({w['params']}), cross-validation "
        f"accuracy on train {w['cv']:.4f}.",
        "",
        f"Rule: {record['rule']}.",
        "",
        "| recipe | features | width | " + " | ".join(f"{h} CV" for h in record["heads"]) + " |",
        "|---|---|---|" + "---|" * len(record["heads"]),
    ]
    for row in record["recipes"]:
        cells = []
        for h in record["heads"]:
            score = row["heads"][h]["cv"]
            text = "-" if score is None else f"{score:.4f}"
            is_winner = row["recipe"] == w["recipe"] and h == w["head"]
            cells.append(f"**{text}**" if is_winner else text)
        lines.append(
            f"| `{row['recipe']}` | {md_escape(row['description'])} | {row['feature_width']} | "
            + " | ".join(cells)
            + " |"
        )
    lines += [
        "",
        "Held-out figures, read after the choice (95 % percentile bootstrap, 2,000 resamples):",
        "",
        "| run | split | accuracy | 95 % interval | correct |",
        "|---|---|---|---|---|",
    ]
    shown = [("chosen", w)] + [("plain default", row) for row in record.get("default_heads", [d])]
    for label, row in shown:
        for split, v in row["held_out"].items():
            lines.append(
                f"| {label}: `{row['recipe']}` + `{row['head']}` | {split} | {v['accuracy']:.3f} | "
                f"[{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] | {v['correct']} / {v['n']} |"
            )
    lines += [
        "",
        f"Time: {record['seconds']:.1f} s for this run (caches and heads reused when up to date).",
        "",
    ]
    return "\n".join(lines)
