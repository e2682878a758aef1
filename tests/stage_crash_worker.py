"""Stages one date over and over, alternating between two versions of its landing file, until killed.

Used by test_stage_crash.py, which SIGKILLs it at random moments while readers watch.
"""

from __future__ import annotations

import sys

from daybreak.context import RunContext
from daybreak.spec import load_spec
from daybreak.stage import stage


def main() -> None:
    base = load_spec(sys.argv[1])
    day = sys.argv[2]
    specs = []
    for variant in ("a", "b"):
        src = base.sources["flights"].model_copy(update={"path": f"landing/{variant}/flights/{{date}}.csv"})
        specs.append(base.model_copy(update={"sources": {"flights": src}}))
    i = 0
    while True:
        stage(specs[i % 2], RunContext.create(day))
        i += 1
        print(i, flush=True)


if __name__ == "__main__":
    main()
