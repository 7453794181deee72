"""Shared fixtures: tiny synthetic image folders and feature caches. No network."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def make_image(path: Path, colour: tuple[int, int, int], seed: int, size=(40, 30)) -> Path:
    """A noisy image of one dominant colour, so classes are separable even by random features."""
    rng = np.random.default_rng(seed)
    base = np.array(colour, dtype=np.float32)
    pixels = np.clip(base + rng.normal(0, 25, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def make_folder(root: Path, per_class: int = 6, classes=("red", "blue"), ext: str = ".png") -> Path:
    """``root/<class>/<i><ext>`` with ``per_class`` images per class."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            make_image(root / name / f"img{i:02d}{ext}", COLOURS[name], seed=100 * c + i)
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Two classes of 6 small PNGs, no split folders."""
    return make_folder(tmp_path / "shapes")


@pytest.fixture
def split_folder(tmp_path: Path) -> Path:
    """train/ (5 per class) and val/ (3 per class) folders, three classes, JPEG."""
    root = tmp_path / "splits"
    for split, n in (("train", 5), ("val", 3)):
        for c, name in enumerate(COLOURS):
            for i in range(n):
                make_image(
                    root / split / name / f"{i}.jpg",
                    COLOURS[name],
                    seed=1000 * c + 10 * i + len(split),
                )
    return root


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """A real stage-one cache: MobileNetV2, random weights, 32x32 inputs, 3 classes."""
    from pipeline.data.folders import SplitConfig
    from pipeline.features.config import FeatureConfig
    from pipeline.features.extract import extract_features

    root = tmp_path_factory.mktemp("tiny")
    make_folder(root / "colours", per_class=10, classes=tuple(COLOURS))
    summary = extract_features(
        root / "colours",
        FeatureConfig(backbone="mobilenet_v2", weights="none", input_size=32, batch_size=8),
        split=SplitConfig(seed=0, val_fraction=0.2, test_fraction=0.2),
        artifacts_dir=root / "artifacts",
        progress=False,
    )
    return summary.cache_path


def needs_assets(*parts: str):
    """Skip unless ``../shared/assets/<parts>`` exists."""
    return pytest.mark.skipif(
        not ASSETS.joinpath(*parts).exists(), reason=f"needs {ASSETS.joinpath(*parts)}"
    )


def pytest_collection_modifyitems(items):
    """Real-data checks join the slow tier: `make test` stays quick, CI runs both tiers."""
    for item in items:
        if item.get_closest_marker("real_data"):
            item.add_marker(pytest.mark.slow)
