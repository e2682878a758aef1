"""daybreak approve: a person's answer to a model version waiting for approval.

With `promotion.approval: manual` in the spec, the daily DAG's promote task tags a version that
passed the gate *pending* and skips deploy. Trigger this DAG from the UI with the form below to
approve it (promote it: the champion moves only if it is still the version the gate compared
against; otherwise the task fails and the version must be re-gated) or to reject it. The reason
and the user who triggered the run are recorded in the audit history (`daybreak history`).
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import Param, dag

from daybreak.airflow import ApproveModelOperator
from daybreak.airflow.assets import CHAMPION

DEFAULT_SPEC = os.environ.get("DAYBREAK_SPEC") or str(Path(__file__).resolve().parent.parent / "specs" / "flights.yaml")


@dag(
    dag_id="daybreak_approve",
    schedule=None,
    start_date=datetime(2013, 1, 1),
    catchup=False,
    tags=["daybreak", "ml", "approval"],
    doc_md=__doc__,
    default_args={"retries": 0, "execution_timeout": timedelta(minutes=10)},
    params={
        "spec": Param(DEFAULT_SPEC, type="string", minLength=1, title="Spec",
                      description="Path to the pipeline spec (YAML)."),
        "version": Param(type="integer", minimum=1, title="Model version",
                         description="The version waiting for approval (daybreak versions shows approval=pending)."),
        "decision": Param("approve", type="string", enum=["approve", "reject"], title="Decision",
                          values_display={"approve": "Approve: promote it to champion",
                                          "reject": "Reject: never promote it"}),
        "reason": Param(type="string", minLength=3, title="Reason",
                        description="Why; recorded in the audit history with your user name."),
    },
)
def daybreak_approve() -> None:
    ApproveModelOperator(task_id="approve", spec="{{ params.spec }}", version="{{ params.version }}",
                         reason="{{ params.reason }}", decision="{{ params.decision }}",
                         champion_asset=CHAMPION)


daybreak_approve()
