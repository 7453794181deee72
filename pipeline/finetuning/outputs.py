"""Stage three's outputs: predictions, the per-epoch log, the curves, the model, its manifest.

:func:`write_outputs` writes them in that order (the manifest last, so a
manifest means a complete run) and returns the :class:`FinetuneResult` the
CLI prints. Predictions are made by the whole network on the val and test
images, whatever phase two trained on.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.core.artifacts import (
    feature_identity,
    new_manifest,
    write_manifest,
    write_predictions,
)
from pipeline.core.files import sha256_file
from pipeline.finetuning.freezing import backbone_layers
from pipeline.finetuning.inputs import describe_input, image_feed
from pipeline.finetuning.model import save_model
from pipeline.heads.softmax import two_columns
from pipeline.report.naming import phase_two_words
from pipeline.report.plotting import plot_curves

if TYPE_CHECKING:
    from pipeline.finetuning.config import FinetuneRun


@dataclass
class FinetuneResult:
    """What a stage-three run produced (printed by the CLI)."""

    model_path: Path
    manifest_path: Path
    predictions_path: Path
    history_path: Path
    plot_path: Path
    layers: int
    depth: int
    head_source: str
    val_accuracy: float
    test_accuracy: float | None
    best_epoch: int
    history: list[dict[str, Any]]
    seconds: float
    resumed_from: int | None = None
    phase_two_input: str = ""
    notes: list[str] = field(default_factory=list)
    model: Any = field(default=None, repr=False)

    def format(self, *, notes: bool = True) -> str:
        """The run's summary; ``notes=False`` leaves out the notes already echoed during it."""
        lines = [*self.notes] if notes else []
        test = f", test accuracy {self.test_accuracy:.4f}" if self.test_accuracy is not None else ""
        phase_two = [h for h in self.history if h["phase"] == 2]
        per_epoch = np.mean([h["seconds"] for h in phase_two]) / 60 if phase_two else 0.0
        lines.append(
            f"fine-tuned {self.layers} of {self.depth} backbone layers: val accuracy "
            f"{self.val_accuracy:.4f}{test} (best epoch {self.best_epoch} of phase two, "
            f"{len(phase_two)} run, {per_epoch:.2f} min/epoch, {self.seconds / 60:.1f} min in all)"
        )
        if self.phase_two_input:
            lines.append(f"  phase two trained on {self.phase_two_input}")
        lines.append(f"saved {self.model_path} (manifest {self.manifest_path.name})")
        lines.append(
            f"  predictions {self.predictions_path.name}, log {self.history_path.name}, "
            f"curves {self.plot_path.name}"
        )
        return "\n".join(lines)


def write_outputs(
    run: FinetuneRun, model, state: dict, sigmoid: bool, resumed_from: int | None
) -> FinetuneResult:
    """Predictions, the log, the curves, the model and, last, its manifest."""
    import keras

    from pipeline.finetuning.training import write_history

    files, features, history = run.files, run.features, state["history"]
    files.model.parent.mkdir(parents=True, exist_ok=True)
    seconds_per_image, accuracy = _write_predictions(run, model, sigmoid)
    write_history(files.history, files.history_csv, history)
    plot_curves(
        history, files.curves, title=f"{run.dataset}: {run.name}",
        phase_two=_caption_words(run.activations),
    )  # fmt: skip
    save_model(model, files.model)
    seconds = run.elapsed()
    manifest = new_manifest(
        "finetuned", name=run.name, dataset=run.dataset, class_names=features.class_names,
        features=feature_identity(features.attrs), fingerprint=features.attrs.get("fingerprint"),
        files={"model": files.model.name, "predictions": files.predictions.name,
               "history": files.history.name, "curves": files.curves.name},
        sha256={"model": sha256_file(files.model)},
        input="float32 RGB images (n, input_size, input_size, 3), values 0..255",
        output="sigmoid: (n, 1) probability of class 1" if sigmoid else "softmax: (n, classes)",
        unfrozen=run.layers, unfreeze=str(run.config.unfreeze), depth=run.depth,
        trainable_layers=[layer.name for layer in backbone_layers(run.base) if layer.trainable],
        head_source=state["head_source"], data_root=str(run.root), cache=str(features.path),
        phase_two_input=run.activations,
        val_accuracy=accuracy.get("val"), test_accuracy=accuracy.get("test"),
        phase_one_val_accuracy=state["phase_one_val_accuracy"],
        best_epoch=int(state["best_epoch"]),
        epochs_run=sum(1 for h in history if h["phase"] == 2), config=asdict(run.config),
        params=int(model.count_params()), fit_seconds=round(seconds, 1),
        predict_seconds_per_image=round(seconds_per_image, 5),
        keras_version=keras.__version__, keras_backend=keras.backend.backend(),
    )  # fmt: skip
    write_manifest(files.manifest, manifest)
    run.checkpoint.remove()
    return FinetuneResult(
        model_path=files.model, manifest_path=files.manifest, predictions_path=files.predictions,
        history_path=files.history, plot_path=files.curves, layers=run.layers, depth=run.depth,
        head_source=state["head_source"], val_accuracy=accuracy["val"],
        test_accuracy=accuracy.get("test"), best_epoch=int(state["best_epoch"]), history=history,
        seconds=seconds, resumed_from=resumed_from, notes=run.notes, model=model,
        phase_two_input=describe_input(run.activations),
    )  # fmt: skip


def _caption_words(activations: dict[str, Any]) -> str:
    """What phase two trained on, for the curves' caption (the report's words, no reason)."""
    given = {key: value for key, value in activations.items() if key != "reason"}
    return phase_two_words({"phase_two_input": given})


def _write_predictions(run: FinetuneRun, model, sigmoid: bool) -> tuple[float, dict[str, float]]:
    """Predict the val and test images; write them; seconds per image and accuracy per split.

    The whole network predicts them: its top on their activations at the cut
    when phase two kept them (:mod:`pipeline.finetuning.validation`; the seconds
    then add the frozen part's), else on the images.
    """

    features = run.features
    rows = np.flatnonzero(run.splits["val"] | run.splits["test"])
    tick = time.perf_counter()
    if run.evaluation is not None:
        proba = two_columns(run.evaluation.predict(rows))
        seconds = time.perf_counter() - tick + run.evaluation.seconds
    else:
        proba = two_columns(model.predict(image_feed(run, rows, sigmoid), verbose=0))
        seconds = time.perf_counter() - tick
    seconds_per_image = seconds / max(1, len(rows))
    pred, labels, split = proba.argmax(axis=1), features.labels[rows], features.split[rows]
    write_predictions(
        run.files.predictions, features.class_names, paths=features.paths[rows], split=split,
        labels=labels, pred=pred, scores=proba, is_proba=True,
    )  # fmt: skip
    accuracy = {
        s: float(np.mean(pred[split == s] == labels[split == s]))
        for s in ("val", "test") if np.any(split == s)
    }  # fmt: skip
    return seconds_per_image, accuracy
