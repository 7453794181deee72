"""A run the report compares: a head or a fine-tuned model, with its predictions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.core.artifacts import SplitPredictions


@dataclass
class Run:
    """One head or fine-tuned model with its predictions on the evaluated splits."""

    name: str  # row label, e.g. "svm" or the fine-tuned model's name
    kind: str  # "head" | "finetuned"
    group: str  # cache stem for heads, "finetuned" for stage three
    manifest: dict[str, Any]
    class_names: tuple[str, ...]
    splits: dict[str, SplitPredictions] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # fine-tuned: per-epoch log
    data_root: str | None = None  # where the predictions' image paths are relative to
    cache_images: int | None = None  # images stage one read for this run's cache

    @property
    def run_id(self) -> str:
        return f"{self.group}/{self.name}"
