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
   the activations of the frozen part, cached once with ``AUG_COPIES``
   augmented copies per training image (:mod:`pipeline.finetuning.inputs`), or,
   with ``AUG_COPIES=0``, the whole network on the images every epoch.

The images, their split and the skipped files come from the stage-one cache
(built first when missing), so every stage sees the same images. A checkpoint
is written after each epoch; running the same command again continues an
interrupted run, and a checkpoint made with other options is refused.

The rooms of stage three: :mod:`pipeline.finetuning.freezing` (``UNFREEZE``, blocks,
``set_trainable``), :mod:`pipeline.finetuning.model` (the model, the warm start,
saving and loading), :mod:`pipeline.finetuning.activations` (the cut, the caches of the
frozen part's output, the top model), :mod:`pipeline.finetuning.inputs` (phase
two's input: which caches, the feeds), :mod:`pipeline.finetuning.image_feed` (the images
as a Keras ``PyDataset``), :mod:`pipeline.finetuning.training` (the ``fit`` calls and
their callbacks), :mod:`pipeline.finetuning.checkpoints` (resume and its refusals),
:mod:`pipeline.finetuning.outputs` (predictions, log, curves, model, manifest);
this module resolves the configuration once and runs the steps in order.
Outputs are laid out by :mod:`pipeline.core.artifacts`
(``artifacts/finetune/<dataset>/<name>.*``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.core.artifacts import Artifacts, dataset_name
from pipeline.core.errors import FinetuneError
from pipeline.data.folders import scan_folder
from pipeline.features import backbones, cache, runtimes
from pipeline.features.config import FeatureConfig, ResolvedFeatures
from pipeline.features.extract import extract_features
from pipeline.features.resplit import cache_split, split_in_use
from pipeline.finetuning.activations import build_top_model
from pipeline.finetuning.checkpoints import CHECKPOINT_VERSION, Checkpoint
from pipeline.finetuning.config import FinetuneConfig, FinetuneRun
from pipeline.finetuning.freezing import (
    backbone_layers,
    parse_layers,
    resolve_layers,
    set_trainable,
)
from pipeline.finetuning.inputs import cache_activations, sample_weights, training_feeds
from pipeline.finetuning.model import (
    build_augmentation,
    build_finetune_model,
    compile_model,
    starting_head,
)
from pipeline.finetuning.outputs import FinetuneResult, write_outputs
from pipeline.finetuning.validation import cut_evaluation
from pipeline.heads.softmax import two_columns

if TYPE_CHECKING:
    import keras

    from pipeline.features.cache import FeatureSet
    from pipeline.finetuning.checkpoints import Checkpoint


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
    >>> from pipeline.features.extract import FeatureConfig
    >>> from pipeline.finetuning import FinetuneConfig, finetune
    >>> config = FinetuneConfig(FeatureConfig(backbone="mobilenet_v2"), unfreeze="block", epochs=3)
    >>> result = finetune("data/hymenoptera_data", config)
    >>> print(result.format())
    """

    run = _prepare(Path(data), config or FinetuneConfig(), artifacts_dir, progress, echo)
    try:  # the run holds its lock (taken by checkpoint.open) until here
        cache_activations(run)
        model, trainee, head, head_source = _assemble(run)
        sigmoid = int(head.output_shape[-1]) == 1
        resumed_from = int(run.state["epoch"]) if run.state else None
        state = _phase_one(run, trainee, head, head_source, sigmoid)
        state = _phase_two(run, trainee, head, state, sigmoid, callbacks)
        return write_outputs(run, model, state, sigmoid, resumed_from)
    finally:
        run.checkpoint.release()


def _prepare(
    data: Path,
    config: FinetuneConfig,
    artifacts_dir: str | Path,
    progress: bool,
    echo: Callable[[str], None],
) -> FinetuneRun:
    """Resolve the configuration, open the checkpoint, make sure stage one has run."""
    import keras

    notes: list[str] = []

    def note(line: str) -> None:
        notes.append(line)
        echo(line)

    data_dir, config, given_cache = _config_from_cache(data, config, note, artifacts_dir)
    resolved = config.validate()
    folder = scan_folder(data_dir, config.split)
    dataset = dataset_name(folder.root, artifacts_dir)  # stage one's name for it
    name = config.name or _default_name(resolved, config.unfreeze)
    artifacts = Artifacts(artifacts_dir)
    files = artifacts.finetune_files(dataset, name)

    spec, size = resolved.spec, resolved.input_size
    keras.utils.set_random_seed(config.split.seed)  # WEIGHTS=none: the same random base
    with backbones.dtype_policy(resolved.runtime.keras_policy):
        base = backbones.build_base(spec, weights=config.features.weights, input_size=size)
    layers = resolve_layers(config.unfreeze, base, spec.name)
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
    return FinetuneRun(
        config=config, resolved=resolved, dataset=dataset, name=name, files=files,
        head_path=artifacts.stage_two_softmax(dataset, summary.cache_path.stem),
        features=features, splits=splits,
        root=Path(features.attrs.get("data_root", folder.root)), base=base, layers=layers,
        depth=len(backbone_layers(base)), checkpoint=checkpoint, identity=identity, state=state,
        notes=notes, echo=echo, data_dir=data_dir, artifacts_dir=Path(artifacts_dir),
        progress=progress,
    )  # fmt: skip


def _config_from_cache(
    data: Path, config: FinetuneConfig, note: Callable[[str], None], artifacts_dir: str | Path
) -> tuple[Path, FinetuneConfig, Path | None]:
    """A data folder as is; a stage-one cache gives its folder, feature configuration and split.

    Either way phase one reads stage one's cache, whichever runtime made it (float32
    features of every runtime share one cache), and starts from the stage-two head
    fitted on it; the network that trains and is exported is Keras's.
    """
    if not (data.suffix == ".h5" and data.is_file()):
        # The split stage one's cache holds (make features SEED=/SPLIT_FILE=): splitting it
        # back to this command's defaults would leave the heads on another split.
        split = split_in_use(data, config.features, config.split, artifacts_dir) or config.split
        if split != config.split:
            note(f"using the cache's split: {split.words()}")
        return data, replace(config, split=split), None

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
    split = cache_split(attrs) or config.split
    before = {**asdict(config.features), **asdict(config.split)}
    after = {**asdict(features), **asdict(split)}
    # The runtime is execution, not identity: not worth a line.
    differ = [
        f"{key}={value}"
        for key, value in after.items()
        if before[key] != value
        and key != "runtime"
        and not (key == "precision" and before[key] == "auto")  # auto takes what stage one took
    ]
    if differ:
        note(f"using the cache's {', '.join(differ)}")
    return Path(attrs["data_root"]), replace(config, features=features, split=split), data


def _runtime_note(features: FeatureSet) -> str:
    """What a stage-one cache at a reduced precision means here (``""`` for float32).

    Only phase one reads the cache's features (the head's warm start and its
    validation accuracy); phase two, its cut cache and the exported model run
    on Keras, so the fine-tuned network is what Keras computes.
    """
    precision = str(features.attrs.get("precision", "fp32"))
    if precision in ("fp32", "float32"):
        return ""
    runtime = str(features.attrs.get("runtime", "keras"))
    return (
        f"stage one: {features.path.name} holds {precision} features ({runtime}): phase one "
        "starts from a head fitted on those features; phase two and the exported model run on "
        "Keras (for float32 throughout, `make features PRECISION=float32` and pass that cache)"
    )


def _default_name(resolved: ResolvedFeatures, layers: int | str) -> str:
    """``<backbone>_<size>_<weights>[_<bf16|fp16>]_layers-<layers>``."""
    tag = resolved.weights_tag
    if runtimes.precision_tag(resolved.runtime.precision):
        tag += "_" + runtimes.precision_tag(resolved.runtime.precision)
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


def _assemble(run: FinetuneRun) -> tuple[keras.Model, keras.Model, keras.Model, str]:
    """The whole model, the model phase two trains, the head and where the head comes from.

    The trained model is the whole model when phase two runs on images, else
    the top of the network on the cached activations (sharing its layers with
    the whole model, which then needs no augmentation: the views hold it).
    """
    import keras

    keras.utils.set_random_seed(run.config.split.seed)  # whether stage one ran just now or not
    with backbones.dtype_policy(run.resolved.runtime.keras_policy):
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


def _phase_one(run: FinetuneRun, model, head, head_source: str, sigmoid: bool) -> dict:
    """The head with the backbone frozen; its end is epoch 0 of the checkpoint."""
    from pipeline.finetuning.training import train_head

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


def _phase_two(run: FinetuneRun, model, head, state: dict, sigmoid: bool, callbacks) -> dict:
    """Unfreeze the last layers, recompile, train from the checkpoint's epoch.

    ``model`` is the whole model (on images) or the top model (on the cached
    activations), as :func:`_assemble` chose. Validation runs the top on the
    val activations at the cut, made once (:mod:`pipeline.finetuning.validation`),
    when there is a cut.
    """
    from pipeline.finetuning.training import CheckpointedEarlyStopping, EpochLog, fit_phase_two

    config = run.config
    set_trainable(run.base, run.layers)
    compile_model(model, config.learning_rate, sigmoid=sigmoid)
    run.checkpoint.restore(model, state)
    history = list(state["history"])
    run.evaluation = cut_evaluation(run, model, head)
    validator = None
    if run.evaluation is not None:
        val_rows = np.flatnonzero(run.splits["val"])
        labels = run.features.labels[val_rows]
        validator = run.evaluation.callback(val_rows, labels, sigmoid=sigmoid)
    train_seq, val_seq, readers = training_feeds(run, sigmoid, validation=validator is None)
    stopping = CheckpointedEarlyStopping(
        run.checkpoint, state, history, patience=config.patience, elapsed=run.elapsed,
        echo=run.echo,
    )  # fmt: skip
    log = EpochLog(
        2, history, epochs=config.epochs, learning_rate=config.learning_rate, echo=run.echo,
        progress=run.progress,
    )  # fmt: skip
    try:
        fit_phase_two(
            model, train_seq, val_seq, epochs=config.epochs, stopping=stopping, log=log,
            callbacks=callbacks, validator=validator,
        )  # fmt: skip
    finally:
        for reader in readers:
            reader.close()
    return {**stopping.state, "history": history}
