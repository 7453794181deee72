"""The report's nearest training images beside each worst image (issue 21): cheap, no Keras."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from heads_helpers import write_cache

from pipeline.core.artifacts import SplitPredictions
from pipeline.report import mistakes
from pipeline.report.evaluation import Run
from pipeline.report.pages import _html_thumbs, _markdown_block

NAMES = ("ant", "bee")


def _cache(tmp_path: Path) -> Path:
    """Train ants along one axis, train bees along another; a val "ant" that looks like a bee."""
    rng = np.random.default_rng(0)
    ants = np.array([1.0, 0.0, 0.0]) + rng.normal(0, 0.05, (6, 3))
    bees = np.array([0.0, 1.0, 0.0]) + rng.normal(0, 0.05, (6, 3))
    odd = np.array([[0.02, 1.0, 0.01], [0.0, 0.9, 0.0]])  # val: a bee filed as ant; a bee
    features = np.concatenate([ants, bees, odd]).astype(np.float32)
    labels = np.array([0] * 6 + [1] * 6 + [0, 1])
    splits = ["train"] * 12 + ["val", "test"]
    return write_cache(tmp_path / "c.h5", features, labels, splits, NAMES)


@pytest.mark.parametrize("block", [2, 4096])  # merged across blocks of train rows, or one block
def test_nearest_train_images_by_cosine(tmp_path: Path, monkeypatch, block: int) -> None:
    monkeypatch.setattr(mistakes, "_BLOCK", block)
    cache = _cache(tmp_path)
    found = mistakes.nearest_train(cache, ["val/ant/0012.png", "nowhere.png"])
    assert list(found) == ["val/ant/0012.png"]  # a path the cache lacks is left out
    near = found["val/ant/0012.png"]
    assert len(near) == mistakes.NEAREST and all(n["label"] == "bee" for n in near)
    assert all(n["path"].startswith("train/bee/") for n in near)  # train only, never itself
    sims = [n["similarity"] for n in near]
    assert sims == sorted(sims, reverse=True) and sims[0] > 0.99


def _run(kind: str, cache: Path) -> Run:
    paths = np.array(["val/ant/0012.png"], dtype=object)
    predictions = SplitPredictions(
        paths=paths, labels=np.array([0]), pred=np.array([1]),
        scores=np.array([[0.1, 0.9]]), is_proba=True,
    )  # fmt: skip
    return Run("svm", kind, "c", {"cache": str(cache)}, NAMES, {"val": predictions})


def test_error_analysis_shows_neighbours_for_heads_only(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    row = {"splits": {"val": {"confusion": [[0, 1], [0, 0]]}}}
    errors = mistakes.error_analysis(_run("head", cache), row)
    worst = errors["splits"]["val"]["top_losses"][0]
    assert [n["label"] for n in worst["nearest"]] == ["bee"] * 3
    data = {"errors": errors}
    page = _html_thumbs(data, "val", {})
    assert "nearest train" in page and page.count("class='nb'") == 3 and "cos 1.00" in page
    md = "\n".join(_markdown_block("thumbs", "val", data, {}))
    assert "nearest training images: bee (train/bee/" in md
    finetuned = mistakes.error_analysis(_run("finetuned", cache), row)
    assert "nearest" not in finetuned["splits"]["val"]["top_losses"][0]


def test_a_damaged_cache_is_a_note_not_a_traceback(tmp_path: Path) -> None:
    cache = tmp_path / "bad.h5"
    cache.write_bytes(b"not hdf5")
    row = {"splits": {"val": {"confusion": [[0, 1], [0, 0]]}}}
    errors = mistakes.error_analysis(_run("head", cache), row)
    assert errors["nearest_note"].startswith("no nearest training images of the worst images")
    assert "nearest" not in errors["splits"]["val"]["top_losses"][0]
