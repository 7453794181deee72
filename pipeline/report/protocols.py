"""The protocols page of a data set: every ``make protocol`` and ``make curve`` result, at a glance.

:func:`write_protocol_page` reads ``artifacts/protocols/<dataset>/<cache stem>/*.json``
(checked by :mod:`pipeline.report.protocol_records`; a malformed file is skipped with one
line) and writes ``artifacts/protocols/<dataset>/index.html`` (one self-contained page, in
the report's style) and ``index.md``. Per protocol: the headline sentence first, what was
run, each head's mean +- std with every seed's figure, the hyper-parameters chosen on each
seed and the time beside stage one's; per curve: the plot, a row per N, each seed's figure.
``make protocol``, ``make curve`` and ``make report`` write it; the stage-two report links
to it in one line (:func:`protocols_link`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.artifacts import now_iso, safe_name
from pipeline.core.errors import ReportError
from pipeline.core.files import write_bytes_atomic
from pipeline.report.curve_section import curve_blocks, numbers_of
from pipeline.report.figures import curve_figure
from pipeline.report.pages import html_document, markdown_document
from pipeline.report.plotting import png_bytes
from pipeline.report.protocol_records import CacheResults, protocols_root, read_results
from pipeline.report.protocol_sections import protocol_blocks, protocol_title
from pipeline.report.render import Section

PAGE = "index.html"
PAGE_MD = "index.md"


@dataclass
class ProtocolPage:
    """Where :func:`write_protocol_page` wrote, what it shows, and the files it skipped."""

    html: Path
    markdown: Path
    shown: list[str]
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        """One warning line per skipped file, then where the page is."""
        lines = [f"warning: {note}" for note in self.notes]
        return "\n".join([*lines, f"wrote {self.html} and {self.markdown}"])


# --------------------------------------------------------------------------- page


def _shown(cache: CacheResults) -> list[str]:
    """What a cache's sections show, in a few words each (for the report's link)."""
    out = [f"{protocol_title(r)} over {len(r['seeds'])} seeds" for r in cache.protocols]
    if cache.curve:
        numbers = numbers_of(cache.curve)
        span = f", {numbers[0]['shots']} to {numbers[-1]['shots']} per class" if numbers else ""
        out.append(f"a few-shot curve{span}")
    return out


def page_sections(
    caches: Sequence[CacheResults], notes: Sequence[str], figures: dict[str, bytes]
) -> list[Section]:
    """A section per protocol and per curve (the cache named when there are several), then
    the files skipped."""
    several = len(caches) > 1
    sections: list[Section] = []
    for cache in caches:
        where = f" ({cache.stem})" if several else ""
        for record in cache.protocols:
            sid = safe_name(f"{cache.stem}-{record['protocol']}")
            sections.append((sid, protocol_title(record) + where, protocol_blocks(record)))
        if cache.curve:
            figure = f"{cache.stem}/curve.png"
            blocks = curve_blocks(
                cache.curve, cache.curve_runs, figure if figure in figures else None
            )
            sections.append((safe_name(f"{cache.stem}-curve"), "Few-shot curve" + where, blocks))
    if not sections:
        text = "No protocol result could be read; run `make protocol` or `make curve` again."
        sections.append(("nothing", "Nothing to show", [("p", text)]))
    if notes:
        sections.append(("skipped", "Files skipped", [("list", list(notes))]))
    return sections


def _intro(caches: Sequence[CacheResults]) -> str:
    stems = ", ".join(c.stem for c in caches) or "none readable"
    return (
        f"Stage-one cache{'s' * (len(caches) != 1)}: {stems}. Each protocol re-splits the "
        "cache's images once per seed and fits the heads on the training images only; every "
        "figure is on the other images (test), as the mean +- std over the seeds (population "
        f"std, as the papers' +-). Page written {now_iso()}."
    )


def write_protocol_page(artifacts_dir: str | Path, dataset: str) -> ProtocolPage | None:
    """Write ``artifacts/protocols/<dataset>/index.html`` and ``index.md`` from the results
    there; None (nothing written) when there are no results.

    Raises
    ------
    ReportError
        The folder cannot be written (one line; the results themselves are untouched).
    """
    root = protocols_root(artifacts_dir, dataset)
    caches, notes = read_results(root)
    if not caches and not notes:
        return None
    figures = {
        f"{c.stem}/curve.png": png_bytes(curve_figure(c.curve), dpi=100, bbox_inches="tight")
        for c in caches
        if c.curve
    }
    sections = page_sections(caches, notes, figures)
    heading, intro = f"{dataset}: research protocols", _intro(caches)
    try:
        html = write_bytes_atomic(root / PAGE, html_document(heading, intro, sections, figures))
        md = write_bytes_atomic(root / PAGE_MD, markdown_document(heading, intro, sections))
    except OSError as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise ReportError(
            f"cannot write the protocols page into {root}: {why}; make the folder writable"
        ) from None
    return ProtocolPage(html, md, [s for c in caches for s in _shown(c)], list(notes))


def protocols_link(
    artifacts_dir: str | Path, dataset: str, report_dir: Path
) -> tuple[dict[str, str] | None, list[str]]:
    """The report's one line to the protocols page (written here), and the page's notes;
    ``(None, [])`` when the data set has no protocol results."""
    try:
        page = write_protocol_page(artifacts_dir, dataset)
    except ReportError as exc:
        return None, [str(exc)]
    if page is None:
        return None, []
    shown = f" ({'; '.join(page.shown)})" if page.shown else ""
    link = {
        "sentence": f"Research protocols on these images{shown} are on",
        "href": os.path.relpath(page.html, report_dir),
        "text": "their own page",
        "path": str(page.html),  # for the lines `make report` prints
    }
    return link, page.notes
