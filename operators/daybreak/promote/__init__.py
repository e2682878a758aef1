"""Step 6, promote: move the champion alias, safely, with history, approval and rollback.
"""

from daybreak.promote._history import gate_report_html, model_history, version_report, version_row
from daybreak.promote._promotion import (
    APPROVAL_TAG,
    PENDING,
    ApproveResult,
    PromoteResult,
    RollbackResult,
    approve_model,
    not_promoted,
    promote_model,
    rollback_model,
    should_deploy,
)

__all__ = [
    "APPROVAL_TAG", "PENDING", "ApproveResult", "PromoteResult", "RollbackResult", "approve_model",
    "gate_report_html", "model_history", "not_promoted", "promote_model", "rollback_model", "should_deploy",
    "version_report",
    "version_row",
]
