"""Prefect flow `approve`: a person's answer to a model version waiting for approval.

With ``promotion.approval: manual`` the daily_retrain flow tags a version that passed the gate
pending and does not deploy. Run this flow (from a deployment, Prefect's UI shows its parameters
as a form) to approve it, which promotes it if the champion is still the version the gate compared
against, or to reject it. Both are recorded in the audit history.

    python flows/approve.py 7 "read the gate report" approve
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("DAYBREAK_SPEC", str(Path(__file__).resolve().parent.parent / "specs" / "flights.yaml"))

from daybreak.prefect.flows import approve

__all__ = ["approve"]

if __name__ == "__main__":
    import sys

    if len(sys.argv) < 3:
        sys.exit("usage: python flows/approve.py VERSION REASON [approve|reject]")
    print(approve(int(sys.argv[1]), sys.argv[2], *sys.argv[3:4]))
