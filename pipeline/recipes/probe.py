"""The layer probe: how well a linear head reads each depth of one backbone.

``make probe DATA=...`` builds one Keras model with several outputs (each cut
layer globally average-pooled), runs it once over the train images, and scores a
linear head per depth by stratified cross-validation on train (the registry's
``svm`` head: L2 per image, then ``LinearSVC(C=1)``). Val and test are never
read. The result, ``artifacts/probe/<dataset>/<stem>.json`` and a plot beside
it, shows where the data wants to cut: data near ImageNet peaks at the last
layer; data far from it (textures, medical, small images) often earlier.

The default cut layers are, for every spatial resolution from a quarter of the
input down, the last layer at that resolution (MobileNetV2 at 224 px:
``block_3_expand_relu`` 56x56, ``block_6_expand_relu`` 28x28,
``block_13_expand_relu`` 14x14, ``out_relu`` 7x7): the stage ends, found from
the model itself, so every registered backbone has them. ``PROBE_LAYERS=a,b``
(``probe --layers``) names others.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.artifacts import Artifacts, dataset_name
from pipeline.core.errors import BackboneError, DataError, did_you_mean
from pipeline.core.files import write_bytes_atomic, write_json_atomic
from pipeline.data.folders import scan_folder
from pipeline.data.images import default_workers, iter_batches
from pipeline.features import backbones
from pipeline.features.config import FeatureConfig, resolve_features
from pipeline.heads.registry import build_head


def stage_ends(base: Any, *, smallest_stride: int = 4) -> list[str]:
    """The last layer at each spatial resolution, from ``1 / smallest_stride`` of the input down."""
    size = base.input.shape[1]
    last: dict[int, str] = {}
    for layer in base.layers:
        shape = layer.output.shape
        if len(shape) != 4 or type(layer).__name__ == "ZeroPadding2D":
            continue  # padding shifts the resolution by one: not a stage
        if shape[1] is not None and shape[1] * smallest_stride <= size:
            last[int(shape[1])] = layer.name
    return [last[r] for r in sorted(last, reverse=True)]


def build_probe_model(base: Any, layers: Sequence[str]) -> Any:
    """One model, one forward pass: the input -> each layer's output, average-pooled.

    Raises
    ------
    BackboneError
        A layer that is not in ``base`` (closest names suggested) or not 4-D.
    """
    import keras

    names = [layer.name for layer in base.layers]
    outputs = []
    for name in layers:
        if name not in names:
            raise BackboneError(
                f"PROBE_LAYERS={name!r} is not a layer of {base.name}{did_you_mean(name, names)}; "
                f"stage ends: {', '.join(stage_ends(base))}"
            )
        out = base.get_layer(name).output
        if len(out.shape) != 4:
            raise BackboneError(
                f"PROBE_LAYERS={name!r} has output shape {tuple(out.shape)}; pick a 4-D one"
            )
        outputs.append(keras.layers.GlobalAveragePooling2D(name=f"probe_{len(outputs)}")(out))
    model = keras.Model(base.input, outputs, name=f"{base.name}_probe")
    model.trainable = False
    return model


@dataclass
class ProbeResult:
    """Cross-validated accuracy of a linear head per cut layer."""

    dataset: str
    backbone: str
    input_size: int
    layers: list[dict[str, Any]]  # name, width, resolution, depth, cv_mean, cv_std, fold_scores
    n_train: int
    folds: int
    seconds: float
    json_path: Path | None = None
    png_path: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def best(self) -> dict[str, Any]:
        return max(self.layers, key=lambda row: (row["cv_mean"], row["depth"]))

    def format(self) -> str:
        lines = [*self.notes]
        lines.append(
            f"layer probe: {self.backbone} at {self.input_size} px, linear SVM (L2, C=1), "
            f"{self.folds}-fold CV on {self.n_train} train images"
        )
        for row in self.layers:
            mark = "  <- best" if row is self.best else ""
            lines.append(
                f"  {row['name']:<28} {row['resolution']:>3}x{row['resolution']:<3} width {row['width']:>5}  "
                f"cv {row['cv_mean']:.3f} +- {row['cv_std']:.3f}{mark}"
            )
        if self.json_path is not None:
            lines.append(f"wrote {self.json_path} and {self.png_path}")
        return "\n".join(lines)


def probe_rows(
    y: np.ndarray, folds: int, class_names: Sequence[str]
) -> tuple[np.ndarray, int, list[str]]:
    """Which train images the probe scores, with how many folds, and a note per class left out.

    A class of one train image cannot be held out by any fold: it is left out (and
    said so), and the folds are what the smallest remaining class allows, the number
    reported being the number scored.

    Raises
    ------
    DataError
        Fewer than two classes have two train images.
    """
    counts = np.bincount(y, minlength=len(class_names))
    thin = [c for c in range(len(counts)) if counts[c] == 1]
    keep = ~np.isin(y, thin)
    notes = [
        f"class {class_names[c]!r} has 1 train image: left out of the probe (no fold can "
        "hold it out)"
        for c in thin
    ]
    kept = counts[counts >= 2]
    if len(kept) < 2:
        raise DataError(
            "the probe needs two classes of at least 2 train images each; add train images"
        )
    return keep, int(min(folds, kept.min())), notes


def cv_scores(x: np.ndarray, y: np.ndarray, *, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Accuracy per fold of the ``svm`` head (L2, C=1) on ``x``: stratified, seeded."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    counts = np.bincount(y)
    folds = max(2, min(folds, int(counts[counts > 0].min())))
    head = build_head("svm", seed=seed).set_params(svm__C=1.0)
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return cross_val_score(head, x, y, cv=splitter, scoring="accuracy")


def run_probe(
    data_dir: str | Path,
    config: Any = None,
    *,
    layers: Sequence[str] | None = None,
    split: Any = None,
    folds: int = 3,
    seed: int = 0,
    artifacts_dir: str | Path = "artifacts",
    log: Callable[[str], Any] | None = None,
) -> ProbeResult:
    """Probe the cut layers of ``config``'s backbone on the train images of ``data_dir``.

    Parameters
    ----------
    data_dir : path
        Image folder, as stage one.
    config : FeatureConfig, optional
        Backbone, weights, input size, batch size (pooling and layer are not used).
    layers : sequence of str, optional
        Layers to cut; default :func:`stage_ends`.
    split : SplitConfig, optional
        As stage one (train is what is probed).
    folds : int
        Cross-validation folds on train.

    Returns
    -------
    ProbeResult
        Per layer: width, resolution, mean and deviation of the fold accuracies;
        the JSON and the plot are written under ``artifacts/probe/<dataset>/``.
    """

    resolved = resolve_features(  # the probe's multi-output model runs on Keras
        config or FeatureConfig(), artifacts_dir=artifacts_dir, choose_runtime=False
    )
    spec, size, cfg = resolved.spec, resolved.input_size, resolved.config
    folder = scan_folder(data_dir, split)
    folder = replace(folder, dataset=dataset_name(data_dir, artifacts_dir))  # stage one's name
    train = [r for r in folder.records if r.split == "train"]
    with backbones.dtype_policy(resolved.runtime.keras_policy):
        base = backbones.build_base(spec, weights=cfg.weights, input_size=size)
    chosen = list(layers) if layers else stage_ends(base)
    model = build_probe_model(base, chosen)
    stem = f"{spec.name}_{size}_{resolved.weights_tag}"
    json_path, png_path = Artifacts(artifacts_dir).probe_files(folder.name, stem)
    identity = {
        "fingerprint": folder.fingerprint(),
        "weights": resolved.weights_id,
        "layers": chosen,
        "folds": folds,
        "seed": seed,
    }
    saved = _saved_record(json_path, identity)
    if saved is not None:
        return _result(saved, json_path, png_path, ["(reused: same images, weights and layers)"])
    started = time.perf_counter()
    outputs, y = _layer_features(model, folder.root, train, resolved, len(chosen))
    keep, folds_scored, notes = probe_rows(y, folds, folder.class_names)
    outputs, y = [x[keep] for x in outputs], y[keep]
    rows = _score_layers(base, chosen, outputs, y, folds=folds_scored, seed=seed)
    record = {
        "identity": identity,
        "dataset": folder.name,
        "backbone": spec.name,
        "input_size": size,
        "weights_source": cfg.weights,
        "head": "svm (L2 per image, LinearSVC C=1)",
        "n_train": int(len(y)),
        "folds": folds_scored,
        "seconds": time.perf_counter() - started,
        "layers": rows,
    }
    result = _result(record, json_path, png_path, notes)
    write_bytes_atomic(png_path, _png(probe_figure(result)))
    write_json_atomic(json_path, record)
    if log is not None:
        log(result.format())
    return result


def _saved_record(json_path: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The probe written before for the same images, weights and layers, or ``None``."""
    if json_path.is_file():
        saved = json.loads(json_path.read_text())
        if saved.get("identity") == identity:
            return saved
    return None


def _layer_features(
    model: Any, root: Path, train: list[Any], resolved: Any, n_layers: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """One forward pass over the train images: each layer's pooled features, and the labels
    of the images that could be read."""
    spec, cfg = resolved.spec, resolved.config
    outputs: list[list[np.ndarray]] = [[] for _ in range(n_layers)]
    labels: list[int] = []
    batches = iter_batches(
        root,
        [r.path for r in train],
        size=resolved.input_size,
        batch_size=cfg.batch_size,
        preprocess=spec.preprocess,
        workers=cfg.workers or default_workers(),
    )
    for batch in batches:
        n = len(batch.x)
        if n == 0:
            continue
        x = batch.x
        if n < cfg.batch_size:  # one compiled shape
            x = np.concatenate([x, np.zeros((cfg.batch_size - n, *x.shape[1:]), x.dtype)])
        for store, out in zip(outputs, model.predict_on_batch(x), strict=True):
            store.append(np.asarray(out, dtype=np.float32)[:n])
        labels += [train[batch.start + i].label for i in np.flatnonzero(batch.ok)]
    return [np.concatenate(store) for store in outputs], np.asarray(labels, dtype=np.int64)


def _score_layers(
    base: Any, chosen: list[str], outputs: list[np.ndarray], y: np.ndarray, *, folds: int, seed: int
) -> list[dict[str, Any]]:
    """A row per cut layer: where it is, its width, and the linear head's fold accuracies."""
    names = [lyr.name for lyr in base.layers]
    rows = []
    for depth, (name, x) in enumerate(zip(chosen, outputs, strict=True)):
        scores = cv_scores(x, y, folds=folds, seed=seed)
        rows.append(
            {
                "name": name,
                "depth": depth,
                "layer_index": names.index(name),
                "resolution": int(base.get_layer(name).output.shape[1]),
                "width": int(x.shape[1]),
                "cv_mean": float(scores.mean()),
                "cv_std": float(scores.std()),
                "fold_scores": [float(s) for s in scores],
            }
        )
    return rows


def _result(
    record: dict[str, Any], json_path: Path, png_path: Path, notes: list[str]
) -> ProbeResult:
    return ProbeResult(
        dataset=record["dataset"],
        backbone=record["backbone"],
        input_size=int(record["input_size"]),
        layers=record["layers"],
        n_train=int(record["n_train"]),
        folds=int(record["folds"]),
        seconds=float(record["seconds"]),
        json_path=json_path,
        png_path=png_path,
        notes=notes,
    )


def _png(figure: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def probe_figure(result: ProbeResult) -> Any:
    """Accuracy per depth with +-1 standard deviation of the folds (a matplotlib Figure, no pyplot)."""
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context({"text.parse_math": False}):  # layer names print as written
        figure = Figure(figsize=(6.4, 3.6))
        ax = figure.add_subplot()
        xs = np.arange(len(result.layers))
        means = np.array([row["cv_mean"] for row in result.layers])
        stds = np.array([row["cv_std"] for row in result.layers])
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=4, color="#1f77b4")
        best = result.layers.index(result.best)
        ax.plot([xs[best]], [means[best]], marker="*", markersize=14, color="#d62728", ls="none")
        ax.set_xticks(
            xs,
            [
                f"{r['name']}\n{r['resolution']}x{r['resolution']}, {r['width']}"
                for r in result.layers
            ],
            fontsize=7,
        )
        ax.set_ylabel(f"accuracy, {result.folds}-fold CV on train")
        ax.set_title(
            f"{result.dataset}: linear SVM per cut layer of {result.backbone} ({result.input_size} px)",
            fontsize=9,
        )
        ax.grid(axis="y", alpha=0.3)
    return figure
