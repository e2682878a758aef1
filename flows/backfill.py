"""Prefect flow `backfill`: the daily cycle for every date of a range, in order, one subflow a day.

The flow lives in ``daybreak.prefect.flows``; this file is its entry point for deployments
(``flows/backfill.py:backfill``) and for running it by hand on the demo spec:

    python flows/backfill.py 2013-01-01 2013-01-07
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("DAYBREAK_SPEC", str(Path(__file__).resolve().parent.parent / "specs" / "flights.yaml"))

from daybreak.prefect.flows import backfill

__all__ = ["backfill"]

if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python flows/backfill.py START END")
    for line in backfill(sys.argv[1], sys.argv[2]):
        print(line)
