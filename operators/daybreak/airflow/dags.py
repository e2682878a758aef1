"""A daily retrain DAG per spec, built from the cycle's one declaration (``daybreak.steps.CYCLE``).

In a file of the DAGs folder::

    from daybreak.airflow import daily_retrain_dag
    daily_retrain_dag("/srv/specs/churn.yaml", dag_id="churn_daily_retrain")

Building the DAG reads the declaration only (no step is imported, the spec is not read): the file
parses as fast as one written by hand.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from daybreak.airflow.assets import CHAMPION, FEATURES, STAGED
from daybreak.airflow.operators import (
    BuildFeaturesOperator,
    DaybreakStepOperator,
    DeployModelOperator,
    EvaluateGateOperator,
    MaterializeOnlineOperator,
    MonitorModelOperator,
    PromoteModelOperator,
    StageDataOperator,
    TrainModelOperator,
)
from daybreak.steps import CYCLE

if TYPE_CHECKING:  # at run time imported when a DAG is built: Airflow loads daybreak.airflow while it configures
    from airflow.sdk import DAG, Param

DOC = """daybreak daily retrain: landing -> stage -> features -> monitor -> train -> gate -> promote -> deploy.

`landing` waits (deferred, in the triggerer) for the day's landing files. `online` (after features, beside
monitor) materializes the online store when the spec sets `online.materialize`, and is skipped otherwise.
The gate decides: promote runs only after PROMOTE, deploy only when the champion moved. Params form:
**spec**, **date** (instead of the run's logical date), **force retrain**, **dry run** (promote says what
it would do; nothing is promoted or deployed), **approve pending version** (under
`promotion.approval: manual`).
"""


def _operators() -> dict[str, tuple[type[DaybreakStepOperator], dict[str, Any]]]:
    """Each step of the cycle as its operator: the class, what the Params form sets, the Assets it
    updates and its time limit. The gate skips promote and deploy after anything but PROMOTE;
    promote skips deploy unless the champion moved; deploy skips itself in a dry run."""
    return {
        "stage": (StageDataOperator, {"outlets": [STAGED], "execution_timeout": timedelta(minutes=30)}),
        "features": (BuildFeaturesOperator, {"outlets": [FEATURES]}),
        "online": (MaterializeOnlineOperator, {"execution_timeout": timedelta(minutes=30)}),
        "monitor": (MonitorModelOperator, {"execution_timeout": timedelta(minutes=30)}),
        "train": (TrainModelOperator, {"force": "{{ params.force }}"}),
        "gate": (EvaluateGateOperator, {"execution_timeout": timedelta(minutes=30)}),
        "promote": (PromoteModelOperator, {"dry_run": "{{ params.dry_run }}", "approve_pending": "{{ params.approve }}",
                                           "champion_asset": CHAMPION, "execution_timeout": timedelta(minutes=10)}),
        "deploy": (DeployModelOperator, {"dry_run": "{{ params.dry_run }}",
                                         "execution_timeout": timedelta(minutes=15)}),
    }


def params(spec: str) -> dict[str, Param]:
    """The run form: the spec (default `spec`), a date override and the run's flags."""
    from airflow.sdk import Param

    return {
        "spec": Param(spec, type="string", minLength=1, pattern=r"\S", title="Spec",
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
    }


LANDING_TASK = "landing"


def daily_retrain_dag(spec: str, *, dag_id: str = "daybreak_daily_retrain", schedule: Any = "@daily",
                      start_date: datetime | None = None, wait_for_landing: bool = True,
                      landing_timeout: timedelta = timedelta(hours=5), **dag_kwargs: Any) -> DAG:
    """The daily cycle of `spec` (path or s3:// URI; the default of the form's spec) as a DAG: one
    task per step of ``daybreak.steps.CYCLE``, task id = step name, in that order; a side step
    (``Step.side``: online) hangs off the step before it, and the next one follows that step, so
    its skip or failure holds nothing else up.

    With `wait_for_landing` (the default) a ``landing`` task (``LandingFileSensor``, deferrable)
    comes first: it waits up to `landing_timeout` for the day's landing files, checking every
    minute in the triggerer, so a late drop delays the run instead of failing its stage task.

    One date at a time, in order (a day trains on the days before it), no catchup; transient
    failures retry (2 times, backing off from 2 minutes), a bad spec or bad data fails at once.
    `dag_kwargs` go to ``DAG`` and replace these defaults (catchup, max_active_runs,
    dagrun_timeout, tags, doc_md, default_args, params)."""
    from airflow.sdk import DAG

    settings: dict[str, Any] = {
        "catchup": False,
        "max_active_runs": 1,
        "dagrun_timeout": timedelta(hours=6),
        "tags": ["daybreak", "ml"],
        "doc_md": DOC,
        "default_args": {"retries": 2, "retry_delay": timedelta(minutes=2), "retry_exponential_backoff": 2.0,
                         "max_retry_delay": timedelta(minutes=20), "execution_timeout": timedelta(hours=1)},
        "params": params(spec),
    } | dag_kwargs
    operators = _operators()
    common = {"spec": "{{ params.spec }}", "logical_date": "{{ params.date or '' }}"}
    with DAG(dag_id, schedule=schedule, start_date=start_date, **settings) as dag:
        last: Any = None  # the task the next step follows (a side step's is the one before it)
        if wait_for_landing:
            from daybreak.airflow.sensors import LandingFileSensor

            last = LandingFileSensor(task_id=LANDING_TASK, spec=common["spec"], logical_date=common["logical_date"],
                                     poke_interval=60, timeout=landing_timeout, execution_timeout=None, retries=0)
        for step in CYCLE:
            operator, options = operators[step.name]
            task = operator(task_id=step.name, **options, **common)
            if last is not None:
                last >> task
            if not step.side:
                last = task
    return dag
