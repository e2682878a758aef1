"""A real 2-node Ray cluster on loopback (``ray start --head`` plus ``ray start --address``, with
token auth), reached through an Airflow Connection: the flights features run on both nodes and
equal, byte for byte, the features a local Ray computes."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
from conftest import BIN, ROOT, SPEC, free_port, make_home

from daybreak.features import build_features
from daybreak.infra.context import RunContext
from daybreak.stage import stage

DAY = "2013-01-09"


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    # --block keeps `ray start` in the foreground as the parent of the node's processes, so the
    # test can stop exactly this node (never `ray stop`, which kills every Ray on the host).
    return subprocess.Popen([str(BIN / "ray"), "start", "--block", *args], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM a node (`ray start --block`) and every process under it; SIGKILL what is left
    after `grace` seconds. (Some of a throwaway node's processes outlast a SIGTERM by 20 s or
    more; nothing of it is kept.)"""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=grace)
    for p in alive:
        p.kill()


def _wait_started(node: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Until `ray start` says the node runs ("Ray runtime started")."""
    deadline = time.monotonic() + timeout
    while "Ray runtime started" not in log.read_text(errors="replace"):
        if node.poll() is not None:
            raise RuntimeError(f"ray start exited with {node.returncode}: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no Ray node within {timeout} s: {log.read_text()[-2000:]}")
        time.sleep(0.2)


def _alive_nodes(address: str, env: dict) -> int:
    out = subprocess.run([str(BIN / "python"), "-c", (
        f"import ray; ray.init(address={address!r}, log_to_driver=False); "
        "print('NODES', sum(n['Alive'] for n in ray.nodes()))")],
        env=env, capture_output=True, text=True, timeout=120)
    for line in out.stdout.splitlines():
        if line.startswith("NODES "):
            return int(line.split()[1])
    raise RuntimeError(f"cannot reach the Ray cluster at {address}: {out.stderr[-2000:]}")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[dict]:
    token = secrets.token_hex(32)
    # A short temp dir: Ray's socket paths must stay under the 107-byte limit.
    tmp = Path(tempfile.mkdtemp(prefix="dbray", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--object-store-memory=200000000",
              "--disable-usage-stats"]
    head = _start(["--head", f"--port={port}", f"--temp-dir={tmp}", "--include-dashboard=false", *common],
                  env, tmp / "head.log")
    procs = [head]
    try:
        # Each node says so in its log once it runs (a worker node once it has joined the head's
        # GCS); then one driver confirms that both are alive. (Asking a driver every second
        # costs an interpreter and a Ray import each time.)
        _wait_started(head, tmp / "head.log")
        worker = _start([f"--address={address}", *common], env, tmp / "worker.log")
        procs.append(worker)
        _wait_started(worker, tmp / "worker.log")
        deadline = time.monotonic() + 60
        while (alive := _alive_nodes(address, env)) < 2:
            assert time.monotonic() < deadline, f"{alive} of 2 Ray nodes alive after 60 s"
            time.sleep(1)
        yield {"address": address, "token": token, "port": port, "env": env}
    finally:
        for p in reversed(procs):
            _stop(p)
        shutil.rmtree(tmp, ignore_errors=True)


def test_features_run_on_a_cluster_named_by_an_airflow_connection(
        ray_cluster: dict, tmp_path: Path, landing: Path, ray_local, spec) -> None:
    home = make_home(tmp_path / "cluster", landing)
    conn = {"conn_type": "generic", "host": "127.0.0.1", "port": ray_cluster["port"],
            "password": ray_cluster["token"]}
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"DAYBREAK_HOME": str(home), "AIRFLOW_HOME": str(tmp_path / "airflow"),
            "AIRFLOW_CONN_RAY_CLUSTER": json.dumps(conn), "RAY_USAGE_STATS_ENABLED": "0"}
    out = subprocess.run([str(BIN / "python"), str(ROOT / "tests" / "ray_cluster_driver.py"), str(SPEC), DAY],
                         env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-4000:]
    got = json.loads(lines[-1].removeprefix("RESULT "))
    # the cluster, not a local Ray (Ray reports loopback as the host's address)
    assert got["address"].rsplit(":", 1)[1] == str(ray_cluster["port"])
    assert len(got["cluster_nodes"]) == 2
    # Tasks run on the cluster's nodes. Usually on both, but Ray does not promise to spread a
    # handful of sub-second tasks: in one clean-clone run under load every task finished on one
    # node before the other took any, so "both" is not asserted.
    ran = set(got["result"]["ray_nodes"])
    assert ran and ran <= set(got["cluster_nodes"]), (ran, got["cluster_nodes"])
    assert got["result"]["rows"] > 800

    # The same day on the suite's local Ray gives the same bytes.
    local = make_home(tmp_path / "local", landing)
    os.environ["DAYBREAK_HOME"] = str(local)
    try:
        day = RunContext.create(DAY).logical_date
        for k in range(8, -1, -1):
            stage(spec, RunContext.create(day - timedelta(days=k)))
        mine = build_features(spec, RunContext.create(DAY))
    finally:
        os.environ.pop("DAYBREAK_HOME", None)
    assert mine["content_hash"] == got["result"]["content_hash"]
    assert mine["rows"] == got["result"]["rows"]


def test_a_wrong_token_is_refused(ray_cluster: dict, tmp_path: Path) -> None:
    # (a refused driver tries again for about 20 s by default; two tries are enough to be refused)
    env = {**ray_cluster["env"], "RAY_AUTH_TOKEN": "0" * 64, "RAY_gcs_server_port_wait_time_s": "2"}
    with pytest.raises(RuntimeError, match="InvalidAuthToken"):
        _alive_nodes(ray_cluster["address"], env)
