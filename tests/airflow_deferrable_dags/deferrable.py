"""DAGs for tests/test_airflow_deferrable.py, run by `airflow standalone`'s scheduler and triggerer.

- ``daybreak_deferrable``: the deferrable deploy and a task that shares its one-slot pool (it can
  only run while the deploy waits in the triggerer), and the landing sensor waiting for a file the
  test drops later;
- ``daybreak_features_partition``: the features step for a date, whose Asset event carries the
  date as its partition key (daybreak_partition_score, linked next to this file, follows it).
"""

from __future__ import annotations

import os
from datetime import datetime

from airflow.sdk import Param, dag, task

from daybreak.airflow import BuildFeaturesOperator, DeployModelOperator, LandingFileSensor
from daybreak.airflow.assets import FEATURES

SPEC = os.environ["DAYBREAK_SPEC"]
POOL = "daybreak_deploy_slot"


@dag(dag_id="daybreak_deferrable", schedule=None, start_date=datetime(2013, 1, 1), catchup=False,
     params={"serve_url": Param("", type="string"), "sensor_store": Param("", type="string"),
             "sensor_date": Param("2013-01-13", type="string")})
def daybreak_deferrable() -> None:
    # queued first (priority), takes the pool's one slot, then defers and gives it back
    DeployModelOperator(task_id="deploy", spec=SPEC, logical_date="2013-01-04", serve_url="{{ params.serve_url }}",
                        pool=POOL, priority_weight=100, poll_interval=0.5, wait_timeout=900, retries=0)

    @task(pool=POOL, priority_weight=1)
    def hold() -> str:
        return "ran while the deploy waited"

    hold()
    LandingFileSensor(task_id="landing", spec=SPEC, sources=["flights"], logical_date="{{ params.sensor_date }}",
                      store="{{ params.sensor_store }}", poke_interval=0.5, timeout=900)


@dag(dag_id="daybreak_features_partition", schedule=None, start_date=datetime(2013, 1, 1), catchup=False,
     params={"date": Param("2013-01-04", type="string")})
def daybreak_features_partition() -> None:
    BuildFeaturesOperator(task_id="features", spec=SPEC, logical_date="{{ params.date }}", outlets=[FEATURES])


daybreak_deferrable()
daybreak_features_partition()
