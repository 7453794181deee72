"""The audit's pages: ``audit.md`` and ``audit.html`` from ``audit.json``'s summary, and the
terminal's one line per finding class."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.files import write_bytes_atomic

SHOWN = 60  # findings per section on the pages; audit.json lists all
SPLITS = ("train", "val", "test")


def class_table(fs: Any, cv: int) -> list[dict[str, Any]]:
    """Per class: images per split, and a note where a class is too small for CV or a split."""
    present = [s for s in SPLITS if np.any(fs.split == s)]
    rows = []
    total = len(fs.labels)
    for c, name in enumerate(fs.class_names):
        mine = fs.labels == c
        counts = {s: int(np.sum(mine & (fs.split == s))) for s in present}
        notes = []
        if counts.get("train", 0) < cv:
            notes.append(f"fewer than CV={cv} train images: the heads' {cv}-fold search fails")
        if int(mine.sum()) < cv:
            notes.append(f"left out of the label audit (fewer than {cv} images)")
        notes += [f"no {s} image" for s in present if s != "train" and counts[s] == 0]
        share = float(mine.sum()) / total
        if len(fs.class_names) > 1 and share < 0.5 / len(fs.class_names):
            notes.append(f"{share:.1%} of the images: under half a fair share")
        rows.append({"class": name, "counts": counts, "total": int(mine.sum()), "notes": notes})
    return rows


def _groups_line(word: str, groups: list[dict[str, Any]], tail: str = "") -> str:
    images = sum(len(g["members"]) for g in groups)
    conflicts = sum("label conflict" in g["where"] for g in groups)
    leaks = sum("leak across splits" in g["where"] for g in groups)
    return (
        f"{word}: {len(groups)} group{'s' * (len(groups) != 1)} ({images} images), "
        f"{conflicts} label conflict{'s' * (conflicts != 1)}, "
        f"{leaks} leak{'s' * (leaks != 1)} across splits{tail}"
    )


def terminal_lines(s: dict[str, Any]) -> list[str]:
    """One line per finding class."""
    near = s["near_duplicates"]
    lab, out = s["label_issues"], s["outliers"]
    rule = near["calibration"]["rule"].split(":", 1)[0]
    notes = [f"{r['class']}: {n}" for r in s["classes"] for n in r["notes"]]
    totals = ", ".join(f"{r['class']} {r['total']}" for r in s["classes"])
    left = (
        f"; classes left out: {', '.join(lab['left_out_classes'])}"
        if lab["left_out_classes"]
        else ""
    )
    return [
        _groups_line("exact duplicates", s["exact_duplicates"]),
        _groups_line(
            "near duplicates",
            near["groups"],
            f" (cosine >= {near['calibration']['threshold']:.3f}, {rule})",
        ),
        f"label issues: {len(lab['items'])} of {lab['audited']} images flagged "
        f"(confident learning on {lab['folds']}-fold out-of-fold probabilities){left}"
        if lab["folds"]
        else f"label issues: not checked (fewer than two classes with CV images){left}",
        f"outliers: {len(out['items'])} image{'s' * (len(out['items']) != 1)} beyond the "
        f"fence {out['fence']:.3f}"
        + (f", farthest {out['items'][0]['path']}" if out["items"] else ""),
        f"classes: {totals}" + (f"; {len(notes)} note(s): " + "; ".join(notes) if notes else ""),
    ]


# --------------------------------------------------------------------------- Markdown


def _md_item(item: dict[str, Any], *extra: str) -> str:
    cells = [f"`{item['path']}`", item["class"], item["split"], *extra]
    return "| " + " | ".join(cells) + " |"


def markdown(s: dict[str, Any]) -> str:
    """``audit.md``: the same findings as the HTML page, without pictures."""
    lines = [f"# Data audit: {s['dataset']}", ""]
    lines += [f"{s['n_images']} images, cache `{s['cache_stem']}`, written {s['created']}.", ""]
    lines += [f"- {line}" for line in terminal_lines(s)] + [""]
    lines += ["## Classes", "", "| class | " + " | ".join(s["classes"][0]["counts"]) + " | notes |"]
    lines += ["|---" * (len(s["classes"][0]["counts"]) + 2) + "|"]
    for r in s["classes"]:
        counts = " | ".join(str(v) for v in r["counts"].values())
        lines.append(f"| {r['class']} | {counts} | {'; '.join(r['notes'])} |")
    for title, groups in (
        ("Exact duplicates", s["exact_duplicates"]),
        ("Near duplicates", s["near_duplicates"]["groups"]),
    ):
        lines += ["", f"## {title}", ""]
        if title.startswith("Near"):
            lines += [f"Threshold: rule {s['near_duplicates']['calibration']['rule']}.", ""]
        for n, g in enumerate(groups[:SHOWN], 1):
            sim = f", cosine >= {g['similarity']}" if g.get("similarity") else ""
            lines += [f"{n}. {', '.join(g['where'])}{sim}: "]
            lines += [f"   - `{m['path']}` ({m['class']}, {m['split']})" for m in g["members"]]
        if not groups:
            lines.append("None found.")
    lab = s["label_issues"]
    lines += ["", "## Likely label errors", "", f"{lab['method']}.", ""]
    lines += ["| image | label | split | suggested | self-confidence |", "|---|---|---|---|---|"]
    lines += [
        _md_item(i, i["suggested"], f"{i['self_confidence']:.3f}") for i in lab["items"][:SHOWN]
    ]
    out = s["outliers"]
    lines += ["", "## Outliers", "", f"Rule: {out['rule']} ({out['fence']:.3f}).", ""]
    lines += ["| image | class | split | score |", "|---|---|---|---|"]
    lines += [_md_item(i, f"{i['score']:.3f}") for i in out["items"][:SHOWN]]
    lines += ["", "## Map", "", "![t-SNE map](map.png)", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}
h1{font-size:24px;margin-bottom:4px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
.tiles{display:flex;gap:10px;margin:14px 0} .tile{flex:1;padding:8px 10px;border-radius:6px;
background:#ebfbee;color:#2b8a3e;font-size:12px} .tile b{display:block;font-size:26px}
.tile.hit{background:#fff4e6;color:#d9480f} .sum{list-style:none;padding:0} .sum li{margin:4px 0;padding:6px 10px;border-radius:4px;background:#f3f4f8}
.sum li.hit{background:#fff1e6;border-left:4px solid #e8590c} .sum li.ok{border-left:4px solid #2b8a3e}
table{border-collapse:collapse} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
.cards{display:flex;flex-wrap:wrap;gap:10px} .card{width:124px;font-size:11px;word-break:break-all}
.card img,.noimg{width:112px;height:112px;object-fit:contain;background:#eee;display:block}
.card .note{color:#c92a2a;font-weight:600} .noimg{color:#999;text-align:center;line-height:112px}
.group{border:1px solid #ddd;border-radius:6px;padding:6px;margin:8px 0}
.tag{display:inline-block;padding:1px 6px;border-radius:3px;background:#e7f5ff;margin-right:4px}
.tag.bad{background:#ffe3e3;color:#c92a2a} .muted{color:#666}
"""


def _card(item: dict[str, Any], note: str = "") -> str:
    """A thumbnail with its class and split, a note (suggested class, score) and its path."""
    img = (
        f'<img src="{html.escape(item["thumb"])}" alt="">'
        if item.get("thumb")
        else '<div class="noimg">no thumbnail</div>'
    )
    name = html.escape(item["path"])
    note_html = f'<div class="note">{html.escape(note)}</div>' if note else ""
    return (
        f'<div class="card" title="{name}">{img}<div><b>{html.escape(item["class"])}</b> '
        f"&middot; {html.escape(item['split'])}</div>{note_html}"
        f'<div class="muted">{name}</div></div>'
    )


def _groups_html(groups: list[dict[str, Any]]) -> str:
    if not groups:
        return "<p>None found.</p>"
    parts = []
    for g in groups[:SHOWN]:
        tags = "".join(
            f'<span class="tag{" bad" if w != "same class, same split" else ""}">{w}</span>'
            for w in g["where"]
        )
        sim = f" cosine &ge; {g['similarity']:.3f}" if g.get("similarity") else ""
        cards = "".join(_card(m) for m in g["members"])
        parts.append(f'<div class="group">{tags}{sim}<div class="cards">{cards}</div></div>')
    more = len(groups) - SHOWN
    return "".join(parts) + (f"<p>{more} more in audit.json</p>" if more > 0 else "")


_TILES = ("exact duplicate groups", "near duplicate groups", "likely label errors", "outliers",
          "class notes")  # fmt: skip


def _summary_html(s: dict[str, Any]) -> str:
    """Tiles of the counts (orange where something was found), then the terminal's lines."""
    e = html.escape
    counts = [
        len(s["exact_duplicates"]),
        len(s["near_duplicates"]["groups"]),
        len(s["label_issues"]["items"]),
        len(s["outliers"]["items"]),
        sum(len(r["notes"]) for r in s["classes"]),
    ]
    tiles = "".join(
        f'<div class="tile {"hit" if n else "ok"}"><b>{n}</b>{e(word)}</div>'
        for n, word in zip(counts, _TILES, strict=True)
    )
    lines = "".join(
        f'<li class="{"hit" if n else "ok"}">{e(line)}</li>'
        for line, n in zip(terminal_lines(s), counts, strict=True)
    )
    return f'<div class="tiles">{tiles}</div><ul class="sum">{lines}</ul>'


def page(s: dict[str, Any]) -> str:
    """``audit.html``: the counts, each finding with thumbnails, the classes, the map."""
    e = html.escape
    heads = "".join(f"<th>{e(k)}</th>" for k in s["classes"][0]["counts"])
    rows = "".join(
        f"<tr><td>{e(r['class'])}</td>"
        + "".join(f"<td>{v}</td>" for v in r["counts"].values())
        + f"<td>{e('; '.join(r['notes']))}</td></tr>"
        for r in s["classes"]
    )
    lab, out, near = s["label_issues"], s["outliers"], s["near_duplicates"]
    issues = "".join(
        _card(i, f"\u2192 {i['suggested']} (p {i['self_confidence']:.2f})")
        for i in lab["items"][:SHOWN]
    )
    far = "".join(_card(i, f"distance {i['score']:.3f}") for i in out["items"][:SHOWN])
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>Data audit: {e(str(s["dataset"]))}</title><style>{_CSS}</style></head><body>
<h1>Data audit: {e(str(s["dataset"]))}</h1>
<p class="muted">{s["n_images"]} images, cache {e(s["cache_stem"])}, {e(s["created"])}.
How each finding is computed: docs/audit.md.</p>
{_summary_html(s)}
<h2>Exact duplicates ({len(s["exact_duplicates"])})</h2>
<p class="muted">Same file content (sha256).</p>{_groups_html(s["exact_duplicates"])}
<h2>Near duplicates ({len(near["groups"])})</h2><p class="muted">Feature cosine &ge;
{near["calibration"]["threshold"]:.3f}; rule: {e(near["calibration"]["rule"])}.</p>
{_groups_html(near["groups"])}
<h2>Likely label errors ({len(lab["items"])})</h2><p class="muted">{e(lab["method"])}.
Each card: the label given, &rarr; the class the model suggests (p: the probability it
gives the label given). Least confident first.</p>
<div class="cards">{issues or "None found."}</div>
<h2>Outliers ({len(out["items"])})</h2><p class="muted">{e(out["rule"])} ({out["fence"]:.3f}).
Farthest first.</p><div class="cards">{far or "None found."}</div>
<h2>Classes</h2><table><tr><th>class</th>{heads}<th>notes</th></tr>{rows}</table>
<h2>Map of the data</h2><img src="{e(s["map"])}" alt="t-SNE map" style="max-width:100%">
</body></html>
"""


def write_pages(s: dict[str, Any], folder: Path) -> None:
    """``audit.md`` and ``audit.html`` in ``folder``."""
    write_bytes_atomic(folder / "audit.md", markdown(s))
    write_bytes_atomic(folder / "audit.html", page(s))
