"""Where the steps compute: in this process, or on Ray (a local instance, or an existing cluster
when ``RAY_ADDRESS`` or an address is given).

``use_ray`` decides, for the feature step and batch scoring: Ray when there is a cluster to use,
or when the data is large enough to pay for Ray's fixed costs; in process otherwise.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from daybreak.infra.cluster import remote_target
from daybreak.infra.errors import DaybreakError

log = logging.getLogger(__name__)

COMPUTE_ENV = "DAYBREAK_COMPUTE"  # auto (the default) | process | ray
MIN_ROWS_ENV = "DAYBREAK_RAY_MIN_ROWS"
THREADS_ENV = "DAYBREAK_THREADS"  # threads of the in-process path (default: the CPUs this process may use)
# Input rows from which a step uses a local Ray when no cluster is configured. Measured with
#   python benchmarks/crossover.py --rows 100000 300000 1000000 --repeats 5 --pandas
#   python benchmarks/crossover.py --rows 3000000 10000000 --repeats 3 --pandas
# (flights scaled; the feature step for one day, its 8-day look-back being the input rows; each
# run a fresh process, the implementations interleaved round by round, medians; in process on 2
# threads against a local Ray already running and warm; 2 cores shared with other work, load
# average 2-6 for the first command, 4-8 for the second), seconds (peak MB of the process tree):
#
#    input rows   in process   warm Ray      polars (eager)  pandas
#       100,000   0.19 (151)   0.23 (1032)    0.11 (45)      0.23 (146)
#       300,000   0.23 (244)   0.35 (1170)    0.20 (53)      0.37 (244)
#     1,000,000   0.48 (285)   0.77 (1287)    0.99 (488)     1.58 (568)
#     3,000,000   1.48 (400)   2.04 (1438)    4.65 (1294)    7.35 (1426)
#    10,000,000   4.90 (670)   5.54 (1531)   12.37 (4217)   20.91 (4559)
#
# A warm Ray never beat in process on this machine, and a driver that has not started Ray yet
# (a CLI run, an Airflow or Prefect task) pays for that first: 4.2 s at 1M rows on a quiet
# machine (``--cold``), 15-50 s on a busy one. So the threshold is the largest size measured:
# there in process was still faster, at less than half the memory; beyond it nothing measured
# says in process is safe, and Ray's bounded memory per task (runs written to disk, not held)
# and its scale-out are what is left to win. More cores favour Ray: measure there (crossover.py)
# and set DAYBREAK_RAY_MIN_ROWS.
RAY_MIN_ROWS = 10_000_000


class ComputeConfigError(DaybreakError):
    """DAYBREAK_COMPUTE or DAYBREAK_RAY_MIN_ROWS holds a value that means nothing."""


@dataclass(frozen=True)
class ComputeChoice:
    """Whether a step uses Ray, and why in words (for its log line)."""

    ray: bool
    why: str

    @property
    def where(self) -> str:
        return "on Ray" if self.ray else "in process"


def ray_min_rows() -> int:
    raw = os.environ.get(MIN_ROWS_ENV, "").strip().replace("_", "")
    if not raw:
        return RAY_MIN_ROWS
    try:
        value = int(raw)
    except ValueError:
        raise ComputeConfigError(f"{MIN_ROWS_ENV}={raw!r}: expected a number of rows") from None
    if value < 0:
        raise ComputeConfigError(f"{MIN_ROWS_ENV}={raw!r}: expected a number of rows >= 0")
    return value


def choose_compute(ray_address: str | None, distributed: str | None, rows: int) -> ComputeChoice:
    """Ray or in process for a step reading `rows` input rows.

    ``DAYBREAK_COMPUTE=process`` or ``ray`` decides; with ``auto`` (the default), Ray when a
    cluster is configured (`ray_address` or ``RAY_ADDRESS`` other than "local", or an
    orchestrator that runs tasks on several machines: `distributed`), or when `rows` reach
    ``DAYBREAK_RAY_MIN_ROWS`` (default ``RAY_MIN_ROWS``); else in this process, where Ray's
    fixed costs (tens of seconds to start it, then a few hundred ms per step) would outweigh
    what it saves.
    """
    mode = (os.environ.get(COMPUTE_ENV) or "auto").strip().lower()
    if mode == "process":
        return ComputeChoice(False, f"{COMPUTE_ENV}=process")
    if mode == "ray":
        return ComputeChoice(True, f"{COMPUTE_ENV}=ray")
    if mode != "auto":
        raise ComputeConfigError(f"{COMPUTE_ENV}={mode!r}: expected auto, process or ray")
    target = remote_target(ray_address or os.environ.get("RAY_ADDRESS"), distributed)
    if target is not None:
        return ComputeChoice(True, f"{target} is configured; {COMPUTE_ENV}=process to compute here")
    limit = ray_min_rows()
    if rows >= limit:
        return ComputeChoice(True, f"at least {limit:,}; {COMPUTE_ENV}=process to force in process")
    return ComputeChoice(False, f"below {limit:,}; {COMPUTE_ENV}=ray to force Ray")


def use_ray(ray_address: str | None, distributed: str | None, rows: int) -> bool:
    """``choose_compute(...).ray``."""
    return choose_compute(ray_address, distributed, rows).ray


def process_threads() -> int:
    """Threads for the in-process path: ``DAYBREAK_THREADS``, else the CPUs this process may use."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if raw:
        try:
            return max(1, int(raw))
        except ValueError:
            raise ComputeConfigError(f"{THREADS_ENV}={raw!r}: expected a number of threads") from None
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


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
