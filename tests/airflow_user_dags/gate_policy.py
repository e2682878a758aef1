"""A user's DAG with the gate's two on_reject policies side by side (used by tests/test_airflow.py).

The spec (DAYBREAK_TEST_STRICT_SPEC) has a floor no model meets, so the gate rejects: with
on_reject="skip" the tasks after it are skipped, with "fail" the gate task fails.
"""

from __future__ import annotations

import os
from datetime import datetime

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import dag

from daybreak.airflow import (
    BuildFeaturesOperator,
    EvaluateGateOperator,
    PromoteModelOperator,
    StageDataOperator,
    TrainModelOperator,
)


@dag(dag_id="gate_policy", schedule=None, start_date=datetime(2013, 1, 1), catchup=False)
def gate_policy() -> None:
    spec = os.environ.get("DAYBREAK_TEST_STRICT_SPEC") or os.environ.get("DAYBREAK_SPEC", "spec.yaml")
    prepared = []
    for day in ("2013-01-01", "2013-01-02"):
        s = StageDataOperator(task_id=f"stage_{day}", spec=spec, logical_date=day)
        f = BuildFeaturesOperator(task_id=f"features_{day}", spec=spec, logical_date=day)
        s >> f
        prepared.append(f)
    train = TrainModelOperator(task_id="train", spec=spec, logical_date="2013-01-02")
    prepared >> train
    gate_skip = EvaluateGateOperator(task_id="gate_skip", spec=spec, logical_date="2013-01-02", on_reject="skip")
    gate_fail = EvaluateGateOperator(task_id="gate_fail", spec=spec, logical_date="2013-01-02", on_reject="fail")
    train >> gate_skip >> PromoteModelOperator(task_id="promote_after_skip", spec=spec, logical_date="2013-01-02") \
        >> EmptyOperator(task_id="after_skip")
    train >> gate_fail >> PromoteModelOperator(task_id="promote_after_fail", spec=spec, logical_date="2013-01-02")


gate_policy()
