"""A Griffe extension for the API reference: Sphinx roles in docstrings become code.

The docstrings cross-reference in Sphinx's way (``:func:`extract_features```,
``:class:`~pipeline.cache.FeatureSet```); mkdocstrings renders Markdown, where
those would show as written. Each role becomes inline code of its target (only
the last name after a ``~``, as Sphinx shows it).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(
    r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const|term|ref):`(?P<text>[^`]+)`"
)


def _code(match: re.Match[str]) -> str:
    text = match["text"]
    shown = re.search(r"<([^>]+)>$", text)  # "title <target>": the title
    if shown:
        return f"`{text[: shown.start()].strip()}`"
    if text.startswith("~"):
        text = text[1:].rsplit(".", 1)[-1]
    return f"`{text}`"


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring as inline code."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ":" in obj.docstring.value:
            obj.docstring.value = ROLE.sub(_code, obj.docstring.value)
