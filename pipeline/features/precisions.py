"""Reduced precisions of stage one on OpenVINO: int8 quantization and the agreement check.

* **int8**: NNCF post-training quantization of the converted float32 model, calibrated on
  :data:`CALIBRATION_IMAGES` images of the user's own data; stored once per data set
  beside the conversion (``<store>/int8/<data>/model.xml``).
* **The agreement check** decides whether ``PRECISION=auto`` may take a reduced precision
  (``bf16``, ``int8``) on a data set. What matters to a user is a head's predictions, not
  each feature vector, so the rule is about predictions: on :data:`AGREEMENT_IMAGES`
  labelled images spread over the data set, a logistic regression is fitted on float32
  features in :data:`FOLDS` stratified folds; each held-out image is predicted from its
  float32 features and from its reduced-precision features. The precision passes when
  the two predictions agree on at least :data:`AGREEMENT_MIN` of the images and the
  reduced precision's correct count is at most :data:`ACCURACY_SLACK` image below float32's
  (more right is no reason to refuse it).
  Cost: two forward passes over the sample and five small fits (about 2 s on 2 cores).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.features.ov_model import OpenVINOModel

if TYPE_CHECKING:  # runtimes imports this module
    from pipeline.features.runtimes import ConversionStore, RuntimeChoice

AGREEMENT_IMAGES = 200  # labelled images the agreement check runs on
AGREEMENT_MIN = 0.99  # share of the sample whose predictions must agree with float32's
ACCURACY_SLACK = 1  # images the correct count may fall below float32's
FOLDS = 5
CALIBRATION_IMAGES = 160  # images int8's quantization measures activation ranges on
# PRECISION=auto takes a reduced precision on a data set only where its one-off cost there is
# paid back within the same run (measured on 2 cores, docs/benchmarks.md): int8's quantization
# and check, 12 to 22 s, against about 3 ms saved per image of the whole stage; bf16's check,
# about 2 s, against about 2.5 ms. Once paid (checked and stored), it is taken at any size.
AUTO_MIN_IMAGES = {"int8": 4000, "bf16": 1000}
ONE_OFF = {"int8": "quantization, 10 to 20 s,", "bf16": "check, about 2 s,"}


def nncf_installed() -> bool:
    """Whether the ``nncf`` package (int8 quantization) can be imported, without importing it."""
    return importlib.util.find_spec("nncf") is not None


def quantized_xml(store_dir: Path, data: str) -> Path:
    """Where the int8 model calibrated on the data set ``data`` lives."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "-", data) or "default"
    return store_dir / "int8" / safe / "model.xml"


def quantize(model_xml: Path, target: Path, calibration: np.ndarray) -> dict:
    """Quantize the float32 model ``model_xml`` to int8 (NNCF), calibrated on ``calibration``
    (a preprocessed batch); write it to ``target`` atomically; return what it cost."""
    import nncf
    import openvino as ov

    started = time.perf_counter()
    model = ov.Core().read_model(str(model_xml))
    samples = [calibration[i : i + 1] for i in range(len(calibration))]
    quantized = nncf.quantize(
        model, nncf.Dataset(samples), subset_size=len(samples), fast_bias_correction=True
    )
    target.parent.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".quantizing-", dir=target.parent.parent))
    try:
        ov.save_model(quantized, str(work / target.name))
        shutil.rmtree(target.parent, ignore_errors=True)
        work.replace(target.parent)  # readers see the whole model or none
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "quantize_seconds": round(time.perf_counter() - started, 2),
        "calibration_images": len(samples),
    }


def head_agreement(reference: np.ndarray, reduced: np.ndarray, labels: np.ndarray) -> dict:
    """The agreement rule (module docstring) on float32 features ``reference`` and the same
    images' reduced-precision features ``reduced``; a dict with ``passed`` and its figures."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels)
    _, counts = np.unique(labels, return_counts=True)
    folds = min(FOLDS, int(counts.min())) if len(counts) else 0
    if len(counts) < 2 or folds < 2:
        return {
            "passed": False,
            "images": len(labels),
            "reason": "the sample needs two classes with at least two images each",
        }
    pred_ref = np.empty_like(labels)
    pred_red = np.empty_like(labels)
    splits = StratifiedKFold(folds, shuffle=True, random_state=0).split(reference, labels)
    for train, test in splits:
        head = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        head.fit(reference[train], labels[train])
        pred_ref[test] = head.predict(reference[test])
        pred_red[test] = head.predict(reduced[test])
    agreement = float(np.mean(pred_ref == pred_red))
    correct_ref, correct_red = int(np.sum(pred_ref == labels)), int(np.sum(pred_red == labels))
    return {
        "passed": bool(agreement >= AGREEMENT_MIN and correct_ref - correct_red <= ACCURACY_SLACK),
        "rule": "agreement",
        "images": len(labels),
        "agreement": round(agreement, 4),
        "correct_float32": correct_ref,
        "correct_reduced": correct_red,
        "cosine_min": round(cosine_min(reduced, reference), 6),
    }


def payback_note(precision: str, images: int) -> str | None:
    """Why ``PRECISION=auto`` leaves ``precision`` out on a new data set of ``images`` images
    (its one-off cost would not pay back), or ``None`` where it pays."""
    least = AUTO_MIN_IMAGES.get(precision)
    if least is None or images >= least:
        return None
    return f"{precision}'s one-off {ONE_OFF[precision]} pays back from {least:,} images"


def auto_reason(precision: str, check: dict | None, unpaid: list[str], images: int | None) -> str:
    """The runtime line's reason for what ``PRECISION=auto`` took (``check``: the precision's
    recorded agreement check; ``unpaid``: the :func:`payback_note` of those left out)."""
    if precision == "fp32" and unpaid:
        return f"PRECISION=auto: {', '.join(unpaid)}; this data set has {images:,}"
    if precision == "fp32" or check is None:
        return ""  # the plain line (fp32 without a reduced precision here; a check to come)
    return (
        f"PRECISION=auto: the fastest that passes the agreement check here, "
        f"{check['agreement']:.1%} of {check['images']} predictions as float32's"
    )


def describe_failure(precision: str, check: dict[str, Any], data: str) -> str:
    """Why a recorded agreement check failed, in one line."""
    if "agreement" not in check:
        return f"{precision} could not be checked on {data}: {check.get('reason', 'no sample')}"
    return (
        f"{precision} features change a linear head's predictions on {data}: "
        f"{check['agreement']:.1%} of {check['images']} images agree with float32 "
        f"(at least {AGREEMENT_MIN:.0%} needed), {check['correct_reduced']} correct against "
        f"{check['correct_float32']}"
    )


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest row-wise cosine between two feature matrices (1.0 for two zero rows)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = (a * b).sum(1) / np.maximum(na * nb, 1e-30)
    return float(np.where(both_zero, 1.0, cos).min()) if len(a) else 1.0


def cosine_median(a: np.ndarray, b: np.ndarray) -> float:
    """Median row-wise cosine between two feature matrices."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return float(np.median(cos)) if len(a) else 1.0


@dataclass(frozen=True)
class Sample:
    """The user's images a reduced precision is checked and calibrated on (preprocessed)."""

    x: np.ndarray  # the agreement check's images
    labels: np.ndarray
    paths: list[str]
    calibration: np.ndarray  # int8's calibration images (others where the data set allows)


def check_reduced(store: ConversionStore, choice: RuntimeChoice, sample: Sample, data: str) -> dict:
    """Quantize (int8, once per data set) and run the agreement check of ``choice.precision``
    against OpenVINO float32 on ``sample``; record and return it."""
    result: dict = {"data": data, "paths": sample.paths}
    if choice.precision == "int8":
        xml = Path(choice.model_xml)
        result.update(quantize(store.model_xml, xml, sample.calibration))
    else:
        xml = store.model_xml
    reference = OpenVINOModel(store.model_xml, "fp32").predict_on_batch(sample.x)
    reduced = OpenVINOModel(xml, choice.precision).predict_on_batch(sample.x)
    result.update(head_agreement(reference, reduced, sample.labels))
    store.record_check(data, choice.precision, result)
    return result
