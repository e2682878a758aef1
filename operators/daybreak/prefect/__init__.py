"""Prefect tasks for the daybreak steps (and, in ``daybreak.prefect.flows``, the flows built from them).

Each task maps its arguments onto one step call and returns the step's small JSON result.
"""

from daybreak.prefect.tasks import (
    approve_model,
    batch_score,
    build_features,
    deploy_model,
    evaluate_gate,
    materialize_online,
    monitor_model,
    promote_model,
    replay_gate,
    stage_data,
    train_model,
)

__all__ = ["approve_model", "batch_score", "build_features", "deploy_model", "evaluate_gate", "materialize_online",
           "monitor_model",
           "promote_model", "replay_gate", "stage_data", "train_model"]
