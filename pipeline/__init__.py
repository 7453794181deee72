"""Transfer learning for small image data sets, after "CNN features off-the-shelf".

Stage one caches frozen ImageNet backbone features to HDF5 (:func:`extract_features`);
stage two fits heads on them (:func:`fit_heads`) and :func:`write_report` compares them;
stage three fine-tunes (:func:`finetune`); :func:`predict_images` classifies new images.
:func:`audit_folder` finds duplicates, leaks, likely label errors and outliers in the data;
:func:`export_features` writes a cache as NumPy and Parquet files.
:func:`run_protocol` and :func:`run_curve` run research protocols (N images per class
over seeds, split lists) on one cache.
:class:`ImageFeatures` is stage one as a scikit-learn transformer, for images in memory.
Importing the package is cheap: each name loads its stage on first use, and Keras and
TensorFlow load only when a model is built.
"""

import importlib
from typing import Any

from pipeline.core.console import quiet_keras_import

__version__ = "0.1.0"

# Public name -> the package that defines it (loaded on first use, PEP 562).
_PUBLIC = {
    "SplitConfig": "pipeline.data",
    "FeatureConfig": "pipeline.features",
    "ImageFeatures": "pipeline.features.transformer",
    "cache_path_for": "pipeline.features",
    "extract_features": "pipeline.features",
    "list_backbones": "pipeline.features",
    "load_features": "pipeline.features",
    "fit_heads": "pipeline.heads",
    "load_head": "pipeline.heads",
    "write_report": "pipeline.report",
    "FinetuneConfig": "pipeline.finetuning",
    "finetune": "pipeline.finetuning",
    "predict_images": "pipeline.predict",
    "audit_folder": "pipeline.audit",
    "export_features": "pipeline.audit",
    "run_protocol": "pipeline.heads.protocol_run",
    "run_curve": "pipeline.recipes.curve",
}
__all__ = sorted(_PUBLIC)

quiet_keras_import()  # TensorFlow's native start-up lines, wherever Keras is first imported


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
