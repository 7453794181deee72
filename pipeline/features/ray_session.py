"""The Ray cluster stage one and the head search run on: its options (:class:`RayConfig`),
the session that joins or starts it (:func:`ray_session`), and scikit-learn's fits sent to
it through joblib (:func:`joblib_on_ray`). Ray itself is imported only inside them."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.core.errors import PipelineError
from pipeline.core.options import check_options


@dataclass(frozen=True)
class RayConfig:
    """Where and how wide stage one runs on Ray (the ``ENGINE=ray`` make variables).

    Parameters
    ----------
    address : str, optional
        ``RAY_ADDRESS=``: join this running cluster (``auto``, ``ray://host:10001``,
        ``host:6379``). Unset: a local cluster is started for the run and shut
        down after it (an already connected session is used as it is).
    concurrency : int
        ``CONCURRENCY=``: backbone actors, one model each.
    gpus_per_actor : float, optional
        GPUs each actor asks for; default 1 where the cluster has GPUs, else 0.
    cpus_per_actor : float
        CPUs each actor asks for (its forward pass uses more threads than that).
    block_size : int, optional
        Records per block (one shard each); default ``BLOCK_BATCHES`` batches.
    actor_start_seconds : float
        How long the backbone actors may take to start (scheduled, model built)
        before the run stops with an error: a cluster without the CPUs or GPUs they
        ask for would otherwise wait for them for ever (Ray Data's default).
    """

    address: str | None = None
    concurrency: int = 1
    gpus_per_actor: float | None = None
    cpus_per_actor: float = 1.0
    block_size: int | None = None
    actor_start_seconds: float = 600.0

    def validate(self) -> None:
        check_options({"concurrency": self.concurrency})
        if self.block_size is not None and self.block_size < 1:
            raise PipelineError(f"block_size must be a whole number >= 1; got {self.block_size}")
        if not self.actor_start_seconds > 0:
            raise PipelineError(
                f"actor_start_seconds must be a positive number; got {self.actor_start_seconds}"
            )


def _import_ray():
    try:
        import ray
    except ImportError:
        raise PipelineError(
            "ENGINE=ray needs Ray: `pip install '.[ray]'` (or `make install`, which installs it)"
        ) from None
    return ray


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None) -> Iterator[Any]:
    """Connect to Ray for the duration of the block; yield the ``ray`` module.

    An already initialised session (a notebook, a test fixture) is used as it is
    and left running. With ``address`` the driver joins that cluster; without
    one a local cluster of ``num_cpus`` CPUs (default: this machine's) is
    started, quietly and without the dashboard, and shut down at the end.
    """
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
    on_term = signal.getsignal(signal.SIGTERM)
    if address:
        try:
            ray.init(address=address, **quiet)
        except ConnectionError as exc:
            raise PipelineError(
                f"cannot reach the Ray cluster at RAY_ADDRESS={address} ({exc}); start it "
                "(`ray start --head` or `ray up cluster.yaml`) or leave RAY_ADDRESS unset"
            ) from None
    else:
        ray.init(
            address="local",  # never an environment's RAY_ADDRESS: that one is passed as address
            num_cpus=num_cpus or os.cpu_count() or 1,
            include_dashboard=False,
            **quiet,
        )
    # Ray's driver turns SIGTERM into sys.exit, which waited on running fits for up to a
    # minute; the default ends the command at once and its watcher ends the cluster
    # (pipeline.core.processes).
    if on_term is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)
    try:
        yield ray
    finally:
        ray.shutdown()


@contextlib.contextmanager
def joblib_on_ray(address: str | None = None) -> Iterator[None]:
    """Run joblib's parallel work (scikit-learn's searches with ``n_jobs``) on Ray.

    Connects as :func:`ray_session` does, registers Ray's joblib backend and
    makes it the default inside the block. A search with ``n_jobs=1`` stays
    sequential: pass ``n_jobs=-1`` (every CPU of the cluster) or a number.
    """
    import joblib

    with ray_session(address):
        from ray.util.joblib import register_ray

        register_ray()
        with joblib.parallel_backend("ray"):
            yield
