"""The audit's pictures: the map of the data (PCA, then t-SNE) and thumbnails of findings."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from threadpoolctl import threadpool_limits

from pipeline.core.files import write_atomic

THUMB = 112  # longest side of a thumbnail, pixels
MAP_PCA = 50
TSNE_ITER = 400  # 150 iterations after early exaggeration's 250 settle a map of a few thousand
MAP_MAX = 5000  # images on the map: every finding, and a random sample of the rest


def map_rows(n: int, marked: Iterable[int], seed: int) -> np.ndarray:
    """The rows the map shows: all when ``n <= MAP_MAX``, else every marked row and a sample.

    t-SNE's time grows with the images; a sample of 5,000 shows the classes' shapes as well.
    """
    if n <= MAP_MAX:
        return np.arange(n)
    marked = np.unique(np.fromiter(marked, dtype=np.int64))
    rest = np.setdiff1d(np.arange(n), marked)
    take = max(0, MAP_MAX - len(marked))
    sample = np.random.default_rng(seed).choice(rest, size=min(take, len(rest)), replace=False)
    return np.sort(np.concatenate([marked, sample]))


def embed_2d(features: np.ndarray, seed: int) -> np.ndarray:
    """2-D coordinates: PCA to 50 dimensions (a denoising step), then t-SNE."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(features, dtype=np.float32)
    n = len(x)
    if n < 4:
        return np.zeros((n, 2))
    x = PCA(min(MAP_PCA, n, x.shape[1]), random_state=seed).fit_transform(x)
    perplexity = float(min(30.0, (n - 1) / 3))
    tsne = TSNE(
        2, perplexity=perplexity, init="pca", random_state=seed, max_iter=TSNE_ITER, angle=0.8
    )
    # One OpenMP thread: the Barnes-Hut gradient's threads spin-wait for each other, five times
    # slower in wall time on a machine that is busy with other work (2,000 images: 5 s, not 27).
    with threadpool_limits(1, "openmp"):
        return tsne.fit_transform(x)


def draw_map(
    xy: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    marks: dict[str, Iterable[int]],
    path: Path,
    title: str = "t-SNE of the features (PCA to 50 first), coloured by class",
) -> Path:
    """A scatter of ``xy`` coloured by class, the findings of ``marks`` drawn over it (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6.5), dpi=110)
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for c, name in enumerate(class_names):
        rows = labels == c
        if rows.any():
            ax.scatter(*xy[rows].T, s=9, color=cmap(c % cmap.N), alpha=0.55, label=name, lw=0)
    styles = {
        "label issue": dict(marker="o", s=70, facecolors="none", edgecolors="red", linewidths=1.4),
        "near duplicate": dict(marker="s", s=60, facecolors="none", edgecolors="#7b2cbf", lw=1.4),
        "exact duplicate": dict(marker="D", s=60, facecolors="none", edgecolors="black", lw=1.4),
        "outlier": dict(marker="x", s=70, color="black", linewidths=1.8),
    }
    for name, rows in marks.items():
        rows = np.fromiter(rows, dtype=np.int64)
        if len(rows):
            ax.scatter(*xy[rows].T, label=f"{name} ({len(rows)})", **styles[name])
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8, markerscale=1.2, framealpha=0.85)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def thumbnail(root: Path | None, rel: str, out_dir: Path) -> str | None:
    """A small JPEG of ``root/rel`` in ``out_dir``; its file name, or ``None`` if unreadable.

    Only files inside ``root`` are read (a cache names paths; it never names where to look).
    """
    if root is None:
        return None
    root = root.resolve()
    source = (root / rel).resolve()
    if not source.is_relative_to(root) or not source.is_file():
        return None
    stat = source.stat()  # an edited image gets a new thumbnail
    key = f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}"
    name = hashlib.sha1(key.encode()).hexdigest()[:16] + ".jpg"
    target = out_dir / name
    if target.is_file():
        return name
    try:
        with Image.open(source) as image:
            image.draft("RGB", (THUMB * 2, THUMB * 2))
            image = image.convert("RGB")
            image.thumbnail((THUMB, THUMB))
            write_atomic(target, lambda tmp: image.save(tmp, format="JPEG", quality=80))
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return name
