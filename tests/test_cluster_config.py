"""What cannot work on a shared-nothing cluster is refused at the start, the nodes are checked to
run the driver's code, and only transient errors are retried (issue 24).

The cluster itself (a 0-CPU head and a worker in its own mount namespace, S3 and an authenticated
MLflow server) is tests/test_cluster_shared_nothing.py; these are the checks on their own."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BIN, SPEC

from daybreak.infra.cluster import (
    SHARED_FS_ENV,
    SHIP_CODE_ENV,
    ClusterConfigError,
    check_nodes,
    check_shared_nothing,
    node_fingerprint,
    runtime_env,
)
from daybreak.infra.context import RunContext
from daybreak.infra.errors import is_retryable
from daybreak.steps import run_step

# Nothing listens here: a step that tried to reach it would hang in Ray's connect, not fail at once.
NOWHERE = "10.255.255.1:6379"
DAY = "2013-01-09"


def test_a_local_store_and_registry_with_a_remote_cluster_are_refused_before_any_work(home: Path) -> None:
    started = time.monotonic()
    with pytest.raises(ClusterConfigError) as caught:
        run_step("features", SPEC, DAY, ray_address=NOWHERE)
    message = str(caught.value)
    assert "the store" in message and "sqlite:" in message and SHARED_FS_ENV in message, message
    assert NOWHERE in message and not is_retryable(caught.value)
    assert time.monotonic() - started < 30
    assert not (home / "store" / "staged").exists()  # nothing was read or written


def test_an_s3_store_with_a_sqlite_registry_names_only_the_registry(home: Path, monkeypatch) -> None:
    monkeypatch.setenv("DAYBREAK_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    ctx = RunContext.create(DAY, store="s3://bucket/prefix", ray_address=NOWHERE)
    with pytest.raises(ClusterConfigError, match="MLflow registry sqlite:") as caught:
        check_shared_nothing(ctx)
    assert "the store" not in str(caught.value)
    # with a tracking server serving its artifacts, nothing is local
    check_shared_nothing(RunContext.create(DAY, store="s3://bucket/prefix", tracking_uri="http://mlflow:5000",
                                           ray_address=NOWHERE))


def test_a_declared_shared_filesystem_or_a_local_ray_is_not_refused(home: Path, monkeypatch) -> None:
    check_shared_nothing(RunContext.create(DAY, ray_address="local"))
    check_shared_nothing(RunContext.create(DAY))
    monkeypatch.setenv(SHARED_FS_ENV, "1")
    check_shared_nothing(RunContext.create(DAY, ray_address=NOWHERE))


def test_the_cli_refuses_at_once_without_retrying_or_a_traceback(home: Path, tmp_path: Path) -> None:
    env = {**os.environ, "RAY_ADDRESS": NOWHERE, "DAYBREAK_HOME": str(home)}
    started = time.monotonic()
    out = subprocess.run([str(BIN / "daybreak"), "run", "--spec", str(SPEC), "--date", DAY], env=env,
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode != 0
    assert SHARED_FS_ENV in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "retry" not in out.stderr.lower(), out.stderr[-3000:]
    assert time.monotonic() - started < 120


def test_an_airflow_executor_on_several_machines_is_refused(home: Path, monkeypatch) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from daybreak.airflow import StageDataOperator
    from daybreak.airflow.operators import distributed_executor

    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", "LocalExecutor")
    assert distributed_executor() is None
    assert distributed_executor("airflow.providers.celery.executors.celery_executor.CeleryExecutor") == \
        "Airflow's CeleryExecutor"
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", "KubernetesExecutor,LocalExecutor")
    assert distributed_executor() == "Airflow's KubernetesExecutor"
    op = StageDataOperator(task_id="stage", spec=str(SPEC), logical_date=DAY)
    with pytest.raises(AirflowFailException, match=f"KubernetesExecutor.*{SHARED_FS_ENV}"):
        op.execute({"run_id": "r1"})
    assert not (home / "store" / "staged").exists()


def test_code_shipping_names_daybreak_and_the_allowed_estimator_modules_never_variables(monkeypatch) -> None:
    monkeypatch.delenv(SHIP_CODE_ENV, raising=False)
    monkeypatch.delenv("DAYBREAK_RAY_PIP", raising=False)
    assert runtime_env() is None
    monkeypatch.setenv(SHIP_CODE_ENV, "1")
    monkeypatch.setenv("DAYBREAK_ALLOWED_ESTIMATOR_MODULES", "conftest, sklearn.ensemble")
    monkeypatch.setenv("DAYBREAK_RAY_PIP", "lightgbm==4.5.0")
    env = runtime_env()
    assert env is not None and set(env) == {"py_modules", "pip"}
    assert Path(env["py_modules"][0]).name == "daybreak" and env["py_modules"][1].endswith("conftest.py")
    assert env["pip"] == ["lightgbm==4.5.0"]
    monkeypatch.setenv("DAYBREAK_RAY_PIP", "acme-models==2.0, --index-url https://bob:s3cret@pypi.acme.example/simple")
    with pytest.raises(ClusterConfigError, match=r"https://\*\*\*@pypi.acme.example/simple carries a credential") as e:
        runtime_env()
    assert "s3cret" not in str(e.value)
    monkeypatch.setenv("DAYBREAK_RAY_PIP", "")
    monkeypatch.setenv("DAYBREAK_ALLOWED_ESTIMATOR_MODULES", "no_such_module_here")
    with pytest.raises(ClusterConfigError, match="no_such_module_here"):
        runtime_env()


SKEW_DRIVER = """
import json, os, sys
from daybreak.infra.compute import ensure_ray
from daybreak.infra.errors import DaybreakError
import daybreak
try:
    ensure_ray()
    import ray
    print("RESULT " + json.dumps({"ok": True, "driver_code": daybreak.__file__}))
except DaybreakError as e:
    print("RESULT " + json.dumps({"ok": False, "error": str(e), "driver_code": daybreak.__file__}))
"""


def test_a_node_running_other_code_is_refused_and_shipping_the_code_mends_it(ray_local, tmp_path: Path) -> None:
    import ray

    found = check_nodes()
    assert found and all(f == node_fingerprint() for f in found.values())
    # A driver running a copy of daybreak with one file changed, attached to the suite's Ray,
    # whose workers run the installed daybreak: as a node with another release installed would.
    import daybreak

    copy = tmp_path / "code" / "daybreak"
    shutil.copytree(Path(daybreak.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "steps.py").write_text((copy / "steps.py").read_text() + "\n# changed on one node\n")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": str(copy.parent)}
    env.pop(SHIP_CODE_ENV, None)

    def drive(extra: dict[str, str]) -> dict:
        out = subprocess.run([str(BIN / "python"), "-c", SKEW_DRIVER], env=env | extra, capture_output=True,
                             text=True, timeout=300, cwd=tmp_path)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        assert lines, out.stderr[-3000:]
        return json.loads(lines[-1].removeprefix("RESULT "))

    skewed = drive({})
    assert skewed["driver_code"].startswith(str(copy)) and not skewed["ok"]
    assert re.search(r"version skew.*daybreak [0-9a-f]{16} \(driver [0-9a-f]{16}\).*" + SHIP_CODE_ENV,
                     skewed["error"]), skewed
    assert drive({SHIP_CODE_ENV: "1"})["ok"]  # the driver's code shipped to the workers: no skew


def _defined_only_here() -> None:
    """A module-level function of a test module that Ray workers cannot import."""


def test_missing_files_and_programming_errors_in_ray_tasks_are_not_retried_lost_workers_are(ray_local) -> None:
    import ray
    import ray.data

    def missing(path: str) -> None:
        open(path)  # noqa: SIM115 - raises

    task = ray.remote(max_retries=0)(missing)
    with pytest.raises(Exception) as caught:
        ray.get(task.remote("/no/such/driver/file.parquet"))
    assert not is_retryable(caught.value)

    def read_missing(batch):
        missing("/no/such/driver/file.parquet")

    with pytest.raises(Exception) as caught:  # Ray Data wraps it twice (UserCodeException)
        ray.data.range(2).map_batches(read_missing).materialize()
    assert not is_retryable(caught.value), type(caught.value).__mro__

    def bad_code(batch):
        return batch["id"].no_such_attribute

    with pytest.raises(Exception) as caught:
        ray.data.range(2).map_batches(bad_code).materialize()
    assert not is_retryable(caught.value)

    # code that is not on the node (Ray says so in a RuntimeError)
    with pytest.raises(Exception, match="failed to import on the worker") as caught:
        ray.get(ray.remote(max_retries=0)(_defined_only_here).remote())
    assert not is_retryable(caught.value)

    def crash() -> None:
        os._exit(1)

    with pytest.raises(Exception) as caught:
        ray.get(ray.remote(max_retries=0)(crash).remote())
    assert is_retryable(caught.value), type(caught.value)


def test_an_s3_spec_path_works_wherever_a_spec_path_is_accepted(s3_server, home: Path, monkeypatch,
                                                                  tmp_path: Path) -> None:
    """The CLI (whose Path option folded 's3://' into 's3:/'), the Airflow operators and the
    Models page's DAYBREAK_SPECS (split on ':') all take an s3:// spec, as the DAG form promises."""
    import uuid

    from s3 import apply_env

    from daybreak.airflow import StageDataOperator
    from daybreak.airflow.models_page import load_specs
    from daybreak.spec import load_spec

    apply_env(monkeypatch, s3_server.env())
    bucket = f"spec-{uuid.uuid4().hex[:8]}"
    s3_server.client().create_bucket(Bucket=bucket)
    s3_server.client().put_object(Bucket=bucket, Key="specs/flights.yaml", Body=SPEC.read_bytes())
    uri = f"s3://{bucket}/specs/flights.yaml"

    out = subprocess.run([str(BIN / "daybreak"), "validate", "--spec", uri, "--json"], env=dict(os.environ),
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout)["spec_hash"] == load_spec(SPEC).spec_hash()

    result = StageDataOperator(task_id="stage", spec=uri, logical_date="2013-01-02").execute({"run_id": "s3spec"})
    assert result["sources"]["flights"]["rows"] > 0

    monkeypatch.setenv("DAYBREAK_SPECS", f"{uri}{os.pathsep}{SPEC}")
    specs, errors = load_specs()
    assert not errors and list(specs) == [load_spec(SPEC).name]


def test_replicas_on_a_remote_cluster_with_a_local_registry_are_refused(home: Path, spec) -> None:
    from daybreak.deploy import serve_replicated

    with pytest.raises(ClusterConfigError, match=SHARED_FS_ENV):
        serve_replicated(spec, RunContext.create(DAY), replicas=2, address=NOWHERE, block=False)


def test_batch_scoring_that_cannot_load_its_model_on_a_worker_is_not_retried(ray_local, spec, tmp_path: Path) -> None:
    """The actor loads the model on its first batch: a failure in its constructor surfaced as an
    ActorDiedError that hid the cause (a 401, a version not found), which was retried."""
    import ray.data

    from daybreak.infra import registry
    from daybreak.score._score import SliceScorer

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registry.setup_tracking(RunContext.create(DAY, tracking_uri=uri), spec.name)
    kwargs = {"spec": spec, "tracking_uri": uri, "version": "7", "fs": None, "scored_at": "2013-01-09T00:00:00+00:00"}
    with pytest.raises(Exception, match="not found") as caught:
        ray.data.from_items([{"path": "unread", "row_groups": [0]}]).map_batches(
            SliceScorer, fn_constructor_kwargs=kwargs, concurrency=1, batch_size=1,
            batch_format="pyarrow").materialize()
    assert not is_retryable(caught.value), type(caught.value).__mro__
