"""Text the figures can draw: fonts with the glyphs of the user's class names.

Class names come from folder names, in any script. Matplotlib's default font has
no Hangul or CJK glyphs: it would draw empty boxes and print a warning per glyph.
The figures therefore draw with DejaVu Sans followed by every installed font known
to cover CJK (Noto CJK, Nanum, Source Han, WenQuanYi, ...), through Matplotlib's
font fallback; names that no such font can draw are replaced by class numbers, and
the report prints a key from number to name (:func:`class_labels`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

BASE_FONT = "DejaVu Sans"
# Families that cover Hangul and CJK ideographs, in order of preference.
_FALLBACK = re.compile(
    r"noto (sans|serif) (cjk|kr|jp|sc|tc|hk)|nanum|source han|wenquanyi|wqy|droid sans fallback|"
    r"malgun|apple ?(sd )?gothic|ms gothic|ipa(ex)?gothic|takao|unifont|ar pl|arial unicode",
    re.IGNORECASE,
)
GLYPH_WARNING = r"Glyph \d+ .*missing from font"  # Matplotlib's warning, filtered as a backstop


@functools.cache
def font_family() -> tuple[str, ...]:
    """The figures' font list: the default font, then the installed CJK fonts."""
    from matplotlib import font_manager

    found = sorted({f.name for f in font_manager.fontManager.ttflist if _FALLBACK.search(f.name)})
    return (BASE_FONT, *found)


@functools.cache
def _covered() -> frozenset[int]:
    """Every code point some font of :func:`font_family` has a glyph for."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    covered: set[int] = set()
    for name in font_family():
        try:
            path = font_manager.findfont(
                font_manager.FontProperties(family=name), fallback_to_default=False
            )
            covered.update(FT2Font(path).get_charmap())
        except (ValueError, RuntimeError, OSError):  # a font listed but not loadable
            continue
    return frozenset(covered)


def drawable(text: str) -> bool:
    """Whether every character of ``text`` has a glyph in the figures' fonts."""
    covered = _covered()
    return all(c.isspace() or ord(c) in covered for c in str(text))


def printable(text: str) -> str:
    """``text`` with each character no font can draw replaced by ``?``."""
    covered = _covered()
    return "".join(c if c.isspace() or ord(c) in covered else "?" for c in str(text))


def class_labels(names: Sequence[str]) -> tuple[list[str], bool]:
    """The labels a figure shows for ``names``, and whether they are numbers needing a key.

    All names when every one can be drawn; otherwise ``0``, ``1``, ... for every class
    (a mix of names and numbers would read as two kinds of class).
    """
    if all(drawable(n) for n in names):
        return [str(n) for n in names], False
    return [str(i) for i in range(len(names))], True
