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
The DAG is built by `daybreak.airflow.daily_retrain_dag`, one task per step of the cycle declared in
`daybreak.steps.CYCLE`; parsing this file imports Airflow, the thin daybreak.airflow operators and
that declaration, no step.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from daybreak.airflow import daily_retrain_dag

DEFAULT_SPEC = os.environ.get("DAYBREAK_SPEC") or str(Path(__file__).resolve().parent.parent / "specs" / "flights.yaml")

dag = daily_retrain_dag(DEFAULT_SPEC, dag_id="daybreak_daily_retrain", start_date=datetime(2013, 1, 1), doc_md=__doc__)
