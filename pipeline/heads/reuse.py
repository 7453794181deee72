"""Reusing heads: ``make head`` run again with nothing changed reuses the heads it saved.

A head's manifest records ``search_key``, a digest of everything its fit depends on
(:func:`reuse_key`); a later sweep with the same key finds the saved head, checks its
files' sha256, and reuses it instead of fitting it again (``FORCE=1`` refits).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.core import artifacts
from pipeline.core.files import sha256_file
from pipeline.heads.registry import HEADS, build_head
from pipeline.heads.scoring import manifest_metric


def reuse_key(
    fs: Any, name: str, grid: Mapping | None, *, norm: str | None, pca: int | None, cv: int,
    seed: int, metric: str = "accuracy",
) -> str:  # fmt: skip
    """A digest of what a head's fit depends on: the cache file (path, size, time, identity),
    the unfitted head's parameters, its grid and bounds, the folds, seed, the metric the
    search scores (``METRIC=``) and library versions. Two runs with the same digest fit the
    same head, so the second reuses the first's."""
    stat = Path(fs.path).stat()
    pipe = build_head(name, norm=norm, pca=pca, seed=seed)
    spec = HEADS[name]
    parts = {
        "cache": [str(Path(fs.path).resolve()), stat.st_size, stat.st_mtime_ns],
        "identity": [fs.attrs.get("fingerprint"), fs.attrs.get("config_json")],
        "head": {k: repr(v) for k, v in sorted(pipe.get_params(deep=True).items()) if "__" in k},
        "steps": [type(step).__name__ for _, step in pipe.steps],
        "grid": {k: list(v) for k, v in (grid or spec.grid).items()},
        "moves": None if grid else {k: list(v) for k, v in spec.extend.items()},
        "cv": [cv, seed],
        "versions": library_versions(),
    }
    if metric != "accuracy":  # so the keys of heads fitted before METRIC= existed still hold
        parts["metric"] = metric
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def reusable_manifests(
    out_dir: Path, keys: Mapping[str, str], metric: str = "accuracy"
) -> dict[str, tuple[Path, dict[str, Any]]]:
    """The heads already saved in ``out_dir`` under the same key, their files intact, chosen
    by ``metric``."""
    found = {}
    for name, key in keys.items():
        path = out_dir / f"{name}.json"
        try:
            manifest = artifacts.read_manifest(path, kind="head")
            intact = all(
                sha256_file(out_dir / file) == manifest["sha256"].get(role)
                for role, file in manifest["files"].items()
            )
        except (artifacts.ArtifactError, OSError, KeyError, TypeError, AttributeError):
            continue  # no head yet, or one that cannot be trusted: fit it
        # The key holds the metric; a manifest that says another one is not reused either.
        if intact and manifest.get("search_key") == key and manifest_metric(manifest) == metric:
            found[name] = (path, manifest)
    return found


def library_versions() -> dict[str, str]:
    """The versions of the libraries a head's fit depends on."""
    import importlib.metadata

    return {pkg: importlib.metadata.version(pkg) for pkg in ("scikit-learn", "keras", "numpy")}
