"""daybreak daily retrain: stage -> features -> monitor -> train -> gate -> promote -> deploy.

`monitor` judges the model in service on the day's logged predictions, now that the day's labels
are staged, before anything is retrained: live metrics per version, drift, and an automatic
rollback when the champion fell below its floor or clearly below `previous` (the gate then
compares the new candidate with the restored champion).

Runs `@daily`; catchup is off, so a new deployment does not replay history by itself. Backfill a
range with the scheduler instead (runs one date at a time, in order):

    airflow backfill create --dag-id daybreak_daily_retrain --from-date 2013-01-01 --to-date 2013-01-14 \
        --max-active-runs 1

Trigger it from the UI with the Params form:

* **spec**: the pipeline spec (YAML) to run;
* **date**: process this date (YYYY-MM-DD) instead of the run's logical date;
* **force retrain**: train a new version even if the date already has a candidate with the same lineage;
* **dry run**: stage, features, train and gate run; promote says what it would do and is skipped,
  and so is deploy;
* **approve pending version**: under `promotion.approval: manual`, approve the version this run tags
  pending, as you (otherwise it waits for the `daybreak_approve` DAG).

A value that does not fit the form is refused when the run is triggered. Staged data, features and
the champion are Assets (`daybreak.staged`, `daybreak.features`, `daybreak.champion`); the
champion's event fires only when it moves and triggers `daybreak_batch_score`.
Parsing this file imports only Airflow and the thin daybreak.airflow operators.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import Param, dag

from daybreak.airflow import (
    BuildFeaturesOperator,
    DeployModelOperator,
    EvaluateGateOperator,
    MonitorModelOperator,
    PromoteModelOperator,
    StageDataOperator,
    TrainModelOperator,
)
from daybreak.airflow.assets import CHAMPION, FEATURES, STAGED

DEFAULT_SPEC = os.environ.get("DAYBREAK_SPEC") or str(Path(__file__).resolve().parent.parent / "specs" / "flights.yaml")


@dag(
    dag_id="daybreak_daily_retrain",
    schedule="@daily",
    start_date=datetime(2013, 1, 1),
    catchup=False,
    max_active_runs=1,  # a day trains on the days before it: one date at a time, in order
    dagrun_timeout=timedelta(hours=6),
    tags=["daybreak", "ml"],
    doc_md=__doc__,
    # transient failures (network, a busy registry) retry; a bad spec or bad data fails at once
    default_args={"retries": 2, "retry_delay": timedelta(minutes=2), "retry_exponential_backoff": 2.0,
                  "max_retry_delay": timedelta(minutes=20), "execution_timeout": timedelta(hours=1)},
    params={
        "spec": Param(DEFAULT_SPEC, type="string", minLength=1, pattern=r"\S", title="Spec",
                      description="Path (or s3:// URI) of the pipeline spec (YAML)."),
        "date": Param(None, type=["null", "string"], format="date", title="Date override",
                      description="Process this date (YYYY-MM-DD) instead of the run's logical date."),
        "force": Param(False, type="boolean", title="Force retrain",
                       description="Train a new version even if this date already has a candidate."),
        "dry_run": Param(False, type="boolean", title="Dry run",
                         description="Stage, build features, train and gate; never promote or deploy."),
        "approve": Param(False, type="boolean", title="Approve pending version",
                         description="Under promotion.approval: manual, approve the version this run tags "
                                     "pending (recorded with your user name)."),
    },
)
def daybreak_daily_retrain() -> None:
    common = {"spec": "{{ params.spec }}", "logical_date": "{{ params.date or '' }}"}
    stage = StageDataOperator(task_id="stage", outlets=[STAGED], execution_timeout=timedelta(minutes=30), **common)
    features = BuildFeaturesOperator(task_id="features", outlets=[FEATURES], **common)
    monitor = MonitorModelOperator(task_id="monitor", execution_timeout=timedelta(minutes=30), **common)
    train = TrainModelOperator(task_id="train", force="{{ params.force }}", **common)
    gate = EvaluateGateOperator(task_id="gate", execution_timeout=timedelta(minutes=30), **common)
    promote = PromoteModelOperator(task_id="promote", dry_run="{{ params.dry_run }}",
                                   approve_pending="{{ params.approve }}", champion_asset=CHAMPION,
                                   execution_timeout=timedelta(minutes=10), **common)
    deploy = DeployModelOperator(task_id="deploy", dry_run="{{ params.dry_run }}",
                                 execution_timeout=timedelta(minutes=15), **common)
    stage >> features >> monitor >> train >> gate >> promote >> deploy


daybreak_daily_retrain()
