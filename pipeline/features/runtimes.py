"""The inference-runtime registry of stage one: who runs the frozen backbone.

* ``keras``: the Keras model itself (``predict_on_batch``), every backend.
* ``openvino``: the same headless Keras model exported to OpenVINO IR
  (``model.export(path, format="openvino")``, Keras's own exporter, which goes
  through a traced ``tf.function`` on TensorFlow and JAX and through TorchScript
  on torch), compiled for the CPU with ``INFERENCE_PRECISION_HINT`` ``f32`` or
  ``bf16``.

``RUNTIME=auto`` (the default) takes the first candidate of
:func:`candidates` that is installed, converts the backbone and passes the
check: the features of :data:`CHECK_IMAGES` images of the user's data keep a
cosine of at least :data:`CHECK_COSINE` to Keras's float32 features. The
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
import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.artifacts import Artifacts
from pipeline.core.errors import PipelineError
from pipeline.core.files import pid_alive, write_json_atomic

CHECK_COSINE = 0.998  # smallest cosine to Keras float32 features a runtime may have
CHECK_IMAGES = 16  # images of the user's data the check runs on
META_VERSION = 1
# OpenVINO's names of our precisions (``INFERENCE_PRECISION_HINT``).
_OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}
# A conversion's work folder of another machine, or unnamed, is litter after this long.
STALE_CONVERSION_SECONDS = 3600.0
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_CONVERTING = re.compile(r"^\.converting-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-")


# PRECISION= words -> the compute precisions the runtimes take (and cache names carry).
COMPUTE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# Keras runs a compute precision as a dtype policy (float32 variables, reduced compute).
KERAS_POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


@dataclass(frozen=True)
class RuntimeChoice:
    """The runtime and compute precision stage one runs with, and why (``notes``, printed)."""

    runtime: str = "keras"  # "keras" or "openvino"
    precision: str = "fp32"  # "fp32", "bf16" or "fp16": the backbone's compute precision
    notes: tuple[str, ...] = ()

    @property
    def keras_policy(self) -> str:
        """The Keras dtype policy of this precision (``float32``, ``mixed_bfloat16`` ...)."""
        return KERAS_POLICIES[self.precision]


def precision_tag(precision: str) -> str:
    """A cache name's precision part: empty for ``fp32``, else ``bf16`` or ``fp16``.

    Every runtime's float32 features agree with Keras's within the check's tolerance
    (a cosine of :data:`CHECK_COSINE`), so they share one cache; reduced precisions
    change the numbers beyond it and get caches of their own.
    """
    return "" if precision == "fp32" else precision


def compute_precisions(precision: str) -> list[str]:
    """The compute precisions ``PRECISION=`` allows, in the order ``auto`` tries them."""
    return ["bf16", "fp32"] if precision == "auto" else [COMPUTE[precision]]


# --------------------------------------------------------------------------- capabilities


def openvino_installed() -> bool:
    """Whether the ``openvino`` package can be imported (without importing it)."""
    return importlib.util.find_spec("openvino") is not None


@functools.cache
def cpu_capabilities() -> tuple[str, ...]:
    """OpenVINO's ``OPTIMIZATION_CAPABILITIES`` of the CPU (``("BF16", "FP32", ...)``)."""
    if not openvino_installed():
        return ()
    import openvino as ov

    return tuple(str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512_BF16 or AMX), per OpenVINO."""
    return "BF16" in cpu_capabilities()


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
    remove_stale_conversions(store.directory.parent)
    meta = store.meta()
    if meta is not None:
        return meta
    store.directory.parent.mkdir(parents=True, exist_ok=True)
    # Named by its owner (pid, machine), so the next run can tell a killed run's leftovers.
    prefix = f".converting-{os.getpid()}-{_HOST}-"
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=store.directory.parent))
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


def remove_stale_conversions(folder: str | Path) -> list[Path]:
    """Remove the work folders of conversions whose process has ended (killed mid-export).

    A folder of this machine goes once its process is gone; one of another machine
    (a shared artifacts folder) or named before the owner was recorded, once it is
    older than :data:`STALE_CONVERSION_SECONDS`. Returns the folders removed.
    """
    removed = []
    for work in Path(folder).glob(".converting-*"):
        owner = _CONVERTING.match(work.name)
        if owner and owner["host"] == _HOST:
            stale = not pid_alive(int(owner["pid"]))
        else:
            try:
                stale = time.time() - work.stat().st_mtime > STALE_CONVERSION_SECONDS
            except OSError:
                continue
        if stale:
            shutil.rmtree(work, ignore_errors=True)
            removed.append(work)
    return removed


# --------------------------------------------------------------------------- choosing


def candidates(runtime: str, precision: str) -> list[tuple[str, str]]:
    """``(runtime, compute precision)`` pairs to try, fastest first.

    OpenVINO runs ``fp32`` and ``bf16`` on the CPU; Keras runs what was asked for
    (``auto`` is ``fp32`` there: a reduced precision on Keras pays off on GPUs only).
    """
    wanted = compute_precisions(precision)
    keras = [("keras", "fp32" if precision == "auto" else wanted[0])]
    if runtime == "keras":
        return keras
    openvino = [("openvino", p) for p in wanted if p in _OV_PRECISION]
    return openvino + keras if runtime == "auto" else openvino


def _why_not_openvino(precision: str, meta: dict | None) -> str | None:
    if not openvino_installed():
        return "the openvino package is not installed (pip install openvino)"
    if precision == "float16":
        return "OpenVINO on the CPU has no float16 (PRECISION=float16 is for GPUs, on Keras)"
    if meta is not None and not meta.get("converted"):
        return f"the backbone does not convert to OpenVINO ({meta.get('error')})"
    return None


def choose(
    runtime: str,
    precision: str,
    *,
    store: ConversionStore | None = None,
    random_weights: bool = False,
    data: str = "",
) -> RuntimeChoice:
    """Pick the runtime from what is installed, the CPU and what ``store`` recorded.

    Cheap (no conversion, no Keras): candidates whose conversion or check (on the
    images of ``data``) has not run yet are taken optimistically; :func:`settle`
    runs them. ``auto`` with random weights (``WEIGHTS=none``, a baseline) stays on Keras.

    Raises
    ------
    PipelineError
        ``RUNTIME=openvino`` where it cannot run (not installed, ``PRECISION=float16``,
        a recorded conversion failure).
    """
    explicit = runtime != "auto"
    keras = RuntimeChoice(*candidates("keras", precision)[0])
    meta = store.meta() if store is not None else None
    if runtime == "keras" or (random_weights and not explicit):
        # Random weights are a baseline, not worth a conversion; their features are
        # near zero, so the cosine check would say little.
        return keras
    why_not = _why_not_openvino(precision, meta)
    if why_not:
        if explicit:
            raise PipelineError(f"RUNTIME=openvino cannot run: {why_not}; use RUNTIME=keras")
        return replace(keras, notes=(f"runtime: keras, because {why_not}",))
    notes: list[str] = []
    for name, prec in candidates(runtime, precision):
        if name == "keras":
            return replace(keras, notes=tuple(notes))
        if prec == "bf16" and not cpu_supports_bf16():
            if precision == "bfloat16":
                notes.append("PRECISION=bfloat16: this CPU has no native bfloat16; using float32")
                return RuntimeChoice(name, "fp32", tuple(notes))
            continue
        check = _recorded_check(meta, data, prec)
        if check is not None and not check["passed"]:
            failed = (
                f"openvino {prec} features have a cosine of {check['cosine_min']:.4f} to Keras "
                f"float32 on {check['images']} images of {data} (below {CHECK_COSINE})"
            )
            if precision == "auto":
                notes.append(f"runtime: {failed}; not used")
                continue
            notes.append(f"warning: {failed}; used because PRECISION={precision} was asked for")
        return RuntimeChoice(name, prec, tuple(notes))
    return replace(keras, notes=tuple(notes))


def _recorded_check(meta: dict | None, data: str, precision: str) -> dict | None:
    """The check of ``precision`` on the images of ``data``, if one was recorded."""
    return ((meta or {}).get("checks", {}).get(data) or {}).get(precision)


def describe(choice: RuntimeChoice) -> str:
    """One line for the output: ``runtime: openvino 2026.4.1, bf16 (native on this CPU)``."""
    if choice.runtime == "keras":
        return "runtime: keras" + ("" if choice.precision == "fp32" else f", {choice.keras_policy}")
    if choice.precision == "bf16":
        why = "bfloat16, native on this CPU"
    elif not cpu_supports_bf16():
        why = "float32: this CPU has no native bfloat16"
    else:
        why = "float32"
    return f"runtime: openvino {openvino_version()}, {choice.precision} ({why})"


def openvino_version() -> str:
    return _version("openvino")


# --------------------------------------------------------------------------- the model


class OpenVINOModel:
    """A compiled OpenVINO model with the two members stage one uses of a Keras model.

    ``output_shape`` and ``predict_on_batch(x) -> ndarray``. Compiled with
    ``PERFORMANCE_HINT=THROUGHPUT``: OpenVINO picks a number of streams for the
    CPU (2 on 2 cores), and each batch is split into one slice per stream, run
    in parallel. Measured on 2 cores (MobileNetV2, 224, fp32, interleaved rounds):
    1.7 times the images/s of one synchronous request with ``LATENCY``.
    """

    def __init__(self, xml: str | Path, precision: str, *, cache_dir: str | Path | None = None):
        import openvino as ov

        core = ov.Core()
        if cache_dir is not None:  # compiled blobs: a later run skips most of the compile
            core.set_property({"CACHE_DIR": str(cache_dir)})
        self.precision = precision
        self.compiled = core.compile_model(
            str(xml),
            "CPU",
            {
                "INFERENCE_PRECISION_HINT": _OV_PRECISION[precision],
                "PERFORMANCE_HINT": "THROUGHPUT",
            },
        )
        streams = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.requests = [self.compiled.create_infer_request() for _ in range(max(1, streams))]
        width = self.compiled.outputs[0].get_partial_shape()[-1].get_length()
        self.output_shape = (None, int(width))

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        slices = np.array_split(x, min(len(self.requests), max(1, len(x))))
        running = list(zip(self.requests, slices, strict=False))  # fewer slices than requests
        for request, part in running:
            request.start_async({0: part})
        for request, _ in running:
            request.wait()
        return np.concatenate([r.get_output_tensor(0).data.copy() for r, _ in running])


def load(choice: RuntimeChoice, store: ConversionStore) -> OpenVINOModel:
    """The compiled model of ``store`` at ``choice.precision``."""
    return OpenVINOModel(store.model_xml, choice.precision, cache_dir=store.directory / "compiled")


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest row-wise cosine between two feature matrices (1.0 for two zero rows)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = (a * b).sum(1) / np.maximum(na * nb, 1e-30)
    return float(np.where(both_zero, 1.0, cos).min()) if len(a) else 1.0


def _cosine_median(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return float(np.median(cos)) if len(a) else 1.0


def check(
    store: ConversionStore,
    precisions: Sequence[str],
    keras_model: Any,
    x: np.ndarray,
    *,
    data: str = "",
    paths: Sequence[str] = (),
) -> dict[str, dict]:
    """Compare the runtime's features with Keras float32's on ``x`` (the images ``paths`` of
    the data set ``data``); record and return them."""
    reference = np.asarray(keras_model.predict_on_batch(x), np.float32)
    results = {}
    for precision in precisions:
        got = OpenVINOModel(store.model_xml, precision).predict_on_batch(x)
        cos = cosine_min(got, reference)
        results[precision] = {
            "cosine_min": round(cos, 6),
            "cosine_median": round(_cosine_median(got, reference), 6),
            "passed": bool(cos >= CHECK_COSINE),
            "images": len(x),
            "data": data,
            "paths": list(paths),
            "threshold": CHECK_COSINE,
        }
        store.record_check(data, precision, results[precision])
    return results


def settle(
    runtime: str,
    precision: str,
    *,
    store: ConversionStore,
    random_weights: bool = False,
    build_keras: Callable[[], Any],
    sample: Callable[[], tuple[np.ndarray, list[str]]],
    data: str = "",
) -> RuntimeChoice:
    """:func:`choose`, after converting and checking what the choice needs (once, recorded).

    ``build_keras`` builds the Keras float32 model (for the conversion and the
    reference features); ``sample`` returns a preprocessed batch of the user's
    images and their paths, for the check, which runs once per data set ``data``.
    Neither is called when ``store`` already holds both.
    """
    # The choice reads what ``store`` holds: asked again after each conversion and check.
    choose_now = functools.partial(
        choose, runtime, precision, store=store, random_weights=random_weights, data=data
    )
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
        if _recorded_check(meta, data, choice.precision) is not None:
            break
        x, paths = sample()
        check(store, [choice.precision], keras_once(), x, data=data, paths=paths)
        choice = choose_now()
    notes += [n for n in choice.notes if n not in notes]
    return RuntimeChoice(choice.runtime, choice.precision, tuple(notes))
