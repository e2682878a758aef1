"""A Ray cluster on loopback whose nodes share nothing but S3 and the MLflow server (issue 24).

Built once for the module:

* moto's S3 server holds the store (``DAYBREAK_STORE=s3://<bucket>/store``) with the landing drops;
* ``mlflow server --app-name basic-auth`` with served artifacts; its password is known to the
  drivers only (``MLFLOW_TRACKING_USERNAME/PASSWORD``);
* a Ray head started with ``--num-cpus 0``, so every task that needs a CPU runs elsewhere, and one
  Ray worker node started inside its own mount namespace (``unshare -m --propagation private``)
  with a fresh tmpfs over the scratch folder, which holds the drivers' DAYBREAK_HOME, their temp
  dirs, the spec, the head's Ray folder and the MLflow server's files: the worker sees none of
  them (the venv and the code stay visible). The worker's own Ray folder lies outside the
  scratch folder, so the test reads it once the node has stopped. The worker's environment holds
  no MLflow or AWS variable (checked from inside, by a task). Both nodes use token auth.

Then, as drivers in processes of their own:

* the Airflow operator, pointed at the cluster by an Airflow Connection (address and token; no
  ``RAY_ADDRESS``), stages 2013-01-01 and builds its features;
* with ``RAY_ADDRESS``: the cycle for 2013-01-02 (stage, features, monitor, train with
  ``model.partition_by`` and ``model.tuning``, gate, promote) and batch scoring of it.

Asserted: the features, the partition models, the tuning trials and batch scoring's actors ran
on the isolated worker (the head has no CPU; GCS task events and the actor table say where each
ran); the features equal a local Ray's byte for byte; a wrong token is refused; a local store or a
SQLite registry with a remote cluster is refused at once, before any work, with one
non-retryable message naming ``DAYBREAK_SHARED_FS`` (and is not refused once it is declared); and
no credential (the MLflow password or its basic-auth header, the AWS secret key, the session
token) is in any file under either node's Ray folder or in any driver's output.

Nodes, servers and drivers are stopped by PID, failing or not. ``DAYBREAK_TEST_KEEP=1`` keeps the
folders (/tmp/dbsn*: ``s`` scratch, ``w`` the worker's Ray folder, ``logs``) for a post-mortem.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import BIN, MLFLOW_AUTH_INI, ROOT, SPEC, free_port, make_home, wait_http
from ray_nodes import start_node, stop_families, stop_family, wait_started

DAY1, DAY2 = "2013-01-01", "2013-01-02"
DRIVER = ROOT / "tests" / "cluster_driver.py"
# The flights model as one model per origin (plus a fallback) with a tiny tuning search.
MODEL = {"partition_by": ["origin_code"], "min_partition_rows": 100, "num_boost_round": 60,
         "tuning": {"space": {"max_depth": {"low": 2, "high": 5, "integer": True}}, "trials": 2,
                    "time_budget_s": 120}}
# The worker's wrapper: a private mount namespace, a fresh tmpfs over the scratch folder ($0) and
# one over daybreak's source folder ($1: the venv's editable install points there, so daybreak is
# not installed on the worker: the drivers ship it), then exec Ray (the PID stays `ray start`'s).
ISOLATE = ["unshare", "-m", "--propagation", "private", "sh", "-c",
           'mount -t tmpfs tmpfs "$0" && mount -t tmpfs tmpfs "$1" && mkdir "$0/worker-home" "$0/worker-tmp" '
           '&& shift && exec "$@"']
OPERATORS = ROOT / "operators"
# daybreak's Ray work in training and scoring, by task or actor name: the partition models, the
# Ray Tune trials (a function trainable runs as an ImplicitFunc actor), batch scoring's actors.
# (The features step reports its nodes itself.)
DAYBREAK_TASKS = ("fit_model", "ImplicitFunc", "SliceScorer")


def _clean_env() -> dict[str, str]:
    """The test's environment without anything that names a service or a credential."""
    drop = ("MLFLOW_", "AWS_", "DAYBREAK_", "AIRFLOW", "RAY_", "PREFECT_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def _run(name: str, args: list[str], env: dict[str, str], cluster: dict, timeout: float = 600) -> tuple[int, str]:
    """A process to its end, its stdout and stderr in one file the credential scan reads."""
    log = cluster["logs"] / f"{name}.out"
    cluster["outputs"].append(log)
    with log.open("wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=cluster["scratch"])
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_family(proc)
        code = -1
    t = time.monotonic() - cluster["t0"]
    cluster["timings"][name] = round(t, 1)
    return code, log.read_text(errors="replace")


def _result(name: str, code: int, output: str) -> dict[str, Any]:
    lines = [ln for ln in output.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"{name} exited {code} without a result:\n{output[-6000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))


def _alive_nodes(address: str, env: dict) -> int:
    out = subprocess.run([str(BIN / "python"), "-c", (
        f"import ray; ray.init(address={address!r}, log_to_driver=False); "
        "print('NODES', sum(n['Alive'] for n in ray.nodes()))")],
        env=env, capture_output=True, text=True, timeout=120)
    for line in out.stdout.splitlines():
        if line.startswith("NODES "):
            return int(line.split()[1])
    raise RuntimeError(f"cannot reach the Ray cluster at {address}: {out.stderr[-2000:]}")


def _hits(path: Path, find: dict[str, bytes]) -> list[str]:
    """Each secret found in the file, with the line it is on (the secret itself masked)."""
    try:
        data = path.read_bytes()
    except OSError:  # a socket, or a file gone meanwhile
        return []
    out = []
    for name, needle in find.items():
        at = data.find(needle)
        if at >= 0:
            start, end = data.rfind(b"\n", 0, at) + 1, data.find(b"\n", at)
            line = data[start:end if end >= 0 else len(data)]
            for other in find.values():
                line = line.replace(other, b"***")
            out.append(f"{name} in {path}: {line[:400].decode(errors='replace')}")
    return out


def _scan(roots: list[Path], find: dict[str, bytes]) -> tuple[list[str], int]:
    """Hits in every regular file under the roots (binary-safe; symlinks not followed), and how
    many files were read."""
    hits, n = [], 0
    for root in roots:
        paths = [root] if root.is_file() else [Path(d) / f for d, _, files in os.walk(root) for f in files]
        for path in paths:
            if path.is_file() and not path.is_symlink():
                n += 1
                hits += _hits(path, find)
    return hits, n


@pytest.fixture(scope="module")
def cluster(s3_server, landing: Path) -> Iterator[dict]:
    t0 = time.monotonic()
    # Short paths: Ray's socket paths must stay under 107 bytes.
    base = Path(tempfile.mkdtemp(prefix="dbsn", dir="/tmp"))
    scratch, worker_tmp, logs = base / "s", base / "w", base / "logs"
    head_tmp, home, mlflow_dir = scratch / "head", scratch / "home", scratch / "mlflow"
    for d in (scratch, worker_tmp, logs, head_tmp, home, mlflow_dir, scratch / "tmp"):
        d.mkdir()
    secret = {"MLflow password": "mlpw-" + secrets.token_urlsafe(24),
              "AWS secret key": "s3key-" + secrets.token_urlsafe(30),
              "AWS session token": "s3tok-" + secrets.token_urlsafe(30)}
    password = secret["MLflow password"]
    token = secrets.token_hex(32)
    ray_port, mlflow_port = free_port(), free_port()
    address, mlflow_url = f"127.0.0.1:{ray_port}", f"http://127.0.0.1:{mlflow_port}"
    bucket = f"sn-{secrets.token_hex(4)}"

    base_env = _clean_env()
    ray_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    head_env = base_env | ray_env
    # the worker: its HOME and TMPDIR on its own tmpfs; no service address, no credential
    worker_env = base_env | ray_env | {"HOME": str(scratch / "worker-home"), "TMPDIR": str(scratch / "worker-tmp")}
    assert not any(v in json.dumps(worker_env) for v in secret.values())
    s3_env = {"DAYBREAK_STORE": f"s3://{bucket}/store", "DAYBREAK_S3_ENDPOINT_URL": s3_server.endpoint,
              "AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(), "AWS_REGION": "us-east-1",
              "AWS_SECRET_ACCESS_KEY": secret["AWS secret key"], "AWS_SESSION_TOKEN": secret["AWS session token"]}
    common = ["--node-ip-address=127.0.0.1", "--object-store-memory=200000000", "--disable-usage-stats"]
    procs: dict[str, subprocess.Popen] = {}

    def stop() -> None:
        stop_families([procs.pop(name) for name in ("worker", "head", "mlflow") if name in procs])

    try:
        (mlflow_dir / "auth.ini").write_text(MLFLOW_AUTH_INI)
        mlflow_log = logs / "mlflow.log"
        with mlflow_log.open("wb") as out:
            procs["mlflow"] = subprocess.Popen(
                [str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port",
                 str(mlflow_port), "--workers", "1", "--backend-store-uri", f"sqlite:///{mlflow_dir / 'mlflow.db'}",
                 "--artifacts-destination", str(mlflow_dir / "artifacts")],
                env=base_env | {"MLFLOW_AUTH_CONFIG_PATH": str(mlflow_dir / "auth.ini"),
                                "MLFLOW_AUTH_ADMIN_PASSWORD": password,
                                "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(24),
                                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                stdout=out, stderr=subprocess.STDOUT, cwd=mlflow_dir, start_new_session=True)
        procs["head"] = start_node(["--head", f"--port={ray_port}", f"--temp-dir={head_tmp}", "--num-cpus=0",
                                    "--include-dashboard=false", *common], head_env, logs / "head.log")
        s3 = s3_server.client()
        s3.create_bucket(Bucket=bucket)
        s3_server.upload_dir(landing, bucket, "store/landing")
        raw = yaml.safe_load(SPEC.read_text())
        raw["model"].update(MODEL)
        spec_file = scratch / "spec.yaml"
        spec_file.write_text(yaml.safe_dump(raw, sort_keys=False))
        wait_started(procs["head"], logs / "head.log")
        procs["worker"] = start_node([f"--address={address}", f"--temp-dir={worker_tmp}", "--num-cpus=2", *common],
                                     worker_env, logs / "worker.log", wrap=[*ISOLATE, str(scratch), str(OPERATORS)])
        wait_started(procs["worker"], logs / "worker.log")
        wait_http(f"{mlflow_url}/health", timeout=180, proc=procs["mlflow"])
        search = f"{mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert httpx.get(search, timeout=30).status_code == 401  # the server really wants the password
        assert httpx.get(search, auth=("admin", password), timeout=30).status_code == 200
        driver_env = base_env | s3_env | {
            "DAYBREAK_HOME": str(home), "TMPDIR": str(scratch / "tmp"), "AIRFLOW_HOME": str(scratch / "airflow"),
            "MLFLOW_TRACKING_URI": mlflow_url, "RAY_USAGE_STATS_ENABLED": "0", "DAYBREAK_STEP_ATTEMPTS": "1",
            "DAYBREAK_RAY_SHIP_CODE": "1"}  # the worker has no daybreak of its own
        yield {"t0": t0, "timings": {"cluster up": round(time.monotonic() - t0, 1)}, "outputs": [],
               "base": base, "scratch": scratch, "logs": logs, "ray_dirs": [head_tmp, worker_tmp],
               "address": address, "port": ray_port, "token": token, "ray_env": ray_env, "mlflow_url": mlflow_url,
               "password": password, "secret": secret, "spec_file": spec_file, "s3_env": s3_env,
               "driver_env": driver_env, "base_env": base_env, "stop": stop, "landing": landing}
    finally:
        stop()
        if not os.environ.get("DAYBREAK_TEST_KEEP"):  # set it to read the nodes' logs after a failure
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def pipeline(cluster: dict) -> dict:
    """The Airflow driver (DAY1's stage and features, the cluster named by a Connection), then the
    cycle driver (DAY2 and batch scoring, with RAY_ADDRESS). Failures are the tests' to report."""
    conn = {"conn_type": "generic", "host": "127.0.0.1", "port": cluster["port"], "password": cluster["token"]}
    env = cluster["driver_env"] | {"AIRFLOW_CONN_RAY_CLUSTER": json.dumps(conn)}
    code, out = _run("driver-airflow", [str(BIN / "python"), str(DRIVER), "airflow", str(cluster["spec_file"]), DAY1],
                     env, cluster, timeout=400)
    airflow = _result("the Airflow driver", code, out)
    env = cluster["driver_env"] | cluster["ray_env"] | {
        "RAY_ADDRESS": cluster["address"], "MLFLOW_TRACKING_USERNAME": "admin",
        "MLFLOW_TRACKING_PASSWORD": cluster["password"]}
    code, out = _run("driver-cycle", [str(BIN / "python"), str(DRIVER), "cycle", str(cluster["spec_file"]), DAY2],
                     env, cluster, timeout=600)
    cycle = _result("the cycle driver", code, out)
    return {"airflow": airflow, "cycle": cycle, "cycle_exit": code, "cycle_output": out}


def _worker_node(nodes: list[dict]) -> str:
    workers = [n["id"] for n in nodes if n["alive"] and not n["head"]]
    heads = [n for n in nodes if n["alive"] and n["head"]]
    assert len(workers) == 1 and len(heads) == 1 and heads[0]["cpus"] == 0, nodes
    return workers[0]


def test_a_wrong_token_is_refused(cluster: dict) -> None:
    # (a refused driver tries again for about 20 s by default; two tries are enough to be refused)
    env = cluster["base_env"] | cluster["ray_env"] | {"RAY_AUTH_TOKEN": "0" * 64,
                                                      "RAY_gcs_server_port_wait_time_s": "2"}
    with pytest.raises(RuntimeError, match="InvalidAuthToken"):
        _alive_nodes(cluster["address"], env)


def test_features_on_the_cluster_named_by_an_airflow_connection(pipeline: dict, cluster: dict) -> None:
    got = pipeline["airflow"]
    assert "error" not in got, got["error"]["traceback"]
    assert got["address"].rsplit(":", 1)[1] == str(cluster["port"])  # the cluster, not a local Ray
    worker = _worker_node(got["nodes"])
    assert got["result"]["ray_nodes"] == [worker]  # the head has no CPU: only the worker can run them
    assert got["result"]["rows"] > 800


def test_the_cycle_and_batch_scoring_ran_on_the_isolated_worker(pipeline: dict) -> None:
    got = pipeline["cycle"]
    worker = _worker_node(got["nodes"])
    # The worker is isolated: it sees none of the driver's files and holds no credential.
    probe = got["probe"]
    assert probe["node"] == worker
    assert probe["visible"] and not any(probe["visible"].values()), probe
    assert probe["credential_env"] == [], probe
    # daybreak there is the copy the driver shipped (Ray's runtime resources), not the source folder
    assert probe["daybreak"] and not probe["daybreak"].startswith(str(OPERATORS)), probe
    ran = got.get("ran")
    assert ran, f"cannot tell where Ray ran the tasks: {got.get('ran_error')}"
    # Where the tasks that need a CPU ran, and daybreak's named tasks and actors. Checked before the
    # steps' outcome: a step that failed may have run some of them.
    cpu = [t for t in ran["tasks"] if t["cpus"] > 0 and t["node"]]  # (a task never placed names no node)
    assert cpu and all(t["node"] == worker for t in cpu), [t for t in cpu if t["node"] != worker]
    on = {name: sorted({t["node"] for t in ran["tasks"] if name in t["name"] and t["node"]}
                       | {a["node"] for a in ran["actors"] if name in (a["class"] or "") and a["node"]})
          for name in DAYBREAK_TASKS}
    assert all(nodes in ([], [worker]) for nodes in on.values()), on
    err = got.get("error")
    assert err is None, f"{err['step']} failed on the cluster: {err['type']}: {err['message'][-3000:]}"
    steps = got["steps"]
    assert steps["features"]["ray_nodes"] == [worker], steps["features"]
    train = steps["train"]
    assert train["status"] == "trained" and train.get("trials") == 2, train
    assert steps["gate"]["decision"] == "PROMOTE" and steps["promote"]["promoted"] is True
    assert steps["batch_score"]["rows"] > 800 and steps["batch_score"]["model_version"] == str(train["model_version"])
    # each did run, on the worker: partition models, tuning trials, scoring actors
    assert all(nodes == [worker] for nodes in on.values()), on


def test_features_equal_a_local_ray_byte_for_byte(pipeline: dict, landing: Path, ray_local, spec, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from daybreak.features import build_features
    from daybreak.infra.context import RunContext
    from daybreak.stage import stage

    cluster_built = {DAY1: pipeline["airflow"].get("result"),
                     DAY2: pipeline["cycle"].get("steps", {}).get("features")}
    assert all(cluster_built.values()), "the cluster built no features to compare"
    monkeypatch.setenv("DAYBREAK_HOME", str(make_home(tmp_path, landing)))
    for day in (DAY1, DAY2):
        stage(spec, RunContext.create(day))
    for day in (DAY1, DAY2):
        mine = build_features(spec, RunContext.create(day))
        assert (mine["content_hash"], mine["rows"]) == (cluster_built[day]["content_hash"], cluster_built[day]["rows"])


def test_a_local_store_or_registry_with_a_remote_cluster_is_refused_at_once(cluster: dict) -> None:
    """The refusal's contract: a ``DaybreakError`` (not retryable) naming ``DAYBREAK_SHARED_FS``,
    raised before any work, and no refusal once a shared filesystem is declared."""
    local = make_home(cluster["scratch"] / "refuse", cluster["landing"])
    env = cluster["driver_env"] | cluster["ray_env"] | {
        "DAYBREAK_HOME": str(local), "DRIVER_LOCAL_STORE": str(local / "store"),
        "DRIVER_RAY_ADDRESS": cluster["address"], "DRIVER_MLFLOW_URL": cluster["mlflow_url"],
        "DAYBREAK_STEP_ATTEMPTS": "2"}  # a retryable error is tried once more after 5 s, and says so
    env.pop("MLFLOW_TRACKING_URI")
    cli_home = make_home(cluster["scratch"] / "refuse-cli", cluster["landing"])
    cli_env = cluster["driver_env"] | cluster["ray_env"] | {"RAY_ADDRESS": cluster["address"],
                                                            "DAYBREAK_HOME": str(cli_home)}
    for k in ("DAYBREAK_STORE", "MLFLOW_TRACKING_URI"):
        cli_env.pop(k)
    code, out = _run("driver-refuse", [str(BIN / "python"), str(DRIVER), "refuse", str(cluster["spec_file"]), DAY1],
                     env, cluster, timeout=400)
    got = _result("the refusal driver", code, out)
    cases = {c["case"]: c for c in got["cases"]}
    problems = []
    for name in ("local store", "sqlite registry"):
        c = cases[name]
        if c["ok"]:
            problems.append(f"{name}: not refused: {json.dumps(c['result'], default=str)[:600]}")
            continue
        e = c["error"]
        if not (e["daybreak_error"] and "DAYBREAK_SHARED_FS" in e["message"] and not e["retryable"]):
            problems.append(f"{name}: not the refusal: {e['type']} (retryable {e['retryable']}): {e['message'][:1500]}")
    if cases["local store"]["published"]:
        problems.append("local store: the features were published anyway")
    if got["retry_warnings"]:
        problems.append(f"retried: {got['retry_warnings']}")
    shared = cases["shared filesystem declared"]
    if not shared["ok"] and "DAYBREAK_SHARED_FS" in shared["error"]["message"]:
        problems.append(f"refused although DAYBREAK_SHARED_FS=1: {shared['error']['message'][:600]}")
    # The CLI: one line, exit 3, no traceback (a local store and a SQLite registry, train)
    code, out = _run("cli-refuse", [str(BIN / "daybreak"), "train", "--spec", str(cluster["spec_file"]),
                                    "--date", DAY1], cli_env, cluster, timeout=300)
    lines = [ln for ln in out.splitlines() if ln.startswith("error:")]
    if not (code == 3 and len(lines) == 1 and "DAYBREAK_SHARED_FS" in lines[0] and "Traceback" not in out):
        problems.append(f"the CLI (exit {code}) did not refuse in one line:\n{out[-1500:]}")
    assert not problems, "\n".join(problems)


def test_a_worker_without_daybreak_is_refused_when_the_code_is_not_shipped(cluster: dict, pipeline: dict) -> None:
    env = cluster["driver_env"] | cluster["ray_env"] | {
        "RAY_ADDRESS": cluster["address"], "MLFLOW_TRACKING_USERNAME": "admin",
        "MLFLOW_TRACKING_PASSWORD": cluster["password"]}
    env.pop("DAYBREAK_RAY_SHIP_CODE")
    # (DAY1's predictions are not made yet: scoring them needs Ray; its features would be kept as they are)
    code, out = _run("cli-no-ship", [str(BIN / "daybreak"), "score", "--spec", str(cluster["spec_file"]),
                                     "--date", DAY1], env, cluster, timeout=300)
    lines = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert code == 3 and len(lines) == 1 and "Traceback" not in out, out[-3000:]
    assert "version skew" in lines[0] and "cannot run daybreak" in lines[0], lines[0]
    assert "DAYBREAK_RAY_SHIP_CODE=1" in lines[0]


def test_no_credential_in_any_ray_file_or_driver_output(cluster: dict, pipeline: dict) -> None:
    cluster["stop"]()  # the nodes' logs are complete
    find = {name: v.encode() for name, v in cluster["secret"].items()}
    find["MLflow password (basic auth header)"] = base64.b64encode(f"admin:{cluster['password']}".encode())
    # both nodes' Ray folders (sessions, logs, runtime_env logs, spilled objects), and the output of
    # every process (the drivers, the CLI, the nodes' `ray start`, the MLflow server)
    hits, scanned = _scan([*cluster["ray_dirs"], cluster["logs"]], find)
    # the scan saw what it should: both nodes' sessions and logs, the drivers' output
    counts = {str(r): sum(1 for p in r.rglob("*") if p.is_file() and not p.is_symlink()) for r in cluster["ray_dirs"]}
    assert all(n > 10 for n in counts.values()), counts
    assert any(cluster["ray_dirs"][1].rglob("runtime_env_agent.log")), "the worker wrote no runtime_env log"
    assert all(p.stat().st_size > 0 for p in cluster["outputs"]), cluster["outputs"]
    print(f"\nscanned {scanned} files ({counts} of the nodes); "
          f"timings {cluster['timings']}", file=sys.stderr)
    assert not hits, "\n".join(hits)
