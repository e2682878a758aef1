"""Run inside a fresh AIRFLOW_HOME by tests/test_airflow.py (Airflow must be configured before import)."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    from airflow.dag_processing.dagbag import DagBag

    out: dict = {}
    bag = DagBag(dag_folder=str(ROOT / "dags"))
    out["import_errors"] = {k: str(v) for k, v in bag.import_errors.items()}
    out["dag_ids"] = sorted(bag.dag_ids)
    heavy = [m for m in ("pyarrow", "pandas", "mlflow", "ray", "xgboost", "sklearn") if m in sys.modules]
    out["heavy_modules_after_parse"] = heavy
    for dag_id in out["dag_ids"]:
        dag = bag.get_dag(dag_id)
        out[dag_id] = {"tasks": [t.task_id for t in dag.topological_sort()], "params": sorted(dag.params.keys()),
                       "schedule": str(getattr(dag, "schedule", None))}
    print("RESULT " + json.dumps(out, default=str))


def _run(dag, **kwargs) -> dict:
    """dag.test() once: the run's state, every task's state and the XComs."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    dr = dag.test(**kwargs)
    out: dict = {"state": str(dr.state), "tasks": {ti.task_id: str(ti.state) for ti in dr.get_task_instances()}}
    with create_session() as session:
        rows = session.query(XComModel).filter(XComModel.dag_id == dag.dag_id, XComModel.run_id == dr.run_id,
                                               XComModel.key == "return_value").all()
        out["xcom"] = {r.task_id: r.value for r in rows}
    return out


def approval() -> None:
    """Manual approval through Airflow: the daily DAG for 2013-01-03 under a manual spec (promote
    tags the version pending, deploy is skipped), then the daybreak_approve DAG with the conf its
    Params form would send: invalid forms refused, an approval, the same approval again; then a
    forced daily run with the form's approve flag set."""
    import os

    from airflow.dag_processing.dagbag import DagBag

    spec = os.environ["DAYBREAK_TEST_MANUAL_SPEC"]
    bag = DagBag(dag_folder=str(ROOT / "dags"))
    out: dict = {"daily": _run(bag.get_dag("daybreak_daily_retrain"),
                               logical_date=datetime(2013, 1, 3, tzinfo=UTC), run_conf={"spec": spec})}
    approve = bag.get_dag("daybreak_approve")
    conf = {"spec": spec, "version": int(os.environ["DAYBREAK_TEST_VERSION"]), "decision": "approve",
            "reason": "looked at the gate report"}
    out["invalid"] = []
    for bad in ({**conf, "decision": "maybe"}, {k: v for k, v in conf.items() if k != "reason"}):
        try:
            approve.test(run_conf=bad)
            out["invalid"].append("accepted")
        except Exception as e:  # the Params validation the form applies
            out["invalid"].append(f"{type(e).__name__}: {e}")
    out["approve"] = _run(approve, run_conf=conf)
    out["again"] = _run(approve, run_conf=conf)
    # the daily form's "Approve pending version": a forced retrain of 2013-01-03 (gated against the
    # version just approved, on the same holdout) is approved by the run that tags it pending, and
    # deployed. Every flag given: dag.test keeps a conf value in the DAG; a logical date of its own.
    out["approve_pending"] = _run(bag.get_dag("daybreak_daily_retrain"),
                                  logical_date=datetime(2013, 2, 3, tzinfo=UTC),
                                  run_conf={"spec": spec, "date": "2013-01-03", "dry_run": False, "force": True,
                                            "approve": True})
    print("RESULT " + json.dumps(out, default=str))


def flags() -> None:
    """The daily DAG's form flags for 2013-01-02 under DAYBREAK_TEST_LENIENT_SPEC: a dry run (gate
    runs, promote says what it would do and is skipped, deploy too), a normal run (promotes v1), a
    forced retrain (v2, promoted); then daybreak_batch_score with no logical date and no asset event
    (scores the champion's date)."""
    import os

    from airflow.dag_processing.dagbag import DagBag

    spec = os.environ["DAYBREAK_TEST_LENIENT_SPEC"]
    bag = DagBag(dag_folder=str(ROOT / "dags"))
    daily = bag.get_dag("daybreak_daily_retrain")
    # dag.test reuses the run (and its conf) of a logical date, and a conf value stays in the DAG
    # object's params for the next dag.test: one logical date per run, every flag given (the form
    # sends them all too), and the date override makes them all process 2013-01-02
    conf = {"spec": spec, "date": "2013-01-02", "dry_run": False, "force": False, "approve": False}
    out: dict = {"dry_run": _run(daily, logical_date=datetime(2013, 2, 1, tzinfo=UTC),
                                 run_conf={**conf, "dry_run": True})}
    out["normal"] = _run(daily, logical_date=datetime(2013, 2, 2, tzinfo=UTC), run_conf=conf)
    out["force"] = _run(daily, logical_date=datetime(2013, 2, 3, tzinfo=UTC), run_conf={**conf, "force": True})
    out["batch"] = _run(bag.get_dag("daybreak_batch_score"), logical_date=None, run_conf={"spec": spec})
    print("RESULT " + json.dumps(out, default=str))


def user_dag() -> None:
    """The user's DAG folder (AIRFLOW__CORE__DAGS_FOLDER) holds my_pipeline.py."""
    from airflow.dag_processing.dagbag import DagBag

    user = DagBag(dag_folder=str(ROOT / "tests" / "airflow_user_dags")).get_dag("my_pipeline")
    run = _run(user, logical_date=datetime(2013, 1, 3, tzinfo=UTC))
    print("RESULT " + json.dumps({"user_dag_state": run["state"], "user_xcom": run["xcom"]}, default=str))


def gate_dag() -> None:
    """Run the gate_policy DAG once; print every task's state and the gates' XComs."""
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(ROOT / "tests" / "airflow_user_dags")).get_dag("gate_policy")
    print("RESULT " + json.dumps(_run(dag, logical_date=datetime(2013, 1, 2, tzinfo=UTC)), default=str))


def describe(dag) -> dict:
    """What a DAG is made of: its tasks in order, their dependencies, operators, limits, Assets,
    templated flags, and the DAG's settings and form (with defaults)."""
    tasks = dag.topological_sort()
    flags = ("force", "dry_run", "approve_pending", "spec", "logical_date")
    return {"tasks": [t.task_id for t in tasks],
            "downstream": {t.task_id: sorted(t.downstream_task_ids) for t in tasks},
            "operators": {t.task_id: type(t).__name__ for t in tasks},
            "limits": {t.task_id: [str(t.execution_timeout), t.retries, str(t.retry_delay)] for t in tasks},
            "outlets": {t.task_id: sorted(str(getattr(o, "name", o)) for o in t.outlets) for t in tasks},
            "flags": {t.task_id: {f: getattr(t, f) for f in flags if isinstance(getattr(t, f, None), str)}
                      for t in tasks},
            "params": {k: dag.params[k] for k in sorted(dag.params.keys())},
            "settings": [str(dag.schedule), dag.catchup, dag.max_active_runs, str(dag.dagrun_timeout),
                         sorted(dag.tags)]}


def factory() -> None:
    """The shipped daily DAG and a user's two-line DAG file built with daily_retrain_dag."""
    from airflow.dag_processing.dagbag import DagBag

    shipped = DagBag(dag_folder=str(ROOT / "dags")).get_dag("daybreak_daily_retrain")
    user = DagBag(dag_folder=str(ROOT / "tests" / "airflow_factory_dags"))
    out = {"shipped": describe(shipped), "user_dag_ids": sorted(user.dag_ids),
           "user_import_errors": {k: str(v) for k, v in user.import_errors.items()},
           "heavy_modules_after_parse": [m for m in ("pyarrow", "pandas", "mlflow", "ray", "xgboost", "sklearn")
                                         if m in sys.modules]}
    if "payments_daily_retrain" in user.dag_ids:
        out["user"] = describe(user.get_dag("payments_daily_retrain"))
    print("RESULT " + json.dumps(out, default=str))


if __name__ == "__main__":
    checks = {"user": user_dag, "gate": gate_dag, "approval": approval, "flags": flags, "factory": factory}
    checks.get(sys.argv[1] if sys.argv[1:] else "", main)()
