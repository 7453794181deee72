"""The report's pages: its sections as Markdown and as one self-contained HTML page.

The last step of the report (collect -> evaluate -> **render**). Every function
takes the data of :func:`pipeline.report.evaluation.build_report_data` and returns
text; nothing here reads results files, computes a statistic or writes a file.
The page is built once, as sections of blocks (:func:`report_sections`), and
written out by :func:`markdown` and :func:`html_page`, so both say the same.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from pipeline.core.artifacts import EVAL_SPLITS
from pipeline.heads.scoring import words
from pipeline.report.cells import ci, fmt, head_times, ms
from pipeline.report.fonts import class_labels
from pipeline.report.naming import phase_two_words, unfreeze_words
from pipeline.report.plotting import confusion_name, safe_figure_name
from pipeline.report.verdict import label, ranked_on, verdict

__all__ = ["ci", "fmt", "intro", "report_sections", "title", "verdict"]

Table = tuple[str, list[str], list[list[str]]]  # (title, header, rows)
Block = tuple[str, Any]  # ("p", text), ("table", Table), ("figures", [names]), ("thumbs", split),
# ("row", [[blocks], [blocks]]: columns side by side), ("verdict", [sentences]), ("list", [text]),
# ("link", {"sentence", "href", "text"}), ("image", (alt, figure name))
Section = tuple[str, str, list[Block]]  # (id, title, blocks)

NUMBERED_CLASSES = (
    "No font installed here has the glyphs of these class names, so the figures number "
    "the classes (key below). Install a font that has them (fonts-noto-cjk or fonts-nanum "
    "for Korean) and run `make report` again to see the names."
)


# --------------------------------------------------------------------------- cells


def _short_identity(identity: Any) -> str:
    """A weights identity short enough for a table cell (``sha256:`` digests cut to 12)."""
    if isinstance(identity, str) and identity.startswith("sha256:"):
        return identity[: len("sha256:") + 12]
    return fmt(identity)


def _rows(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["run"]: r for r in data["runs"]}


# --------------------------------------------------------------------------- words


def title(data: dict[str, Any]) -> str:
    """The page title: the data set and what was compared."""
    c = data["counts"]
    parts = []
    if c["heads"]:
        caches = "backbone cache" if c["backbones"] == 1 else "backbone caches"
        parts.append(f"{c['heads']} head{'s' * (c['heads'] != 1)} on {c['backbones']} {caches}")
    if c["finetuned"]:
        parts.append(f"{c['finetuned']} fine-tuned run{'s' * (c['finetuned'] != 1)}")
    return f"{data['dataset']}: {' and '.join(parts)} compared"


# --------------------------------------------------------------------------- tables


_TIMES = ["head ms/image (cached features)", "end-to-end ms/image (from images)"]


def leaderboard_table(data: dict[str, Any]) -> Table:
    """The ranked runs: selection score, interval, McNemar against the best, cost."""
    chosen = data["selection"]
    split = chosen["compare_split"]
    metric, said = ranked_on(data)
    head = "rank", "run"
    if chosen["rule"] == "val":
        header = [*head, f"{split} {said} [95% CI]"]
    else:
        header = [*head, f"CV {said} (train)", f"{split} {said} [95% CI], not ranked on"]
    header += ["p vs #1 (McNemar)", "tied with #1", "fit s", *_TIMES]
    rows_by_id = _rows(data)
    rows = []
    for e in data["leaderboard"]:
        row = [str(e["rank"]), label(data, e["run"])]
        if chosen["rule"] != "val":
            row.append(fmt(e["selection_score"]))
        row.append(ci(e, metric) if metric in e else "-")
        test = e.get("mcnemar_vs_best")
        row.append(f"{test['p_value']:.3g}" if test else "-")
        row.append("chosen" if e["rank"] == 1 else "yes" if e.get("tied_with_best") else "")
        rows.append([*row, fmt(e["fit_seconds"], 2), *head_times(rows_by_id[e["run"]])])
    return f"Leaderboard (ranked on {chosen['metric']})", header, rows


def cost_table(data: dict[str, Any]) -> Table:
    """What the chosen run and the runs tied with it cost; :func:`cost_note` says what
    each time includes."""
    chosen = data["selection"]
    rows_by_id = _rows(data)
    header = ["run", "fit s", _TIMES[0], "stage one ms/image", _TIMES[1]]
    rows = []
    for run in [chosen["winner"], *chosen["tied"]]:
        r = rows_by_id[run]
        head, end_to_end = head_times(r)
        stage_one = "-" if r["includes_backbone"] else ms(r["extraction_seconds_per_image"])
        rows.append([label(data, run), fmt(r["fit_seconds"], 2), head, stage_one, end_to_end])
    return "Cost of the chosen run and of the runs tied with it", header, rows


def cost_note(data: dict[str, Any]) -> str:
    """What the time columns include, in words."""
    seconds = {
        r.get("cache_label") or r["group"]: r["extraction_seconds"]
        for r in data["runs"]
        if not r["includes_backbone"] and r.get("extraction_seconds")
    }
    once = ", ".join(f"{fmt(v, 1)} s for {k}" for k, v in seconds.items())
    return (
        "Head: the head alone on features already cached. Stage one: the backbone's time per "
        "image, paid once per cache and shared by its heads"
        + (f" ({once} in all)" if once else "")
        + ". End to end: from the images, stage one and head together; a fine-tuned run has "
        "only this figure."
    )


def final_table(data: dict[str, Any]) -> Table | None:
    """The chosen run's test figures, reported apart: nothing was chosen on them."""
    final = data["selection"]["final_test"]
    if not final:
        return None
    header = ["run", "test images", "accuracy [95% CI]", "balanced accuracy", "macro F1"]
    row = [label(data, data["selection"]["winner"]), str(final["n"]), ci(final, "accuracy")]
    row += [ci(final, "balanced_accuracy"), ci(final, "macro_f1")]
    return "Final figures on the untouched test split", header, [row]


def per_class_table(data: dict[str, Any], split: str) -> Table:
    """Precision, recall, F1 and support of each class for the chosen run on ``split``."""
    row = _rows(data)[data["selection"]["winner"]]
    pc = row["splits"][split]["per_class"]
    rows = [
        [
            name,
            fmt(pc["precision"][i]),
            fmt(pc["recall"][i]),
            fmt(pc["f1"][i]),
            str(pc["support"][i]),
        ]
        for i, name in enumerate(row["class_names"])
    ]
    return f"Per class on {split}", ["class", "precision", "recall", "F1", "support"], rows


def confused_table(data: dict[str, Any], split: str) -> Table:
    """The most-confused class pairs of the chosen run on ``split``."""
    pairs = data["errors"]["splits"][split]["most_confused"]
    header = ["true class", "predicted as", "images", "share of the true class"]
    rows = [[p["true"], p["pred"], str(p["count"]), f"{p['share']:.1%}"] for p in pairs]
    return f"Most confused on {split}", header, rows


def metrics_table(data: dict[str, Any], split: str) -> Table | None:
    """Every metric with its interval of each compared run on ``split``; ``None`` if none has it."""
    runs = [r for r in data["runs"] if split in r["splits"] and r["run"] not in data["baselines"]]
    if not runs:
        return None
    many = any("top5_accuracy" in r["splits"][split] for r in runs)
    header = ["run", "n", "accuracy [95% CI]", "balanced accuracy [95% CI]", "macro F1 [95% CI]"]
    header += ["top-5 accuracy"] if many else []
    header += ["log loss", "fit s", *_TIMES]
    rows = []
    for r in runs:
        s = r["splits"][split]
        row = [label(data, r["run"]), str(s["n"]), ci(s, "accuracy"), ci(s, "balanced_accuracy")]
        row += [ci(s, "macro_f1")] + ([fmt(s.get("top5_accuracy"))] if many else [])
        row += [fmt(s.get("log_loss")), fmt(r["fit_seconds"], 2)]
        rows.append(row + list(head_times(r)))
    return f"Metrics on {split}", header, rows


def baselines_table(data: dict[str, Any]) -> Table:
    """Random-weight runs: their accuracy on each split, for reference only."""
    rows_by_id = _rows(data)
    rows = []
    for run in data["baselines"]:
        splits = rows_by_id[run]["splits"]
        rows.append(
            [label(data, run)]
            + [ci(splits[s], "accuracy") if s in splits else "-" for s in EVAL_SPLITS]
        )
    return "Random-weight baselines", ["run"] + [f"{s} accuracy" for s in EVAL_SPLITS], rows


def mcnemar_table(data: dict[str, Any]) -> Table:
    """Each McNemar comparison with its discordant counts and exact p-value."""
    header = [
        "split", "a", "b", "images", "only a right", "only b right", "both right", "both wrong",
        "exact p",
    ]  # fmt: skip
    keys = ("n", "only_a", "only_b", "both", "neither")
    rows = [
        [c["split"], label(data, c["a"]), label(data, c["b"])]
        + [str(c[k]) for k in keys]
        + [f"{c['p_value']:.3g}"]
        for c in data["mcnemar"]
    ]
    return "McNemar's exact test (same images)", header, rows


def _chosen(config: Mapping[str, Any]) -> str:
    params = config.get("params") or {}
    if isinstance(params, dict):
        chosen = ", ".join(f"{k}={v}" for k, v in params.items())
    else:
        chosen = str(params)
    if "n_epochs" in config:
        chosen += f", epochs={config['n_epochs']}"
    return chosen or "-"


def configuration_table(data: dict[str, Any]) -> Table:
    """The configuration of each run.

    ``weights`` is what the user passed (``imagenet``, ``none``, a file);
    ``weights identity`` what they were (a Keras version, a file's digest).
    """
    header = [
        "run", "identity", "backbone", "weights", "weights identity", "input", "pooling",
        "layer", "norm", "pca", "chosen", "CV score", "seed", "split",
    ]  # fmt: skip
    rows = []
    for r in data["runs"]:
        c = r["config"]
        rows.append(
            [label(data, r["run"]), r["run"], fmt(c.get("backbone")), fmt(c.get("weights_source"))]
            + [_short_identity(c.get("weights"))]
            + [fmt(c.get(key)) for key in ("input_size", "pooling", "layer", "norm", "pca")]
            + [_chosen(c), _cv_score(c), fmt(c.get("seed")), fmt(c.get("split"))]
        )
    return "Configuration of each run", header, rows


def _cv_score(config: Mapping[str, Any]) -> str:
    """The head's CV score, its metric named unless accuracy (``METRIC=`` of make head)."""
    metric = config.get("cv_metric") or "accuracy"
    shown = fmt(config.get("cv_accuracy"))
    return shown if metric == "accuracy" or shown == "-" else f"{shown} ({words(metric)})"


# --------------------------------------------------------------------------- sections


def _figures(names: Sequence[str], available: Collection[str]) -> list[Block]:
    shown = [n for n in names if n in available]
    return [("figures", shown)] if shown else []


def _error_section(data: dict[str, Any], available: Collection[str]) -> Section | None:
    errors = data["errors"]
    if not errors:
        return None
    winner = errors["run"]
    if errors["has_proba"]:
        order = "highest loss first (loss = -log of the true class's probability)"
    else:
        order = "no probabilities: the largest lead of the wrong class's score first"
    blocks: list[Block] = []
    names = _rows(data)[winner]["class_names"]
    if class_labels(names)[1]:
        blocks.append(("p", NUMBERED_CLASSES))
        blocks.append(("table", ("Class numbers in the figures", ["number", "class"],
                                 [[str(i), n] for i, n in enumerate(names)])))  # fmt: skip
    for split in errors["splits"]:
        blocks.append(("h3", f"{split}: {_rows(data)[winner]['splits'][split]['n']} images"))
        side = [("table", per_class_table(data, split)), ("table", confused_table(data, split))]
        matrix = _figures([confusion_name(winner, split)], available)
        # Past 15 classes the matrix needs the page's width, not half of it.
        blocks += [("row", [matrix, side])] if len(names) <= 15 else [*matrix, *side]
        blocks += [("p", f"The {split} images it gets most wrong, {order}:"), ("thumbs", split)]
    return "errors", f"What the chosen run gets wrong ({label(data, winner)})", blocks


def finetune_caption(row: dict[str, Any]) -> str:
    """What a fine-tuned run did, from its record: which layers, trained on what."""
    c = row["config"]
    return (
        f"{label_of(row)}: phase one trained the head on cached features; phase two "
        f"fine-tuned the {unfreeze_words(c) or 'unfrozen layers'} of "
        f"{c.get('backbone') or 'the backbone'} "
        f"{phase_two_words(c)}."
    )


def label_of(row: dict[str, Any]) -> str:
    return row.get("label") or row["run"]


def _finetuned_blocks(data: dict[str, Any], available: Collection[str]) -> list[Block]:
    blocks: list[Block] = []
    for r in data["runs"]:
        if r["kind"] == "finetuned":
            blocks.append(("p", finetune_caption(r)))
            blocks += _figures([f"curves_{safe_figure_name(r['name'])}.png"], available)
    return blocks


def report_sections(data: dict[str, Any], available: Collection[str]) -> list[Section]:
    """Every section of the report, in order; figures named only where ``available``."""
    chosen = data["selection"]
    verdict_blocks: list[Block] = [("verdict", verdict(data))]
    if data.get("audit"):  # right after the verdict: a leak makes its figures optimistic
        verdict_blocks.append(("audit", data["audit"]))
    verdict_blocks.append(("p", chosen["words"]))
    verdict_blocks += [("table", t) for t in (final_table(data),) if t]
    if chosen["winner"]:
        verdict_blocks += [("table", cost_table(data)), ("p", cost_note(data))]
    if data.get("protocols"):  # the protocols page of this data set (report.protocols)
        verdict_blocks.append(("link", data["protocols"]))
    sections: list[Section] = [("verdict", "Verdict", verdict_blocks)]
    if data["leaderboard"]:
        blocks = [("table", leaderboard_table(data))] + _figures(
            ["forest.png", "cost.png"], available
        )
        moved = [
            line.removesuffix("; GRID= sets a grid")
            for r in data["runs"]
            for line in r["config"].get("grid_moves") or []
        ]
        if moved:  # a best value at a grid's edge would have hidden a better one beyond it
            text = "Grids that moved past their edge: " + "; ".join(moved) + ". GRID= sets a grid."
            blocks.append(("p", text))
        sections.append(("leaderboard", "Leaderboard", blocks))
    if section := _error_section(data, available):
        sections.append(section)
    others = [confusion_name(e["run"], chosen["compare_split"]) for e in data["leaderboard"][1:]]
    blocks = _figures(others, available) + _figures(["roc.png", "calibration.png"], available)
    blocks += [("table", mcnemar_table(data))] if data["mcnemar"] else []
    if blocks:
        sections.append(("comparisons", "Other runs compared", blocks))
    if tuned := _finetuned_blocks(data, available):
        sections.append(("finetuned", "Fine-tuned runs", tuned))
    tables = [t for split in EVAL_SPLITS if (t := metrics_table(data, split))]
    note = "For reference: the ranking uses only " + chosen["metric"] + "."
    sections.append(("metrics", "Every metric", [("p", note)] + [("table", t) for t in tables]))
    if data["baselines"]:
        note = "Random backbone weights: a floor to beat, not a contender."
        sections.append(("baselines", "Baselines", [("p", note), ("table", baselines_table(data))]))
    sections.append(("configuration", "Configuration", [("table", configuration_table(data))]))
    if data["notes"]:
        sections.append(("notes", "Notes", [("list", data["notes"])]))
    return sections


def intro(data: dict[str, Any]) -> str:
    b = data["bootstrap"]
    return (
        f"Created {data['created']}. Intervals: 95% percentile bootstrap over images "
        f"({b['resamples']} resamples, seed {b['seed']}). Heads' hyper-parameters were chosen "
        "by cross-validation on the train split only."
    )


# --------------------------------------------------------------------------- pages
