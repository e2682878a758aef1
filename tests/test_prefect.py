"""The Prefect flow (ephemeral API, as a user runs it with no server) and its tasks."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import BIN, ROOT, SPEC, make_home

from daybreak.gate import PROMOTE, SKIPPED
from daybreak.gate._gating import REJECT
from daybreak.infra import registry
from daybreak.infra.context import RunContext

# The ephemeral API keeps its state in SQLite. On a busy 2-core machine its start-up writes can
# wait on each other longer than the 5 s default, and the telemetry service adds one more writer;
# the server itself took over the 20 s start-up limit in one loaded CI-like run.
QUIET_PREFECT = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT": "60",
                 "PREFECT_SERVER_DATABASE_TIMEOUT": "60", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}

SCRIPT = """
import json, sys
sys.path.insert(0, {flows!r})
from approve import approve
from backfill import backfill
from daily_retrain import daily_retrain
lines = backfill("2013-01-01", "2013-01-02", spec={spec!r})
out = [daily_retrain(date=d, spec={spec!r}) for d in ("2013-01-01", "2013-01-02")]  # reruns: from the cache
out.append(daily_retrain(date="2013-01-03", spec={strict!r}))  # a floor no model meets: rejected
out.append(daily_retrain(date="2013-01-03", spec={manual!r}))  # passes, and waits for approval
out = [{{k: r.get(k) for k in ("date", "gate", "promote", "deploy")}} for r in out]
out.append(approve(version=int(out[-1]["gate"]["candidate_version"]), reason="read the report", spec={manual!r}))
print("RESULT " + json.dumps([lines] + out, default=str))
"""


def test_daily_retrain_flow_promotes_only_after_the_gate_says_so(home: Path, tmp_path: Path, spec) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_LOCAL_STORAGE_PATH=str(tmp_path / "results"),
               PREFECT_LOGGING_LEVEL="WARNING", **QUIET_PREFECT)
    strict = tmp_path / "strict.yaml"
    strict.write_text(json.dumps(spec.model_copy(update={"gate": spec.gate.model_copy(update={"floor": 0.99})})
                                 .model_dump(mode="json")))
    manual = tmp_path / "manual.yaml"
    manual.write_text(json.dumps(spec.model_copy(update={
        "gate": spec.gate.model_copy(update={"compare": "no_worse", "margin": 1.0, "floor": 0.0}),
        "promotion": spec.promotion.model_copy(update={"approval": "manual"})}).model_dump(mode="json")))
    code = SCRIPT.format(flows=str(ROOT / "flows"), spec=str(SPEC), strict=str(strict), manual=str(manual))
    proc = subprocess.run([str(BIN / "python"), "-c", code], env=env, capture_output=True, text=True, timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines, day1, day2, day3, manual_day3, approved = json.loads(line[len("RESULT "):])
    # the backfill ran both days in order; the reruns give the same answers
    assert [ln["decision"] for ln in lines] == [SKIPPED, PROMOTE] and lines[1]["champion_version"] == "1", lines
    assert day1["gate"]["decision"] == SKIPPED and day1["promote"]["promoted"] is False
    # a rerun of a promoted day: the gate's answer from the cache, the champion already in place
    assert day2["gate"]["decision"] == PROMOTE and day2["promote"]["champion_version"] == "1"
    # rejected: the flow stops before promote and deploy
    assert day3["gate"]["decision"] == REJECT and day3["gate"]["champion_version"] == day2["gate"]["candidate_version"]
    assert day3["promote"]["promoted"] is False and day3["promote"]["reason"] == "gate decision is REJECT"
    assert day3["deploy"] is None and day3["promote"]["champion_version"] == day2["gate"]["candidate_version"]
    # promotion.approval: manual: the version waits, nothing is deployed; the approve flow promotes it
    pending = manual_day3["promote"]
    assert manual_day3["gate"]["decision"] == PROMOTE and pending["approval"] == "pending", manual_day3
    assert pending["champion_version"] == day2["gate"]["candidate_version"] and manual_day3["deploy"] is None
    assert approved["approval"] == "approved" and approved["champion_version"] == pending["candidate_version"]
    assert approved["previous_version"] == day2["gate"]["candidate_version"] and approved["reason"] == "read the report"
    cl = registry.client(RunContext.create("2013-01-02"))
    champ = registry.alias_version(cl, spec.model.name, "champion")
    assert str(champ.version) == pending["candidate_version"]


def test_tasks_are_plain_step_calls(home: Path) -> None:
    from daybreak.prefect import stage_data

    out = stage_data.fn(str(SPEC), "2013-01-05")
    assert out["step"] == "stage" and out["rows"] == 720
    again = stage_data.fn(str(SPEC), "2013-01-05")
    assert again["sources"]["flights"]["skipped"] is True


def test_permanent_errors_are_not_retried() -> None:
    from daybreak.infra.errors import ContractError, is_retryable
    from daybreak.prefect.tasks import _retry_if_transient

    class State:
        def __init__(self, data):
            self.data = data

    assert _retry_if_transient(None, None, State(ContractError("bad file"))) is False
    assert _retry_if_transient(None, None, State(ConnectionError("mlflow restarting"))) is True
    assert is_retryable(ValueError("bad date")) is False
    # a tracking server that refuses the credentials refuses them again; one that is down may come back
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, TEMPORARILY_UNAVAILABLE, UNAUTHENTICATED

    assert _retry_if_transient(None, None, State(MlflowException("401", error_code=UNAUTHENTICATED))) is False
    assert is_retryable(MlflowException("403", error_code=PERMISSION_DENIED)) is False
    assert is_retryable(MlflowException("503", error_code=TEMPORARILY_UNAVAILABLE)) is True


SECRET_SCRIPT = """
import json
from prefect import flow
from prefect.blocks.system import Secret
from daybreak.prefect import stage_data
Secret(value=json.dumps({creds!r})).save("daybreak-s3", overwrite=True)

@flow
def stage_from_s3():
    return stage_data({spec!r}, "2013-01-03", store={store!r}, storage_secret="daybreak-s3")

print("RESULT " + json.dumps(stage_from_s3(), default=str))
"""


def test_s3_credentials_from_a_secret_block(s3_server, landing: Path, tmp_path: Path) -> None:
    from s3 import CREDS

    bucket = "prefect-secret"
    s3_server.client().create_bucket(Bucket=bucket)
    s3_server.upload_dir(landing, bucket, "store/landing")
    creds = {"endpoint_url": s3_server.endpoint, "region": "us-east-1",
             "access_key": CREDS["AWS_ACCESS_KEY_ID"], "secret_key": CREDS["AWS_SECRET_ACCESS_KEY"]}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_", "DAYBREAK_S3"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_LOCAL_STORAGE_PATH=str(tmp_path / "results"),
               PREFECT_LOGGING_LEVEL="INFO", **QUIET_PREFECT)
    env["DAYBREAK_HOME"] = str(tmp_path / "home")
    code = SECRET_SCRIPT.format(creds=creds, spec=str(SPEC), store=f"s3://{bucket}/store")
    proc = subprocess.run([str(BIN / "python"), "-c", code], env=env, capture_output=True, text=True, timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(line[len("RESULT "):])
    assert out["rows"] == 914 and out["sources"]["flights"]["uri"].startswith(f"s3://{bucket}/")
    assert CREDS["AWS_SECRET_ACCESS_KEY"] not in proc.stdout + proc.stderr


def test_lineage_cache_policy_keys_recorded_outputs_only(use_cycled: dict) -> None:
    from daybreak.prefect.tasks import Lineage, stage_data, train_model
    from daybreak.steps import cache_key

    day = "2013-01-03"
    inputs = {"spec": str(SPEC), "date": day, "store": None, "storage_secret": None}
    assert Lineage(step="stage").lineage_key(inputs) == cache_key("stage", SPEC, day) is not None
    assert Lineage(step="stage").lineage_key(inputs | {"date": "2013-01-09"}) is None  # not staged yet
    assert Lineage(step="train").lineage_key(inputs | {"force": True}) is None  # force always trains
    assert Lineage(step="gate").lineage_key(inputs | {"override": "promote"}) is None
    # a spec that cannot load: no key (the step then reports the error), never an exception
    assert Lineage(step="stage").lineage_key(inputs | {"spec": "/nonexistent.yaml"}) is None

    class Ctx:  # with no lineage key, the task run's own key: its result is persisted, never reused
        class task_run:
            id = "0f1e"

    assert Lineage(step="stage").compute_key(Ctx, inputs | {"date": "2013-01-09"}, {}) == "daybreak-task-run-0f1e"
    assert Lineage(step="stage").compute_key(Ctx, inputs, {}) == cache_key("stage", SPEC, day)
    # the tasks carry the policy; promote and deploy never cache
    assert isinstance(stage_data.cache_policy, Lineage) and isinstance(train_model.cache_policy, Lineage)
    from daybreak.prefect.tasks import deploy_model, promote_model

    assert not isinstance(promote_model.cache_policy, Lineage) and not isinstance(deploy_model.cache_policy, Lineage)


LENIENT_DAYS = """
import json, sys
sys.path.insert(0, {flows!r})
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from daily_retrain import daily_retrain
from daybreak.infra.context import RunContext
from daybreak.cycle import run_cycle
from daybreak.spec import load_spec

def run(day):
    state = daily_retrain(date=day, spec={spec!r}, return_state=True)
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    tasks = [tr.task_key.rsplit("-", 1)[0] for tr in sorted(runs, key=lambda tr: tr.created)]
    return {{"result": state.result(), "tasks": tasks}}

out = {{"flow": [run(d) for d in ("2013-01-01", "2013-01-02", "2013-01-01")]}}  # the last: a rerun, SKIPPED
out["cli"] = run_cycle(load_spec({spec!r}), RunContext.create("2013-01-01"), deploy=False)  # `daybreak run`
out["cli_day2"] = run_cycle(load_spec({spec!r}), RunContext.create("2013-01-02"))  # deploys to no endpoint
print("RESULT " + json.dumps(out, default=str))
"""


@pytest.fixture(scope="module")
def lenient_days(tmp_path_factory: pytest.TempPathFactory, landing: Path, spec) -> dict:
    """The flow for 2013-01-01 (SKIPPED: nothing to train on) and 2013-01-02 (promoted, deployed to no
    endpoint) under a gate every candidate passes, then 2013-01-01 again by the flow and by run_cycle,
    and 2013-01-02 again by run_cycle. The spec materializes the online store (the embedded one)."""
    base = tmp_path_factory.mktemp("lenient-flow")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(base / "prefect"), PREFECT_LOCAL_STORAGE_PATH=str(base / "results"),
               PREFECT_LOGGING_LEVEL="WARNING", PYTHONWARNINGS="ignore", DAYBREAK_HOME=str(make_home(base, landing)),
               **QUIET_PREFECT)
    lenient = base / "lenient.yaml"
    lenient.write_text(json.dumps(spec.model_copy(update={
        "gate": spec.gate.model_copy(update={"compare": "no_worse", "margin": 1.0, "floor": 0.0}),
        "online": spec.online.model_copy(update={"materialize": True}),  # every step of the cycle runs
    }).model_dump(mode="json")))
    code = LENIENT_DAYS.format(flows=str(ROOT / "flows"), spec=str(lenient))
    proc = subprocess.run([str(BIN / "python"), "-c", code], env=env, capture_output=True, text=True, timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(line[len("RESULT "):])


def test_a_day_not_promoted_reports_the_live_champion_as_the_cli_does(lenient_days: dict) -> None:
    """A rerun of a SKIPPED day after a later day promoted: the flow and `daybreak run` both report
    the champion in service now (v1), not the gate's (none, when the day was first gated)."""
    day1, day2, rerun = (r["result"] for r in lenient_days["flow"])
    cli = lenient_days["cli"]
    assert day1["gate"]["decision"] == SKIPPED and day2["promote"]["champion_version"] == "1", (day1, day2)
    assert rerun["gate"]["decision"] == SKIPPED and rerun["promote"]["promoted"] is False, rerun
    assert cli["promote"]["champion_version"] == "1", cli["promote"]
    assert rerun["promote"]["champion_version"] == cli["promote"]["champion_version"], rerun["promote"]
    assert rerun["summary"]["champion_version"] == cli["summary"]["champion_version"]


def test_the_flow_and_run_cycle_follow_the_declared_cycle(lenient_days: dict) -> None:
    """Both run the steps of daybreak.steps.CYCLE in its order, and the same of them: all on a
    promoted day, none after promote once the gate said no (promote then reports, no task runs)."""
    from daybreak.prefect.flows import TASKS
    from daybreak.steps import CYCLE, STEPS

    names = [step.name for step in CYCLE]
    day1, day2, _ = lenient_days["flow"]
    assert day2["tasks"] == [TASKS[n].name for n in names], day2["tasks"]
    assert [k for k in lenient_days["cli_day2"] if k in STEPS] == names
    gate_said_no = names[:names.index("promote")]
    assert day1["tasks"] == [TASKS[n].name for n in gate_said_no], day1["tasks"]
    assert [k for k in lenient_days["cli"] if k in STEPS] == [*gate_said_no, "promote"]
    assert [k for k in day1["result"] if k in STEPS and day1["result"][k] is not None] == [*gate_said_no, "promote"]
    # the online step ran as a task after features: each day materialized, the rerun of the older
    # day kept the newer state
    assert day1["result"]["online"]["status"] == "materialized", day1["result"]["online"]
    assert day2["result"]["online"]["status"] == "materialized", day2["result"]["online"]
    assert day2["result"]["online"]["materialized_date"] == "2013-01-02"
    rerun = lenient_days["flow"][2]["result"]["online"]
    assert rerun["status"] == "kept_newer" and rerun["materialized_date"] == "2013-01-02", rerun
