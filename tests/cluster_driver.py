"""Run by tests/test_cluster_shared_nothing.py in its own process, against the shared-nothing Ray
cluster that test starts. Prints one ``RESULT {json}`` line (also when a step failed: then with
``error``), so the test can tell which part failed.

Modes:

* ``airflow SPEC DAY``: stage DAY, then the Airflow operator ``BuildFeaturesOperator`` builds its
  features on the cluster named by an Airflow Connection (``AIRFLOW_CONN_RAY_CLUSTER``: address
  and token; neither ``RAY_ADDRESS`` nor ``RAY_AUTH_TOKEN`` is in this process's environment).
* ``cycle SPEC DAY``: with ``RAY_ADDRESS`` set, the daily cycle for DAY (stage -> features ->
  monitor -> train -> gate -> promote; no deploy), then batch scoring of DAY; reports where Ray
  ran every task and actor (GCS task events and actor table: no dashboard needed).
* ``refuse SPEC DAY``: the refusals (a local store, a SQLite registry) and the declared shared
  filesystem; see ``refusals``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from datetime import date, timedelta
from typing import Any


def _error(e: BaseException) -> dict[str, Any]:
    from daybreak.infra.errors import DaybreakError, is_retryable

    return {"type": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__],
            "daybreak_error": isinstance(e, DaybreakError), "retryable": is_retryable(e),
            "message": str(e)[:4000], "traceback": traceback.format_exc()[-6000:]}


def _emit(out: dict[str, Any]) -> None:
    print("RESULT " + json.dumps(out, default=str), flush=True)


def _nodes() -> list[dict[str, Any]]:
    import ray

    return [{"id": n["NodeID"], "alive": n["Alive"], "cpus": n["Resources"].get("CPU", 0),
             "head": "node:__internal_head__" in n["Resources"]} for n in ray.nodes()]


def _probe_worker() -> dict[str, Any]:
    """What a task that needs a CPU (so runs on the worker: the head has none) sees: not the
    driver's files, and no credential in its environment."""
    import ray

    paths = [os.environ["DAYBREAK_HOME"], os.environ.get("TMPDIR", "/nonexistent"), sys.argv[2]]

    @ray.remote(num_cpus=1)
    def probe(paths: list[str]) -> dict[str, Any]:
        import importlib.util
        import os

        found = importlib.util.find_spec("daybreak")
        return {"node": ray.get_runtime_context().get_node_id(),
                "daybreak": found.origin if found else None,
                "visible": {p: os.path.exists(p) for p in paths},
                "credential_env": sorted(k for k in os.environ if k.startswith(("MLFLOW_", "AWS_")))}

    return ray.get(probe.remote(paths))


def _where_ray_ran() -> dict[str, Any]:
    """Every task of this job (actor creations and actor methods too) with the node it ran on and
    the CPUs it asked for, and every actor with its node: from the GCS's task events and actor
    table (the state API would need the dashboard). An actor's creation event names no node: the
    actor table does."""
    import ray._private.state as state
    from ray.core.generated import common_pb2

    actors = {actor_id: {"class": a.get("ActorClassName"), "node": (a.get("Address") or {}).get("NodeID"),
                         "state": a.get("State")} for actor_id, a in state.actors().items()}
    tasks = []
    for ev in state.state._get_all_task_events():
        info = ev.task_info
        node = ev.state_updates.node_id.hex() if ev.state_updates.node_id else ""
        if not node and info.type == common_pb2.TaskType.ACTOR_CREATION_TASK:
            node = (actors.get(info.actor_id.hex()) or {}).get("node") or ""
        tasks.append({"name": info.name, "node": node, "cpus": info.required_resources.get("CPU", 0.0)})
    return {"tasks": tasks, "actors": list(actors.values())}


def airflow(spec_path: str, day: str) -> None:
    from daybreak.infra.context import RunContext
    from daybreak.spec import load_spec
    from daybreak.stage import stage

    out: dict[str, Any] = {}
    try:
        stage(load_spec(spec_path), RunContext.create(day))
        from daybreak.airflow import BuildFeaturesOperator

        op = BuildFeaturesOperator(task_id="features", spec=spec_path, logical_date=day, ray_conn_id="ray_cluster")
        out["result"] = op.execute({"run_id": "cluster-airflow"})
        import ray

        out["address"] = ray.get_runtime_context().gcs_address
        out["nodes"] = _nodes()
    except BaseException as e:
        out["error"] = _error(e)
    _emit(out)


def cycle(spec_path: str, day: str) -> None:
    from daybreak.gate import should_promote
    from daybreak.infra.compute import ensure_ray
    from daybreak.infra.context import RunContext
    from daybreak.spec import load_spec
    from daybreak.steps import STEPS

    out: dict[str, Any] = {"steps": {}}
    t0 = time.monotonic()
    step = "connect"
    try:
        spec = load_spec(spec_path)
        ensure_ray(os.environ["RAY_ADDRESS"])
        out["nodes"] = _nodes()
        out["probe"] = _probe_worker()
        ctx = RunContext.create(day)
        # the cycle's steps one by one (as run_cycle runs them; deploy off), so a failure names its step
        for step in ("stage", "features", "monitor", "train", "gate", "promote", "batch_score"):
            if step == "promote" and not should_promote(out["steps"]["gate"]):
                raise AssertionError(f"the gate did not promote: {out['steps']['gate']}")
            out["steps"][step] = STEPS[step].run(spec, ctx)
            out.setdefault("seconds", {})[step] = round(time.monotonic() - t0, 1)
    except BaseException as e:
        out["error"] = {"step": step, **_error(e)}
    try:
        out["ran"] = _where_ray_ran()
    except Exception as e:  # reported, so the test says why it cannot tell where tasks ran
        out["ran_error"] = _error(e)
    _emit(out)


class _Retries(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying" in record.getMessage():
            self.lines.append(record.getMessage())


def _attempt(name: str, fn: Any) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        result = fn()
        return {"case": name, "ok": True, "result": result, "seconds": time.monotonic() - t0}
    except BaseException as e:
        return {"case": name, "ok": False, "error": _error(e), "seconds": time.monotonic() - t0}


def refusals(spec_path: str, day: str) -> None:
    """With the cluster's RAY_ADDRESS (taken from DRIVER_RAY_ADDRESS once the local staging is
    done), through ``run_cycle`` and its retries (DAYBREAK_STEP_ATTEMPTS unset: a retryable error
    would be tried again after 5 s, and say so in a warning):

    1. the features step with a local store (the day staged there first, without a cluster);
    2. the train step with an S3 store (``DAYBREAK_STORE``) and a SQLite registry;
    3. declared shared filesystem: features of a day not staged in the local store must fail as
       usual ("run the stage step first"), not with the refusal.
    """
    from daybreak.cycle import run_cycle
    from daybreak.features import feature_zone
    from daybreak.infra.context import RunContext
    from daybreak.spec import load_spec
    from daybreak.stage import stage

    local_store = os.environ["DRIVER_LOCAL_STORE"]
    spec = load_spec(spec_path)
    retries = _Retries()
    logging.getLogger("daybreak").addHandler(retries)
    out: dict[str, Any] = {"cases": []}
    assert "RAY_ADDRESS" not in os.environ
    stage(spec, RunContext.create(day, store=local_store))  # in process: no cluster yet
    os.environ["RAY_ADDRESS"] = os.environ["DRIVER_RAY_ADDRESS"]

    ctx = RunContext.create(day, store=local_store, tracking_uri=os.environ["DRIVER_MLFLOW_URL"])
    case = _attempt("local store", lambda: run_cycle(spec, ctx, deploy=False, steps=["features"]))
    case["published"] = ctx.store.partition(feature_zone(spec), ctx.logical_date) is not None
    out["cases"].append(case)

    sqlite = RunContext.create(day)  # DAYBREAK_STORE (S3); no MLFLOW_TRACKING_URI: SQLite in DAYBREAK_HOME
    case = _attempt("sqlite registry", lambda: run_cycle(spec, sqlite, deploy=False, steps=["train"]))
    case["tracking_uri"] = sqlite.tracking_uri
    out["cases"].append(case)

    os.environ["DAYBREAK_SHARED_FS"] = "1"
    later = (date.fromisoformat(day) + timedelta(days=1)).isoformat()  # not staged in the local store
    shared = RunContext.create(later, store=local_store, tracking_uri=os.environ["DRIVER_MLFLOW_URL"])
    out["cases"].append(_attempt("shared filesystem declared",
                                 lambda: run_cycle(spec, shared, deploy=False, steps=["features"])))
    out["retry_warnings"] = retries.lines
    _emit(out)


if __name__ == "__main__":
    {"airflow": airflow, "cycle": cycle, "refuse": refusals}[sys.argv[1]](*sys.argv[2:])
