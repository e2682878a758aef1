"""The Prefect deployment end to end on real servers: `prefect server start` and an `mlflow server`
with basic auth on loopback, `daybreak prefect deploy` serving the deployments with a cron
schedule, and runs triggered with `run_deployment` (tests/prefect_driver.py, in a subprocess).

The MLflow password lives only in a Prefect Secret block; the tracking URI and the block's name
come from the `daybreak` Prefect Variable. The serving process gets neither in its environment.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from conftest import BIN, ROOT, SPEC, free_port, make_home, wait_http
from test_prefect import QUIET_PREFECT  # SQLite writers wait on each other on a busy 2-core machine

DRIVER = ROOT / "tests" / "prefect_driver.py"
NAME = "daybreak-test"
CRON = "0 3 * * *"
DAYS = ("2013-01-01", "2013-01-02", "2013-01-02")
CACHED_TASKS = ("stage_data", "build_features", "train_model", "evaluate_gate")
NEVER_CACHED = ("monitor_model", "promote_model", "deploy_model")
# every process this test starts carries this variable (and passes it on to its children)
TAG_VAR = "DAYBREAK_TEST_PREFECT_SERVER"


def _base_env(tag: str) -> dict[str, str]:
    drop = ("PREFECT_", "MLFLOW_", "DAYBREAK_", "AWS_", "RAY_ADDRESS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(**{TAG_VAR: tag})
    return env


def _start(cmd: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
    with open(log, "wb") as out:  # the child keeps its own handle
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 30) -> int | None:
    """Signal the process group the test started (the process is its leader), then SIGKILL it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            pass
    code = proc.poll()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # children left in the group
    except ProcessLookupError:
        pass
    if proc.poll() is None:
        proc.wait(timeout=10)
    return code


def _ours(tag: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(TAG_VAR) == tag and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _tail(path: Path, n: int = 6000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"({path} missing)"


def _driver(mode: str, env: dict[str, str], log: Path, timeout: float,
            watch: tuple[subprocess.Popen, Path] | None = None) -> tuple[dict[str, Any], str]:
    """Run tests/prefect_driver.py; fail at once if the watched process (the server) exits meanwhile."""
    proc = _start([str(BIN / "python"), str(DRIVER), mode], env, log, cwd=ROOT)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if watch is not None and watch[0].poll() is not None:
                pytest.fail(f"{watch[0].args[:3]} exited with {watch[0].returncode} during the driver's "
                            f"{mode}:\n{_tail(watch[1])}\n--- driver ---\n{_tail(log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"driver {mode} still running after {timeout}s:\n{_tail(log)}"
                            + (f"\n--- serving process ---\n{_tail(watch[1])}" if watch else ""))
            time.sleep(0.5)
    finally:
        _stop(proc, grace=5)
    output = log.read_text(errors="replace")
    line = next((ln for ln in output.splitlines() if ln.startswith("RESULT ")), None)
    assert line, f"driver {mode} exited {proc.returncode}:\n{output[-6000:]}"
    return json.loads(line[len("RESULT "):]), output


def _files_containing(root: Path, needle: bytes) -> list[str]:
    hits = []
    for folder, _, files in os.walk(root):  # does not follow the landing symlink
        for name in files:
            path = Path(folder) / name
            if path.is_symlink() or not path.is_file():
                continue
            if needle in path.read_bytes():
                hits.append(str(path))
    return hits


def _tasks(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["task"]: t for t in run["task_runs"]}


def _outcome(run: dict[str, Any]) -> dict[str, Any]:
    """The flow's return value, read back from Prefect's result storage."""
    assert isinstance(run["result"], dict) and "summary" in run["result"], \
        f"no flow result for {run['date']}: {run['result_error'] or run['result']}"
    return run["result"]


@pytest.mark.slow
def test_served_deployment_on_a_prefect_server_retrains_promotes_and_caches(
        landing: Path, tmp_path: Path, spec, monkeypatch: pytest.MonkeyPatch) -> None:
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    tag = uuid.uuid4().hex
    password = secrets.token_urlsafe(24)
    home = make_home(tmp_path, landing)
    results = tmp_path / "results"
    server_home, client_home, mlflow_dir, logs = (tmp_path / d for d in ("prefect-server", "prefect-client",
                                                                         "mlflow", "logs"))
    for d in (results, server_home, client_home, mlflow_dir, logs):
        d.mkdir()
    mlflow_port, prefect_port = free_port(), free_port()
    mlflow_url, api_url = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{prefect_port}/api"
    procs: dict[str, subprocess.Popen] = {}
    try:
        # -- MLflow with basic auth, and the Prefect server, both on loopback
        procs["mlflow"] = _start(
            [str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port",
             str(mlflow_port), "--workers", "1", "--backend-store-uri", f"sqlite:///{mlflow_dir / 'mlflow.db'}",
             "--artifacts-destination", str(mlflow_dir / "artifacts")],
            {**_base_env(tag), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
             "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(24),
             "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            logs / "mlflow.log", cwd=mlflow_dir)
        procs["prefect"] = _start(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port),
             "--no-ui", "--analytics-off"],
            {**_base_env(tag), **QUIET_PREFECT, "PREFECT_HOME": str(server_home),
             "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(prefect_port),
             "PREFECT_SERVER_UI_ENABLED": "false", "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2"},
            logs / "prefect-server.log", cwd=server_home)
        wait_http(f"{mlflow_url}/health", timeout=180, proc=procs["mlflow"])
        timings["mlflow up"] = time.monotonic() - t0
        wait_http(f"{api_url}/health", timeout=180, proc=procs["prefect"])
        assert httpx.get(f"{api_url}/health", timeout=10).status_code == 200
        timings["prefect up"] = time.monotonic() - t0
        search = f"{mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert httpx.get(search, timeout=30).status_code == 401  # the server really wants the password
        assert httpx.get(search, auth=("admin", password), timeout=30).status_code == 200
        # a wrong password: the CLI says so in one message (exit 5), without a traceback or the password
        wrong = subprocess.run([str(BIN / "daybreak"), "versions", "--spec", str(SPEC), "--tracking-uri", mlflow_url],
                               env={**_base_env(tag), "MLFLOW_TRACKING_USERNAME": "admin",
                                    "MLFLOW_TRACKING_PASSWORD": "not-" + password, "DAYBREAK_HOME": str(home)},
                               capture_output=True, text=True, timeout=300)
        assert wrong.returncode == 5 and "refused the credentials (UNAUTHENTICATED)" in wrong.stderr, wrong.stderr
        assert "Traceback" not in wrong.stderr and password not in wrong.stderr + wrong.stdout

        # -- the Secret block and the `daybreak` Variable (the password only in the driver's env)
        client_env = {**_base_env(tag), "PREFECT_API_URL": api_url, "PREFECT_HOME": str(client_home),
                      "PREFECT_LOCAL_STORAGE_PATH": str(results), "PREFECT_LOGGING_LEVEL": "INFO",
                      "DRIVER_DEPLOYMENT_NAME": NAME}
        # serve_url: a free port, so the deploy step finds no endpoint instead of one this test did not start
        serve_url = f"http://127.0.0.1:{free_port()}"
        setup, setup_out = _driver("setup", {**client_env, "DRIVER_MLFLOW_URL": mlflow_url,
                                             "DRIVER_SERVE_URL": serve_url, "DRIVER_MLFLOW_PASSWORD": password},
                                   logs / "driver-setup.log", timeout=300,
                                   watch=(procs["prefect"], logs / "prefect-server.log"))
        assert setup["variable"] == {"tracking_uri": mlflow_url, "mlflow_secret": "daybreak-mlflow",
                                     "serve_url": serve_url}

        # -- the serving process: no MLflow URI or credentials and no password in its environment
        deploy_env = {**client_env, "DAYBREAK_HOME": str(home), "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
        assert not any(k.startswith("MLFLOW_") for k in deploy_env) and password not in json.dumps(deploy_env)
        deploy_log = logs / "deploy.log"
        procs["deploy"] = _start([str(BIN / "daybreak"), "prefect", "deploy", "--spec", str(SPEC), "--cron", CRON,
                                  "--name", NAME], deploy_env, deploy_log, cwd=tmp_path)
        timings["deploy started"] = time.monotonic() - t0

        data, run_out = _driver("run", {**client_env, "DRIVER_WAIT_SECONDS": "120"}, logs / "driver-run.log",
                                timeout=1500, watch=(procs["deploy"], deploy_log))
        timings["runs done"] = time.monotonic() - t0
        where = f"\n--- serving process ---\n{_tail(deploy_log)}\n--- driver ---\n{run_out[-4000:]}"

        # -- three deployments; the daily one on the cron schedule, with the spec as a default
        daily = data["deployments"].get(f"daily_retrain/{NAME}")
        assert daily and set(data["deployments"]) == {f"{f}/{NAME}" for f in ("daily_retrain", "backfill",
                                                                                 "approve")}, data["deployments"]
        assert [(s["cron"], s["active"]) for s in daily["schedules"]] == [(CRON, True)], daily
        assert daily["schedules"][0]["timezone"] in (None, "UTC", "Etc/UTC"), daily
        assert Path(daily["parameters"]["spec"]).resolve() == SPEC, daily
        for other in ("backfill", "approve"):
            assert data["deployments"][f"{other}/{NAME}"]["schedules"] == [], data["deployments"]
        assert f"daily_retrain/{NAME}" in deploy_log.read_text(errors="replace")  # it says what it serves

        # -- the scheduler created runs from the cron schedule, at 03:00 UTC in the future
        scheduled = data["scheduled"]
        assert scheduled, f"no scheduled runs after {data['waited_for_schedule_s']}s{where}"
        future = [r for r in scheduled if r["expected_start_time"] > data["now"]]
        assert future and all(r["state_type"] == "SCHEDULED" and r["auto_scheduled"] for r in future), scheduled
        assert all(r["expected_start_time"][11:19] == "03:00:00" for r in future), scheduled
        assert all(r["parameters"].get("date") is None for r in future), scheduled  # the run's date is its own

        # -- the three triggered runs completed
        runs = data["runs"]
        assert [r["state_type"] for r in runs] == ["COMPLETED"] * 3, \
            [(r["date"], r["state_name"], r["state_message"]) for r in runs] + [where]
        assert [r["parameters"]["date"] for r in runs] == list(DAYS)
        day1, day2, rerun = (_outcome(r) for r in runs)
        assert [o["date"] for o in (day1, day2, rerun)] == list(DAYS)
        assert day1["gate"]["decision"] == "SKIPPED" and day1["promote"]["promoted"] is False, day1
        assert day2["gate"]["decision"] == "PROMOTE" and day2["promote"]["promoted"] is True, day2
        candidate = str(day2["gate"]["candidate_version"])
        assert str(day2["promote"]["champion_version"]) == candidate, day2
        assert day2["deploy"]["url"] == serve_url, day2["deploy"]  # the Variable's settings reached the flow

        # -- the champion moved, on the MLflow server named by the Variable, with the Secret's password
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url)
        champion = client.get_model_version_by_alias(spec.model.name, spec.promotion.alias)
        assert str(champion.version) == candidate
        assert not (home / "mlflow.db").exists()  # nothing went to the embedded registry

        # -- the rerun of the same date: the steps come from Prefect's cache, nothing moves
        first, again = _tasks(runs[1]), _tasks(runs[2])
        assert all(first[t]["state_name"] != "Cached" for t in CACHED_TASKS), runs[1]["task_runs"]
        assert {t: again[t]["state_name"] for t in CACHED_TASKS} == dict.fromkeys(CACHED_TASKS, "Cached"), \
            runs[2]["task_runs"]
        assert all(again[t]["state_name"] != "Cached" for t in NEVER_CACHED if t in again), runs[2]["task_runs"]
        cached_gate = again["evaluate_gate"]["result"]  # read back from the persisted cache record
        assert isinstance(cached_gate, dict), again["evaluate_gate"]
        assert cached_gate["decision"] == "PROMOTE" and str(cached_gate["candidate_version"]) == candidate
        assert rerun["gate"] == day2["gate"], (rerun["gate"], day2["gate"])
        assert rerun["promote"]["promoted"] is False and str(rerun["promote"]["champion_version"]) == candidate, rerun
        assert str(client.get_model_version_by_alias(spec.model.name, spec.promotion.alias).version) == candidate
        result_files = [p for p in results.rglob("*") if p.is_file()]
        assert len(result_files) >= len(CACHED_TASKS), result_files
        # every task's result is persisted and reads back, cached or not (promote and deploy too)
        for r in runs:
            unread = [(t["name"], t["result_error"]) for t in r["task_runs"] if not isinstance(t["result"], dict)]
            assert unread == [], unread

        # -- the work-pool recipe of the README: prefect.yaml deployed, a process worker runs a backfill
        pool_env = {**client_env, "DAYBREAK_HOME": str(home), "DAYBREAK_SPEC": str(SPEC)}
        subprocess.run([str(BIN / "prefect"), "work-pool", "create", "daybreak", "--type", "process"], env=pool_env,
                       cwd=ROOT, check=True, capture_output=True, timeout=120)
        deployed = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], env=pool_env, cwd=ROOT,
                                  capture_output=True, text=True, timeout=300)
        assert deployed.returncode == 0 and "backfill/daybreak" in deployed.stdout, deployed.stdout + deployed.stderr
        triggered = subprocess.run([str(BIN / "prefect"), "deployment", "run", "backfill/daybreak", "--param",
                                    "start=2013-01-01", "--param", "end=2013-01-02"], env=pool_env, cwd=ROOT,
                                   capture_output=True, text=True, timeout=120)
        assert triggered.returncode == 0, triggered.stdout + triggered.stderr
        worker = subprocess.run([str(BIN / "prefect"), "worker", "start", "--pool", "daybreak", "--run-once"],
                                env=pool_env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        out = worker.stdout + worker.stderr
        assert worker.returncode == 0 and "backfill 2013-01-01..2013-01-02' - Finished in state Completed" in out, \
            out[-4000:]
        assert "[2/2] 2013-01-02: decision PROMOTE, champion v" + candidate in out, out[-4000:]
        # from the cache: 2013-01-02's four steps, and 2013-01-01's stage and features (that day trained no
        # model, so train and gate recorded nothing to cache)
        assert out.count("Finished in state Cached") == len(CACHED_TASKS) + 2, out[-4000:]
        assert password not in out
        timings["work pool backfill"] = time.monotonic() - t0

        # -- the password is nowhere in MLflow: run params and tags, model tags
        experiments = client.search_experiments()
        mlruns = client.search_runs([e.experiment_id for e in experiments]) if experiments else []
        assert mlruns, "no MLflow runs on the server"
        for r in mlruns:
            assert password not in json.dumps([r.data.params, r.data.tags, r.info.run_name])
        for mv in client.search_model_versions(f"name = '{spec.model.name}'"):
            assert password not in json.dumps([mv.tags, mv.description, mv.source])

        # -- stop everything: the serving process as with Ctrl-C, then the servers
        t_stop = time.monotonic()
        deploy_code = _stop(procs.pop("deploy"), signal.SIGINT, grace=20)
        prefect_code = _stop(procs.pop("prefect"), signal.SIGTERM, grace=30)
        mlflow_code = _stop(procs.pop("mlflow"), signal.SIGTERM, grace=30)
        timings["stopped in"] = time.monotonic() - t_stop
        left = _ours(tag)
        assert left == [], [p.cmdline() for p in left]
        for port in (mlflow_port, prefect_port):
            with httpx.Client(timeout=2) as h, pytest.raises(httpx.HTTPError):
                h.get(f"http://127.0.0.1:{port}/")

        # -- and the password was never printed, logged or written down
        secret = password.encode()
        assert password not in deploy_log.read_text(errors="replace"), "password in the serving process output"
        assert password not in run_out + setup_out, "password in the driver output"
        for r in runs:
            assert r["logs"], f"no flow-run logs for {r['date']}"
            assert password not in r["logs"], f"password in the flow-run logs of {r['date']}"
        for root in (results, server_home, client_home, home, mlflow_dir / "artifacts", logs):
            assert _files_containing(root, secret) == [], f"password written under {root}"
        # the scan does read Prefect's database: the Variable's value is there in clear, the Secret's is not
        assert _files_containing(server_home, mlflow_url.encode()), "the Variable not found in Prefect's database"
        timings["scheduled runs seen after"] = data["waited_for_schedule_s"]
        timings["total"] = time.monotonic() - t0
        print("\n" + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
              + f"; run seconds {[r['seconds'] for r in runs]}; exit codes deploy={deploy_code} "
              f"prefect={prefect_code} mlflow={mlflow_code}")
    finally:
        for proc in procs.values():
            _stop(proc, signal.SIGINT if proc.args[0].endswith("daybreak") else signal.SIGTERM, grace=20)
        for p in _ours(tag):  # anything they left behind (e.g. Ray workers) carries the tag
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
