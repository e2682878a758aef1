"""Outages: the S3 endpoint goes away and comes back, the MLflow server restarts, a Ray worker node
dies. The cycle retries its steps with backoff (daybreak.cycle.Retry) and either completes or
fails with a retryable error; either way nothing is half-done (invariants.check), a rerun
completes, and what it published equals what an undisturbed run publishes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import invariants
import pytest
from conftest import BIN, SPEC, free_port, make_home, wait_http
from tally import tally, trials

from daybreak.cycle import Retry, run_cycle, with_retry
from daybreak.features import build_features, feature_zone
from daybreak.gate import PROMOTE
from daybreak.infra import registry
from daybreak.infra.context import RunContext
from daybreak.infra.errors import is_retryable
from daybreak.stage import stage

FAST = Retry(attempts=4, backoff_s=1.0)  # waits 1, 2, 4 s: rides out a 2 s outage


@contextmanager
def retries_logged() -> Iterator[list[str]]:
    """The cycle's retry warnings while the block runs."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler, logger = Keep(logging.WARNING), logging.getLogger("daybreak.cycle")
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)


def partitions_of(spec, ctx: RunContext) -> dict[str, str]:
    """{zone/date: content hash} of the day's published partitions."""
    out = {}
    for zone in invariants.zones(spec):
        part = ctx.store.partition(zone, ctx.logical_date)
        if part is not None:
            out[zone] = part.manifest["content_hash"]
    return out


# --- S3 ---------------------------------------------------------------------------------------

class FlakyS3:
    """moto's S3 API on a fixed port that can disappear and come back.

    Buckets live in moto's in-process backend, so they outlast a restart as a real S3's would.
    Stopping closes the listening socket (new connections are refused) and every open
    connection (requests in flight and pooled keep-alive connections see a reset), as a server
    that went away would. An armed trigger strikes at one chosen request:

    - ``before``: the endpoint goes away before the server handles it;
    - ``after``: the server handles it (an object is stored), then the endpoint goes away;
    - ``lost``: the server handles it, but its response and the client's retries of that same
      request are lost (their connections reset) while the rest of the endpoint answers.

    Each lasts ``down_s`` seconds (None: until ``start()``).
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server: Any = None
        self.thread: threading.Thread | None = None
        self.conns: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.trigger: tuple[str, str, str, float | None] | None = None
        self.fired: list[str] = []
        self.lost: tuple[str, float] | None = None  # (method and path, until when) of a lost request
        self.up = threading.Event()
        self.gone = threading.Event()  # set once the listener and every connection are closed

    def start(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        moto = DomainDispatcherApplication(create_backend_app)

        def app(environ: dict, start_response: Any) -> Any:
            request = f"{environ['REQUEST_METHOD']} {environ.get('PATH_INFO', '')}?{environ.get('QUERY_STRING', '')}"
            when, down_s = self._strikes(request)
            if self._is_lost(request):
                environ["werkzeug.socket"].shutdown(socket.SHUT_RDWR)
                start_response("503 Service Unavailable", [])
                return [b""]
            if when == "before":
                self._go_down(down_s)
                start_response("503 Service Unavailable", [])
                return [b""]
            body = list(moto(environ, start_response))
            if when == "after":
                self._go_down(down_s)
            elif when == "lost":
                with self.lock:
                    self.lost = (request, time.monotonic() + (down_s if down_s is not None else 3600))
                environ["werkzeug.socket"].shutdown(socket.SHUT_RDWR)
            return body

        srv = make_server("127.0.0.1", self.port, app, threaded=True, request_handler=MotoRequestHandler)
        accept = srv.get_request

        def get_request() -> tuple[socket.socket, Any]:
            conn, addr = accept()
            with self.lock:
                self.conns.add(conn)
            return conn, addr

        srv.get_request = get_request
        self.server = srv
        self.thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.gone.clear()
        self.up.set()

    def stop(self) -> None:
        if self.server is None:
            return
        self.up.clear()
        srv, self.server = self.server, None
        srv.shutdown()
        srv.server_close()  # the listener: new connections are refused from now on
        with self.lock:
            conns, self.conns = self.conns, set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.gone.set()

    def arm(self, method: str, pattern: str, when: str, down_s: float | None) -> None:
        """Strike at the first `method` request whose path and query contain every
        `|`-separated part of `pattern`."""
        with self.lock:
            self.trigger, self.fired, self.lost = (method, pattern, when, down_s), [], None

    def _strikes(self, request: str) -> tuple[str | None, float | None]:
        with self.lock:
            t = self.trigger
            method, _, path = request.partition(" ")
            if t is None or method != t[0] or not all(p in path for p in t[1].split("|")):
                return None, None
            self.trigger = None
            self.fired.append(request)
            return t[2], t[3]

    def _is_lost(self, request: str) -> bool:
        with self.lock:
            return self.lost is not None and self.lost[0] == request and time.monotonic() < self.lost[1]

    def _go_down(self, down_s: float | None) -> None:
        def outage() -> None:
            self.stop()
            if down_s is not None:
                time.sleep(down_s)
                self.start()

        threading.Thread(target=outage, daemon=True).start()
        self.gone.wait(5)  # this request's own connection goes with the others: no response arrives

    def env(self) -> dict[str, str]:
        from s3 import CREDS

        return {**CREDS, "DAYBREAK_S3_ENDPOINT_URL": self.endpoint}

    def client(self) -> Any:
        import boto3
        from s3 import CREDS

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=CREDS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDS["AWS_SECRET_ACCESS_KEY"])


@dataclass(frozen=True)
class S3Outage:
    what: str
    method: str
    pattern: str  # parts of the request path, '|'-separated
    when: str  # before / after the server handles the request
    down_s: float | None  # None: longer than the retries, so the cycle fails and is rerun


# pyarrow writes every object as a multipart upload: POST ?uploads, PUT parts, POST ?uploadId=
# (the completion, when the object appears).
S3_OUTAGES = [
    S3Outage("stage's manifest completes but its response and the client's retries are lost", "POST",
             "/staged/flights/|_manifest.json|uploadId=", "lost", 2.0),
    S3Outage("gone 2 s as a feature task writes its run", "PUT", "/features/|/_runs/", "before", 2.0),
    S3Outage("gone 2 s as stage writes a data file", "PUT", "/staged/flights/|/run=|.parquet", "before", 2.0),
    S3Outage("gone for longer than the retries as stage writes", "PUT", "/staged/weather/|/run=", "before", None),
    S3Outage("gone 2 s right after the feature manifest completes", "POST", "/features/|_manifest.json|uploadId=",
             "after", 2.0),
    S3Outage("the feature manifest completes but its response and the client's retries are lost", "POST",
             "/features/|_manifest.json|uploadId=", "lost", 2.0),
]
S3_TRIALS = trials(ci=2, full=10)  # (the landing files end at 2013-01-12)


def test_s3_endpoint_goes_away_and_comes_back(spec, landing: Path, ray_local, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from s3 import apply_env

    t = tally("outage: S3 endpoint down")
    # The outages hit stage and features; training nothing keeps each cycle short. The features on
    # Ray, whose tasks read and write S3 (a small day would stay in process).
    monkeypatch.setenv("DAYBREAK_COMPUTE", "ray")
    spec = spec.model_copy(update={"training": spec.training.model_copy(update={"min_rows": 10**9})})
    s3 = FlakyS3()
    s3.start()
    try:
        apply_env(monkeypatch, s3.env())
        bucket = f"outage-{uuid.uuid4().hex[:8]}"
        s3.client().create_bucket(Bucket=bucket)
        first = date(2013, 1, 1)
        days = [first + timedelta(days=k) for k in range(S3_TRIALS + 1)]
        c = s3.client()
        for d in days:
            for sub in ("flights", "weather"):
                c.upload_file(str(landing / sub / f"{d}.csv"), bucket, f"store/landing/{sub}/{d}.csv")
        for p in (landing / "dims").iterdir():
            c.upload_file(str(p), bucket, f"store/landing/dims/{p.name}")
        monkeypatch.setenv("DAYBREAK_HOME", str(make_home(tmp_path / "s3", landing)))
        monkeypatch.setenv("DAYBREAK_STORE", f"s3://{bucket}/store")
        baseline = LocalBaseline(spec, make_home(tmp_path / "baseline", landing))

        run_cycle(spec, RunContext.create(first), deploy=False, retry=FAST)
        for k, day in enumerate(days[1:]):
            o = S3_OUTAGES[k % len(S3_OUTAGES)]
            ctx = RunContext.create(day)
            before = invariants.snapshot(spec, ctx)
            problems = []
            s3.arm(o.method, o.pattern, o.when, o.down_s)
            t0 = time.monotonic()
            failed = None
            with retries_logged() as retried:
                try:
                    run_cycle(spec, ctx, deploy=False, retry=FAST if o.down_s else Retry(attempts=2, backoff_s=0.5))
                except Exception as e:
                    failed = e
            if not s3.fired:
                problems.append(f"{day} ({o.what}): the outage never happened")
            if o.down_s is None:
                s3.start()
                if failed is None:
                    problems.append(f"{day} ({o.what}): the cycle completed although S3 was down")
            if failed is not None and (o.down_s is not None or not is_retryable(failed)):
                problems.append(f"{day} ({o.what}): the cycle failed: {type(failed).__name__}: {failed}")
            s3.up.wait(30)
            res = invariants.check(spec, ctx, before)
            problems += [f"{day} ({o.what}): {p}" for p in res["problems"]]
            try:
                run_cycle(spec, RunContext.create(day), deploy=False, retry=FAST)
            except Exception as e:
                problems.append(f"{day} ({o.what}): the rerun failed: {type(e).__name__}: {e}")
            got, want = partitions_of(spec, ctx), baseline.partitions(day)
            if got != want:
                problems.append(f"{day} ({o.what}): published {got}, an undisturbed run publishes {want}")
            print(f"S3 outage {day} ({o.what}): {'failed, ' if failed else ''}{len(retried)} retries "
                  f"({time.monotonic() - t0:.1f} s); "
                  f"problems: {problems or 'none'}")
            t.record(problems, data_lost=res["data_lost"], wrong_promotions=res["wrong_promotions"])
            if problems:
                break  # the next date reads this one's partitions
    finally:
        s3.stop()
    t.check()


class LocalBaseline:
    """The same days staged and featured, undisturbed, on a local store: what must be published."""

    def __init__(self, spec, home: Path) -> None:
        self.spec, self.store = spec, str(home / "store")
        self.done: set[date] = set()

    def partitions(self, day: date) -> dict[str, str]:
        first = date(2013, 1, 1)
        for k in range((day - first).days + 1):
            d = first + timedelta(days=k)
            if d not in self.done:
                ctx = RunContext.create(d, store=self.store)
                stage(self.spec, ctx)
                build_features(self.spec, ctx)
                self.done.add(d)
        return partitions_of(self.spec, RunContext.create(day, store=self.store))


# --- MLflow -----------------------------------------------------------------------------------

class MlflowServer:
    """A real ``mlflow server`` on a fixed port, on a sqlite file, so its state outlasts a restart."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.db, self.port = folder, folder / "mlflow.db", free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.restarts: list[float] = []  # seconds each restart took

    def start(self) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(self.folder / "server.log", "a") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
                 "--backend-store-uri", f"sqlite:///{self.db}", "--artifacts-destination",
                 str(self.folder / "artifacts"), "--workers", "1"],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.folder, start_new_session=True)
        wait_http(f"{self.uri}/health", timeout=120, proc=self.proc)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal the server's process group (the CLI and its uvicorn) and wait for it to go."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        self.proc = None

    def restart_when(self, sql: str, args: tuple, done: threading.Event) -> threading.Thread:
        """In the background: as soon as `sql` finds a row in the server's database, SIGTERM the
        server and start it again on the same port; `done` is set once it answers again (or the
        watch was called off by setting it)."""

        def watch() -> None:
            con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=0.2)
            try:
                while not done.is_set():
                    try:
                        hit = con.execute(sql, args).fetchone()
                    except sqlite3.OperationalError:
                        hit = None
                    if hit:
                        t0 = time.monotonic()
                        self.stop()
                        self.start()
                        self.restarts.append(time.monotonic() - t0)
                        break
                    time.sleep(0.02)
            finally:
                con.close()
                done.set()

        th = threading.Thread(target=watch, daemon=True)
        th.start()
        return th


@dataclass(frozen=True)
class MlflowOutage:
    what: str
    sql: str  # the server restarts when this finds a row (? is the logical date)
    client_retries: bool  # False: the MLflow client gives up at once and the cycle has to retry


RUN_STARTED = "select 1 from runs where name = ?"
VERSION_CREATED = ("select 1 from model_versions where run_id in (select run_uuid from runs where name = ?)")
MLFLOW_OUTAGES = [
    MlflowOutage("train just registered its version", VERSION_CREATED, client_retries=False),
    MlflowOutage("the gate logs its run", RUN_STARTED, client_retries=False),
    MlflowOutage("train logs its run, MLflow's client retrying too", RUN_STARTED, client_retries=True),
    MlflowOutage("train logs its run", RUN_STARTED, client_retries=False),
]
MLFLOW_TRIALS = trials(ci=1, full=8)
# waits 1, then 2 s at a time: over a minute in all, longer than a restart on a loaded machine (15-25 s),
# and the cycle goes on within 2 s of the server's return (longer waits only add idle time)
PATIENT = Retry(attempts=36, backoff_s=1.0, max_wait_s=2.0)


def test_mlflow_server_restarts_mid_run(spec, fresh: Path, ray_local, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    t = tally("outage: MLflow server restart")
    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    done, watcher = threading.Event(), None
    try:
        for k in range(MLFLOW_TRIALS):
            o = MLFLOW_OUTAGES[k % len(MLFLOW_OUTAGES)]
            day = date(2013, 1, 2) + timedelta(days=k)
            step = "gate" if "gate" in o.what else "train"
            ctx = RunContext.create(day, tracking_uri=server.uri)
            before = invariants.snapshot(spec, ctx)
            champ_before = champion(spec, ctx)
            problems: list[str] = []
            if not o.client_retries:
                monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            done = threading.Event()
            watcher = server.restart_when(o.sql, (f"{step}-{day}",), done)
            failed = None
            t0 = time.monotonic()
            with retries_logged() as retried:
                try:
                    run_cycle(spec, ctx, deploy=False, retry=PATIENT)
                except Exception as e:
                    failed = e
                finally:
                    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
            took = time.monotonic() - t0
            done.set()  # calls the watch off if it has not fired; a restart under way finishes
            watcher.join(300)
            if len(server.restarts) != k + 1:
                problems.append(f"{day} ({o.what}): the server did not restart during the cycle")
            if server.proc is None or server.proc.poll() is not None:
                server.start()
            if failed is not None and not is_retryable(failed):  # (a retryable one is a clean failure if
                # the checks below pass: the restart outlasted the retries)
                problems.append(f"{day} ({o.what}): the cycle failed: {type(failed).__name__}: {failed}")
            res = invariants.check(spec, ctx, before)
            problems += [f"{day} ({o.what}): {p}" for p in res["problems"]]
            again = None
            if failed is None or is_retryable(failed):  # (after a permanent error, the rerun would wait as long)
                try:
                    again = run_cycle(spec, RunContext.create(day, tracking_uri=server.uri), deploy=False,
                                      retry=PATIENT)
                except Exception as e:
                    problems.append(f"{day} ({o.what}): the rerun failed: {type(e).__name__}: {e}")
            problems += [f"{day} ({o.what}): {p}" for p in lineage_problems(spec, ctx, before, again, champ_before)]
            print(f"MLflow restart {day} ({o.what}): cycle {'failed' if failed else 'completed'} in {took:.1f} s, "
                  f"restart {server.restarts[-1:]} s, "
                  f"retried {[m.split(':')[0] for m in retried]}; problems: {problems or 'none'}")
            t.record(problems, data_lost=res["data_lost"], wrong_promotions=res["wrong_promotions"])
            if problems:
                break  # the next date would start from what this one left behind
    finally:
        done.set()
        if watcher is not None:
            watcher.join(300)
        server.stop()
    t.check()


def champion(spec, ctx: RunContext) -> str | None:
    champ = registry.alias_version(registry.client(ctx), spec.model.name, spec.promotion.alias)
    return None if champ is None else str(champ.version)


def lineage_problems(spec, ctx: RunContext, before: dict[str, Any], rerun: dict[str, Any] | None,
                     champ_before: str | None) -> list[str]:
    """The date registered exactly one version, the rerun (if any) found it, and the champion is
    what the recorded decision says: that version after PROMOTE, the one before otherwise."""
    day = ctx.logical_date.isoformat()
    cl = registry.client(ctx)
    new = {str(mv.version): mv for mv in registry.versions(cl, spec.model.name)
           if str(mv.version) not in before["versions"]}
    out = []
    if len(new) != 1:
        out.append(f"{len(new)} model versions registered for {day}: "
                   + ", ".join(f"v{v} (run {mv.run_id}, lineage {mv.tags.get(registry.LINEAGE_TAG)})"
                               for v, mv in sorted(new.items())))
    cand = registry.candidate_for(cl, spec.model.name, day, spec.spec_hash())
    if cand is None:
        return [*out, f"no candidate recorded for {day}"]
    if rerun is not None and (rerun["train"].get("status") != "exists"
                              or rerun["train"].get("model_version") != str(cand.version)):
        out.append(f"the rerun's train step did {rerun['train'].get('status')} v{rerun['train'].get('model_version')}, "
                   f"not 'exists' v{cand.version}")
    decision = cand.tags.get(registry.DECISION_TAG)
    want = str(cand.version) if decision == PROMOTE else champ_before
    if champion(spec, ctx) != want:
        out.append(f"champion v{champion(spec, ctx)} after decision {decision} on v{cand.version}; want v{want}")
    return out


# --- Ray --------------------------------------------------------------------------------------

RAY_DAY = date(2013, 1, 9)
FEATURE_TASKS = ("_on_node", "build_window_index", "fold_tables", "day_run")  # build_features' Ray tasks
RAY_TRIALS = trials(ci=1, full=4)


class RayCluster:
    """Two Ray nodes on this host (``ray start --block``, stopped by PID), with token auth."""

    def __init__(self) -> None:
        import secrets

        self.tmp = Path(tempfile.mkdtemp(prefix="dbray", dir="/tmp"))  # Ray's socket paths must stay short
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                     "RAY_USAGE_STATS_ENABLED": "0",
                     # a dead node is noticed in about 3 s instead of about 15 s
                     "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                     "RAY_health_check_failure_threshold": "3"}
        self.common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--object-store-memory=200000000",
                       "--disable-usage-stats"]
        self.head: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []

    def start(self) -> None:
        from ray_nodes import start_node as _start

        self.head = _start(["--head", f"--port={self.port}", f"--temp-dir={self.tmp}", "--include-dashboard=false",
                            *self.common], self.env, self.tmp / "head.log")
        self.add_worker()  # it waits for the head's GCS (the driver checks that both nodes are up)

    def add_worker(self) -> subprocess.Popen:
        from ray_nodes import start_node as _start

        w = _start([f"--address={self.address}", *self.common], self.env, self.tmp / f"worker{len(self.workers)}.log")
        self.workers.append(w)
        return w

    def stop(self) -> None:
        from ray_nodes import stop_family as _stop

        for p in [*reversed(self.workers), self.head]:
            if p is not None:
                _stop(p)
        shutil.rmtree(self.tmp, ignore_errors=True)


def kill_node_mid_task(node: subprocess.Popen, stop: threading.Event, found: list[str]) -> None:
    """Wait until a process of `node` runs one of the feature step's tasks; freeze that process
    at once (SIGSTOP) and, if it is still in the task, SIGKILL every process of the node.
    Appends what was running to `found`."""
    import psutil

    def task(p: Any) -> str | None:
        try:
            title = " ".join(p.cmdline()).strip()
        except psutil.Error:
            return None
        return title if title.startswith("ray::") and title[5:].split()[0] in FEATURE_TASKS else None

    root = psutil.Process(node.pid)
    procs: list[Any] = []
    refresh = 0.0
    while not stop.is_set():
        if time.monotonic() > refresh:  # Ray may start more workers on the node
            procs, refresh = root.children(recursive=True), time.monotonic() + 0.25
        for p in procs:
            if task(p) is None:
                continue
            try:
                p.suspend()
            except psutil.Error:
                continue
            title = task(p)
            if title is None:  # it finished the task just before
                try:
                    p.resume()
                except psutil.Error:
                    pass
                continue
            family = [root, *root.children(recursive=True)]
            for q in family:
                try:
                    q.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(family, timeout=10)
            found.append(f"{title} (pid {p.pid})")
            return
        time.sleep(0.001)


def ray_driver(address: str, spec_path: str, day: str) -> None:
    """Run in its own process (the suite's own process holds a local Ray): wait for both nodes,
    start a Python worker on each, say READY and wait for a line on stdin, then build the day's
    features through the cycle's retry."""
    from daybreak.infra.compute import ensure_ray
    from daybreak.spec import load_spec

    ensure_ray(address)
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    deadline = time.monotonic() + 120
    while sum(n["Alive"] for n in ray.nodes()) < 2:
        if time.monotonic() > deadline:
            raise TimeoutError("the worker node did not join within 120 s")
        time.sleep(0.5)

    @ray.remote
    def warm() -> None:
        import daybreak.features._build  # noqa: F401

    ray.get([warm.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
             for n in ray.nodes() if n["Alive"]])
    spec = load_spec(spec_path)
    print("READY", flush=True)
    sys.stdin.readline()
    with retries_logged() as retried:
        res = with_retry("features", build_features, spec, RunContext.create(day, ray_address=address),
                         Retry(attempts=3, backoff_s=2.0))
    print("RESULT " + json.dumps({"result": res, "retries": retried}), flush=True)


def start_driver(cluster: RayCluster, store: Path) -> subprocess.Popen:
    here = Path(__file__).resolve().parent
    code = (f"import sys; sys.path[:0] = {[str(here), str(here.parent)]!r}; import test_outages; "
            f"test_outages.ray_driver({cluster.address!r}, {str(SPEC)!r}, {RAY_DAY.isoformat()!r})")
    env = {**cluster.env, "DAYBREAK_STORE": str(store), "DAYBREAK_HOME": str(store.parent)}
    store.parent.mkdir(parents=True)
    with open(store.parent / "driver.log", "w") as log:
        return subprocess.Popen([str(BIN / "python"), "-c", code], env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=log, text=True, cwd=store.parent)


@dataclass
class Drive:
    killed: list[str]  # the task the worker node was running when it was killed (empty: not caught)
    lines: list[str]  # the driver's stdout
    returncode: int
    took: float


def drive(cluster: RayCluster, store: Path, prepare: Any) -> Drive:
    """Start a driver, run ``prepare()`` (fill `store`) while it connects, then let it build the
    features while kill_node_mid_task watches the newest worker node."""
    driver = start_driver(cluster, store)
    watchdog = threading.Timer(300, driver.kill)
    watchdog.start()
    stop, found, lines = threading.Event(), [], []
    killer = threading.Thread(target=kill_node_mid_task, args=(cluster.workers[-1], stop, found))
    try:
        prepare()
        t0 = time.monotonic()
        for line in driver.stdout:
            lines.append(line)
            if line.startswith("READY"):
                killer.start()
                driver.stdin.write("go\n")
                driver.stdin.flush()
        driver.wait()
    finally:
        watchdog.cancel()
        stop.set()
        if killer.is_alive():
            killer.join(30)
    return Drive(found, lines, driver.returncode, time.monotonic() - t0)


def test_ray_worker_node_dies_during_features(spec, landing: Path, ray_local, tmp_path: Path) -> None:
    """Both nodes run the feature step's tasks; the worker node is SIGKILLed (all its processes)
    while one of them runs there. Ray retries the lost tasks on the head (the cycle's retry is
    the backstop); the published partition equals the one a local Ray publishes. A clean failure
    (retryable, nothing published) is allowed if a rerun then completes. The tasks are short: a
    run in which none was caught running on the worker node is repeated (at most 3 times)."""
    t = tally("outage: Ray worker node killed")
    base = make_home(tmp_path / "base", landing) / "store"
    want: list[Any] = []

    def inputs() -> None:  # staged once, and the undisturbed features, on this process's local Ray
        for d in range(8, -1, -1):
            stage(spec, RunContext.create(RAY_DAY - timedelta(days=d), store=str(base)))
        build_features(spec, RunContext.create(RAY_DAY, store=str(base)))
        want.append(RunContext.create(RAY_DAY, store=str(base)).store.partition(feature_zone(spec), RAY_DAY))

    cluster = RayCluster()
    cluster.start()
    try:
        for k in range(RAY_TRIALS):
            if k:
                cluster.add_worker()
            for attempt in range(3):
                store = tmp_path / f"trial{k}-{attempt}" / "store"
                before: dict[str, str] = {}

                def prepare(store: Path = store, before: dict[str, str] = before) -> None:
                    if not want:
                        inputs()
                    shutil.copytree(base, store, symlinks=True,
                                    ignore=lambda d, names: ["features"] if Path(d) == base else [])
                    before.update(invariants.partition_problems(spec, RunContext.create(RAY_DAY, store=str(store)))[1])

                run = drive(cluster, store, prepare)
                if run.killed:
                    break
            ctx = RunContext.create(RAY_DAY, store=str(store))
            problems = []
            if not run.killed:
                problems.append("the worker node was never caught running a feature task (nothing was killed)")
            results = [json.loads(ln.removeprefix("RESULT ")) for ln in run.lines if ln.startswith("RESULT ")]
            broken, seen = invariants.partition_problems(spec, ctx)
            lost = invariants.lost({"partitions": before, "versions": set()}, {"partitions": seen, "versions": set()})
            problems += broken + lost
            if run.returncode != 0 or not results:
                err = (store.parent / "driver.log").read_text()[-1500:]
                if not any(ln.startswith("READY") for ln in run.lines):
                    problems.append(f"the driver failed before the feature step started: {err}")
                elif ctx.store.partition(feature_zone(spec), RAY_DAY) is not None:
                    problems.append(f"the feature step failed (exit {run.returncode}) but published: {err}")
                else:  # failed cleanly: the rerun must complete (on this process's Ray)
                    print(f"the feature step failed cleanly after the kill: {err[-300:]}")
                    try:
                        build_features(spec, ctx)
                    except Exception as e:
                        problems.append(f"the rerun failed: {type(e).__name__}: {e}")
            got = ctx.store.partition(feature_zone(spec), RAY_DAY)
            if got is None or got.manifest["content_hash"] != want[0].manifest["content_hash"]:
                problems.append(f"published features {None if got is None else got.manifest['content_hash']}, "
                                f"an undisturbed run publishes {want[0].manifest['content_hash']}")
            print(f"Ray worker node killed running {run.killed} (attempt {attempt + 1}, {run.took:.1f} s); "
                  f"cycle retries: {results[0]['retries'] if results else '-'}; problems: {problems or 'none'}")
            t.record(problems, data_lost=len(lost))
    finally:
        cluster.stop()
    t.check()
