"""Prefect flow: a person's answer to a model version waiting for approval.

With ``promotion.approval: manual`` the daily_retrain flow tags a version that passed the gate
pending and does not deploy. Run this flow (from a deployment, Prefect's UI shows its parameters
as a form) to approve it, which promotes it if the champion is still the version the gate compared
against, or to reject it. Both are recorded in the audit history.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from prefect import flow

from daybreak.prefect import approve_model

DEFAULT_SPEC = os.environ.get("DAYBREAK_SPEC") or str(Path(__file__).resolve().parent.parent / "specs" / "flights.yaml")


@flow(name="approve", flow_run_name="{decision} v{version}")
def approve(version: int, reason: str, decision: Literal["approve", "reject"] = "approve",
            spec: str = DEFAULT_SPEC, by: str | None = None) -> dict[str, Any]:
    """Approve (promote) or reject the model version, with a reason. `by` names who answers in
    the history (fill it in the run form: the worker's OS user is recorded otherwise)."""
    return approve_model(spec, version, reason, decision=decision, by=by)


if __name__ == "__main__":
    import sys

    if len(sys.argv) < 3:
        sys.exit("usage: python flows/approve.py VERSION REASON [approve|reject]")
    print(approve(int(sys.argv[1]), sys.argv[2], *sys.argv[3:4]))
