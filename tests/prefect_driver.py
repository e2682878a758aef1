"""Client side of tests/test_prefect_server.py, run in a subprocess against a real Prefect server.

    python tests/prefect_driver.py setup   # Secret block + `daybreak` Variable (password from the env)
    python tests/prefect_driver.py run     # wait for the served deployments and their scheduled runs,
                                           # trigger the three runs, print `RESULT <json>`

Environment: PREFECT_API_URL (the server), PREFECT_HOME, PREFECT_LOCAL_STORAGE_PATH (the serving
process's result storage, so persisted results can be read back); for `setup` also
DRIVER_MLFLOW_URL and DRIVER_MLFLOW_PASSWORD (never on the command line, never printed).
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import UTC, datetime
from typing import Any

FLOW = "daily_retrain"
NAME = os.environ.get("DRIVER_DEPLOYMENT_NAME", "daybreak-test")
DATES = ("2013-01-01", "2013-01-02", "2013-01-02")  # the last one: a rerun, from Prefect's cache
SECRET_BLOCK = "daybreak-mlflow"


def setup() -> dict[str, Any]:
    """The Secret block with the MLflow login, and the `daybreak` Variable naming it."""
    from prefect.blocks.system import Secret
    from prefect.variables import Variable

    password = os.environ.pop("DRIVER_MLFLOW_PASSWORD")
    Secret(value=json.dumps({"username": "admin", "password": password})).save(SECRET_BLOCK, overwrite=True)
    settings = {"tracking_uri": os.environ["DRIVER_MLFLOW_URL"], "mlflow_secret": SECRET_BLOCK}
    if os.environ.get("DRIVER_SERVE_URL"):
        settings["serve_url"] = os.environ["DRIVER_SERVE_URL"]
    Variable.set("daybreak", settings, overwrite=True)
    return {"secret": SECRET_BLOCK, "variable": Variable.get("daybreak")}


def _deployments(client) -> dict[str, Any]:
    out = {}
    for flow in (FLOW, "backfill", "approve"):
        d = client.read_deployment_by_name(f"{flow}/{NAME}")
        out[f"{flow}/{NAME}"] = {
            "id": str(d.id), "parameters": d.parameters, "paused": d.paused,
            "schedules": [{"active": s.active, "cron": getattr(s.schedule, "cron", None),
                           "timezone": getattr(s.schedule, "timezone", None),
                           "type": type(s.schedule).__name__} for s in (d.schedules or [])]}
    return out


def _scheduled(client, deployment_id: str) -> list[dict[str, Any]]:
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
        deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]),
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))))
    return [{"id": str(r.id), "state_type": r.state_type.value if r.state_type else None, "state_name": r.state_name,
             "expected_start_time": (r.expected_start_time.astimezone(UTC).isoformat()
                                     if r.expected_start_time else None),
             "auto_scheduled": r.auto_scheduled, "parameters": r.parameters} for r in runs]


def _wait_for_deployments(timeout: float) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    t0 = time.monotonic()
    deadline = t0 + timeout
    deployments: dict[str, Any] = {}
    scheduled: list[dict[str, Any]] = []
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            try:
                deployments = _deployments(client)
            except ObjectNotFound:
                time.sleep(1)
                continue
            scheduled = _scheduled(client, deployments[f"{FLOW}/{NAME}"]["id"])
            now = datetime.now(UTC)
            if any(datetime.fromisoformat(r["expected_start_time"]) > now for r in scheduled):
                break
            time.sleep(1)
    return deployments, scheduled, time.monotonic() - t0


def _result_of(state) -> tuple[Any, str | None]:
    try:
        return state.result(raise_on_failure=False), None
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


def _details(client, flow_run) -> dict[str, Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    run_filter = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
    task_runs = []
    for tr in client.read_task_runs(flow_run_filter=run_filter):
        value, error = _result_of(tr.state) if tr.state is not None else (None, "no state")
        task_runs.append({"name": tr.name, "task_key": tr.task_key, "task": tr.task_key.rsplit("-", 1)[0],
                          "state_type": tr.state_type.value if tr.state_type else None,
                          "state_name": tr.state_name, "result": value, "result_error": error})
    result, error = _result_of(flow_run.state)
    return {"flow_run_id": str(flow_run.id), "name": flow_run.name, "parameters": flow_run.parameters,
            "state_type": flow_run.state_type.value if flow_run.state_type else None,
            "state_name": flow_run.state_name, "state_message": flow_run.state.message if flow_run.state else None,
            "result": result, "result_error": error, "task_runs": task_runs}


def _logs(client, flow_run_id: str) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    logs: list[str] = []
    for _ in range(10):  # logs reach the API in batches: wait until the count stops growing
        found = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                 sort=LogSort.TIMESTAMP_ASC)
        if found and len(found) == len(logs):
            break
        logs = [f"{lg.level} {lg.name}: {lg.message}" for lg in found]
        time.sleep(1.5)
    return "\n".join(logs)


def run() -> dict[str, Any]:
    from prefect import get_client
    from prefect.deployments import run_deployment

    deployments, scheduled, waited = _wait_for_deployments(float(os.environ.get("DRIVER_WAIT_SECONDS", "120")))
    out: dict[str, Any] = {"now": datetime.now(UTC).isoformat(), "deployments": deployments,
                           "scheduled": scheduled, "waited_for_schedule_s": round(waited, 1), "runs": []}
    if not scheduled:
        return out
    with get_client(sync_client=True) as client:
        for day in DATES:
            t0 = time.monotonic()
            fr = run_deployment(f"{FLOW}/{NAME}", parameters={"date": day}, timeout=900, poll_interval=2)
            fr = client.read_flow_run(fr.id)
            details = _details(client, fr)
            details.update(date=day, seconds=round(time.monotonic() - t0, 1))
            out["runs"].append(details)
            if details["state_type"] != "COMPLETED":
                break
        for details in out["runs"]:  # after the runs, so waiting for late log batches costs little
            details["logs"] = _logs(client, details["flow_run_id"])
    return out


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode not in ("setup", "run"):
        sys.exit("usage: prefect_driver.py setup|run")
    print("RESULT " + json.dumps(setup() if mode == "setup" else run(), default=str), flush=True)
