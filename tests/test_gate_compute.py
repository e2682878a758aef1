"""The gate's decision is a pure function of what it loaded: tested here on arrays, with no
registry, store, Ray or MLflow (the load and publish halves are covered by test_gate.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from daybreak.gate._gating import GateInputs, compute
from daybreak.infra.records import Decision, GateRecord, Tag


def _inputs(candidate: np.ndarray, champion: np.ndarray | None, y: np.ndarray,
            data_rules: list | None = None) -> GateInputs:
    return GateInputs(day="2013-01-05", candidate_version="2", champion_version=None if champion is None else "1",
                      frame=pd.DataFrame({"origin": np.where(np.arange(len(y)) % 2, "JFK", "LGA")}),
                      holdout_hash="h", y=y, candidate=candidate, champion=champion, data_rules=data_rules or [])


def _data(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(float)
    good = np.clip(0.5 + 0.35 * (2 * y - 1) + rng.normal(0, 0.2, n), 0, 1)
    weak = np.clip(0.5 + 0.05 * (2 * y - 1) + rng.normal(0, 0.2, n), 0, 1)
    return y, good, weak


def test_a_clearly_better_candidate_is_promoted_and_recorded(spec) -> None:
    y, good, weak = _data()
    v = compute(spec, _inputs(good, weak, y), now="2026-12-02T00:00:00+00:00")
    assert v.record.decision == Decision.PROMOTE == v.full["decision"]
    assert v.record.champion_version == "1" and v.record.holdout_rows == len(y)
    assert v.record.candidate_metric > v.record.champion_metric
    tags = v.record.to_tags()
    assert tags[Tag.GATE_DECIDED_AT] == "2026-12-02T00:00:00+00:00" and tags[Tag.GATE_OVERRIDE] == "none"
    assert GateRecord.from_tags(tags).rules == v.record.rules


def test_a_worse_candidate_is_rejected_and_an_override_is_recorded_next_to_it(spec) -> None:
    y, good, weak = _data(seed=1)
    v = compute(spec, _inputs(weak, good, y))
    assert v.record.decision == Decision.REJECT
    forced = compute(spec, _inputs(weak, good, y), forced=Decision.PROMOTE, reason="hotfix", by="ana")
    assert forced.record.decision == Decision.PROMOTE and forced.record.computed_decision == Decision.REJECT
    assert (forced.record.override_reason, forced.record.override_by) == ("hotfix", "ana")
    assert forced.full["override"] == {"decision": Decision.PROMOTE, "reason": "hotfix", "by": "ana"}


def test_a_failed_blocking_data_check_blocks_a_better_candidate(spec) -> None:
    y, good, weak = _data(seed=2)
    rule = {"rule": "label_shift", "kind": "data", "metric": None, "value": 0.5, "threshold": 0.1, "verdict": "fail"}
    assert compute(spec, _inputs(good, weak, y, [rule])).record.decision == Decision.BLOCKED


def test_nan_predictions_are_never_promoted_even_without_a_champion(spec) -> None:
    y, good, _ = _data(seed=3)
    bad = good.copy()
    bad[::10] = np.nan
    v = compute(spec, _inputs(bad, None, y))
    assert v.record.decision == Decision.REJECT and v.record.champion_version is None
    assert next(r for r in v.record.rules if r["rule"] == "finite_predictions")["verdict"] == "fail"
