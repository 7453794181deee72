"""Stage one: a frozen ImageNet backbone over a folder of images, its features cached to HDF5.

:func:`extract_features` runs it; :class:`FeatureConfig` holds its options; :func:`load_features`
reads a cache back. The modules, from the bottom up: ``backbones`` (the registry),
``preprocessing``, ``runtimes`` (Keras or OpenVINO), ``views`` (several views per image),
``config``, ``cache`` (the HDF5 format), ``records`` (what a cache records), ``extractor``
(the model), ``ray_shards`` and ``ray_engine`` (stage one on Ray), ``extract``, ``joins``
(caches joined by image path) and ``rebuild`` (the features of new images, for predict).
"""

from pipeline.features.backbones import BackboneSpec, get_backbone, list_backbones
from pipeline.features.cache import FeatureSet, load_features
from pipeline.features.config import FeatureConfig, ResolvedFeatures, cache_path_for
from pipeline.features.extract import extract_features
from pipeline.features.joins import join_caches
from pipeline.features.records import ExtractionSummary

__all__ = [
    "BackboneSpec",
    "ExtractionSummary",
    "FeatureConfig",
    "FeatureSet",
    "ResolvedFeatures",
    "cache_path_for",
    "extract_features",
    "get_backbone",
    "join_caches",
    "list_backbones",
    "load_features",
]
