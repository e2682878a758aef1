"""The Airflow DAG and an embedded operator, run for real with dag.test() in a fresh AIRFLOW_HOME."""

from __future__ import annotations

import json
import os
import subprocess
from itertools import pairwise
from pathlib import Path

import pytest
from conftest import BIN, ROOT, SPEC, make_home

from daybreak.gate import PROMOTE
from daybreak.infra import registry
from daybreak.infra.context import RunContext


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory, landing: Path) -> dict:
    base = tmp_path_factory.mktemp("airflow")
    home = make_home(base, landing)
    env = {**os.environ, "AIRFLOW_HOME": str(base / "airflow"), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "DAYBREAK_HOME": str(home), "DAYBREAK_SPEC": str(SPEC)}
    subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    return {"env": env, "home": home}


def _check(env: dict, *args: str) -> dict:
    proc = subprocess.run([str(BIN / "python"), str(ROOT / "tests" / "airflow_check.py"), *args], env=env,
                          capture_output=True, text=True, timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(line[len("RESULT "):])


def test_dagbag_parses_light(airflow_env: dict) -> None:
    out = _check(airflow_env["env"])
    assert out["import_errors"] == {}
    assert out["dag_ids"] == ["daybreak_approve", "daybreak_batch_score", "daybreak_daily_retrain",
                              "daybreak_partition_score"]
    assert out["heavy_modules_after_parse"] == []
    daily, approve, batch = out["daybreak_daily_retrain"], out["daybreak_approve"], out["daybreak_batch_score"]
    assert daily["tasks"] == ["landing", "stage", "features", "online", "monitor", "train", "gate", "promote",
                              "deploy"]
    assert daily["params"] == ["approve", "date", "dry_run", "force", "spec"]
    assert daily["schedule"] == "@daily"
    assert approve == {"tasks": ["approve"], "params": ["decision", "reason", "spec", "version"], "schedule": "None"}
    assert batch["tasks"] == ["score"] and batch["params"] == ["date", "spec"]
    assert "x-daybreak://champion" in batch["schedule"]
    partition = out["daybreak_partition_score"]
    assert partition["tasks"] == ["score"] and partition["params"] == ["spec"]
    assert "PartitionedAssetTimetable" in partition["schedule"] and "x-daybreak://features" in partition["schedule"]


def test_the_dag_factory_builds_the_declared_cycle(airflow_env: dict) -> None:
    """The shipped DAG and a user's two-line DAG file are both built by daily_retrain_dag from the
    cycle's declaration: one task per declared step, in its order, chained; the online step hangs
    off features (its skip or failure holds up no training); the same operators, limits, Assets
    and form, with the user's own dag_id and spec."""
    from daybreak.steps import CYCLE

    out = _check(airflow_env["env"], "factory")
    assert out["user_import_errors"] == {} and out["user_dag_ids"] == ["payments_daily_retrain"], out
    assert out["heavy_modules_after_parse"] == []
    shipped, user = out["shipped"], out["user"]
    names = ["landing", *(step.name for step in CYCLE)]  # the landing sensor, then the declared steps
    assert shipped["tasks"] == names
    chain = [n for n in names if n != "online"]
    assert shipped["downstream"] == {a: [b] for a, b in pairwise(chain)} | {names[-1]: [], "online": [],
                                                                            "features": ["monitor", "online"]}
    assert shipped["operators"]["online"] == "MaterializeOnlineOperator"
    assert shipped["operators"]["landing"] == "LandingFileSensor"
    assert shipped["params"]["spec"] == str(SPEC) and user["params"]["spec"] == "specs/payments.yaml"
    assert user == shipped | {"params": shipped["params"] | {"spec": "specs/payments.yaml"}}


def lenient_spec(spec, folder: Path) -> Path:
    """The spec with a gate every trained day passes (written as JSON, which YAML reads)."""
    gate = {"compare": "no_worse", "margin": 1.0, "floor": 0.0,
            "slices": spec.gate.slices.model_copy(update={"columns": []})}
    lenient = spec.model_copy(update={"gate": spec.gate.model_copy(update=gate)})
    path = folder / "lenient.yaml"
    path.write_text(json.dumps(lenient.model_dump(mode="json")))
    return path


def _x(value):
    return json.loads(value) if isinstance(value, str) else value


def test_dry_run_force_and_batch_score_with_dag_test(airflow_env: dict, fresh: Path, spec) -> None:
    """The form's flags through dag.test for 2013-01-02: dry run (nothing promoted), a normal run,
    a forced retrain; then the asset-scheduled batch DAG run without a logical date or event."""
    env = {**airflow_env["env"], "DAYBREAK_HOME": str(fresh),
           "DAYBREAK_TEST_LENIENT_SPEC": str(lenient_spec(spec, fresh))}
    out = _check(env, "flags")

    dry = out["dry_run"]
    assert dry["state"] == "success", dry
    assert dry["tasks"]["gate"] == "success", dry["tasks"]
    assert dry["tasks"]["promote"] == "skipped" and dry["tasks"]["deploy"] == "skipped", dry["tasks"]
    would = _x(dry["xcom"]["promote"])
    assert would["dry_run"] is True and would["promoted"] is False, would
    assert would["would"] == "move champion to v1 (from no champion)", would

    # the spec does not opt in to online features: the online task is skipped, saying why, and
    # nothing after features waited for it
    assert dry["tasks"]["online"] == "skipped" and dry["tasks"]["monitor"] == "success", dry["tasks"]
    assert _x(dry["xcom"]["online"])["enabled"] is False, dry["xcom"].get("online")

    normal = out["normal"]
    assert _x(normal["xcom"]["train"])["status"] == "exists", normal  # the dry run's candidate
    assert _x(normal["xcom"]["promote"])["champion_version"] == "1", normal
    assert normal["tasks"]["deploy"] == "success", normal

    forced = out["force"]
    train = _x(forced["xcom"]["train"])
    assert train["status"] == "trained" and train["forced"] is True and train["model_version"] == "2", train
    assert _x(forced["xcom"]["promote"])["champion_version"] == "2", forced

    batch = out["batch"]
    assert batch["state"] == "success", batch
    scored = _x(batch["xcom"]["score"])
    assert scored["date"] == "2013-01-02" and scored["model_version"] == "2" and scored["rows"] > 0, scored
    cl = registry.client(RunContext.create("2013-01-02"))
    assert str(registry.alias_version(cl, spec.model.name, "champion").version) == "2"


def test_operator_embedded_in_a_user_dag(airflow_env: dict, s3_server, landing: Path, tmp_path: Path) -> None:
    from s3 import CREDS

    bucket = "airflow-conn"
    s3_server.client().create_bucket(Bucket=bucket)
    s3_server.upload_dir(landing, bucket, "store/landing")
    conn = {"conn_type": "aws", "login": CREDS["AWS_ACCESS_KEY_ID"], "password": CREDS["AWS_SECRET_ACCESS_KEY"],
            "extra": {"endpoint_url": s3_server.endpoint, "region_name": "us-east-1"}}
    env = {k: v for k, v in airflow_env["env"].items() if not k.startswith("AWS_") and "S3" not in k}
    env.update({"AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "tests" / "airflow_user_dags"),
                "AIRFLOW_CONN_DAYBREAK_S3": json.dumps(conn), "DAYBREAK_TEST_S3_STORE": f"s3://{bucket}/store"})
    out = _check(env, "user")
    assert out["user_dag_state"] == "success"
    s3_result = out["user_xcom"]["stage_flights_s3"]
    s3_result = json.loads(s3_result) if isinstance(s3_result, str) else s3_result
    assert s3_result["rows"] == 914 and s3_result["sources"]["flights"]["uri"].startswith("s3://airflow-conn/")
    assert CREDS["AWS_SECRET_ACCESS_KEY"] not in json.dumps(out)
    staged = out["user_xcom"]["stage_flights"]
    staged = json.loads(staged) if isinstance(staged, str) else staged
    assert staged["date"] == "2013-01-03" and staged["rows"] == 914
    assert int(out["user_xcom"]["report"]) == 914


def test_gate_rejection_skips_or_fails_downstream(airflow_env: dict, landing: Path, tmp_path: Path, spec) -> None:
    home = make_home(tmp_path, landing)
    strict = spec.model_copy(update={"gate": spec.gate.model_copy(update={"floor": 0.99})})
    spec_file = tmp_path / "strict.yaml"
    spec_file.write_text(json.dumps(strict.model_dump(mode="json")))
    env = {**airflow_env["env"], "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "tests" / "airflow_user_dags"),
           "DAYBREAK_HOME": str(home), "DAYBREAK_TEST_STRICT_SPEC": str(spec_file)}
    out = _check(env, "gate")
    t = out["tasks"]
    assert t["train"] == "success" and t["gate_skip"] == "success", t
    assert t["promote_after_skip"] == "skipped" and t["after_skip"] == "skipped", t
    assert t["gate_fail"] == "failed" and t["promote_after_fail"] == "upstream_failed", t
    decision = out["xcom"]["gate_skip"]
    decision = json.loads(decision) if isinstance(decision, str) else decision
    assert decision["decision"] == "REJECT"
    assert [r["verdict"] for r in decision["rules"] if r["rule"] == "floor"] == ["fail"]


def test_daily_dag_three_days_with_dag_test(airflow_env: dict, monkeypatch: pytest.MonkeyPatch, spec) -> None:
    proc = subprocess.run([str(BIN / "python"), str(ROOT / "scripts" / "demo.py"), "--days", "3"],
                          env=airflow_env["env"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("2013-")]
    assert len(lines) == 3, proc.stdout
    assert "decision=SKIPPED" in lines[0] and "decision=PROMOTE" in lines[1]
    assert "mlflow ui" in proc.stdout and "daybreak serve" in proc.stdout
    monkeypatch.setenv("DAYBREAK_HOME", str(airflow_env["home"]))
    cl = registry.client(RunContext.create("2013-01-03"))
    champ = registry.alias_version(cl, spec.model.name, "champion")
    assert champ is not None and champ.tags[registry.DECISION_TAG] == PROMOTE
    assert len(registry.versions(cl, spec.model.name)) == 2
    assert (airflow_env["home"] / "demo.log").is_file()


def test_manual_approval_through_the_dags(airflow_env: dict, fresh: Path, spec) -> None:
    """Under promotion.approval: manual the daily DAG leaves the version pending and skips deploy;
    the daybreak_approve DAG, triggered with the conf of its Params form, promotes it."""
    from daybreak.gate import evaluate_gate
    from daybreak.infra.audit import audit_events
    from daybreak.promote import promote_model
    from daybreak.train import train_model

    lenient = spec.model_copy(update={"gate": spec.gate.model_copy(update={"compare": "no_worse", "margin": 1.0,
                                                                           "floor": 0.0})})
    ctx = RunContext.create("2013-01-02")
    train_model(lenient, ctx)
    evaluate_gate(lenient, ctx)
    assert promote_model(lenient, ctx)["promoted"]  # v1: the champion the DAG's candidate is gated against
    manual = lenient.model_copy(update={"promotion": lenient.promotion.model_copy(update={"approval": "manual"})})
    # v2 trained and gated here (warm) saves the DAG run's process about half a minute; its train
    # and gate tasks find them (idempotent), its promote task does the work under test
    train_model(manual, RunContext.create("2013-01-03"))
    assert evaluate_gate(manual, RunContext.create("2013-01-03"))["decision"] == PROMOTE
    spec_file = fresh / "manual.yaml"
    spec_file.write_text(json.dumps(manual.model_dump(mode="json")))
    env = {**airflow_env["env"], "DAYBREAK_HOME": str(fresh), "DAYBREAK_TEST_MANUAL_SPEC": str(spec_file),
           "DAYBREAK_TEST_VERSION": "2"}
    out = _check(env, "approval")

    daily = out["daily"]
    assert daily["state"] == "success", daily
    assert daily["tasks"]["promote"] == "success" and daily["tasks"]["deploy"] == "skipped", daily["tasks"]
    pending = daily["xcom"]["promote"]
    pending = json.loads(pending) if isinstance(pending, str) else pending
    assert pending["approval"] == "pending"
    assert pending["candidate_version"] == "2" and pending["champion_version"] == "1"

    bad_decision, no_reason = out["invalid"]
    assert "ParamValidationError" in bad_decision and "maybe" in bad_decision, bad_decision
    assert "ParamValidationError" in no_reason and "reason" in no_reason, no_reason
    assert out["approve"]["state"] == "success" and out["approve"]["tasks"] == {"approve": "success"}, out["approve"]
    approved = out["approve"]["xcom"]["approve"]
    approved = json.loads(approved) if isinstance(approved, str) else approved
    assert approved["approval"] == "approved" and approved["champion_version"] == "2" and approved["by"] == "dag_test"
    assert out["again"]["tasks"] == {"approve": "failed"}, out["again"]  # already promoted: nothing changes

    events = audit_events(manual, ctx)
    v2 = [e for e in events if e["version"] == "2"]
    assert {e["event"] for e in v2[:2]} == {"approved", "promote"} and v2[2]["event"] == "pending_approval"
    assert next(e for e in v2 if e["event"] == "approved")["reason"] == "looked at the gate report"

    # approve=True on the daily form: the run approves the version it tags pending, then deploys
    run = out["approve_pending"]
    assert run["state"] == "success" and run["tasks"]["promote"] == "success", (run["tasks"], run["xcom"].get("gate"))
    promoted = run["xcom"]["promote"]
    promoted = json.loads(promoted) if isinstance(promoted, str) else promoted
    assert run["tasks"]["deploy"] == "success", (run["tasks"], promoted)
    assert promoted["approval"] == "approved" and promoted["champion_version"] == "3", promoted
    assert promoted["previous_version"] == "2" and "approve_pending" in promoted["reason"], promoted
    cl = registry.client(ctx)
    assert str(registry.alias_version(cl, spec.model.name, "champion").version) == "3"
    assert str(registry.alias_version(cl, spec.model.name, "previous").version) == "2"
    v3 = [e["event"] for e in audit_events(manual, ctx) if e["version"] == "3"]
    assert "pending_approval" in v3 and "approved" in v3, v3
