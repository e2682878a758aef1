"""Ray: a local instance by default, an existing cluster when ``RAY_ADDRESS`` (or an address) is given."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


def ensure_ray(address: str | None = None) -> None:
    """Connect once per process. ``address="local"`` never attaches to a stray cluster. A cluster
    gets the job's runtime_env (``infra.cluster.runtime_env``) and its nodes are checked to run the
    driver's code and library versions (``infra.cluster.check_nodes``) before any work."""
    import ray

    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    if target == "local":
        kwargs["num_cpus"] = int(os.environ.get("DAYBREAK_RAY_CPUS", os.cpu_count() or 2))
    else:
        from daybreak.infra.cluster import runtime_env

        kwargs["runtime_env"] = runtime_env()  # code shipping, if asked for: never credentials
    log.info("starting Ray (%s)", "local" if target == "local" else "cluster")
    ray.init(address=target, **kwargs)
    if target != "local":
        from daybreak.infra.cluster import check_nodes

        try:
            fingerprints = check_nodes()
        except BaseException:
            ray.shutdown()  # the next call connects (and checks) again
            raise
        log.info("Ray cluster: %d node(s) with CPUs run the driver's daybreak code", len(fingerprints))
    from ray.data import DataContext

    dctx = DataContext.get_current()
    # Progress bars help at a terminal but flood Airflow/Prefect task logs.
    dctx.enable_progress_bars = sys.stderr.isatty()
    # Task-based sort shuffle: for daily-sized inputs it is several times faster than the
    # actor-based hash shuffle, which pays to start its aggregators on every groupby.
    dctx.shuffle_strategy = os.environ.get("DAYBREAK_RAY_SHUFFLE", "sort_shuffle_pull_based")
    # Blocks leave each stage in input order, however the tasks happened to finish: the feature
    # step's window history (and so its float sums) and its sorted output are the same each run.
    dctx.execution_options.preserve_order = True
    # A failed map raises its own error (FileNotFoundError, KeyError), not a UserCodeException that
    # has lost it on the way back from the worker: the retry policy (errors.is_retryable) reads it.
    dctx.raise_original_map_exception = True


# What a Ray task or actor that talks to MLflow (or to S3 through MLflow's artifact store) needs
# from the driver's environment. Node identity (an instance profile, IRSA) needs none of it.
WORKER_ENV = (
    "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "DAYBREAK_S3_ENDPOINT_URL",
)


class WorkerEnv:
    """Credentials captured on the driver and applied in a Ray worker process.

    Passed as a task or actor argument, so it travels in Ray's object store, never in a
    ``runtime_env``: Ray writes a runtime_env's variables in clear to ``runtime_env_agent.log``
    on every node. Its repr names no value. Apply it only in a process of its own (an actor, or a
    task that owns its worker): it sets ``os.environ``. Session tokens are captured once, so a
    job that outlives them fails with the provider's expiry error: prefer node identity.
    """

    __slots__ = ("_values",)

    def __init__(self, values: dict[str, str]) -> None:
        self._values = dict(values)

    @classmethod
    def capture(cls, extra: dict[str, str] | None = None) -> WorkerEnv:
        """The driver's `WORKER_ENV` variables that are set, plus `extra`."""
        return cls({k: v for k in WORKER_ENV if (v := os.environ.get(k))} | (extra or {}))

    def apply(self) -> None:
        os.environ.update(self._values)

    def names(self) -> list[str]:
        return sorted(self._values)

    def __repr__(self) -> str:
        return f"WorkerEnv({len(self._values)} variables)"

    __str__ = __repr__

    def __reduce__(self) -> tuple:
        return (WorkerEnv, (self._values,))


# What Ray Tune copies from the driver's environment into every trial actor's runtime_env (ray
# 2.60, ray/tune/execution/class_cache.py), which Ray's runtime_env agent then logs in clear.
TUNE_PROPAGATES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")


@contextmanager
def hidden_from_ray(names: tuple[str, ...] = TUNE_PROPAGATES) -> Iterator[None]:
    """Take `names` out of this process's environment while Ray creates actors that would carry
    them in a logged runtime_env; put them back after. (The work inside must not need them.)"""
    saved = {k: os.environ.pop(k) for k in names if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)
