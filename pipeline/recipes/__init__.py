"""Recipes beyond one vector per image: ``probe`` (a linear head's accuracy per cut layer)
and ``auto`` (feature recipes tried and chosen by cross-validation on train)."""

from pipeline.recipes.auto import AutoResult, run_auto
from pipeline.recipes.probe import ProbeResult, run_probe

__all__ = ["AutoResult", "ProbeResult", "run_auto", "run_probe"]
