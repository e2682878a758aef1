"""Airflow 3 idioms through the scheduler and the triggerer of `airflow standalone`, plus the triggers
and hooks on their own.

- the deferrable deploy gives its worker and pool slot back while the endpoint rolls out: a task
  in the same one-slot pool runs while the deploy is ``deferred``, then the endpoint reports the
  champion and the deploy resumes, checks parity and succeeds;
- the landing sensor waits in the triggerer for a landing file the test drops later;
- the features task's Asset event carries its date as the partition key, and
  ``daybreak_partition_score`` (a ``PartitionedAssetTimetable``) scores that date.

The endpoint is a real `daybreak serve` behind a "rollout gate" (a small proxy in this process):
its ``/version`` reports an old version until the test opens the gate, as a load balancer in front
of instances still rolling out would. Every wait polls the API with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, SPEC, Served, free_port
from test_airflow_ui import Airflow, _env, standalone

DEFERRABLE, PRODUCER, PARTITION_SCORE = "daybreak_deferrable", "daybreak_features_partition", "daybreak_partition_score"
POOL = "daybreak_deploy_slot"


# --- the triggers on their own (no Airflow servers) ---------------------------------------------


class RolloutGate:
    """A proxy to a serving endpoint whose ``/version`` says ``old`` until `open` is set; every
    other request goes through. ``POST /refresh`` answers 404, as a server that only polls."""

    def __init__(self, upstream: str, old: str = "0") -> None:
        self.upstream, self.old, self.open = upstream, old, threading.Event()
        gate = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _forward(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "authorization")}
                r = httpx.request(method, gate.upstream + self.path, content=body, headers=headers, timeout=120)
                self._send(r.status_code, r.content, r.headers.get("content-type", "application/json"))

            def do_GET(self) -> None:
                if self.path.startswith("/version") and not gate.open.is_set():
                    self._send(200, json.dumps({"version": gate.old}).encode())
                else:
                    self._forward("GET")

            def do_POST(self) -> None:
                if self.path.startswith("/refresh"):
                    self._send(404, b'{"detail": "this server polls"}')
                else:
                    self._forward("POST")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def _events(trigger) -> list:
    return [e.payload async for e in trigger.run()]


class _Versions(BaseHTTPRequestHandler):
    answers: list[dict] = []  # noqa: RUF012 - set per test

    def do_GET(self) -> None:
        body = json.dumps(self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_served_version_trigger_waits_for_every_replica() -> None:
    from daybreak.airflow.triggers import ServedVersionTrigger

    _Versions.answers = [{"version": "1"}, {"committed": "2", "replicas": {"a": "2", "b": "1"}, "expected_replicas": 2},
                         {"committed": "2", "replicas": {"a": "2", "b": "2"}, "expected_replicas": 2}]
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Versions)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        trigger = ServedVersionTrigger(url=url, version="2", poll_interval=0.01, timeout=30, settle=0)
        [event] = asyncio.run(_events(trigger))
        assert event["status"] == "served" and event["info"]["replicas"] == {"a": "2", "b": "2"}, event
        assert len(_Versions.answers) == 1  # it asked until every replica served v2
        classpath, kwargs = trigger.serialize()
        assert classpath == "daybreak.airflow.triggers.ServedVersionTrigger"
        assert json.loads(json.dumps(kwargs)) == kwargs  # stored with the deferred task as JSON
        [late] = asyncio.run(_events(ServedVersionTrigger(url=url, version="3", poll_interval=0.01, timeout=0.2,
                                                          settle=0)))
        assert late["status"] == "timeout" and late["info"]["committed"] == "2", late
        # served at once, yet it fires only after `settle` (Airflow's defer/resume race)
        t0 = time.monotonic()
        [settled] = asyncio.run(_events(ServedVersionTrigger(url=url, version="2", poll_interval=0.01, settle=1.0)))
        assert settled["status"] == "served" and time.monotonic() - t0 >= 1.0
    finally:
        server.shutdown()
        server.server_close()


def test_landing_file_trigger_fires_when_the_file_lands(tmp_path: Path) -> None:
    from daybreak.airflow.triggers import LandingFileTrigger

    (tmp_path / "landing" / "flights").mkdir(parents=True)
    trigger = LandingFileTrigger(store=str(tmp_path), patterns=["landing/flights/2013-01-13.csv"], poll_interval=0.05,
                                 settle=0)

    async def drop_later() -> list:
        waiting = asyncio.ensure_future(_events(trigger))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        (tmp_path / "landing" / "flights" / "2013-01-13.csv").write_text("year\n2013\n")
        return await asyncio.wait_for(waiting, 30)

    [event] = asyncio.run(drop_later())
    assert event == {"status": "landed", "files": {
        "landing/flights/2013-01-13.csv": [str(tmp_path / "landing" / "flights" / "2013-01-13.csv")]}}
    [late] = asyncio.run(_events(LandingFileTrigger(store=str(tmp_path), patterns=["landing/flights/x.csv"],
                                                    poll_interval=0.05, timeout=0.1, settle=0)))
    assert late["status"] == "timeout" and late["missing"] == ["landing/flights/x.csv"]


def test_landing_file_trigger_on_s3(s3_server, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trigger lists S3 with the credentials of a Connection, read where it runs."""
    from s3 import CREDS

    from daybreak.airflow.triggers import landed

    bucket = "landing-trigger"
    s3_server.client().create_bucket(Bucket=bucket)
    s3_server.client().put_object(Bucket=bucket, Key="store/landing/flights/2013-01-13.csv", Body=b"year\n2013\n")
    conn = {"conn_type": "aws", "login": CREDS["AWS_ACCESS_KEY_ID"], "password": CREDS["AWS_SECRET_ACCESS_KEY"],
            "extra": {"endpoint_url": s3_server.endpoint, "region_name": "us-east-1"}}
    monkeypatch.setenv("AIRFLOW_CONN_LANDING_S3", json.dumps(conn))
    for var in [v for v in os.environ if v.startswith("AWS_")]:
        monkeypatch.delenv(var)  # only the Connection's credentials
    found = landed(f"s3://{bucket}/store", ["landing/flights/2013-01-13.csv", "landing/flights/2013-01-14.csv"],
                   "landing_s3")
    assert found == {"landing/flights/2013-01-13.csv": [f"s3://{bucket}/store/landing/flights/2013-01-13.csv"],
                     "landing/flights/2013-01-14.csv": []}


def test_old_connection_types_still_work_with_a_deprecation_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    from daybreak.airflow.hooks import ConnectionTypeDeprecationWarning, MlflowHook, RayHook
    from daybreak.airflow.provider import get_provider_info

    monkeypatch.setenv("AIRFLOW_CONN_OLD_MLFLOW", json.dumps({"conn_type": "mlflow", "host": "https://m.example"}))
    monkeypatch.setenv("AIRFLOW_CONN_OLD_RAY", json.dumps({"conn_type": "ray", "host": "head", "port": 6380}))
    monkeypatch.setenv("AIRFLOW_CONN_NEW_RAY", json.dumps({"conn_type": "daybreak_ray", "host": "head"}))
    with pytest.warns(ConnectionTypeDeprecationWarning, match="'daybreak_mlflow'"):
        assert MlflowHook("old_mlflow").tracking_uri() == "https://m.example"
    with pytest.warns(ConnectionTypeDeprecationWarning, match="'daybreak_ray'"):
        assert RayHook("old_ray").address() == "head:6380"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert RayHook("new_ray").address() == "head:6379"
    info = get_provider_info()
    assert [t["connection-type"] for t in info["connection-types"]] == ["daybreak_mlflow", "daybreak_ray"]
    url = info["integrations"][0]["external-doc-url"]
    assert url == "https://github.com/daybreak-ml/daybreak#readme", url  # pyproject's Documentation URL


# --- through airflow standalone ----------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, cycled: dict, spec):
    """`airflow standalone` over a copy of the cycled home (a champion, features for 2013-01-01 ..
    04), with the test DAGs and the shipped daybreak_partition_score; `daybreak serve` on the
    champion behind a closed rollout gate; an empty store for the sensor."""
    base = tmp_path_factory.mktemp("deferrable")
    home = base / "home"
    shutil.copytree(cycled["home"] / "store", home / "store", symlinks=True)
    shutil.copy(cycled["home"] / "mlflow.db", home / "mlflow.db")  # artifacts: the shared home's, read only
    dags = base / "dags"
    dags.mkdir()
    for f in (ROOT / "tests" / "airflow_deferrable_dags" / "deferrable.py", ROOT / "dags" / f"{PARTITION_SCORE}.py"):
        (dags / f.name).symlink_to(f)
    sensor_store = base / "sensor_store"
    (sensor_store / "landing" / "flights").mkdir(parents=True)
    env = _env(base, home, SPEC, free_port()) | {"AIRFLOW__CORE__DAGS_FOLDER": str(dags)}
    served = Served(spec, home, base, env={})
    gate = RolloutGate(served.url)
    try:
        with standalone(base, home, SPEC, env, (DEFERRABLE, PRODUCER, PARTITION_SCORE)) as af:
            yield {"af": af, "gate": gate, "served": served, "sensor_store": sensor_store, "home": home}
    finally:
        gate.close()
        served.stop()


def _states(af: Airflow, dag_id: str, run_id: str) -> dict[str, str]:
    return af.task_states(dag_id, [run_id])[run_id]


def _asset_events(af: Airflow, uri: str) -> list[dict]:
    """The events of an Asset. Airflow 3.3's listing answers 500 while an event's queued run has no
    start date yet (AssetEventResponse.created_dagruns.start_date: None): asked again until it answers."""
    def listed() -> list[dict] | None:
        r = af.api("GET", "/assets/events", params={"limit": 100, "order_by": "timestamp"})
        return [e for e in r.json()["asset_events"] if e["uri"] == uri] if r.status_code == 200 else None

    return af.wait(f"the events of {uri} listed", lambda: (got := listed()) is not None and [got], 120)[0]


def _champion(home: Path, spec) -> str:
    from daybreak.infra import registry
    from daybreak.infra.context import RunContext

    ctx = RunContext.create("2013-01-04", tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    return str(registry.alias_version(registry.client(ctx), spec.model.name, spec.promotion.alias).version)


def test_deferred_deploy_frees_its_pool_slot(site: dict, spec) -> None:
    af, gate = site["af"], site["gate"]
    r = af.api("POST", "/pools", json={"name": POOL, "slots": 1, "include_deferred": False})
    assert r.status_code in (200, 201), r.text
    assert af.api("PATCH", f"/dags/{DEFERRABLE}", json={"is_paused": False}).status_code == 200
    r = af.api("POST", f"/dags/{DEFERRABLE}/dagRuns", json={"logical_date": None, "conf": {
        "serve_url": gate.url, "sensor_store": str(site["sensor_store"])}})
    assert r.status_code == 200, r.text
    run_id = site["run_id"] = r.json()["dag_run_id"]

    def hold_ran() -> dict | None:
        states = _states(af, DEFERRABLE, run_id)
        assert states.get("deploy") not in ("success", "failed", "up_for_retry"), states  # the gate is closed
        assert states.get("hold") != "failed", states
        return states if states.get("hold") == "success" else None

    # the pool has one slot and the deploy (higher priority) took it first: the other task can
    # only have run because the deploy gave the slot back while it waits in the triggerer
    states = af.wait("the task sharing the deploy's one-slot pool to run", hold_ran, 300)
    assert states["deploy"] == "deferred", states
    ti = af.api("GET", f"/dags/{DEFERRABLE}/dagRuns/{run_id}/taskInstances/deploy").json()
    assert ti["pool"] == POOL and ti["trigger"] is not None, ti
    assert "ServedVersionTrigger" in ti["trigger"]["classpath"], ti["trigger"]

    def picked_up() -> dict | None:
        ti = af.api("GET", f"/dags/{DEFERRABLE}/dagRuns/{run_id}/taskInstances/deploy").json()
        return ti if ti["triggerer_job"] is not None else None

    # a triggerer runs the wait: it claims new triggers on its own loop, so a task can be deferred
    # a moment before any triggerer has taken its trigger (CI saw None there once)
    ti = af.wait("a triggerer to take the deploy's trigger", picked_up, 60)
    assert ti["triggerer_job"] is not None, ti

    gate.open.set()  # the endpoint now reports the champion: the trigger fires, the deploy resumes

    def deployed() -> bool:
        state = _states(af, DEFERRABLE, run_id)["deploy"]
        assert state not in ("failed", "up_for_retry"), af.task_states(DEFERRABLE, [run_id])
        return state == "success"

    af.wait("the deploy to resume and succeed", deployed, 300)
    result = af.xcom(DEFERRABLE, run_id, "deploy")
    assert result["deployed"] is True and result["parity_rows"] > 0, result
    assert result["champion_version"] == _champion(site["home"], spec) and result["url"] == gate.url, result


def test_landing_sensor_waits_for_the_file(site: dict) -> None:
    af, run_id = site["af"], site["run_id"]
    af.wait("the landing sensor deferred", lambda: _states(af, DEFERRABLE, run_id).get("landing") == "deferred", 180)
    assert af.run_state(DEFERRABLE, run_id) == "running"
    # the drop arrives: a real day's flights file under the date the sensor waits for
    src = site["home"] / "store" / "landing" / "flights" / "2013-01-12.csv"
    drop = site["sensor_store"] / "landing" / "flights" / "2013-01-13.csv"
    shutil.copyfile(src, drop)

    def sensed() -> bool:
        state = _states(af, DEFERRABLE, run_id)["landing"]
        assert state not in ("failed", "up_for_retry"), state
        return state == "success"

    af.wait("the landing sensor to succeed", sensed, 180)
    assert af.xcom(DEFERRABLE, run_id, "landing") == {"flights": [str(drop)]}
    af.wait_runs_done(DEFERRABLE, [run_id], 60)


def test_partitioned_features_event_triggers_scoring_of_its_date(site: dict, spec) -> None:
    af, day = site["af"], "2013-01-03"
    assert af.api("PATCH", f"/dags/{PARTITION_SCORE}", json={"is_paused": False}).status_code == 200
    assert af.api("PATCH", f"/dags/{PRODUCER}", json={"is_paused": False}).status_code == 200
    r = af.api("POST", f"/dags/{PRODUCER}/dagRuns", json={"logical_date": None, "conf": {"date": day}})
    assert r.status_code == 200, r.text
    af.wait_runs_done(PRODUCER, [r.json()["dag_run_id"]], 300)

    features = _asset_events(af, "x-daybreak://features")
    assert [(e["partition_key"], e["extra"]["date"]) for e in features] == [(day, day)], features

    def scored() -> list[dict]:
        runs = af.runs(PARTITION_SCORE)
        failed = [r["dag_run_id"] for r in runs if r["state"] == "failed"]
        assert not failed, af.task_states(PARTITION_SCORE, failed)
        return [r for r in runs if r["state"] == "success"]

    [run] = af.wait(f"{PARTITION_SCORE} to score the partition", scored, 300)
    assert run["partition_key"] == day and run["logical_date"] is None, run
    result = af.xcom(PARTITION_SCORE, run["dag_run_id"], "score")
    assert result["date"] == day and result["rows"] > 0, result
    assert result["model_version"] == _champion(site["home"], spec), result
    assert (site["home"] / "store" / "predictions" / spec.model.name / f"date={day}").exists()
    predictions = _asset_events(af, "x-daybreak://predictions")
    assert [(e["partition_key"], e["extra"]["date"]) for e in predictions] == [(day, day)], predictions
