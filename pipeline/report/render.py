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
from pipeline.report.evaluation import ALPHA
from pipeline.report.plotting import confusion_name, safe_figure_name

Table = tuple[str, list[str], list[list[str]]]  # (title, header, rows)
Block = tuple[str, Any]  # ("p", text), ("table", Table), ("figures", [names]), ("thumbs", split),
# ("row", [[blocks], [blocks]]: columns side by side), ("verdict", [sentences]), ("list", [text])
Section = tuple[str, str, list[Block]]  # (id, title, blocks)


# --------------------------------------------------------------------------- cells


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: ``-`` for ``None``, floats to ``digits`` decimals."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def with_interval(value: float, interval: Sequence[float]) -> str:
    """``0.912 [0.880, 0.940]``."""
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def ci(entry: dict[str, Any], metric: str) -> str:
    return with_interval(entry[metric], entry[f"{metric}_ci"])


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3g}"


def _short_identity(identity: Any) -> str:
    """A weights identity short enough for a table cell (``sha256:`` digests cut to 12)."""
    if isinstance(identity, str) and identity.startswith("sha256:"):
        return identity[: len("sha256:") + 12]
    return fmt(identity)


def _listing(names: Sequence[str], most: int = 8) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


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


def cost_words(row: dict[str, Any]) -> str:
    """``fit 1.2 s, 0.5 ms per image on cached features (stage one: ...)``."""
    words = (
        f"fit {fmt(row['fit_seconds'], 2)} s, {_ms(row['predict_seconds_per_image'])} ms per image"
    )
    if row["includes_backbone"]:
        return words + " from the images, backbone included"
    words += " on cached features"
    if row.get("extraction_seconds_per_image"):
        words += (
            f" (stage one adds {_ms(row['extraction_seconds_per_image'])} ms per image and took "
            f"{fmt(row['extraction_seconds'], 1)} s once for its backbone cache)"
        )
    return words


def _runner_up_words(chosen: dict[str, Any]) -> str:
    runner, test = chosen["runner_up"], chosen["runner_up_mcnemar"]
    if runner is None:
        return "It is the only run ranked."
    if test is None:
        return f"The runner-up, {runner}, predicted other images, so McNemar's test does not apply."
    verdict = "cannot be told apart from it" if test["p_value"] >= ALPHA else "is worse"
    return (
        f"The runner-up, {runner}, {verdict}: exact McNemar test on {test['split']}, "
        f"{test['only_a']} images only the chosen run gets right against {test['only_b']} "
        f"only the runner-up gets right, p = {test['p_value']:.3g}."
    )


def verdict(data: dict[str, Any]) -> list[str]:
    """The verdict at the top of the report, as sentences (one paragraph each)."""
    chosen = data["selection"]
    if chosen["winner"] is None:
        return ["No run could be ranked: " + chosen["words"]]
    row = _rows(data)[chosen["winner"]]
    board = data["leaderboard"][0]
    score = f"{chosen['metric']} {board['selection_score']:.3f}"
    if chosen["rule"] == "val" and "accuracy_ci" in board:
        score = f"{chosen['metric']} {ci(board, 'accuracy')}"
    lines = [f"Chosen run: {chosen['winner']} ({score}); {cost_words(row)}."]
    final = chosen["final_test"]
    if final:
        lines.append(
            f"Its accuracy on the untouched test split is {ci(final, 'accuracy')} "
            f"({final['n']} images): the number to quote."
        )
    else:
        lines.append("There is no test split: no untouched figure to quote.")
    lines.append(_runner_up_words(chosen))
    split = chosen["compare_split"]
    if chosen["runner_up"]:
        tied = chosen["tied"]
        lines.append(
            f"Statistically tied with it (McNemar p ≥ {ALPHA} on {split}): {_listing(tied)}."
            if tied
            else "No other run is statistically tied with it."
        )
        overlap = chosen["overlapping"]
        if overlap:
            lines.append(
                f"95% intervals on {split} overlapping the chosen run's: {_listing(overlap)}."
            )
    if data["baselines"]:
        lines.append(
            f"{len(data['baselines'])} runs on random backbone weights are baselines, "
            "listed apart and not ranked."
        )
    return lines


# --------------------------------------------------------------------------- tables


def leaderboard_table(data: dict[str, Any]) -> Table:
    """The ranked runs: selection score, interval, McNemar against the best, cost."""
    chosen = data["selection"]
    split = chosen["compare_split"]
    head = "rank", "run"
    if chosen["rule"] == "val":
        header = [*head, f"{split} accuracy [95% CI]"]
    else:
        header = [*head, "CV accuracy (train)", f"{split} accuracy [95% CI], not ranked on"]
    header += ["p vs #1 (McNemar)", "tied with #1", "fit s", "ms/image"]
    rows = []
    for e in data["leaderboard"]:
        row = [str(e["rank"]), e["run"]]
        if chosen["rule"] != "val":
            row.append(fmt(e["selection_score"]))
        row.append(ci(e, "accuracy") if "accuracy" in e else "-")
        test = e.get("mcnemar_vs_best")
        row.append(f"{test['p_value']:.3g}" if test else "-")
        row.append("chosen" if e["rank"] == 1 else "yes" if e.get("tied_with_best") else "")
        row += [fmt(e["fit_seconds"], 2), _ms(e["predict_seconds_per_image"])]
        rows.append(row)
    return f"Leaderboard (ranked on {chosen['metric']})", header, rows


def cost_table(data: dict[str, Any]) -> Table:
    """What the chosen run and the runs tied with it cost, and what the times include."""
    chosen = data["selection"]
    rows_by_id = _rows(data)
    header = [
        "run", "fit s", "predict ms/image", "stage one ms/image", "end-to-end ms/image",
        "what the times include",
    ]  # fmt: skip
    rows = []
    for run in [chosen["winner"], *chosen["tied"]]:
        r = rows_by_id[run]
        what = (
            "images in, backbone included"
            if r["includes_backbone"]
            else f"head on cached features; stage one {fmt(r['extraction_seconds'], 1)} s once"
        )
        rows.append(
            [
                run,
                fmt(r["fit_seconds"], 2),
                _ms(r["predict_seconds_per_image"]),
                _ms(r["extraction_seconds_per_image"]),
                _ms(r["end_to_end_seconds_per_image"]),
                what,
            ]
        )
    return "Cost of the chosen run and of the runs tied with it", header, rows


def final_table(data: dict[str, Any]) -> Table | None:
    """The chosen run's test figures, reported apart: nothing was chosen on them."""
    final = data["selection"]["final_test"]
    if not final:
        return None
    header = ["run", "test images", "accuracy [95% CI]", "balanced accuracy", "macro F1"]
    row = [data["selection"]["winner"], str(final["n"]), ci(final, "accuracy")]
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
    header += ["top-5"] if many else []
    header += ["log loss", "fit s", "predict ms/image"]
    rows = []
    for r in runs:
        s = r["splits"][split]
        row = [r["run"], str(s["n"]), ci(s, "accuracy"), ci(s, "balanced_accuracy")]
        row += [ci(s, "macro_f1")] + ([fmt(s.get("top5_accuracy"))] if many else [])
        row += [fmt(s.get("log_loss")), fmt(r["fit_seconds"], 2)]
        rows.append(row + [_ms(r["predict_seconds_per_image"])])
    return f"Metrics on {split}", header, rows


def baselines_table(data: dict[str, Any]) -> Table:
    """Random-weight runs: their accuracy on each split, for reference only."""
    rows_by_id = _rows(data)
    rows = []
    for run in data["baselines"]:
        splits = rows_by_id[run]["splits"]
        rows.append(
            [run] + [ci(splits[s], "accuracy") if s in splits else "-" for s in EVAL_SPLITS]
        )
    return "Random-weight baselines", ["run"] + [f"{s} accuracy" for s in EVAL_SPLITS], rows


def mcnemar_table(data: dict[str, Any]) -> Table:
    """Each McNemar comparison with its discordant counts and exact p-value."""
    header = [
        "split", "a", "b", "n", "a right, b wrong", "b right, a wrong",
        "both right", "both wrong", "p (exact)",
    ]  # fmt: skip
    keys = ("split", "a", "b", "n", "only_a", "only_b", "both", "neither")
    rows = [[str(c[k]) for k in keys] + [f"{c['p_value']:.4g}"] for c in data["mcnemar"]]
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
        "run", "backbone", "weights", "weights identity", "input", "pooling", "layer",
        "norm", "pca", "chosen", "CV acc.", "seed",
    ]  # fmt: skip
    rows = []
    for r in data["runs"]:
        c = r["config"]
        rows.append(
            [r["run"], fmt(c.get("backbone")), fmt(c.get("weights_source"))]
            + [_short_identity(c.get("weights"))]
            + [fmt(c.get(key)) for key in ("input_size", "pooling", "layer", "norm", "pca")]
            + [_chosen(c), fmt(c.get("cv_accuracy")), fmt(c.get("seed"))]
        )
    return "Configuration of each run", header, rows


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
    for split in errors["splits"]:
        blocks.append(("h3", f"{split}: {_rows(data)[winner]['splits'][split]['n']} images"))
        side = [("table", per_class_table(data, split)), ("table", confused_table(data, split))]
        blocks.append(("row", [_figures([confusion_name(winner, split)], available), side]))
        blocks += [("p", f"The {split} images it gets most wrong, {order}:"), ("thumbs", split)]
    return "errors", f"What the chosen run gets wrong ({winner})", blocks


def report_sections(data: dict[str, Any], available: Collection[str]) -> list[Section]:
    """Every section of the report, in order; figures named only where ``available``."""
    chosen = data["selection"]
    verdict_blocks: list[Block] = [("verdict", verdict(data)), ("p", chosen["words"])]
    verdict_blocks += [("table", t) for t in (final_table(data),) if t]
    if chosen["winner"]:
        verdict_blocks.append(("table", cost_table(data)))
    sections: list[Section] = [("verdict", "Verdict", verdict_blocks)]
    if data["leaderboard"]:
        blocks = [("table", leaderboard_table(data))] + _figures(
            ["forest.png", "cost.png"], available
        )
        sections.append(("leaderboard", "Leaderboard", blocks))
    if section := _error_section(data, available):
        sections.append(section)
    others = [confusion_name(e["run"], chosen["compare_split"]) for e in data["leaderboard"][1:]]
    blocks = _figures([*others, "roc.png", "calibration.png"], available)
    blocks += [("table", mcnemar_table(data))] if data["mcnemar"] else []
    if blocks:
        sections.append(("comparisons", "Other runs compared", blocks))
    curves = [
        f"curves_{safe_figure_name(r['name'])}.png"
        for r in data["runs"]
        if r["kind"] == "finetuned"
    ]
    if curves:
        note = "Phase one trains the head on cached features, phase two fine-tunes on images."
        sections.append(
            ("finetuned", "Fine-tuned runs", [("p", note)] + _figures(curves, available))
        )
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
