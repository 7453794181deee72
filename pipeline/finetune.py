"""Stage three: fine-tune the last layers of a backbone under the softmax head.

:func:`finetune` is what ``make finetune`` and ``python -m pipeline finetune``
call. It works in two phases, as the Keras transfer-learning guide does:

1. **Head.** The backbone is frozen, so the head sees exactly the stage-one
   features; it starts from the stage-two head fit on the cached features
   (``artifacts/heads/<dataset>/<cache stem>/softmax.keras``) when that head
   exists and was fit on this cache, and costs nothing then. Otherwise it is
   trained from scratch here, on the cached features (identical to training
   it on images through the frozen base, without augmentation, at a
   hundredth of the cost), and the run says so.
2. **Fine-tuning.** The last ``layers`` layers of the backbone become
   trainable (BatchNormalization never: it stays frozen and in inference mode,
   the base is called with ``training=False``), the model is recompiled and
   trained at a low learning rate (Adam, 1e-5) with augmentation and class
   weights, early stopping on validation accuracy and the best weights kept.
   Phase one's model is the first candidate, so fine-tuning never ends below
   the head on the validation split. It trains the top of the network on
   the activations of the frozen part, cached once with ``AUG_VIEWS``
   augmented views per training image (:mod:`pipeline.finetune_input`), or,
   with ``AUG_VIEWS=0``, the whole network on the images every epoch.

The images, their split and the skipped files come from the stage-one cache
(built first when missing), so every stage sees the same images. A checkpoint
is written after each epoch; running the same command again continues an
interrupted run, and a checkpoint made with other options is refused.

The rooms of stage three: :mod:`pipeline.freezing` (``LAYERS``, blocks,
``set_trainable``), :mod:`pipeline.finetune_model` (the model, the warm start,
saving and loading), :mod:`pipeline.activations` (the cut, the caches of the
frozen part's output, the top model), :mod:`pipeline.finetune_input` (phase
two's input: which caches, the feeds), :mod:`pipeline.image_feed` (the images
as a Keras ``PyDataset``), :mod:`pipeline.training` (the ``fit`` calls and
their callbacks), :mod:`pipeline.checkpoints` (resume and its refusals),
:mod:`pipeline.finetune_outputs` (predictions, log, curves, model, manifest);
this module resolves the configuration once and runs the steps in order.
Outputs are laid out by :mod:`pipeline.artifacts`
(``artifacts/finetune/<dataset>/<name>.*``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import FinetuneError
from pipeline.features import FeatureConfig, ResolvedFeatures, resolve_features
from pipeline.finetune_outputs import FinetuneResult, write_outputs
from pipeline.freezing import parse_layers
from pipeline.images import SplitConfig
from pipeline.options import check_options

if TYPE_CHECKING:
    import keras

    from pipeline.activations import Cut
    from pipeline.artifacts import FinetuneFiles
    from pipeline.cache import FeatureSet
    from pipeline.checkpoints import Checkpoint

_OWN_OPTIONS = (
    "epochs", "head_epochs", "patience", "learning_rate", "head_learning_rate", "rotation",
    "zoom", "flip", "class_weight", "aug_views",
)  # fmt: skip
# What a checkpoint must share to be continued (not epochs, patience, name, workers).
_IDENTITY = (
    "layers", "learning_rate", "head_epochs", "head_learning_rate", "augment", "flip",
    "rotation", "zoom", "class_weight", "aug_views",
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
    layers : int or {"all", "block"}
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
    aug_views : int
        Phase two trains the top of the network on cached activations of the
        frozen part (:mod:`pipeline.activations`): this many augmented views
        of each training image are cached once, one drawn per image per epoch
        (with ``augment=False``, the unaugmented activations). ``0``: every
        epoch runs the whole network on the images, as before.
    name : str, optional
        Output name (default ``<backbone>_<size>_<weights>_layers-<layers>``).
    restart : bool
        Discard an unfinished run's checkpoint instead of continuing it.

    Examples
    --------
    >>> from dataclasses import replace
    >>> config = FinetuneConfig(FeatureConfig(backbone="resnet50"), layers=20)
    >>> replace(config, features=replace(config.features, batch_size=16)).features.batch_size
    16
    """

    features: FeatureConfig = field(default_factory=FeatureConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    layers: int | str = "block"
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
    aug_views: int = 8
    name: str | None = None
    restart: bool = False

    def validate(self) -> ResolvedFeatures:
        """Check every option without building anything; return the resolved features."""
        if self.features.pooling != "avg" or self.features.layer:
            raise FinetuneError(
                "fine-tuning puts the head on avg-pooled features of the backbone's last "
                f"layer; got pooling={self.features.pooling!r} layer={self.features.layer!r}"
            )
        resolved = resolve_features(self.features)
        check_options(asdict(self.split), ("seed", "val_fraction", "test_fraction"))
        parse_layers(self.layers)
        check_options({key: getattr(self, key) for key in _OWN_OPTIONS})
        views = self.aug_views
        if (
            isinstance(views, bool)
            or not isinstance(views, int | np.integer)
            or not 0 <= views <= 64
        ):
            raise FinetuneError(
                "AUG_VIEWS= (--aug-views) must be a whole number in 0..64 (0: a full forward "
                f"pass every epoch); got {views!r}"
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
class _Run:
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

    def note(self, line: str) -> None:
        self.notes.append(line)
        self.echo(line)

    def elapsed(self) -> float:
        """Seconds of this run, plus those of the runs it resumes."""
        earlier = float(self.state.get("seconds", 0.0)) if self.state else 0.0
        return time.perf_counter() - self.started + earlier


# --- the run ---------------------------------------------------------------------------------


def finetune(
    data: str | Path,
    config: FinetuneConfig | None = None,
    *,
    artifacts_dir: str | Path = "artifacts",
    progress: bool = True,
    echo: Callable[[str], None] = print,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> FinetuneResult:
    """Fine-tune a backbone and its softmax head on an image folder.

    Parameters
    ----------
    data : path
        Folder of class subfolders (as in stage one), or a stage-one cache
        (``.h5``, ``avg`` pooling) whose backbone, weights, size and split are used.
    config : FinetuneConfig, optional
        Options (defaults: MobileNetV2, ImageNet, last block, 10 epochs at 1e-5).
    artifacts_dir : path
        Root of the outputs: reads ``features/`` and ``heads/``, writes ``finetune/``.
    progress : bool
        Show a progress bar over each epoch's batches.
    echo : callable
        Receives one line per note and per epoch (default ``print``).
    callbacks : sequence of keras.callbacks.Callback
        More callbacks for the phase-two ``fit`` (TensorBoard, ...).

    Returns
    -------
    FinetuneResult
        Paths of the outputs, accuracies, the per-epoch log and the model.

    Raises
    ------
    FinetuneError
        Bad ``layers`` (negative, not a number, deeper than the backbone), a
        checkpoint of another configuration, no training or validation images.

    Examples
    --------
    >>> from pipeline.features import FeatureConfig
    >>> from pipeline.finetune import FinetuneConfig, finetune
    >>> config = FinetuneConfig(FeatureConfig(backbone="mobilenet_v2"), layers="block", epochs=3)
    >>> result = finetune("data/hymenoptera_data", config)
    >>> print(result.format())
    """
    from pipeline.finetune_input import cache_activations

    run = _prepare(Path(data), config or FinetuneConfig(), artifacts_dir, progress, echo)
    try:  # the run holds its lock (taken by checkpoint.open) until here
        cache_activations(run)
        model, trainee, head, head_source = _assemble(run)
        sigmoid = int(head.output_shape[-1]) == 1
        resumed_from = int(run.state["epoch"]) if run.state else None
        state = _phase_one(run, trainee, head, head_source, sigmoid)
        state = _phase_two(run, trainee, state, sigmoid, progress, callbacks)
        return write_outputs(run, model, state, sigmoid, resumed_from)
    finally:
        run.checkpoint.release()


def _prepare(
    data: Path,
    config: FinetuneConfig,
    artifacts_dir: str | Path,
    progress: bool,
    echo: Callable[[str], None],
) -> _Run:
    """Resolve the configuration, open the checkpoint, make sure stage one has run."""
    import keras

    from pipeline import backbones, cache
    from pipeline.artifacts import Artifacts, dataset_name
    from pipeline.checkpoints import CHECKPOINT_VERSION, Checkpoint
    from pipeline.features import extract_features
    from pipeline.freezing import backbone_layers, resolve_layers
    from pipeline.images import scan_folder

    notes: list[str] = []

    def note(line: str) -> None:
        notes.append(line)
        echo(line)

    data_dir, config, given_cache = _config_from_cache(data, config, note)
    resolved = config.validate()
    folder = scan_folder(data_dir, config.split)
    dataset = dataset_name(folder.root)
    name = config.name or _default_name(resolved, config.layers)
    artifacts = Artifacts(artifacts_dir)
    files = artifacts.finetune_files(dataset, name)

    spec, size = resolved.spec, resolved.input_size
    keras.utils.set_random_seed(config.split.seed)  # WEIGHTS=none: the same random base
    with backbones.dtype_policy(config.features.precision):
        base = backbones.build_base(spec, weights=config.features.weights, input_size=size)
    layers = resolve_layers(config.layers, base, spec.name)
    identity = {
        "checkpoint_version": CHECKPOINT_VERSION,
        "data_root": str(folder.root.resolve()),
        "fingerprint": folder.fingerprint(),
        "layers_resolved": layers,
        **config.identity(resolved),
    }
    checkpoint = Checkpoint(files.checkpoint)  # validated above: a refused run locks nothing
    state = checkpoint.open(identity, restart=config.restart, note=note)  # takes the run's lock
    try:
        summary = extract_features(
            data_dir, config.features, split=config.split, artifacts_dir=artifacts_dir,
            cache_path=given_cache, progress=progress,
        )  # fmt: skip
        for line in summary.notes:
            note(line)
        if summary.status != "up to date":
            note(f"stage one: {summary.status} {summary.cache_path}")
        features = cache.load_features(summary.cache_path)
        splits = _check_splits(features)
        if _runtime_note(features):
            note(_runtime_note(features))
    except BaseException:
        checkpoint.release()
        raise
    return _Run(
        config=config, resolved=resolved, dataset=dataset, name=name, files=files,
        head_path=artifacts.stage_two_softmax(dataset, summary.cache_path.stem),
        features=features, splits=splits,
        root=Path(features.attrs.get("data_root", folder.root)), base=base, layers=layers,
        depth=len(backbone_layers(base)), checkpoint=checkpoint, identity=identity, state=state,
        notes=notes, echo=echo, data_dir=data_dir, artifacts_dir=Path(artifacts_dir),
        progress=progress,
    )  # fmt: skip


def _config_from_cache(
    data: Path, config: FinetuneConfig, note: Callable[[str], None]
) -> tuple[Path, FinetuneConfig, Path | None]:
    """A data folder as is; a stage-one cache gives its folder, feature configuration and split.

    For a folder, ``RUNTIME=auto`` means Keras: phase one fits the head on the
    stage-one features, and the network that trains and is exported is Keras's.
    A cache keeps the runtime it records (:func:`_runtime_note` says so).
    """
    if not (data.suffix == ".h5" and data.is_file()):
        if config.features.runtime == "auto":
            config = replace(config, features=replace(config.features, runtime="keras"))
        return data, config, None
    from pipeline import cache

    attrs = cache.read_attrs(data)
    if attrs.get("pooling") != "avg" or attrs.get("layer"):
        raise FinetuneError(
            f"{data} was made with POOLING={attrs.get('pooling')} LAYER={attrs.get('layer') or ''}; "
            "fine-tuning puts the head on avg-pooled features of the last layer: run "
            "`make features POOLING=avg` and pass that cache or the data folder"
        )
    features = FeatureConfig.from_cache_attrs(
        attrs, batch_size=config.features.batch_size, workers=config.features.workers
    )
    split = config.split
    if int(attrs.get("split_seed", -1)) >= 0:
        split = SplitConfig(
            seed=int(attrs["split_seed"]), val_fraction=float(attrs["val_fraction"]),
            test_fraction=float(attrs["test_fraction"]),
        )  # fmt: skip
    before = {**asdict(config.features), **asdict(config.split)}
    after = {**asdict(features), **asdict(split)}
    # The runtime is kept (the cache is then up to date) but said apart: see _runtime_note.
    differ = [
        f"{key}={value}"
        for key, value in after.items()
        if before[key] != value and key not in ("runtime", "runtime_precision")
    ]
    if differ:
        note(f"using the cache's {', '.join(differ)}")
    return Path(attrs["data_root"]), replace(config, features=features, split=split), data


def _runtime_note(features: FeatureSet) -> str:
    """What a stage-one cache made by another runtime than Keras means here (``""`` for Keras).

    Only phase one reads the cache's features (the head's warm start and its
    validation accuracy); phase two, its cut cache and the exported model run
    on Keras, so the fine-tuned network is what Keras computes.
    """
    runtime = str(features.attrs.get("runtime", "keras"))
    if runtime == "keras":
        return ""
    precision = features.attrs.get("runtime_precision", "")
    return (
        f"stage one: {features.path.name} was made by {runtime} ({precision}): phase one fits "
        "the head on its features; phase two and the exported model run on Keras (for a Keras "
        "phase one, pass the data folder or a cache of `make features RUNTIME=keras`)"
    )


def _default_name(resolved: ResolvedFeatures, layers: int | str) -> str:
    """``<backbone>_<size>_<weights>[_f16][_<precision>]_layers-<layers>``."""
    tag = resolved.weights_tag
    if resolved.dtype == "float16":
        tag += "_f16"
    if resolved.config.precision != "float32":
        tag += "_" + resolved.config.precision.replace("_", "-")
    return f"{resolved.spec.name}_{resolved.input_size}_{tag}_layers-{parse_layers(layers)}"


def _check_splits(features: FeatureSet) -> dict[str, np.ndarray]:
    masks = {s: features.split == s for s in ("train", "val", "test")}
    for required in ("train", "val"):
        if not masks[required].any():
            raise FinetuneError(
                f"the stage-one cache {features.path} has no {required!r} images; fine-tuning "
                "needs both (add a val/ folder, or use a folder without split folders, "
                "which is split by VAL_FRACTION)"
            )
    return masks


def _assemble(run: _Run) -> tuple[keras.Model, keras.Model, keras.Model, str]:
    """The whole model, the model phase two trains, the head and where the head comes from.

    The trained model is the whole model when phase two runs on images, else
    the top of the network on the cached activations (sharing its layers with
    the whole model, which then needs no augmentation: the views hold it).
    """
    import keras

    from pipeline import backbones
    from pipeline.activations import build_top_model
    from pipeline.finetune_model import build_augmentation, build_finetune_model, starting_head

    keras.utils.set_random_seed(run.config.split.seed)  # whether stage one ran just now or not
    with backbones.dtype_policy(run.config.features.precision):
        head, source = starting_head(
            run.features, run.head_path,
            resumed_source=run.state["head_source"] if run.state else None, note=run.note,
        )  # fmt: skip
        model = build_finetune_model(
            run.resolved.spec, run.base, head, size=run.resolved.input_size,
            augmentation=build_augmentation(run.config) if run.cut is None else None,
        )  # fmt: skip
        trainee = model if run.cut is None else build_top_model(run.base, head, run.cut)
    return model, trainee, head, source


def _phase_one(run: _Run, model, head, head_source: str, sigmoid: bool) -> dict:
    """The head with the backbone frozen; its end is epoch 0 of the checkpoint."""
    from pipeline.finetune_input import sample_weights
    from pipeline.finetune_model import compile_model
    from pipeline.softmax import two_columns
    from pipeline.training import train_head

    if run.state is not None:
        run.note(f"resuming {run.files.checkpoint} after phase-two epoch {int(run.state['epoch'])}")
        return run.state
    config, features, splits = run.config, run.features, run.splits
    history: list[dict[str, Any]] = []
    if head_source == "scratch":
        compile_model(head, config.head_learning_rate, sigmoid=sigmoid)
        x_train, y_train = features.features[splits["train"]], features.labels[splits["train"]]
        x_val, y_val = features.features[splits["val"]], features.labels[splits["val"]]
        if sigmoid:
            y_train, y_val = y_train.reshape(-1, 1), y_val.reshape(-1, 1)
        history = train_head(
            head, (x_train, y_train, sample_weights(run, y_train.ravel())), (x_val, y_val),
            epochs=config.head_epochs, batch_size=config.features.batch_size,
            patience=max(5, config.patience), learning_rate=config.head_learning_rate,
        )  # fmt: skip
        if history:
            run.echo(
                f"phase 1: trained the head for {len(history)} epochs on cached features "
                f"({sum(r['seconds'] for r in history):.1f} s)"
            )
    proba = np.asarray(head.predict(features.features[splits["val"]], verbose=0, batch_size=256))
    val_accuracy = float(
        np.mean(two_columns(proba).argmax(axis=1) == features.labels[splits["val"]])
    )
    run.echo(
        f"phase 1: val accuracy {val_accuracy:.4f} with the backbone frozen ({head_source} head)"
    )
    return run.checkpoint.start(model, run.identity, history, val_accuracy, head_source)


def _phase_two(run: _Run, model, state: dict, sigmoid: bool, progress: bool, callbacks) -> dict:
    """Unfreeze the last layers, recompile, train from the checkpoint's epoch.

    ``model`` is the whole model (on images) or the top model (on the cached
    activations), as :func:`_assemble` chose.
    """
    from pipeline.finetune_input import training_feeds
    from pipeline.finetune_model import compile_model
    from pipeline.freezing import set_trainable
    from pipeline.training import CheckpointedEarlyStopping, EpochLog, fit_phase_two

    config = run.config
    set_trainable(run.base, run.layers)
    compile_model(model, config.learning_rate, sigmoid=sigmoid)
    run.checkpoint.restore(model, state)
    history = list(state["history"])
    train_seq, val_seq, readers = training_feeds(run, sigmoid)
    stopping = CheckpointedEarlyStopping(
        run.checkpoint, state, history, patience=config.patience, elapsed=run.elapsed,
        echo=run.echo,
    )  # fmt: skip
    log = EpochLog(
        2, history, epochs=config.epochs, learning_rate=config.learning_rate, echo=run.echo,
        progress=progress,
    )  # fmt: skip
    try:
        fit_phase_two(
            model, train_seq, val_seq, epochs=config.epochs, stopping=stopping, log=log,
            callbacks=callbacks,
        )  # fmt: skip
    finally:
        for reader in readers:
            reader.close()
    return {**stopping.state, "history": history}
