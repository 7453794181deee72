"""The report's pages: its tables as Markdown and as one self-contained HTML page.

The last step of the report (collect -> evaluate -> **render**). Every function
takes the data of :func:`pipeline.evaluation.build_report_data` and returns
text; nothing here reads results files, computes a statistic or writes a file.
Each table is built once, as ``(title, header, rows)`` of strings
(:func:`report_tables`), and written out by :func:`markdown` and :func:`html_page`.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.artifacts import EVAL_SPLITS

Table = tuple[str, list[str], list[list[str]]]  # (title, header, rows)

_EMPTY = "(none: needs both an svm and a softmax head, or a fine-tuned run)"
_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}"
    "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f2f2f2}"
    "img{max-width:100%;margin:1em 0}"
)


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


def _ci(entry: dict[str, Any], metric: str) -> str:
    return with_interval(entry[metric], entry[f"{metric}_ci"])


def _short_identity(identity: Any) -> str:
    """A weights identity short enough for a table cell (``sha256:`` digests cut to 12)."""
    if isinstance(identity, str) and identity.startswith("sha256:"):
        return identity[: len("sha256:") + 12]
    return fmt(identity)


# --------------------------------------------------------------------------- tables


def leaderboard_table(data: dict[str, Any]) -> Table:
    """Every run on the primary split, best first."""
    header = ["rank", "run", "accuracy [95% CI]", "balanced acc.", "macro F1", "fit s"]
    rows = [
        [
            str(i + 1),
            e["run"],
            with_interval(e["accuracy"], e["accuracy_ci"]),
            fmt(e["balanced_accuracy"]),
            fmt(e["macro_f1"]),
            fmt(e["fit_seconds"], 2),
        ]
        for i, e in enumerate(data["leaderboard"])
    ]
    return f"Leaderboard ({data['primary_split']} split, every backbone cache)", header, rows


def metrics_table(data: dict[str, Any], split: str) -> Table | None:
    """Every metric with its interval of each run on ``split``; ``None`` when no run has it."""
    runs = [r for r in data["runs"] if split in r["splits"]]
    if not runs:
        return None
    many = any("top5_accuracy" in r["splits"][split] for r in runs)
    header = ["run", "n", "accuracy [95% CI]", "balanced accuracy [95% CI]", "macro F1 [95% CI]"]
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
        row += [fmt(s.get("top5_accuracy"))] if many else []
        per_image = r["predict_seconds_per_image"]
        row += [
            fmt(s.get("log_loss")),
            fmt(r["fit_seconds"], 2),
            fmt(per_image * 1e3 if per_image is not None else None, 4),
        ]
        rows.append(row)
    return f"Metrics on {split}", header, rows


def mcnemar_table(data: dict[str, Any]) -> Table:
    """Each McNemar comparison with its discordant counts and exact p-value."""
    header = [
        "split", "a", "b", "n", "a right, b wrong", "b right, a wrong",
        "both right", "both wrong", "p (exact)",
    ]  # fmt: skip
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
            [
                r["run"],
                fmt(c.get("backbone")),
                fmt(c.get("weights_source")),
                _short_identity(c.get("weights")),
                fmt(c.get("input_size")),
                fmt(c.get("pooling")),
                fmt(c.get("layer")),
                fmt(c.get("norm")),
                fmt(c.get("pca")),
                _chosen(c),
                fmt(c.get("cv_accuracy")),
                fmt(c.get("seed")),
            ]
        )
    return "Configuration of each run", header, rows


def report_tables(data: dict[str, Any]) -> list[Table]:
    """``(title, header, rows)`` of every table, in the report's order."""
    tables = [leaderboard_table(data)]
    tables += [t for split in EVAL_SPLITS if (t := metrics_table(data, split))]
    tables += [mcnemar_table(data), configuration_table(data)]
    return tables


# --------------------------------------------------------------------------- pages


def selection_note(data: dict[str, Any]) -> str:
    """How each run chose its hyper-parameters, and what that means for val figures."""
    note = "Heads' hyper-parameters were chosen by cross-validation on the train split only."
    if any(r["kind"] == "finetuned" for r in data["runs"]):
        note += (
            " Fine-tuned runs picked their best epoch on val, so their val figures (and McNemar"
            " tests on val) lean optimistic; test figures, where present, do not."
        )
    return note


def markdown(data: dict[str, Any], figures: Sequence[str]) -> str:
    """``report.md``: the tables, then the figures as links to ``figures/<name>``."""
    lines = [
        f"# Heads report: {data['dataset']}",
        "",
        f"Created {data['created']}. Intervals: 95% percentile bootstrap over images "
        f"({data['bootstrap']['resamples']} resamples, seed {data['bootstrap']['seed']}). "
        f"{selection_note(data)}",
        "",
    ]
    for title, header, rows in report_tables(data):
        lines += [f"## {title}", ""]
        if not rows:
            lines += [_EMPTY, ""]
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


def html_page(data: dict[str, Any], figures: Mapping[str, bytes]) -> str:
    """``report.html``: one self-contained page, the figures embedded as base64 PNG."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>Heads report: {esc(data['dataset'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>Heads report: {esc(data['dataset'])}</h1>",
        f"<p>Created {esc(data['created'])}. Intervals: 95% percentile bootstrap over images "
        f"({data['bootstrap']['resamples']} resamples). {esc(selection_note(data))}</p>",
    ]
    for title, header, rows in report_tables(data):
        parts.append(f"<h2>{esc(title)}</h2>")
        if not rows:
            parts.append(f"<p>{_EMPTY}</p>")
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


def summary_lines(data: dict[str, Any]) -> list[str]:
    """The few lines ``make report`` prints: top ten, McNemar results, notes."""
    lines = [f"{data['dataset']}: {len(data['runs'])} runs, ranked on {data['primary_split']}:"]
    lines += [
        f"  {i + 1}. {e['run']:<48} {with_interval(e['accuracy'], e['accuracy_ci'])}"
        for i, e in enumerate(data["leaderboard"][:10])
    ]
    lines += [
        f"  McNemar {c['a']} vs {c['b']} ({c['split']}): {c['only_a']} vs {c['only_b']} "
        f"discordant, p = {c['p_value']:.3g}"
        for c in data["mcnemar"]
    ]
    lines += [f"  note: {n}" for n in data["notes"]]
    return lines
