"""A user's own DAG that embeds one daybreak operator (used by tests/test_airflow.py)."""

from __future__ import annotations

import os
from datetime import datetime

from airflow.sdk import dag, task

from daybreak.airflow import StageDataOperator


@dag(dag_id="my_pipeline", schedule="@daily", start_date=datetime(2013, 1, 1), catchup=False)
def my_pipeline() -> None:
    staged = StageDataOperator(task_id="stage_flights", spec=os.environ["DAYBREAK_SPEC"], logical_date="{{ ds }}")

    @task
    def report(result: dict) -> int:
        print(f"staged {result['rows']} rows on {result['date']}")
        return result["rows"]

    report(staged.output)

    if os.environ.get("DAYBREAK_TEST_S3_STORE"):
        # the same operator against S3, credentials from the Airflow Connection 'daybreak_s3'
        StageDataOperator(task_id="stage_flights_s3", spec=os.environ["DAYBREAK_SPEC"], logical_date="{{ ds }}",
                          store=os.environ["DAYBREAK_TEST_S3_STORE"], aws_conn_id="daybreak_s3")


my_pipeline()
