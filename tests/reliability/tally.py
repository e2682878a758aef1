"""Counting for the reliability suite (tests/reliability/).

Each scenario keeps a Tally: trials, failed trials, data lost (published partitions or model
versions that went missing or corrupt) and wrong promotions (a champion whose recorded gate
decision is not PROMOTE, or a second promotion). At the end of the session tests/conftest.py
prints every tally as a table and writes it to ``$DAYBREAK_RELIABILITY_REPORT`` (default
``.daybreak/reliability.md`` and ``.json``).

``make test`` runs each scenario with few trials; ``make reliability`` sets
``DAYBREAK_RELIABILITY=full`` for the full counts.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

FULL = os.environ.get("DAYBREAK_RELIABILITY", "").lower() == "full"


def trials(ci: int, full: int) -> int:
    """How many trials a scenario runs: `full` under ``make reliability``, `ci` otherwise."""
    return full if FULL else ci


@dataclass
class Tally:
    scenario: str
    trials: int = 0
    failures: int = 0
    data_lost: int = 0
    wrong_promotions: int = 0
    problems: list[str] = field(default_factory=list)

    def record(self, problems: list[str] | None = None, *, data_lost: int = 0, wrong_promotions: int = 0) -> None:
        """One trial: what went wrong in it (empty: nothing)."""
        self.trials += 1
        self.data_lost += data_lost
        self.wrong_promotions += wrong_promotions
        if problems or data_lost or wrong_promotions:
            self.failures += 1
            self.problems += [f"trial {self.trials}: {p}" for p in (problems or [])]
            if data_lost:
                self.problems.append(f"trial {self.trials}: {data_lost} lost")
            if wrong_promotions:
                self.problems.append(f"trial {self.trials}: {wrong_promotions} wrong promotion(s)")

    def check(self) -> None:
        """Fail the test if any trial failed (after recording, so the table shows it)."""
        assert self.trials > 0, f"{self.scenario}: no trial ran"
        assert self.failures == 0, f"{self.scenario}: {self.failures} of {self.trials} trials failed:\n" + \
            "\n".join(self.problems[:20])


TALLIES: list[Tally] = []


def tally(scenario: str) -> Tally:
    t = Tally(scenario)
    TALLIES.append(t)
    return t


def table() -> str:
    rows = ["| scenario | trials | failures | data lost | wrong promotions |", "| --- | ---: | ---: | ---: | ---: |"]
    rows += [f"| {t.scenario} | {t.trials} | {t.failures} | {t.data_lost} | {t.wrong_promotions} |" for t in TALLIES]
    return "\n".join(rows)


def write_report(default_dir: Path) -> Path:
    base = Path(os.environ.get("DAYBREAK_RELIABILITY_REPORT") or default_dir / "reliability")
    base.parent.mkdir(parents=True, exist_ok=True)
    mode = "full trials (make reliability)" if FULL else "CI trials (make test)"
    base.with_suffix(".md").write_text(f"Reliability suite, {mode}:\n\n{table()}\n")
    base.with_suffix(".json").write_text(json.dumps({"full": FULL, "scenarios": [asdict(t) for t in TALLIES]},
                                                    indent=2))
    return base.with_suffix(".md")
