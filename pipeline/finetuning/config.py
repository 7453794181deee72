"""Stage three's options (:class:`FinetuneConfig`) and one run's resolved state
(:class:`FinetuneRun`), shared by the steps of :mod:`pipeline.finetuning.run`."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.artifacts import FinetuneFiles
from pipeline.core.errors import FinetuneError
from pipeline.core.options import check_options
from pipeline.data.folders import SplitConfig
from pipeline.features.cache import FeatureSet
from pipeline.features.config import FeatureConfig, ResolvedFeatures, resolve_features
from pipeline.finetuning.activations import Cut
from pipeline.finetuning.checkpoints import Checkpoint
from pipeline.finetuning.costs import MODES
from pipeline.finetuning.freezing import parse_layers

_OWN_OPTIONS = (
    "epochs", "head_epochs", "patience", "learning_rate", "head_learning_rate", "rotation",
    "zoom", "flip", "class_weight", "aug_copies",
)  # fmt: skip


# What a checkpoint must share to be continued (not epochs, patience, name, workers).
_IDENTITY = (
    "unfreeze", "learning_rate", "head_epochs", "head_learning_rate", "augment", "flip",
    "rotation", "zoom", "class_weight", "aug_copies",
)  # fmt: skip


@dataclass(frozen=True)
class FinetuneConfig:
    """Options of stage three (the ``make finetune`` variables).

    Parameters
    ----------
    features : FeatureConfig
        Backbone, weights, input size, batch size, precision and decoding
        workers, as in stage one; ``pooling`` must stay ``"avg"`` (and
        ``layer`` unset): the stage-one cache of these gives the split and,
        with stage two, the starting head.
    split : SplitConfig
        The stratified split of stage one; its seed also seeds shuffling and
        augmentation.
    unfreeze : int or {"all", "block"}
        Backbone layers to unfreeze in phase two, counted from the end over
        every Keras layer of the headless backbone (weightless ones too, as
        the Keras guide counts them): ``0`` trains the head only, ``"all"``
        every layer, ``"block"`` the backbone's last block.
    epochs : int
        Most phase-two epochs (early stopping may end sooner).
    learning_rate : float
        Adam learning rate of phase two.
    head_epochs, head_learning_rate
        Phase one, when there is no stage-two head to start from.
    patience : int
        Epochs without a better validation accuracy before stopping.
    augment : bool
        Random flip, rotation and zoom (Keras preprocessing layers) in training.
    flip, rotation, zoom
        Their settings: flip mode, and rotation and zoom as fractions.
    class_weight : {"balanced", "none"}
        Weight each class by ``n / (k * n_class)`` on the training split.
    phase_two : {"auto", "activations", "images"}
        What phase two trains on: ``"auto"`` estimates both from stage one's
        seconds per image (:mod:`pipeline.finetuning.costs`) and takes the
        cheaper for ``epochs`` epochs; ``"activations"`` builds the caches below
        whatever the run's length; ``"images"`` runs the whole network every epoch.
    aug_copies : int
        On cached activations, phase two trains the top of the network on cached activations of the
        frozen part (:mod:`pipeline.finetuning.activations`): this many augmented copies
        of each training image are cached once, one drawn per image per epoch
        (with ``augment=False``, the unaugmented activations). ``0``: every
        epoch runs the whole network on the images, as before.
    name : str, optional
        Output name (default ``<backbone>_<size>_<weights>_layers-<unfreeze>``).
    restart : bool
        Discard an unfinished run's checkpoint instead of continuing it.

    Examples
    --------
    >>> from dataclasses import replace
    >>> config = FinetuneConfig(FeatureConfig(backbone="resnet50"), unfreeze=20)
    >>> replace(config, features=replace(config.features, batch_size=16)).features.batch_size
    16
    """

    features: FeatureConfig = field(default_factory=FeatureConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    unfreeze: int | str = "block"
    epochs: int = 10
    learning_rate: float = 1e-5
    head_epochs: int = 50
    head_learning_rate: float = 1e-3
    patience: int = 3
    augment: bool = True
    flip: str = "horizontal"
    rotation: float = 0.1
    zoom: float = 0.1
    class_weight: str = "balanced"
    aug_copies: int = 8
    phase_two: str = "auto"
    name: str | None = None
    restart: bool = False

    def validate(self) -> ResolvedFeatures:
        """Check every option without building anything; return the resolved features."""
        if self.features.pooling != "avg" or self.features.layer:
            raise FinetuneError(
                "fine-tuning puts the head on avg-pooled features of the backbone's last "
                f"layer; got pooling={self.features.pooling!r} layer={self.features.layer!r}"
            )
        resolved = resolve_features(self.features, choose_runtime=False)  # Keras trains
        check_options(asdict(self.split), ("seed", "val_fraction", "test_fraction"))
        parse_layers(self.unfreeze)
        check_options({key: getattr(self, key) for key in _OWN_OPTIONS})
        copies = self.aug_copies
        if (
            isinstance(copies, bool)
            or not isinstance(copies, int | np.integer)
            or not 0 <= copies <= 64
        ):
            raise FinetuneError(
                "AUG_COPIES= (--aug-copies) must be a whole number in 0..64 (0: a full forward "
                f"pass every epoch); got {copies!r}"
            )
        if self.phase_two not in MODES:
            raise FinetuneError(
                "PHASE_TWO= (--phase-two) must be auto, activations or images (auto: whichever "
                f"the estimate says is faster for EPOCHS); got {self.phase_two!r}"
            )
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise FinetuneError(
                "NAME= (--name) must be letters, digits, '.', '_' or '-' (a file name); "
                f"got {self.name!r}"
            )
        return resolved

    def identity(self, resolved: ResolvedFeatures) -> dict[str, Any]:
        """The options a checkpoint must share to be continued (not epochs or patience)."""
        return {
            "backbone": resolved.spec.name,
            "weights": resolved.weights_id,
            "input_size": resolved.input_size,
            "batch_size": self.features.batch_size,
            "precision": self.features.precision,
            **asdict(self.split),
            **{key: getattr(self, key) for key in _IDENTITY},
        }


@dataclass
class FinetuneRun:
    """One run's configuration, resolved once, and what the steps share."""

    config: FinetuneConfig
    resolved: ResolvedFeatures
    dataset: str
    name: str
    files: FinetuneFiles
    head_path: Path
    features: FeatureSet
    splits: dict[str, np.ndarray]
    root: Path
    base: Any
    layers: int
    depth: int
    checkpoint: Checkpoint
    identity: dict[str, Any]
    state: dict | None
    notes: list[str]
    echo: Callable[[str], None]
    started: float = field(default_factory=time.perf_counter)
    data_dir: Path | None = None
    artifacts_dir: Path = Path("artifacts")
    progress: bool = True
    cut: Cut | None = None  # where phase two's input is cached; None: images, every epoch
    activations: dict[str, Any] = field(default_factory=dict)  # the caches, for the manifest
    decoded: dict[str, np.ndarray] = field(default_factory=dict)  # images decoded once (on images)
    evaluation: Any = None  # CutEvaluation: val and test on the frozen part's output, made once

    def note(self, line: str) -> None:
        self.notes.append(line)
        self.echo(line)

    def elapsed(self) -> float:
        """Seconds of this run, plus those of the runs it resumes."""
        earlier = float(self.state.get("seconds", 0.0)) if self.state else 0.0
        return time.perf_counter() - self.started + earlier
