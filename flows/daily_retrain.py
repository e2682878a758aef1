"""Prefect flow `daily_retrain`: stage -> features -> train -> gate -> promote -> deploy for one date.

The flow lives in ``daybreak.prefect.flows``; this file is its entry point for deployments
(``flows/daily_retrain.py:daily_retrain``) and for running it by hand on the demo spec:

    python flows/daily_retrain.py 2013-01-05     # ephemeral Prefect API, no server needed
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("DAYBREAK_SPEC", str(Path(__file__).resolve().parent.parent / "specs" / "flights.yaml"))

from daybreak.prefect.flows import daily_retrain

__all__ = ["daily_retrain"]

if __name__ == "__main__":
    import sys

    print(daily_retrain(date=sys.argv[1] if len(sys.argv) > 1 else None)["summary"])
