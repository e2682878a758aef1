"""daybreak daily retrain: stage -> features -> train -> gate -> promote -> deploy.

Trigger it from the UI with the Params form to pick a spec or re-run a given date. Parsing this
file imports only Airflow and the thin daybreak.airflow operators.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import Asset, Param, dag

from daybreak.airflow import (
    BuildFeaturesOperator,
    DeployModelOperator,
    EvaluateGateOperator,
    PromoteModelOperator,
    StageDataOperator,
    TrainModelOperator,
)

STAGED = Asset(name="daybreak_daily_retrain.staged", uri="x-daybreak://daybreak_daily_retrain/staged")
DEFAULT_SPEC = os.environ.get("DAYBREAK_SPEC") or str(Path(__file__).resolve().parent.parent / "specs" / "flights.yaml")


@dag(
    dag_id="daybreak_daily_retrain",
    schedule="@daily",
    start_date=datetime(2013, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["daybreak", "ml"],
    doc_md=__doc__,
    default_args={"retries": 1, "retry_delay": timedelta(minutes=2), "execution_timeout": timedelta(hours=2)},
    params={
        "spec": Param(DEFAULT_SPEC, type="string", minLength=1, title="Spec",
                      description="Path to the pipeline spec (YAML)."),
        "date": Param(None, type=["null", "string"], format="date", pattern=r"^\d{4}-\d{2}-\d{2}$",
                      title="Date override",
                      description="Process this date (YYYY-MM-DD) instead of the run's logical date."),
    },
)
def daybreak_daily_retrain() -> None:
    common = {"spec": "{{ params.spec }}", "logical_date": "{{ params.date or '' }}"}
    stage = StageDataOperator(task_id="stage", outlets=[STAGED], **common)
    features = BuildFeaturesOperator(task_id="features", **common)
    train = TrainModelOperator(task_id="train", **common)
    gate = EvaluateGateOperator(task_id="gate", **common)
    promote = PromoteModelOperator(task_id="promote", **common)
    deploy = DeployModelOperator(task_id="deploy", **common)
    stage >> features >> train >> gate >> promote >> deploy


daybreak_daily_retrain()
