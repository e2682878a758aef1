"""Running on a cluster whose nodes share nothing but S3 and the MLflow server.

Three checks, each failing at the start with one clear, non-retryable ``ClusterConfigError``:

* ``check_shared_nothing``: work that runs on other machines (a Ray cluster, or an orchestrator
  whose tasks run on several machines) cannot read a local store, a SQLite registry or ``file:``
  artifacts: they would be another disk there (an empty ``mlflow.db``, "run the stage step
  first"). Unless ``DAYBREAK_SHARED_FS=1`` declares that every node mounts the same filesystem
  at the same path.
* ``check_artifact_location``: an experiment whose artifacts go to a local folder (an ``mlflow
  server`` without ``--serve-artifacts``) is the same problem, seen once the experiment is known.
* ``check_nodes``: every node that runs tasks runs the driver's daybreak code (the digest of its
  source files) and the same versions of the libraries that decide the bytes of features and
  models; skew would label one node's features with another's feature version.

Code reaches the nodes pre-installed (an image with daybreak in it, the usual KubeRay set-up) or
shipped with the job: ``DAYBREAK_RAY_SHIP_CODE=1`` sends daybreak's package and the modules of
``DAYBREAK_ALLOWED_ESTIMATOR_MODULES`` as Ray ``py_modules``; ``DAYBREAK_RAY_PIP`` (comma-separated
requirements) installs packages in a Ray-managed virtualenv on each node. Neither carries
credentials: those travel as task arguments (``compute.WorkerEnv``), never in a runtime_env,
whose variables Ray logs in clear.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
import sys
import time
from functools import cache
from pathlib import Path
from typing import Any

from daybreak.infra.errors import DaybreakError, redact

SHARED_FS_ENV = "DAYBREAK_SHARED_FS"
SHIP_CODE_ENV = "DAYBREAK_RAY_SHIP_CODE"
PIP_ENV = "DAYBREAK_RAY_PIP"
# The libraries whose versions decide the bytes a node computes (features, models, predictions).
CHECKED_PACKAGES = ("ray", "pyarrow", "numpy", "pandas", "scikit-learn", "xgboost", "mlflow")


class ClusterConfigError(DaybreakError):
    """The set-up cannot work on this cluster; retrying would fail the same way."""


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def shared_fs_declared() -> bool:
    return _truthy(os.environ.get(SHARED_FS_ENV))


def remote_target(ray_address: str | None, distributed: str | None = None) -> str | None:
    """What runs work on other machines, in words; None when everything runs on this one."""
    if ray_address and ray_address.strip() not in ("", "local"):
        return f"the Ray cluster at {redact(ray_address)}"
    if distributed:
        return distributed
    return None


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


def _local_uri(uri: str) -> bool:
    """A path, or a ``sqlite:``/``file:`` URI: this machine's disk. (``mlflow-artifacts:/1``, an
    artifact location the server proxies, has a scheme but no ``//``.)"""
    scheme = _SCHEME.match(uri)
    return scheme is None or scheme.group(1).lower() in ("sqlite", "file")


def local_parts(store_uri: str, store_is_local: bool, tracking_uri: str, artifact_root: str | None) -> list[str]:
    """The parts of a set-up that live on this machine's disk."""
    parts = []
    if store_is_local:
        parts.append(f"the store {store_uri} (set DAYBREAK_STORE=s3://bucket/prefix)")
    if _local_uri(tracking_uri):
        parts.append(f"the MLflow registry {redact(tracking_uri)} (set MLFLOW_TRACKING_URI to an `mlflow server`)")
    elif artifact_root and _local_uri(artifact_root):
        parts.append(f"the MLflow artifacts {artifact_root}")
    return parts


def _refusal(target: str, parts: list[str]) -> ClusterConfigError:
    return ClusterConfigError(
        f"{target} may run work on other machines, but {'; '.join(parts)} "
        f"{'is' if len(parts) == 1 else 'are'} on this machine's disk, which they cannot see. Use an "
        "s3:// store and an `mlflow server` that serves its artifacts (--serve-artifacts), or set "
        f"{SHARED_FS_ENV}=1 if every node mounts the same filesystem at the same path.")


def check_shared_nothing(ctx: Any) -> None:
    """Refuse a local store, a SQLite registry or ``file:`` artifacts when work runs elsewhere."""
    target = remote_target(ctx.ray_address, getattr(ctx, "distributed", None))
    if target is None or shared_fs_declared():
        return
    parts = local_parts(ctx.store.uri(ctx.store.base), ctx.store.kind == "local", ctx.tracking_uri,
                        ctx.artifact_root)
    if parts:
        raise _refusal(target, parts)


def check_artifact_location(ctx: Any, location: str | None) -> None:
    """Refuse an experiment whose artifacts are written to a local folder, when work runs elsewhere."""
    target = remote_target(ctx.ray_address, getattr(ctx, "distributed", None))
    if target is None or shared_fs_declared() or not location or not _local_uri(location):
        return
    raise _refusal(target, [f"the experiment's artifact location {location} (start the `mlflow server` "
                            "with --serve-artifacts)"])


# --- code shipping and the node check --------------------------------------------------------

def _module_path(name: str) -> str:
    found = importlib.util.find_spec(name)
    if found is None or not (found.submodule_search_locations or found.origin):
        raise ClusterConfigError(f"{SHIP_CODE_ENV}: module {name!r} cannot be found on the driver to ship")
    locations = list(found.submodule_search_locations or [])
    return locations[0] if locations else str(found.origin)


def runtime_env() -> dict[str, Any] | None:
    """The job's Ray runtime_env from ``DAYBREAK_RAY_SHIP_CODE`` and ``DAYBREAK_RAY_PIP``; None
    when neither is set (the code is pre-installed on every node). Never any env_vars."""
    env: dict[str, Any] = {}
    if _truthy(os.environ.get(SHIP_CODE_ENV)):
        # (the spec's list, read here without importing the spec layer; pip packages are not shipped)
        allowed = os.environ.get("DAYBREAK_ALLOWED_ESTIMATOR_MODULES", "").split(",")
        tops = {m.strip().split(".")[0] for m in allowed if m.strip()} - {"sklearn", "xgboost"}
        env["py_modules"] = [_module_path("daybreak"), *(_module_path(m) for m in sorted(tops))]
    pip = [p.strip() for p in os.environ.get(PIP_ENV, "").split(",") if p.strip()]
    for req in pip:
        if redact(req) != req:  # Ray logs a runtime_env in clear: no index password in it
            raise ClusterConfigError(f"{PIP_ENV}: {redact(req)} carries a credential, which Ray would log in "
                                     "clear on every node; configure the index on the nodes (pip.conf) instead")
    if pip:
        env["pip"] = pip
    return env or None


@cache
def code_digest() -> str:
    """sha256 of daybreak's source files (names and bytes), so two nodes with the same version
    string but different code are told apart."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def node_fingerprint() -> dict[str, str]:
    """What must match across nodes: Python, daybreak's code and the checked libraries."""
    out = {"python": f"{sys.version_info[0]}.{sys.version_info[1]}", "daybreak": code_digest()}
    for pkg in CHECKED_PACKAGES:
        out[pkg] = "absent"
        for dist in (pkg, f"{pkg}-cpu"):  # xgboost-cpu is xgboost built without CUDA
            try:
                out[pkg] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return out


def _probe() -> tuple[str, dict[str, str]]:
    import ray

    return ray.get_runtime_context().get_node_id(), node_fingerprint()


def check_nodes(timeout: float = 300.0, probe_env: dict[str, Any] | None = None) -> dict[str, dict[str, str]]:
    """Run a probe on every alive node with CPUs and refuse one whose fingerprint differs from the
    driver's. Returns the fingerprints by node id. (A node without CPUs runs no task of daybreak's.)
    `probe_env`: a runtime_env for the probe on top of the job's (what a task would run with)."""
    import ray
    from ray.exceptions import GetTimeoutError, RayTaskError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    mine = node_fingerprint()
    nodes = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes()
             if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0}
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
    extra = {"runtime_env": probe_env} if probe_env else {}
    refs = {nid: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(nid, soft=False), **extra).remote()
            for nid in nodes}
    found: dict[str, dict[str, str]] = {}
    problems = []
    deadline = time.monotonic() + timeout  # for all the nodes together
    for nid, ref in refs.items():
        where = f"node {nodes[nid]} ({nid[:8]})"
        try:
            _, found[nid] = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
        except GetTimeoutError:
            raise TimeoutError(f"Ray {where} did not run the version check within {timeout:.0f} s") from None
        except RayTaskError as e:
            cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else e
            problems.append(f"{where} cannot run daybreak ({type(cause).__name__}: {str(cause).splitlines()[0][:200]})"
                            f"; install it there or set {SHIP_CODE_ENV}=1")
            continue
        diff = [f"{k} {found[nid].get(k)} (driver {v})" for k, v in mine.items() if found[nid].get(k) != v]
        if diff:
            problems.append(f"{where} differs from the driver: {', '.join(diff)}")
    if problems:
        raise ClusterConfigError("version skew on the Ray cluster: " + "; ".join(problems) + ". Install the "
                                 f"driver's versions on every node, or ship daybreak with {SHIP_CODE_ENV}=1.")
    return found
