"""The project's exception types.

Every error a user can cause (a bad path, a bad option, a bad file) is a
:class:`PipelineError`: the CLI prints its message on one line and exits with
status 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PipelineError(ValueError):
    """A user-facing error: the message says what was wrong and how to fix it.

    A :class:`ValueError`, so code that catches bad values catches it too.
    """


class DataError(PipelineError):
    """The image folder is missing, empty or badly laid out."""


class BackboneError(PipelineError):
    """Unknown backbone, bad input size, unknown layer."""


class WeightsError(PipelineError):
    """Weights cannot be found, read or do not fit the backbone."""


class CacheError(PipelineError):
    """A feature cache is missing, stale, locked or malformed."""


class FinetuneError(PipelineError):
    """Bad fine-tuning option (UNFREEZE...) or a checkpoint of another configuration."""


class HeadError(PipelineError):
    """A head cannot be fitted, loaded or used: unknown name, bad cache, wrong features."""


class ReportError(PipelineError):
    """Nothing to report, or a results file that cannot be read."""


class PredictError(PipelineError):
    """A model or image input that ``predict`` cannot use."""


def did_you_mean(word: str, choices: Iterable[str], n: int = 3) -> str:
    """Return ``"; did you mean a, b?"`` for the closest choices, or ``""``."""
    close = difflib.get_close_matches(word.lower(), list(choices), n=n, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else ""
