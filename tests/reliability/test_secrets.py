"""Secrets: with real credentials in play, no secret is ever printed, logged or written down.

Real services on loopback: the moto S3 server (the store lives in a bucket), an `mlflow server
--app-name basic-auth` whose admin password is random (its artifacts proxied, so model files and
gate reports go through it), and Airflow in a fresh AIRFLOW_HOME. The secrets, all random: the
S3 secret key, an S3 session token and the MLflow password.

Trials:

1. **CLI**: `daybreak run` for 2013-01-01 and 2013-01-02 (stage, features on a local Ray, train
   v1, gate, promote, deploy) with ``AWS_*`` and ``MLFLOW_TRACKING_USERNAME/PASSWORD`` in its
   environment. Scanned: its stdout and stderr, its Ray session folder, then everything the
   shared stores hold (below).
2. **CLI error path**: `daybreak gate` with a wrong MLflow password (another random secret): it
   must fail with the server's refusal, and print neither password.
3. **Airflow** (``make reliability`` only: ``airflow db migrate`` and a ``dag.test`` of the whole
   chain cost over a minute on a busy 2-core machine, and tests/test_airflow*.py already run the
   operators with Connections under ``make test``): the daily chain for 2013-01-03 through
   ``dag.test`` (as `airflow dags test` does), its operators given ``aws_conn_id`` and
   ``mlflow_conn_id``: the credentials live only in Airflow Connections in the metadata DB
   (Fernet-encrypted; the driver gets them on stdin, never in its environment). Scanned: every
   file under AIRFLOW_HOME (the metadata DB with its XComs, rendered fields and connections; task
   logs), the driver's output and Ray folder, and the shared stores again.

The shared stores: every object in the bucket (staged data, features, manifests, quarantine),
the local DAYBREAK_HOME, the MLflow server's folder (its backend DB holds every param, tag, run
name and model-version tag in clear; the artifacts: models, gate_report.html, decision.json) and
log, plus the params, tags and run names of every MLflow run and the tags, description and
source of every model version, read through the API. A hit is the secret itself or the basic
auth header's base64 of ``admin:<password>``. Positive controls keep the scan honest: the
connection's host is found in Airflow's DB in clear, XCom values are found there, the Ray sessions
left logs, MLflow refuses requests without the password.

Found in the DB in clear, as expected: the connections' ids, hosts and logins (the S3 access key
id); their passwords and extras are Fernet-encrypted (``airflow db migrate`` writes a generated
``fernet_key`` to airflow.cfg, as a production install does). Under ``dag.test`` the task logs go
to the driver's output, which is scanned; AIRFLOW_HOME holds no log files. moto does not check
S3 signatures, so the S3 secret is in use (every request is signed with it) but not verified.
The MLflow app runs with its credential cache on (``auth_cache_ttl_seconds``), a documented
production setting; without it each request pays a PBKDF2 check (over a second on a busy
2-core machine).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC
from pathlib import Path

import httpx
from conftest import BIN, MLFLOW_AUTH_INI, ROOT, free_port, wait_http
from tally import FULL, tally
from test_airflow import lenient_spec
from test_prefect_server import _files_containing, _stop

TESTS = ROOT / "tests"
DAG_ID = "daybreak_secrets"
DAG = '''
import os
from datetime import datetime

from airflow.sdk import dag

from daybreak.airflow import (BuildFeaturesOperator, DeployModelOperator, EvaluateGateOperator,
                              PromoteModelOperator, StageDataOperator, TrainModelOperator)


@dag(dag_id="daybreak_secrets", schedule=None, start_date=datetime(2013, 1, 1), catchup=False)
def daybreak_secrets():
    common = {"spec": os.environ["DAYBREAK_TEST_SPEC"], "store": os.environ["DAYBREAK_TEST_STORE"],
              "aws_conn_id": "secrets_s3", "mlflow_conn_id": "secrets_mlflow"}
    (StageDataOperator(task_id="stage", **common) >> BuildFeaturesOperator(task_id="features", **common)
     >> TrainModelOperator(task_id="train", **common) >> EvaluateGateOperator(task_id="gate", **common)
     >> PromoteModelOperator(task_id="promote", **common)
     >> DeployModelOperator(task_id="deploy", serve_url=os.environ["DAYBREAK_TEST_SERVE_URL"], **common))


daybreak_secrets()
'''


def airflow_driver() -> None:
    """In the Airflow process: the Connections (from stdin) into the metadata DB, then the DAG
    through dag.test for 2013-01-03; prints ``RESULT {...}``."""
    from datetime import datetime

    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.connection import Connection
    from airflow.utils.session import create_session
    from airflow_check import _run

    creds = json.loads(sys.stdin.read())
    with create_session() as session:
        session.query(Connection).filter(Connection.conn_id.in_(["secrets_s3", "secrets_mlflow"])).delete()
        session.add(Connection(conn_id="secrets_s3", conn_type="aws", login=creds["access_key"],
                               password=creds["secret_key"],
                               extra=json.dumps({"endpoint_url": creds["endpoint"], "region_name": "us-east-1",
                                                 "aws_session_token": creds["session_token"]})))
        session.add(Connection(conn_id="secrets_mlflow", conn_type="mlflow", host=creds["tracking_uri"],
                               login="admin", password=creds["password"]))
    del creds
    dag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"]).get_dag(DAG_ID)
    out = _run(dag, logical_date=datetime(2013, 1, 3, tzinfo=UTC))
    print("RESULT " + json.dumps(out, default=str), flush=True)


def needles(values: dict[str, str], password: str) -> dict[str, bytes]:
    """What counts as a leak: each secret, and the basic auth header's encoding of the password."""
    out = {name: v.encode() for name, v in values.items()}
    out["password (basic auth header)"] = base64.b64encode(f"admin:{password}".encode())
    return out


def hits_in_files(roots: list[Path], find: dict[str, bytes]) -> list[str]:
    return [f"{name} in {path}" for root in roots for name, needle in find.items()
            for path in _files_containing(root, needle)]


def files_under(root: Path) -> int:
    return sum(1 for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def hits_in_text(where: str, text: str, find: dict[str, bytes]) -> list[str]:
    raw = text.encode(errors="replace")
    return [f"{name} in {where}" for name, needle in find.items() if needle in raw]


def bucket_hits(s3, bucket: str, find: dict[str, bytes]) -> tuple[list[str], int]:
    hits, n = [], 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            n += 1
            body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            hits += [f"{name} in s3://{bucket}/{obj['Key']}" for name, needle in find.items() if needle in body]
    return hits, n


def mlflow_api_hits(url: str, password: str, find: dict[str, bytes]) -> tuple[list[str], int]:
    """Params, tags and run names of every run; tags, description and source of every version."""
    from mlflow import MlflowClient

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=password)
    try:
        cl = MlflowClient(tracking_uri=url, registry_uri=url)
        exps = [e.experiment_id for e in cl.search_experiments()]
        runs = cl.search_runs(exps, max_results=1000) if exps else []
        blob = [[r.info.run_name, r.data.params, r.data.tags] for r in runs]
        versions = cl.search_model_versions(max_results=1000)
        blob += [[mv.name, mv.version, mv.tags, mv.description, mv.source] for mv in versions]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    text = json.dumps(blob, default=str)
    return hits_in_text("MLflow runs (params, tags, names) and model versions (tags, source)", text, find), \
        len(runs) + len(versions)


def _clean_env() -> dict[str, str]:
    drop = ("MLFLOW_", "DAYBREAK_", "AWS_", "AIRFLOW", "RAY_ADDRESS", "RAY_TMPDIR")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def _launch(cmd: list[str], env: dict[str, str], log: Path, stdin: str | None = None,
            cwd: Path | None = None) -> subprocess.Popen:
    """A process in its own group, output to `log`; `stdin` written to it and closed."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.PIPE, start_new_session=True)
    proc.stdin.write((stdin or "").encode())
    proc.stdin.close()
    return proc


def _finish(proc: subprocess.Popen, log: Path, timeout: float) -> tuple[int, str]:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = _stop(proc)
    return code, log.read_text(errors="replace")


def _json_tail(text: str) -> dict:
    """The JSON document a ``--json`` command printed last (MLflow prints "View run" lines too)."""
    start = text.rindex("\n{\n") + 1 if not text.startswith("{") else 0
    return json.JSONDecoder().raw_decode(text[start:])[0]


def test_no_secret_anywhere(s3_server, landing: Path, spec, tmp_path: Path, ray_local: None) -> None:
    t = tally("Secrets")
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    secret = {"S3 secret key": "s3key-" + secrets.token_urlsafe(30),
              "S3 session token": "s3tok-" + secrets.token_urlsafe(30),
              "MLflow password": "mlpw-" + secrets.token_urlsafe(24)}
    password = secret["MLflow password"]
    wrong = "wrongpw-" + secrets.token_urlsafe(24)
    find = needles(secret, password)
    access_key = "AKIA" + secrets.token_hex(8).upper()

    bucket = f"secrets-{secrets.token_hex(4)}"
    s3 = s3_server.client()
    s3.create_bucket(Bucket=bucket)
    s3_server.upload_dir(landing, bucket, "store/landing")
    store = f"s3://{bucket}/store"
    home, mlflow_dir, logs, dags = (tmp_path / d for d in ("home", "mlflow", "logs", "dags"))
    airflow_home = tmp_path / "airflow"
    for d in (home, mlflow_dir, logs, dags):
        d.mkdir()
    spec_file = lenient_spec(spec, tmp_path)
    (dags / "daybreak_secrets.py").write_text(DAG)
    # the basic-auth app's settings, with its credential cache on (see the module docstring)
    (mlflow_dir / "auth.ini").write_text(MLFLOW_AUTH_INI)
    # Ray's session folders (logs of every worker) in short private paths (unix sockets live there)
    ray_dirs = {k: Path(tempfile.mkdtemp(prefix=f"dbs{k[0]}", dir="/tmp")) for k in ("cli", "airflow")}
    serve_url = f"http://127.0.0.1:{free_port()}"  # nothing listens: deploy reports no endpoint
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs: dict[str, subprocess.Popen] = {}
    base = _clean_env()
    airflow_env = base | {"AIRFLOW_HOME": str(airflow_home), "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
                          "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "DAYBREAK_HOME": str(home),
                          "DAYBREAK_TEST_SPEC": str(spec_file), "DAYBREAK_TEST_STORE": store,
                          "DAYBREAK_TEST_SERVE_URL": serve_url, "RAY_TMPDIR": str(ray_dirs["airflow"]),
                          "DAYBREAK_COMPUTE": "ray"}  # small days would stay in process: Ray's logs are scanned
    cli_env = base | {"DAYBREAK_HOME": str(home), "DAYBREAK_STORE": store, "MLFLOW_TRACKING_URI": url,
                      "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password,
                      "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret["S3 secret key"],
                      "AWS_SESSION_TOKEN": secret["S3 session token"], "AWS_REGION": "us-east-1",
                      "DAYBREAK_S3_ENDPOINT_URL": s3_server.endpoint, "DAYBREAK_SERVE_URL": serve_url,
                      "RAY_TMPDIR": str(ray_dirs["cli"]), "DAYBREAK_COMPUTE": "ray"}
    assert not any(v in json.dumps(airflow_env) for v in secret.values())

    def cli_run(day: str) -> subprocess.Popen:
        cmd = [str(BIN / "daybreak"), "run", "--spec", str(spec_file), "--date", day, "--json"]
        return _launch(cmd, cli_env, logs / f"daybreak-run-{day}.out")

    try:
        # the MLflow server and Airflow's DB start while 2013-01-01 is prepared
        procs["mlflow"] = _launch(
            [str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{mlflow_dir / 'mlflow.db'}",
             "--artifacts-destination", str(mlflow_dir / "artifacts")],
            base | {"MLFLOW_AUTH_CONFIG_PATH": str(mlflow_dir / "auth.ini"), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
                    "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(24),
                    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            logs / "mlflow.log", cwd=mlflow_dir)
        if FULL:
            procs["migrate"] = _launch([str(BIN / "airflow"), "db", "migrate"], airflow_env, logs / "migrate.log")
        # 2013-01-01 (history for the next day: stage and features) here, with the same credentials
        from daybreak.features import build_features
        from daybreak.infra.context import RunContext
        from daybreak.infra.store import StorageOptions
        from daybreak.spec import load_spec
        from daybreak.stage import stage

        first = RunContext.create("2013-01-01", store=store, storage=StorageOptions(
            endpoint_url=s3_server.endpoint, region="us-east-1", access_key=access_key,
            secret_key=secret["S3 secret key"], session_token=secret["S3 session token"]))
        lenient = load_spec(spec_file)
        stage(lenient, first)
        build_features(lenient, first)
        timings["2013-01-01 prepared"] = time.monotonic() - t0
        wait_http(f"{url}/health", timeout=180, proc=procs["mlflow"])
        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert httpx.get(search, timeout=30).status_code == 401  # the server really wants the password
        assert httpx.get(search, auth=("admin", password), timeout=30).status_code == 200
        timings["mlflow up"] = time.monotonic() - t0

        # -- 1. the CLI, credentials in its environment
        problems: list[str] = []
        results = []
        for day in ("2013-01-02",):
            procs["cli"] = cli_run(day)
            code, out = _finish(procs.pop("cli"), logs / f"daybreak-run-{day}.out", timeout=600)
            assert code == 0, f"daybreak run {day} exited {code}:\n{out[-6000:]}"
            results.append(_json_tail(out))
            problems += hits_in_text(f"the output of daybreak run {day}", out, find)
            timings[f"cli {day}"] = time.monotonic() - t0
        assert results[-1]["promote"]["promoted"] is True, results[-1]
        problems += hits_in_files([ray_dirs["cli"], home, mlflow_dir], find)
        in_bucket, objects = bucket_hits(s3, bucket, find)
        in_api, records = mlflow_api_hits(url, password, find)
        problems += in_bucket + in_api
        ray_files = files_under(ray_dirs["cli"])
        print(f"\nCLI: {ray_files} files of its Ray session, {objects} objects in the bucket, {records} MLflow runs "
              "and versions scanned")
        if not ray_files or not objects or not records:
            problems.append("nothing to scan: the CLI run left no Ray logs, objects or MLflow records")
        t.record(problems)

        # -- 2. a wrong MLflow password: a clear failure, and neither password printed
        procs["wrong"] = _launch([str(BIN / "daybreak"), "gate", "--spec", str(spec_file), "--date", "2013-01-02"],
                                 cli_env | {"MLFLOW_TRACKING_PASSWORD": wrong}, logs / "wrong-password.out")
        wrong_code, wrong_out = _finish(procs.pop("wrong"), logs / "wrong-password.out", timeout=300)
        problems = hits_in_text("the output of daybreak gate (wrong password)", wrong_out,
                                needles(secret | {"wrong MLflow password": wrong}, wrong) | find)
        if wrong_code == 0:
            problems.append("daybreak gate succeeded with a wrong MLflow password")
        elif not any(w in wrong_out for w in ("401", "Unauthorized", "authenticat")):
            problems.append(f"the failure does not say the server refused the credentials: {wrong_out[-600:]}")
        problems += hits_in_files([logs], find)  # the MLflow server's log (and so far Airflow's migration)
        t.record(problems)
        # -- 3. Airflow (make reliability): the credentials only in Connections
        if FULL:
            assert procs.pop("migrate").wait(timeout=600) == 0, (logs / "migrate.log").read_text()[-3000:]
            timings["db migrated"] = time.monotonic() - t0
            creds = {"access_key": access_key, "secret_key": secret["S3 secret key"],
                     "session_token": secret["S3 session token"], "password": password, "tracking_uri": url,
                     "endpoint": s3_server.endpoint}
            code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; "
                    "from test_secrets import airflow_driver; airflow_driver()")
            procs["airflow"] = _launch([str(BIN / "python"), "-c", code, str(TESTS), str(TESTS / "reliability")],
                                       airflow_env, logs / "airflow-driver.out", stdin=json.dumps(creds), cwd=tmp_path)
            code, out = _finish(procs.pop("airflow"), logs / "airflow-driver.out", timeout=900)
            timings["airflow run"] = time.monotonic() - t0
            line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
            assert line, f"the Airflow driver exited {code}:\n{out[-8000:]}"
            run = json.loads(line[len("RESULT "):])
            assert run["state"] == "success" and set(run["tasks"].values()) == {"success"}, run
            promoted = run["xcom"]["promote"]
            promoted = json.loads(promoted) if isinstance(promoted, str) else promoted
            assert promoted["promoted"] is True and promoted["champion_version"] == "2", promoted

            problems = hits_in_text("the Airflow driver's output (the task logs)", out, find)
            problems += hits_in_files([airflow_home, ray_dirs["airflow"], home, mlflow_dir], find)
            in_bucket, objects = bucket_hits(s3, bucket, find)
            in_api, records = mlflow_api_hits(url, password, find)
            problems += in_bucket + in_api
            # what the metadata DB holds in clear: the connections' hosts and logins, not their secrets
            with sqlite3.connect(airflow_home / "airflow.db") as con:
                conns = con.execute("select conn_id, host, login, is_encrypted, is_extra_encrypted from connection "
                                    "where conn_id like 'secrets_%' order by conn_id").fetchall()
                xcoms = con.execute("select count(*) from xcom where dag_id = ?", (DAG_ID,)).fetchone()[0]
            print(f"Airflow: connections {conns}; {xcoms} XComs; {files_under(airflow_home)} files in AIRFLOW_HOME, "
                  f"{files_under(ray_dirs['airflow'])} of its Ray session, {objects} objects, {records} MLflow records "
                  "scanned")
            if not files_under(ray_dirs["airflow"]):
                problems.append("the Airflow run left no Ray session files to scan")
            if [c[3:] for c in conns] != [(1, 0), (1, 1)]:  # secrets_mlflow has no extra
                problems.append(f"connections not Fernet-encrypted in the metadata DB: {conns}")
            if not _files_containing(airflow_home, url.encode()):  # positive control: the DB is read
                problems.append("the connection host is not found in AIRFLOW_HOME: the scan does not read the DB")
            if xcoms < 6 or not _files_containing(airflow_home, b'"champion_version"'):
                problems.append(f"{xcoms} XComs, or their values not found in AIRFLOW_HOME: the scan misses them")
            problems += hits_in_files([logs], find)  # the MLflow server's log and Airflow's migration, whole
            t.record(problems)

    finally:
        for proc in procs.values():
            _stop(proc, signal.SIGTERM, grace=30)
        for d in ray_dirs.values():
            shutil.rmtree(d, ignore_errors=True)
    timings["total"] = time.monotonic() - t0
    print(", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    t.check()
