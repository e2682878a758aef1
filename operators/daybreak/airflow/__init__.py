"""Airflow operators for the daybreak steps (``airflow.sdk``; Airflow 3).

Each operator maps its (templated) arguments and the task context onto one step call and returns
the step's small JSON result as its XCom. Nothing heavy is imported until ``execute``.
``daily_retrain_dag(spec, dag_id=...)`` builds the daily cycle of a spec as a DAG.
``LandingFileSensor`` waits (deferred) for a day's landing files; ``DeployModelOperator`` waits for
the endpoint in the triggerer too (see ``daybreak.airflow.triggers``).
"""

from daybreak.airflow.dags import daily_retrain_dag
from daybreak.airflow.operators import (
    ApproveModelOperator,
    BatchScoreOperator,
    BuildFeaturesOperator,
    DaybreakStepOperator,
    DeployModelOperator,
    EvaluateGateOperator,
    MaterializeOnlineOperator,
    MonitorModelOperator,
    PromoteModelOperator,
    ReplayGateOperator,
    StageDataOperator,
    TrainModelOperator,
)
from daybreak.airflow.sensors import LandingFileSensor

__all__ = [
    "ApproveModelOperator",
    "BatchScoreOperator",
    "BuildFeaturesOperator",
    "DaybreakStepOperator",
    "DeployModelOperator",
    "EvaluateGateOperator",
    "LandingFileSensor",
    "MaterializeOnlineOperator",
    "MonitorModelOperator",
    "PromoteModelOperator",
    "ReplayGateOperator",
    "StageDataOperator",
    "TrainModelOperator",
    "daily_retrain_dag",
]
