"""What every stage shares: the layout under ``artifacts/``, option checks, atomic files,
the project's errors, and what the terminal shows."""

from pipeline.core.artifacts import Artifacts, dataset_name
from pipeline.core.errors import PipelineError

__all__ = ["Artifacts", "PipelineError", "dataset_name"]
