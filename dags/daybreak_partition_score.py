"""daybreak partition score: score each day's features, for that day, as soon as they are built.

Scheduled on the partitioned Asset `daybreak.features` (`PartitionedAssetTimetable`): each event of
`daybreak_daily_retrain`'s features task carries the date it built as its partition key, and queues
one run of this DAG for that partition. The run scores that date's features with the champion of
the moment (a date before the first champion is skipped) and publishes the predictions: an event
of the partitioned Asset `daybreak.predictions` for the same date. A run's date is its
`partition_key` (see the run's details); the form's spec is the one the features were built with.

Paused when created, like every DAG: unpause it to score every day. `daybreak_batch_score` follows
promotions instead (it rescores the promoted date with the new champion).
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import Param, PartitionedAssetTimetable, dag

from daybreak.airflow import BatchScoreOperator
from daybreak.airflow.assets import FEATURES, PREDICTIONS

DEFAULT_SPEC = os.environ.get("DAYBREAK_SPEC") or str(Path(__file__).resolve().parent.parent / "specs" / "flights.yaml")


@dag(
    dag_id="daybreak_partition_score",
    schedule=PartitionedAssetTimetable(assets=FEATURES),
    start_date=datetime(2013, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["daybreak", "ml", "scoring"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1), "execution_timeout": timedelta(hours=1)},
    params={
        "spec": Param(DEFAULT_SPEC, type="string", minLength=1, pattern=r"\S", title="Spec",
                      description="Path (or s3:// URI) of the pipeline spec (YAML)."),
    },
)
def daybreak_partition_score() -> None:
    BatchScoreOperator(task_id="score", spec="{{ params.spec }}", outlets=[PREDICTIONS], skip_without_champion=True)


daybreak_partition_score()
