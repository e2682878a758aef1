"""Step 5, gate: the candidate against the champion on the same holdout, with statistical confidence.
"""

from daybreak.gate._datachecks import Days, psi, window_days
from daybreak.gate._gating import (
    PROMOTE,
    REPORT,
    SKIPPED,
    GateResult,
    evaluate_gate,
    holdout,
    recorded_decision,
    recorded_gate,
    should_promote,
)
from daybreak.gate._replay import ReplayDay, ReplayResult, policy_spec, replay
from daybreak.gate._report import live_chart
from daybreak.gate._rules import clusters_for

__all__ = [
    "PROMOTE",
    "REPORT",
    "SKIPPED",
    "Days",
    "GateResult",
    "ReplayDay",
    "ReplayResult",
    "clusters_for",
    "evaluate_gate",
    "holdout",
    "live_chart",
    "policy_spec",
    "psi",
    "recorded_decision",
    "recorded_gate",
    "replay",
    "should_promote",
    "window_days",
]
