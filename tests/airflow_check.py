"""Run inside a fresh AIRFLOW_HOME by tests/test_airflow.py (Airflow must be configured before import)."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
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
    dag = bag.get_dag("daybreak_daily_retrain")
    out["tasks"] = [t.task_id for t in dag.topological_sort()] if hasattr(dag, "topological_sort") else sorted(dag.task_ids)
    out["params"] = sorted(dag.params.keys())
    out["schedule"] = str(getattr(dag, "schedule", None))
    print("RESULT " + json.dumps(out, default=str))


def user_dag() -> None:
    """The user's DAG folder (AIRFLOW__CORE__DAGS_FOLDER) holds my_pipeline.py."""
    from airflow.dag_processing.dagbag import DagBag

    out: dict = {}
    user = DagBag(dag_folder=str(ROOT / "tests" / "airflow_user_dags")).get_dag("my_pipeline")
    dr = user.test(logical_date=datetime(2013, 1, 3, tzinfo=timezone.utc))
    out["user_dag_state"] = str(dr.state)
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(XComModel).filter(XComModel.dag_id == "my_pipeline", XComModel.run_id == dr.run_id).all()
        out["user_xcom"] = {r.task_id: r.value for r in rows}
    print("RESULT " + json.dumps(out, default=str))


def gate_dag() -> None:
    """Run the gate_policy DAG once; print every task's state and the gates' XComs."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    dag = DagBag(dag_folder=str(ROOT / "tests" / "airflow_user_dags")).get_dag("gate_policy")
    dr = dag.test(logical_date=datetime(2013, 1, 2, tzinfo=timezone.utc))
    out: dict = {"state": str(dr.state), "tasks": {ti.task_id: str(ti.state) for ti in dr.get_task_instances()}}
    with create_session() as session:
        rows = session.query(XComModel).filter(XComModel.dag_id == "gate_policy", XComModel.run_id == dr.run_id,
                                               XComModel.key == "return_value").all()
        out["xcom"] = {r.task_id: r.value for r in rows}
    print("RESULT " + json.dumps(out, default=str))


if __name__ == "__main__":
    {"user": user_dag, "gate": gate_dag}.get(sys.argv[1] if sys.argv[1:] else "", main)()
