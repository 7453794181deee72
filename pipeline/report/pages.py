"""The report's pages: Markdown, one self-contained HTML file (figures and thumbnails inline),
and the lines ``make report`` prints."""

from __future__ import annotations

import base64
import html
import re
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from pipeline.report.plotting import safe_figure_name
from pipeline.report.render import (
    Block,
    Section,
    Table,
    ci,
    fmt,
    intro,
    report_sections,
    title,
    verdict,
)


def thumbnail_names(thumbs: Mapping[str, bytes]) -> dict[str, str]:
    """Image path -> file name of its thumbnail (``thumbnails/<name>`` beside report.md)."""
    return {path: f"{i:02d}_{safe_figure_name(path)[-60:]}" for i, path in enumerate(thumbs)}


def _thumb_caption(entry: dict[str, Any]) -> str:
    words = f"true {entry['label']}, predicted {entry['pred']}"
    if "p_pred" in entry:
        words += f" (p {entry['p_pred']:.2f}; true class p {entry['p_true']:.2f})"
    elif "margin" in entry:
        words += f" (score {entry['margin']:.2f} above the true class's)"
    return words


def _markdown_table(table: Table) -> list[str]:
    title_, header, rows = table
    lines = [f"**{md_escape(title_)}**", ""]
    if not rows:
        return lines + ["(none)", ""]
    lines += ["| " + " | ".join(map(md_escape, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in rows]
    return lines + [""]


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]|~#!$])")


def md_escape(text: Any) -> str:
    """``text`` shown literally by Markdown renderers: punctuation escaped, HTML made inert.

    Class and file names come from the user's folders: ``*``, ``_``, ``|``, ``<b>``
    or ``$x$`` in them must print as written, never format or inject.
    """
    escaped = _MARKDOWN_SPECIAL.sub(r"\\\1", str(text))
    return escaped.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _flat(blocks: Sequence[Block]) -> list[Block]:
    """Blocks with each ``row`` replaced by its blocks (Markdown has no side by side)."""
    out: list[Block] = []
    for kind, value in blocks:
        out += [b for column in value for b in column] if kind == "row" else [(kind, value)]
    return out


def _markdown_block(
    kind: str, value: Any, data: dict[str, Any], thumbs: Mapping[str, str]
) -> list[str]:
    if kind == "verdict":
        return [f"**{md_escape(value[0])}**", ""] + [
            line for v in value[1:] for line in (md_escape(v), "")
        ]
    if kind in ("p", "h3"):
        return [f"### {md_escape(value)}" if kind == "h3" else md_escape(value), ""]
    if kind == "audit":
        link = f" [The audit]({value['href']})." if value["href"] else ""
        return [md_escape(value["sentence"]) + link, ""]
    if kind == "link":
        link = f"[{md_escape(value['text'])}]({value['href']})"
        return [f"{md_escape(value['sentence'])} {link}.", ""]
    if kind == "image":  # (alt text, the PNG's path relative to the page)
        return [f"![{md_escape(value[0])}]({quote(value[1])})", ""]
    if kind == "table":
        return _markdown_table(value)
    if kind == "figures":
        return [f"![{name}](figures/{name})" for name in value] + [""]
    if kind == "thumbs":
        lines = []
        for e in data["errors"]["splits"][value]["top_losses"]:
            image = f"![](thumbnails/{thumbs[e['path']]}) " if e["path"] in thumbs else ""
            lines.append(f"- {image}{md_escape(e['path'])}: {md_escape(_thumb_caption(e))}")
            if e.get("nearest"):
                near = [
                    (f"![](thumbnails/{thumbs[n['path']]}) " if n["path"] in thumbs else "")
                    + f"{md_escape(n['label'])} ({md_escape(n['path'])}, cos {n['similarity']:.2f})"
                    for n in e["nearest"]
                ]
                lines.append("  - nearest training images: " + "; ".join(near))
        return lines + [""]
    return [f"- {md_escape(n)}" for n in value] + [""]


def markdown(
    data: dict[str, Any], figures: Sequence[str], thumbs: Mapping[str, str] | None = None
) -> str:
    """``report.md``: the sections, figures as links to ``figures/<name>``, thumbnails to
    ``thumbnails/<name>`` (``thumbs``: image path -> file name)."""
    sections = report_sections(data, figures)
    return markdown_document(title(data), intro(data), sections, data, thumbs)


def markdown_document(
    heading: str,
    intro_text: str,
    sections: Sequence[Section],
    data: dict[str, Any] | None = None,
    thumbs: Mapping[str, str] | None = None,
) -> str:
    """A Markdown page of ``sections`` under ``heading`` (``data``: the report's, for its
    ``thumbs`` blocks; other pages have none)."""
    lines = [f"# {heading}", "", intro_text, ""]
    for _, title_, blocks in sections:
        lines += [f"## {title_}", ""]
        for kind, value in _flat(blocks):
            lines += _markdown_block(kind, value, data or {}, thumbs or {})
    return "\n".join(lines).rstrip() + "\n"


def _png(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _html_table(table: Table) -> str:
    esc = html.escape
    title_, header, rows = table
    out = f"<h3>{esc(title_)}</h3>"
    if not rows:
        return out + "<p class='muted'>(none)</p>"
    cells = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return out + f"<div class='scroll'><table><tr>{cells}</tr>{body}</table></div>"


def _html_thumbs(data: dict[str, Any], split: str, thumbs: Mapping[str, bytes]) -> str:
    esc = html.escape
    items = []
    for e in data["errors"]["splits"][split]["top_losses"]:
        image = (
            f"<img alt='{esc(e['path'])}' src='{_png(thumbs[e['path']])}'>"
            if e["path"] in thumbs
            else "<p class='muted'>(image not found)</p>"
        )
        caption = f"{esc(_thumb_caption(e))}<br><span class='muted'>{esc(e['path'])}</span>"
        item = f"<figure class='thumb'>{image}<figcaption>{caption}</figcaption></figure>"
        items.append(f"<div class='loss'>{item}{_html_nearest(e, thumbs)}</div>")
    if not items:
        return "<p class='muted'>No wrong prediction on this split.</p>"
    return "<div class='thumbs'>" + "".join(items) + "</div>"


def _html_nearest(entry: dict[str, Any], thumbs: Mapping[str, bytes]) -> str:
    """The nearest training images beside a worst image: thumbnail, class, cosine."""
    if not entry.get("nearest"):
        return ""
    esc, out = html.escape, []
    for n in entry["nearest"]:
        image = (
            f"<img alt='{esc(n['path'])}' src='{_png(thumbs[n['path']])}'>"
            if n["path"] in thumbs
            else ""
        )
        words = f"{esc(n['label'])}<br><span class='muted'>cos {n['similarity']:.2f}</span>"
        out.append(
            f"<figure class='nb' title='{esc(n['path'])}'>{image}<figcaption>{words}</figcaption></figure>"
        )
    return "<div class='nearest'><span class='muted'>nearest train</span>" + "".join(out) + "</div>"


def _html_block(
    kind: str,
    value: Any,
    data: dict[str, Any],
    figures: Mapping[str, bytes],
    thumbs: Mapping[str, bytes],
) -> str:
    esc = html.escape
    if kind == "verdict":
        first = f"<p><strong>{esc(value[0])}</strong></p>"
        return (
            "<div class='verdict'>"
            + first
            + "".join(f"<p>{esc(v)}</p>" for v in value[1:])
            + "</div>"
        )
    if kind == "p":
        return f"<p>{esc(value)}</p>"
    if kind == "audit":
        link = f" <a href='{esc(value['href'])}'>The audit</a>." if value["href"] else ""
        return f"<p class='audit'>{esc(value['sentence'])}{link}</p>"
    if kind == "link":  # {"sentence", "href", "text"}: a sentence ending in a link
        link = f"<a href='{esc(value['href'])}'>{esc(value['text'])}</a>"
        return f"<p>{esc(value['sentence'])} {link}.</p>"
    if kind == "image":  # (alt text, name in figures)
        return f"<div class='gallery'><img alt='{esc(value[0])}' src='{_png(figures[value[1]])}'></div>"
    if kind == "h3":
        return f"<h3>{esc(value)}</h3>"
    if kind == "table":
        return _html_table(value)
    if kind == "figures":
        images = "".join(f"<img alt='{esc(n)}' src='{_png(figures[n])}'>" for n in value)
        # Confusion matrices keep their size (scrolling if wider than the page): shrunk,
        # a hundred classes' labels would be unreadable.
        wide = " wide" if any(n.startswith("confusion_") for n in value) else ""
        return f"<div class='gallery{wide}'>{images}</div>"
    if kind == "thumbs":
        return _html_thumbs(data, value, thumbs)
    if kind == "row":
        cells = "".join(
            "<div>" + "".join(_html_block(*b, data, figures, thumbs) for b in column) + "</div>"
            for column in value
        )
        return f"<div class='row'>{cells}</div>"
    return "<ul>" + "".join(f"<li>{esc(n)}</li>" for n in value) + "</ul>"


def html_page(
    data: dict[str, Any], figures: Mapping[str, bytes], thumbs: Mapping[str, bytes] | None = None
) -> str:
    """``report.html``: one self-contained page, figures and thumbnails embedded as base64 PNG."""
    sections = report_sections(data, figures)
    return html_document(title(data), intro(data), sections, figures, data, thumbs)


def html_document(
    heading: str,
    intro_text: str,
    sections: Sequence[Section],
    figures: Mapping[str, bytes],
    data: dict[str, Any] | None = None,
    thumbs: Mapping[str, bytes] | None = None,
) -> str:
    """One self-contained HTML page of ``sections`` in the report's style, ``figures``
    (name -> PNG bytes) embedded; ``data``: the report's, for its ``thumbs`` blocks."""
    esc = html.escape
    data, thumbs = data or {}, thumbs or {}
    nav = "".join(f"<a href='#{esc(sid)}'>{esc(title_)}</a>" for sid, title_, _ in sections)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{esc(heading)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(heading)}</h1><p class='muted'>{esc(intro_text)}</p><nav>{nav}</nav>",
    ]
    for sid, title_, blocks in sections:
        parts.append(f"<section id='{esc(sid)}'><h2>{esc(title_)}</h2>")
        parts += [_html_block(kind, value, data, figures, thumbs) for kind, value in blocks]
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def summary_lines(data: dict[str, Any], width: int = 100) -> list[str]:
    """The lines ``make report`` prints: the ranking, then the verdict as the page words it."""
    chosen = data["selection"]
    metric = chosen.get("chosen_by") or "accuracy"
    lines = [f"{data['dataset']}: {len(data['runs'])} runs, ranked on {chosen['metric']}:"]
    for e in data["leaderboard"][:10]:
        shown = (
            ci(e, metric)
            if f"{metric}_ci" in e and chosen["rule"] == "val"
            else fmt(e["selection_score"])
        )
        lines.append(f"  {e['rank']:>2}. {e.get('label') or e['run']:<28} {shown}")
    for sentence in verdict(data):
        lines += textwrap.wrap(sentence, width, initial_indent="  ", subsequent_indent="    ")
    if (note := data.get("audit")) and note["found"]:
        lines += textwrap.wrap(
            note["sentence"], width, initial_indent="  ", subsequent_indent="    "
        )
    lines += [f"  note: {n}" for n in data["notes"]]
    if link := data.get("protocols"):
        lines.append(f"  protocol results: {link['path']}")
    return lines


_CSS = """
body{font-family:system-ui,sans-serif;margin:0 auto;padding:1.5em 2em;max-width:1280px;
 color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:2em;border-bottom:1px solid #ddd}
h3{font-size:1.05em;margin:1.4em 0 .3em}
nav{font-size:.9em;margin:.5em 0 1em}nav a{margin-right:1em}
.verdict{background:#f4f8fb;border-left:4px solid #1f77b4;padding:.6em 1.2em;font-size:1.05em}
.scroll{overflow-x:auto}
table{border-collapse:collapse;margin:.6em 0 1em;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;white-space:nowrap}
th{background:#f2f2f2;white-space:normal;vertical-align:bottom}
.gallery,.row{display:flex;flex-wrap:wrap;gap:1em 2em;align-items:flex-start}
.gallery img{max-width:100%;height:auto}
.gallery.wide{overflow-x:auto}.gallery.wide img{max-width:none}
.row>div:first-child{flex:none}.row>div{min-width:0}
.thumbs{display:flex;flex-wrap:wrap;gap:.8em}
.thumb{margin:0;width:150px;font-size:12px}
.thumb img{display:block;border:1px solid #ccc;image-rendering:pixelated;max-width:140px}
.thumb figcaption{margin-top:.2em;overflow-wrap:anywhere}
.loss{display:flex;gap:.3em;align-items:flex-start}
.nearest{width:64px;font-size:11px}.nb{margin:0 0 .3em}
.nb img{display:block;border:1px solid #ccc;image-rendering:pixelated;max-width:60px}
.muted{color:#666;font-size:.9em}
"""
