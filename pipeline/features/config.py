"""Stage one's options: :class:`FeatureConfig`, resolved once into :class:`ResolvedFeatures` (spec,
size, weights identity, dtype, runtime), and the cache name that follows from them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.core.artifacts import Artifacts
from pipeline.core.errors import PipelineError
from pipeline.core.options import check_options
from pipeline.features import backbones, runtimes
from pipeline.features import views as views_module
from pipeline.features.cache_writer import work_path_of
from pipeline.features.views import Views

# Compute precisions as caches record them (and as older caches did) -> the PRECISION= word.
PRECISION_WORDS = {
    **{code: word for word, code in runtimes.COMPUTE.items()},
    "float32": "float32",
    "mixed_bfloat16": "bfloat16",
    "mixed_float16": "float16",
}


@dataclass(frozen=True)
class FeatureConfig:
    """Options of stage one (the ``make features`` variables).

    Parameters
    ----------
    backbone : str
        Registry name, e.g. ``"vgg16"`` (``python -m pipeline backbones``).
    weights : str
        ``"imagenet"``, ``"none"`` (random init) or a local weights file.
    input_size : int, optional
        Square input side; the backbone's default when omitted.
    pooling : {"avg", "max", "flatten"}
        How the last feature map becomes a vector.
    layer : str, optional
        Cut the backbone at this named layer.
    batch_size : int
        Images per forward pass.
    precision : {"auto", "float32", "bfloat16", "float16", "int8"}
        The backbone's compute precision, whichever runtime runs it: OpenVINO's
        ``INFERENCE_PRECISION_HINT``, OpenVINO int8 (NNCF post-training quantization
        on the user's images) or a Keras mixed dtype policy. ``auto`` takes the
        fastest of ``int8``, ``bfloat16`` and ``float32`` the CPU and packages allow
        whose linear-head predictions on a sample of the user's images agree with
        float32's (:mod:`pipeline.features.precisions`); ``float16`` is for GPUs (Keras).
    storage : {"float32", "float16"}
        How the features are stored (``float16``: half the disk).
    workers : int, optional
        Decoding threads (default one per core, at most 8).
    runtime : {"auto", "keras", "openvino"}
        Who runs the backbone (:mod:`pipeline.features.runtimes`); ``auto`` takes the
        fastest one whose features pass the check, else ``keras``. Execution only:
        float32 features of every runtime share one cache.
    views : str, optional
        Several views per image (:mod:`pipeline.features.views`): scales, ``+flip``,
        ``+crops``, e.g. ``"224,320,448+flip"``; unset (or the input size alone)
        is today's single view.
    combine : {"mean", "concat"}
        How the views' scales become one vector.
    """

    backbone: str = "mobilenet_v2"
    weights: str = "imagenet"
    input_size: int | None = None
    pooling: str = "avg"
    layer: str | None = None
    batch_size: int = 32
    precision: str = "auto"
    storage: str = "float32"
    workers: int | None = None
    runtime: str = "auto"
    views: str | None = None
    combine: str = "mean"

    def validate(self) -> backbones.BackboneSpec:
        """Check every option without building anything; return the backbone spec."""
        return resolve_features(self).spec

    @classmethod
    def from_cache_attrs(cls, attrs: Mapping[str, Any], **overrides: Any) -> FeatureConfig:
        """The configuration a finished cache was made with (from its attributes).

        ``overrides`` replace fields that do not change the features
        (``batch_size``, ``workers``).
        """
        config = cls(
            backbone=str(attrs["backbone"]),
            weights=str(attrs["weights_source"]),
            input_size=int(attrs["input_size"]),
            pooling=str(attrs["pooling"]),
            layer=str(attrs.get("layer") or "") or None,
            precision=PRECISION_WORDS.get(str(attrs.get("precision", "fp32")), "float32"),
            storage=str(attrs.get("dtype", "float32")),
            runtime=str(attrs.get("runtime", "keras")),
            views=str(attrs.get("views") or "") or None,
            combine=str(attrs.get("views_combine") or "mean"),
        )
        return replace(config, **overrides)


@dataclass(frozen=True)
class ResolvedFeatures:
    """A :class:`FeatureConfig` resolved once: what every later step needs, computed here.

    Made by :func:`resolve_features` (as timm's ``resolve_model_data_config``):
    the backbone spec, the input size, the weights' identity and the stored
    dtype, so nothing downstream re-resolves or parses them.
    """

    config: FeatureConfig
    spec: backbones.BackboneSpec
    input_size: int
    weights_id: str
    dtype: str  # how features are stored: "float32" or "float16"
    # Who runs the backbone, at which compute precision: chosen by resolve_features,
    # settled by pipeline.features.extractor.settle_runtime once the images are known.
    runtime: runtimes.RuntimeChoice = runtimes.RuntimeChoice()
    store: runtimes.ConversionStore | None = None  # the converted model (runtimes other than keras)
    views: Views | None = (
        None  # several views per image (pipeline.features.views); None: the plain one
    )

    @property
    def weights_tag(self) -> str:
        """``imagenet``, ``random`` or ``w-<first 10 hex of the weights file's sha256>``."""
        if self.config.weights in ("imagenet", "none"):
            return "imagenet" if self.config.weights == "imagenet" else "random"
        return "w-" + self.weights_id.split(":")[1][:10]

    @property
    def cache_stem(self) -> str:
        """The cache's name: what the features are, never who computed them.

        ``<backbone>_<size>_<pooling>[_<layer>][_<views>]_<weights>[_<bf16|fp16|int8>][_stored-f16]``.
        """
        return self.stem_at(self.runtime.precision)

    def stem_at(self, precision: str) -> str:
        """:attr:`cache_stem` at the compute precision ``precision`` (``fp32``, ``bf16``, ``fp16``,
        ``int8``)."""
        config = self.config
        parts = [self.spec.name, str(self.input_size), config.pooling]
        if config.layer:
            parts.append("".join(c if c.isalnum() else "-" for c in config.layer))
        if self.views is not None:  # the plain view has no tag
            parts.append(self.views.tag)
        parts.append(self.weights_tag)
        if runtimes.precision_tag(precision):  # other numerics: another file, never a rebuild
            parts.append(runtimes.precision_tag(precision))
        if self.dtype == "float16":
            parts.append("stored-f16")
        return "_".join(parts)


def resolve_features(
    config: FeatureConfig, *, artifacts_dir: str | Path = "artifacts", choose_runtime: bool = True
) -> ResolvedFeatures:
    """Check ``config`` (one table of constraints, :mod:`pipeline.core.options`) and resolve it.

    The runtime is chosen from what is installed, the CPU and the checks
    recorded under ``artifacts_dir`` (:func:`pipeline.features.runtimes.choose`); nothing
    is built or converted here. ``choose_runtime=False`` leaves it at Keras: enough for
    everything but running stage one (the cache's name does not depend on it).

    Raises
    ------
    PipelineError
        The first bad option, named as the user types it.
    """
    check_options(
        asdict(config), ("pooling", "batch_size", "precision", "storage", "workers", "runtime")
    )
    if config.input_size is not None:
        check_options({"input_size": config.input_size})
    spec = backbones.get_backbone(config.backbone)
    size = backbones.resolve_input_size(spec, config.input_size)
    views = resolve_views(config, spec, size)
    resolved = ResolvedFeatures(
        config=config,
        spec=spec,
        input_size=views.scales[0] if views else size,
        weights_id=backbones.weights_identity(config.weights),
        dtype=config.storage,
        runtime=runtimes.keras_choice(config.precision),
        views=views,
    )
    if not choose_runtime or config.runtime == "keras" or views is not None:
        return resolved  # views run on Keras (one model per scale)
    store = runtimes.ConversionStore.for_config(
        artifacts_dir,
        backbone=spec.name,
        weights_id=resolved.weights_id,
        weights_tag=resolved.weights_tag,
        input_size=size,
        pooling=config.pooling,
        layer=config.layer,
    )
    choice = runtimes.choose(
        config.runtime, config.precision, store=store, random_weights=config.weights == "none"
    )
    return replace(resolved, runtime=choice, store=store)


def resolve_views(config: FeatureConfig, spec: backbones.BackboneSpec, size: int) -> Views | None:
    """``VIEWS=`` resolved (:func:`pipeline.features.views.parse_views`); ``None`` for the plain view."""
    views = views_module.parse_views(
        config.views,
        combine=config.combine,
        input_size=size,
        minimum=spec.min_size,
        pooling=config.pooling,
    )
    if (
        views is not None
        and config.input_size is not None
        and config.input_size not in views.scales
    ):
        raise PipelineError(
            f"INPUT_SIZE={config.input_size} is not among VIEWS={views.text()}; "
            "give the scales in VIEWS only"
        )
    if views is not None and config.runtime == "openvino":
        raise PipelineError("VIEWS= runs on Keras (one model per scale); use RUNTIME=keras or auto")
    return views


def cache_path_for(
    dataset: str, config: FeatureConfig | ResolvedFeatures, artifacts_dir: str | Path = "artifacts"
) -> Path:
    """Where the cache of ``dataset`` under ``config`` lives (:attr:`ResolvedFeatures.cache_stem`).

    Found from the configuration and what stage one wrote, without choosing a runtime:
    where ``PRECISION=auto`` allows several compute precisions, the newest cache among
    them (stage one's choice); none yet: the float32 name.
    """
    layout = Artifacts(artifacts_dir)
    if isinstance(config, ResolvedFeatures):
        return layout.cache_path(dataset, config.cache_stem)
    resolved = resolve_features(config, artifacts_dir=artifacts_dir, choose_runtime=False)
    allowed = runtimes.compute_precisions(config.precision)
    allowed = sorted(allowed, key=lambda p: p != "fp32")  # float32 first: the name before any run
    paths = [layout.cache_path(dataset, resolved.stem_at(p)) for p in allowed]
    # A finished cache, or the work file of a run that stopped (it resumes under that name).
    written = {p: p if p.is_file() else work_path_of(p) for p in paths}
    existing = [p for p in paths if written[p].is_file()]
    return max(existing, key=lambda p: written[p].stat().st_mtime) if existing else paths[0]
