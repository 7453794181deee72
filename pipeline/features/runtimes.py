"""The inference-runtime registry of stage one: who runs the frozen backbone.

* ``keras``: the Keras model itself (``predict_on_batch``), every backend.
* ``openvino``: the same headless Keras model exported to OpenVINO IR
  (``model.export(path, format="openvino")``, Keras's own exporter, which goes
  through a traced ``tf.function`` on TensorFlow and JAX and through TorchScript
  on torch), compiled for the CPU with ``INFERENCE_PRECISION_HINT`` ``f32`` or
  ``bf16``, or quantized to ``int8`` on the user's images
  (:mod:`pipeline.features.precisions`, NNCF).

``RUNTIME=auto`` (the default) takes the first candidate of
:func:`candidates` (int8, bf16, fp32: fastest first) that is installed, converts
the backbone and passes two checks: the conversion's, where float32 features of
:data:`CHECK_IMAGES` images of the user's data keep a cosine of at least
:data:`CHECK_COSINE` to Keras's; and, for a reduced precision, the agreement
check (:func:`pipeline.features.precisions.head_agreement`): a linear head's
predictions on a labelled sample agree with float32's, taken by ``PRECISION=auto`` where
its one-off cost on a new data set pays back (:func:`precisions.payback_note`). The
converted model is stored once per backbone, weights, input size, pooling and
layer under ``artifacts/runtimes/openvino/<key>/`` (``model.xml``, ``model.bin``,
``meta.json``); each data set's check is recorded there with the images it ran on,
so later runs neither convert nor import Keras. Everything that fails (no
``openvino`` package, a conversion error, a failed check, ``PRECISION=float16``)
falls back to ``keras`` with a note saying why.

The runtime is execution, not identity: float32 features of every runtime share
one cache (:func:`precision_tag`), and later stages find it from the
configuration alone, without choosing a runtime again.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.artifacts import Artifacts
from pipeline.core.errors import PipelineError
from pipeline.core.files import make_work_folder, remove_stale_work_folders, write_json_atomic
from pipeline.features import precisions
from pipeline.features.ov_model import (  # re-exported: the runtime's capabilities
    OV_PRECISION,
    OpenVINOModel,
    cpu_capabilities,  # noqa: F401
    cpu_supports_bf16,
    openvino_installed,
)

CHECK_COSINE = 0.998  # smallest cosine to Keras float32 features a runtime may have
CHECK_IMAGES = 16  # images of the user's data the check runs on
META_VERSION = 1


# PRECISION= words -> the compute precisions the runtimes take (and cache names carry).
COMPUTE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int8": "int8"}
# Keras runs a compute precision as a dtype policy (float32 variables, reduced compute).
KERAS_POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


@dataclass(frozen=True)
class RuntimeChoice:
    """The runtime and compute precision stage one runs with, and why (``notes``, printed)."""

    runtime: str = "keras"  # "keras" or "openvino"
    precision: str = "fp32"  # "fp32", "bf16", "fp16" or "int8": the backbone's compute precision
    notes: tuple[str, ...] = ()
    model_xml: str = ""  # int8: the model quantized on this data set's images
    reason: str = ""  # PRECISION=auto: why this precision, for the runtime's line

    @property
    def keras_policy(self) -> str:
        """The Keras dtype policy of this precision (``float32``, ``mixed_bfloat16`` ...)."""
        return KERAS_POLICIES[self.precision]


def precision_tag(precision: str) -> str:
    """A cache name's precision part: empty for ``fp32``, else ``bf16``, ``fp16`` or ``int8``.

    Every runtime's float32 features agree with Keras's within the check's tolerance
    (a cosine of :data:`CHECK_COSINE`), so they share one cache; reduced precisions
    change the numbers beyond it and get caches of their own.
    """
    return "" if precision == "fp32" else precision


# What PRECISION=auto tries, fastest first: each reduced precision where the runtime has it, it
# passes the agreement check and its one-off cost pays back (precisions.payback_note). Their
# heads' val accuracy moves no more than a float32 rerun's (docs/benchmarks.md).
AUTO_PRECISIONS = ("int8", "bf16", "fp32")


def compute_precisions(precision: str) -> list[str]:
    """The compute precisions ``PRECISION=`` allows, fastest first."""
    return list(AUTO_PRECISIONS) if precision == "auto" else [COMPUTE[precision]]


# --------------------------------------------------------------------------- the store


@dataclass(frozen=True)
class ConversionStore:
    """The converted model of one backbone configuration, on disk.

    ``directory`` is ``<artifacts>/runtimes/openvino/<stem>_<hash>``; the hash
    covers everything the converted graph depends on (:meth:`identity`).
    """

    directory: Path
    identity: dict

    @classmethod
    def for_config(
        cls,
        artifacts_dir: str | Path,
        *,
        backbone: str,
        weights_id: str,
        weights_tag: str,
        input_size: int,
        pooling: str,
        layer: str | None,
    ) -> ConversionStore:
        identity = {
            "meta_version": META_VERSION,
            "backbone": backbone,
            "weights": weights_id,
            "input_size": input_size,
            "pooling": pooling,
            "layer": layer or "",
            "openvino": _version("openvino"),
            "keras": _version("keras"),
        }
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
        layer_part = "".join(c if c.isalnum() else "-" for c in layer) + "_" if layer else ""
        stem = f"{backbone}_{input_size}_{pooling}_{layer_part}{weights_tag}_{digest}"
        return cls(Artifacts(artifacts_dir).runtime_dir("openvino", stem), identity)

    @property
    def model_xml(self) -> Path:
        return self.directory / "model.xml"

    @property
    def meta_path(self) -> Path:
        return self.directory / "meta.json"

    def meta(self) -> dict | None:
        """The recorded conversion and checks, or ``None`` (absent, unreadable, another identity)."""
        try:
            meta = json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return None
        if meta.get("identity") != self.identity:
            return None
        if meta.get("converted") and not (
            self.model_xml.is_file() and self.model_xml.with_suffix(".bin").is_file()
        ):
            return None  # files removed by hand: convert again
        return meta

    def record_check(self, data: str, precision: str, result: dict) -> None:
        """Record a check's result, by data set: each data set is checked on its own images."""
        meta = self.meta() or {}
        meta.setdefault("checks", {}).setdefault(data, {})[precision] = result
        write_json_atomic(self.meta_path, meta)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def convert(store: ConversionStore, build_keras: Callable[[], Any]) -> dict:
    """Export the Keras model to OpenVINO IR in ``store`` unless already there; return the meta.

    A failed conversion is recorded too (``"converted": false`` with the
    reason), so later runs fall back at once instead of converting again.
    """
    remove_stale_work_folders(store.directory.parent, "converting")
    meta = store.meta()
    if meta is not None:
        return meta
    store.directory.parent.mkdir(parents=True, exist_ok=True)
    work = make_work_folder(store.directory.parent, "converting")
    started = time.perf_counter()
    try:
        model = build_keras()
        import keras

        meta = {"identity": store.identity, "keras_backend": keras.backend.backend()}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Keras's input-structure chatter when tracing
                model.export(str(work / "model.xml"), format="openvino", verbose=False)
            meta.update(converted=True, error="")
        except Exception as exc:  # an op the converter lacks, a backend it cannot trace
            reason = " ".join(str(exc).split())[:300] or type(exc).__name__
            meta.update(converted=False, error=f"{type(exc).__name__}: {reason}")
        meta["convert_seconds"] = round(time.perf_counter() - started, 2)
        meta["checks"] = {}
        write_json_atomic(work / "meta.json", meta)
        try:
            os.replace(work, store.directory)  # atomic: readers see all files or none
        except OSError:  # another run finished first, or an old store is in the way
            if store.meta() is None:
                shutil.rmtree(store.directory, ignore_errors=True)
                os.replace(work, store.directory)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return store.meta() or meta


# --------------------------------------------------------------------------- choosing


def candidates(runtime: str, precision: str) -> list[tuple[str, str]]:
    """``(runtime, compute precision)`` pairs to try, fastest first.

    OpenVINO runs ``fp32``, ``bf16`` and ``int8`` on the CPU; Keras runs what was asked
    for (``auto`` is ``fp32`` there: a reduced precision on Keras pays off on GPUs only).
    """
    wanted = compute_precisions(precision)
    keras = [("keras", "fp32" if precision in ("auto", "int8") else wanted[0])]
    if runtime == "keras":
        return keras
    openvino = [("openvino", p) for p in wanted if p in OV_PRECISION]
    return openvino + keras if runtime == "auto" else openvino


def keras_choice(precision: str) -> RuntimeChoice:
    """Keras at ``PRECISION=precision``; int8, which Keras cannot run, is float32 with a note
    (fine-tuning's own Keras runs of an int8 configuration compute float32 so, on purpose)."""
    choice = RuntimeChoice(*candidates("keras", precision)[0])
    if precision == "int8":
        note = "PRECISION=int8 runs on OpenVINO only (RUNTIME=auto); RUNTIME=keras computes float32"
        choice = replace(choice, notes=(note,))
    return choice


def _why_not_openvino(precision: str, meta: dict | None) -> str | None:
    if not openvino_installed():
        return "the openvino package is not installed (pip install openvino)"
    if precision == "float16":
        return "OpenVINO on the CPU has no float16 (PRECISION=float16 is for GPUs, on Keras)"
    if meta is not None and not meta.get("converted"):
        return f"the backbone does not convert to OpenVINO ({meta.get('error')})"
    return None


NO_NNCF = "int8 needs the nncf package (pip install nncf)"


def choose(
    runtime: str,
    precision: str,
    *,
    store: ConversionStore | None = None,
    random_weights: bool = False,
    data: str = "",
    images: int | None = None,
) -> RuntimeChoice:
    """Pick the runtime from what is installed, the CPU and what ``store`` recorded.

    Cheap (no conversion, no Keras): candidates whose conversion or checks (on the
    images of ``data``) have not run yet are taken optimistically; :func:`settle`
    runs them. ``auto`` with random weights (``WEIGHTS=none``, a baseline) stays on Keras;
    ``auto`` on a data set of ``images`` images (when known) leaves out a reduced precision
    not yet checked on it whose one-off cost would not pay back (:func:`precisions.payback_note`).

    Raises
    ------
    PipelineError
        ``RUNTIME=openvino`` where it cannot run (not installed, ``PRECISION=float16``,
        a recorded conversion failure); ``PRECISION=int8`` where OpenVINO or NNCF cannot run.
    """
    explicit = runtime != "auto"
    meta = store.meta() if store is not None else None
    if precision == "int8" and runtime != "keras":
        _check_int8(meta, random_weights)
    keras = keras_choice(precision)
    if runtime == "keras" or (random_weights and not explicit):
        # Random weights are a baseline, not worth a conversion; their features are
        # near zero, so the checks would say little.
        return keras
    why_not = _why_not_openvino(precision, meta)
    if why_not:
        if explicit:
            raise PipelineError(f"RUNTIME=openvino cannot run: {why_not}; use RUNTIME=keras")
        return replace(keras, notes=(f"runtime: keras, because {why_not}",))
    notes: list[str] = []
    conversion = _recorded_check(meta, data, "fp32")  # the conversion's own check
    if conversion is not None and not conversion["passed"]:
        failed = (
            f"openvino features have a cosine of {conversion['cosine_min']:.4f} to Keras "
            f"float32 on {conversion['images']} images of {data} (below {CHECK_COSINE})"
        )
        if not explicit:
            return replace(keras, notes=(f"runtime: {failed}; not used",))
        notes.append(f"warning: {failed}; used because RUNTIME={runtime} was asked for")
    unpaid: list[str] = []  # auto: reduced precisions whose one-off cost would not pay back
    for name, prec in candidates(runtime, precision):
        if name == "keras":
            return replace(keras, notes=tuple(notes))
        if prec == "bf16" and not cpu_supports_bf16():
            if precision == "bfloat16":
                notes.append("PRECISION=bfloat16: this CPU has no native bfloat16; using float32")
                return RuntimeChoice(name, "fp32", tuple(notes))
            continue
        if prec == "int8" and not precisions.nncf_installed():
            notes.append(f"runtime: {NO_NNCF}; not tried")  # auto only: int8 asked for raised
            continue
        check = _recorded_check(meta, data, prec) if prec != "fp32" else None
        if precision == "auto" and check is None and prec != "fp32" and images is not None:
            why = precisions.payback_note(prec, images)
            if why:
                unpaid.append(why)
                continue
        if check is not None and not check["passed"]:
            failed = precisions.describe_failure(prec, check, data)
            if precision == "auto":
                notes.append(f"runtime: {failed}; not used")
                continue
            notes.append(f"warning: {failed}; used because PRECISION={precision} was asked for")
        model_xml = ""
        if prec == "int8" and store is not None:
            model_xml = str(precisions.quantized_xml(store.directory, data))
        reason = precisions.auto_reason(prec, check, unpaid, images) if precision == "auto" else ""
        return RuntimeChoice(name, prec, tuple(notes), model_xml, reason)
    return replace(keras, notes=tuple(notes))


def _check_int8(meta: dict | None, random_weights: bool) -> None:
    """``PRECISION=int8`` asked for where it cannot run: one line saying why."""
    why_not = _why_not_openvino("int8", meta) or (None if precisions.nncf_installed() else NO_NNCF)
    if why_not or random_weights:
        why_not = why_not or "WEIGHTS=none (random weights) is a baseline, not quantized"
        raise PipelineError(
            f"PRECISION=int8 cannot run: {why_not}; int8 runs on OpenVINO (RUNTIME=auto)"
        )


def _recorded_check(meta: dict | None, data: str, precision: str) -> dict | None:
    """The check of ``precision`` on the images of ``data``, if one was recorded (a reduced
    precision's cosine check of an earlier version does not count: it runs again)."""
    found = ((meta or {}).get("checks", {}).get(data) or {}).get(precision)
    if found is not None and precision != "fp32" and found.get("rule") != "agreement":
        return None
    return found


def describe(choice: RuntimeChoice) -> str:
    """One line for the output: ``runtime: openvino 2026.4.1, bf16 (native on this CPU)``."""
    if choice.runtime == "keras":
        return "runtime: keras" + ("" if choice.precision == "fp32" else f", {choice.keras_policy}")
    if choice.reason:
        why = choice.reason
    elif choice.precision == "int8":
        why = "int8, quantized on this data set's images"
    elif choice.precision == "bf16":
        why = "bfloat16, native on this CPU"
    elif not cpu_supports_bf16():
        why = "float32: this CPU has no native bfloat16"
    else:
        why = "float32"
    return f"runtime: openvino {openvino_version()}, {choice.precision} ({why})"


def openvino_version() -> str:
    return _version("openvino")


# --------------------------------------------------------------------------- the model


def load(choice: RuntimeChoice, store: ConversionStore) -> OpenVINOModel:
    """The compiled model of ``store`` at ``choice.precision`` (int8: the quantized one)."""
    xml = choice.model_xml if choice.precision == "int8" else store.model_xml
    return OpenVINOModel(xml, choice.precision, cache_dir=store.directory / "compiled")


cosine_min = precisions.cosine_min


def check(
    store: ConversionStore,
    checked: Sequence[str],
    keras_model: Any,
    x: np.ndarray,
    *,
    data: str = "",
    paths: Sequence[str] = (),
) -> dict[str, dict]:
    """The conversion's check: compare the runtime's features with Keras float32's on ``x``
    (the images ``paths`` of the data set ``data``) by cosine; record and return them."""
    reference = np.asarray(keras_model.predict_on_batch(x), np.float32)
    results = {}
    for precision in checked:
        got = OpenVINOModel(store.model_xml, precision).predict_on_batch(x)
        cos = cosine_min(got, reference)
        results[precision] = {
            "cosine_min": round(cos, 6),
            "cosine_median": round(precisions.cosine_median(got, reference), 6),
            "passed": bool(cos >= CHECK_COSINE),
            "images": len(x),
            "data": data,
            "paths": list(paths),
            "threshold": CHECK_COSINE,
        }
        store.record_check(data, precision, results[precision])
    return results


def _checked(meta: dict, data: str, choice: RuntimeChoice) -> bool:
    """Whether ``choice`` needs no more checking on ``data`` (int8: its model is there too)."""
    if _recorded_check(meta, data, "fp32") is None:
        return False  # the conversion's own check comes first, whatever the precision
    if choice.precision == "fp32":
        return True
    if choice.precision == "int8" and not Path(choice.model_xml).is_file():
        return False  # quantized model removed by hand: quantize and check again
    return _recorded_check(meta, data, choice.precision) is not None


def settle(
    runtime: str,
    precision: str,
    *,
    store: ConversionStore,
    random_weights: bool = False,
    build_keras: Callable[[], Any],
    sample: Callable[[], tuple[np.ndarray, list[str]]],
    reduced_sample: Callable[[], precisions.Sample | None] | None = None,
    data: str = "",
    images: int | None = None,
) -> RuntimeChoice:
    """:func:`choose`, after converting and checking what the choice needs (once, recorded).

    ``build_keras`` builds the Keras float32 model (for the conversion and the
    reference features); ``sample`` returns a preprocessed batch of the user's
    images and their paths, for the conversion's check; ``reduced_sample`` a labelled
    :class:`~pipeline.features.precisions.Sample` for a reduced precision's agreement check (and int8's calibration).
    The checks run once per data set ``data`` (of ``images`` images, for ``auto``'s pay-back
    rule); nothing is called when ``store`` already holds them. Without ``reduced_sample`` (or a sample), ``auto`` stays at float32.
    """
    if precision == "auto" and reduced_sample is None:
        precision = "float32"
    # The choice reads what ``store`` holds: asked again after each conversion and check.
    options = {"store": store, "random_weights": random_weights, "data": data, "images": images}
    choose_now = functools.partial(choose, runtime, precision, **options)
    choice = choose_now()
    keras_model = None

    def keras_once() -> Any:
        nonlocal keras_model
        if keras_model is None:
            keras_model = build_keras()
        return keras_model

    notes = list(choice.notes)
    while choice.runtime == "openvino":
        meta = convert(store, keras_once)
        if not meta.get("converted"):
            return choose_now()
        if _checked(meta, data, choice):
            break
        if _recorded_check(meta, data, "fp32") is None:
            x, paths = sample()
            check(store, ["fp32"], keras_once(), x, data=data, paths=paths)
        elif choice.precision != "fp32":
            labelled = reduced_sample() if reduced_sample is not None else None
            if labelled is None and precision == "auto":
                notes.append("runtime: no labelled sample to check reduced precisions on")
                precision = "float32"
                choose_now = functools.partial(choose, runtime, precision, **options)
            elif labelled is None:
                break  # asked for: used unchecked
            else:
                precisions.check_reduced(store, choice, labelled, data)
        choice = choose_now()
    notes += [n for n in choice.notes if n not in notes]
    return replace(choice, notes=tuple(notes))
