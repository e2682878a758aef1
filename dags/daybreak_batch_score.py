"""daybreak batch score: score a date's features with the champion each time the champion moves.

Scheduled on the Asset `daybreak.champion`, which gets an event when `daybreak_daily_retrain`'s
promote task (or `daybreak_approve`) moves the champion. Such a run has no logical date: it scores
the date in the event's extra (the date the promoting run processed), else the date the champion
was trained for. Trigger it by hand with a date to score another day. Its predictions are the
partitioned Asset `daybreak.predictions` (partition key: the date scored).

To score every day's features as they are built, with the champion of the moment, unpause
`daybreak_partition_score` instead (or as well).
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import Param, dag

from daybreak.airflow import BatchScoreOperator
from daybreak.airflow.assets import CHAMPION, PREDICTIONS

DEFAULT_SPEC = os.environ.get("DAYBREAK_SPEC") or str(Path(__file__).resolve().parent.parent / "specs" / "flights.yaml")


@dag(
    dag_id="daybreak_batch_score",
    schedule=[CHAMPION],
    start_date=datetime(2013, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["daybreak", "ml", "scoring"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1), "execution_timeout": timedelta(hours=1)},
    params={
        "spec": Param(DEFAULT_SPEC, type="string", minLength=1, pattern=r"\S", title="Spec",
                      description="Path (or s3:// URI) of the pipeline spec (YAML)."),
        "date": Param(None, type=["null", "string"], format="date", title="Date",
                      description="Score this date (YYYY-MM-DD); empty: the date of the promotion."),
    },
)
def daybreak_batch_score() -> None:
    BatchScoreOperator(task_id="score", spec="{{ params.spec }}", logical_date="{{ params.date or '' }}",
                       outlets=[PREDICTIONS])


daybreak_batch_score()
