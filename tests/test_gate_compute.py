"""The gate's decision is a pure function of what it loaded: tested here on arrays, with no
registry, store, Ray or MLflow (the load and publish halves are covered by test_gate.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from daybreak.gate._gating import GateInputs, compute
from daybreak.infra.records import Decision, GateRecord, Tag
from daybreak.spec._model import BaselineSpec


def _inputs(candidate: np.ndarray, champion: np.ndarray | None, y: np.ndarray,
            data_rules: list | None = None) -> GateInputs:
    return GateInputs(day="2013-01-05", candidate_version="2", champion_version=None if champion is None else "1",
                      frame=pd.DataFrame({"origin": np.where(np.arange(len(y)) % 2, "JFK", "LGA")}),
                      holdout_hash="h", y=y, candidate=candidate, champion=champion, data_rules=data_rules or [],
                      prior=0.5)


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


# --- baselines, confidence on floors, selection-aware champion scores, INSUFFICIENT_DATA --------

def _gate(spec, **update):
    return spec.model_copy(update={"gate": spec.gate.model_copy(update=update)})


def _rules(v) -> dict:
    return {r["rule"]: r for r in v.record.rules}


def test_a_model_no_better_than_the_prior_is_never_a_first_champion(spec) -> None:
    """No champion, no floor: the prior baseline alone stops a model that ranks by chance."""
    rng = np.random.default_rng(4)
    y = (rng.random(3000) < 0.3).astype(float)
    noise = rng.random(3000)
    v = compute(_gate(spec, floor=None), _inputs(noise, None, y))
    assert v.record.decision == Decision.REJECT
    assert _rules(v)["baseline:prior"]["verdict"] == "fail"
    assert v.full["baselines"][0]["name"] == "prior"


def test_a_floor_is_judged_on_the_interval_when_there_is_no_champion(spec) -> None:
    """AUC a little above the floor on few rows: the point estimate clears it, the lower end does not."""
    rng = np.random.default_rng(5)
    n = 300
    y = (rng.random(n) < 0.5).astype(float)
    weak = np.clip(0.5 + 0.05 * (2 * y - 1) + rng.normal(0, 0.25, n), 0, 1)
    s = _gate(spec, floor=0.55, baselines=[])
    first = compute(s, _inputs(weak, None, y))
    floor = _rules(first)["floor"]
    assert floor["value"] > 0.55 > floor["bound"] and floor["verdict"] == "fail", floor
    assert compute(_gate(s, floor_confidence="never"), _inputs(weak, None, y)).record.decision == Decision.PROMOTE
    # with a champion, auto judges the floor on the point estimate (the champion comparison has confidence)
    with_champ = compute(_gate(s, compare="no_worse", margin=1.0), _inputs(weak, weak.copy(), y))
    assert _rules(with_champ)["floor"]["verdict"] == "pass" and "bound" not in _rules(with_champ)["floor"]


def test_a_model_worse_than_persistence_is_rejected(spec) -> None:
    """A single series: 'the last known reading' beats a model that tracks the level loosely."""
    rng = np.random.default_rng(6)
    n = 2000
    level = np.cumsum(rng.normal(0, 1, n + 1))
    y, last = level[1:], level[:-1]
    feature = spec.features.feature_names()[0]
    model = y + rng.normal(0, 3, n)  # unbiased but noisier than persistence (whose error sd is 1)
    s = _gate(spec, metric="rmse", floor=None, floors={}, report_metrics=["rmse", "mae"], slices=spec.gate.slices.
              model_copy(update={"columns": []}),
              baselines=[*spec.gate.baselines, BaselineSpec(kind="feature", column=feature, name="persistence")])
    s = s.model_copy(update={"model": s.model.model_copy(update={"task": "regression"})})
    inputs = _inputs(model, None, y)
    inputs.frame[feature] = last
    v = compute(s.model_validate(s.model_dump()), inputs)
    rules = _rules(v)
    assert rules["baseline:persistence"]["verdict"] == "fail" and rules["baseline:prior"]["verdict"] == "pass"
    assert v.record.decision == Decision.REJECT


def test_the_champion_is_not_credited_with_its_own_selection_rows(spec) -> None:
    """Two holdout days; the champion was gated on the first: it is compared on the second only."""
    y, good, weak = _data(n=4000, seed=7)
    inputs = _inputs(good, weak, y)
    inputs.frame["__day"] = np.where(np.arange(len(y)) < 2000, "2013-01-04", "2013-01-05")
    seen = GateInputs(**{**inputs.__dict__, "champion_seen": frozenset({"2013-01-04"})})
    v = compute(spec, seen)
    assert v.full["champion_excluded_days"] == ["2013-01-04"]
    assert "on the 2000 of 4000 rows" in _rules(v)["confidence"]["detail"]
    # every row is one it was selected on (a forced retrain of its own date): compared on all rows,
    # which favours it, and said so
    everything = GateInputs(**{**inputs.__dict__, "champion_seen": frozenset({"2013-01-04", "2013-01-05"})})
    v = compute(spec, everything)
    assert "inflated" in _rules(v)["confidence"]["detail"] and v.record.decision == Decision.PROMOTE


def test_too_few_rows_or_too_few_of_a_class_is_insufficient_data(spec) -> None:
    y, good, weak = _data(n=4000, seed=8)
    few = compute(_gate(spec, min_rows=5000), _inputs(good, weak, y))
    assert few.record.decision == Decision.INSUFFICIENT
    assert [r["rule"] for r in few.record.rules if r["verdict"] == "fail"] == ["min_rows"]
    rare = np.where(np.cumsum(y) > 5, 0.0, y)  # five positives in 4000 rows
    v = compute(spec, _inputs(good, weak, rare))
    assert v.record.decision == Decision.INSUFFICIENT and _rules(v)["min_class_rows"]["value"] == 5


# --- the statistics review's cases (helper review of issue 22) -----------------------------------

def _hourly(rng, hours: int, per_hour: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, pd.DataFrame]:
    """Two models of equal quality whose advantage flips from hour to hour (the hour's weather
    favours one or the other): rows of an hour are not independent evidence."""
    n = hours * per_hour
    hour = np.repeat(np.arange(hours), per_hour)
    beta = rng.normal(0, 1, hours)[hour]
    w, x = rng.normal(size=n), rng.normal(size=n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(x + beta * w)))).astype(float)
    a = 1 / (1 + np.exp(-(x + 0.5 * w)))
    b = 1 / (1 + np.exp(-(x - 0.5 * w)))
    stamps = pd.Timestamp("2013-01-05T05:00:00Z") + pd.to_timedelta(hour, unit="h")
    return y, a, b, pd.DataFrame({"event_time": stamps, "origin": "JFK"})


def test_one_holdout_day_is_resampled_by_hour_and_aa_false_promotions_stay_near_nominal(spec) -> None:
    """With one holdout day (about 19 hours of flights) the gate used to fall back to rows and
    promoted an equal model about 1 time in 5 when the gain varies by hour; by hour (t quantile)
    it stays near the nominal 2.5%."""
    s = _gate(spec, compare="improve", margin=0.0, floor=None, baselines=[],
              slices=spec.gate.slices.model_copy(update={"columns": []}),
              bootstrap=spec.gate.bootstrap.model_copy(update={"between_days": "off"}))  # within the day only
    rows = s.model_copy(update={"gate": s.gate.model_copy(update={
        "bootstrap": s.gate.bootstrap.model_copy(update={"cluster_by": []})})})
    rng = np.random.default_rng(11)
    promoted = {"hour": 0, "row": 0}
    trials = 200
    for _ in range(trials):
        y, a, b, frame = _hourly(rng, 19, 40)
        inputs = GateInputs(day="2013-01-05", candidate_version="2", champion_version="1", frame=frame,
                            holdout_hash="h", y=y, candidate=a, champion=b, prior=0.5)
        hour = compute(s, inputs)
        assert hour.full["interval_unit"] == "event_time:hour" and hour.full["clusters"] == 19
        promoted["hour"] += hour.record.decision == Decision.PROMOTE
        promoted["row"] += compute(rows, inputs).record.decision == Decision.PROMOTE
    assert promoted["hour"] / trials <= 0.06, promoted
    assert promoted["row"] / trials >= 0.12, promoted  # what the row-level interval did


def test_too_few_clusters_is_insufficient_data_not_a_zero_width_interval(spec) -> None:
    """One cluster made every bootstrap resample the point estimate: a zero-width interval that
    promoted a noise model. Now it is INSUFFICIENT_DATA."""
    rng = np.random.default_rng(12)
    y = (rng.random(400) < 0.3).astype(float)
    noise = rng.random(400)
    s = _gate(spec, floor=None, bootstrap=spec.gate.bootstrap.model_copy(update={"cluster_by": ["origin"],
                                                                               "method": "bootstrap"}))
    inputs = _inputs(noise, None, y)
    inputs.frame["origin"] = "JFK"
    v = compute(s, inputs)
    assert v.record.decision == Decision.INSUFFICIENT and _rules(v)["min_clusters"]["value"] == 1


def test_a_champion_with_nan_predictions_is_compared_on_the_rest(spec) -> None:
    y, good, weak = _data(n=4000, seed=13)
    broken = weak.copy()
    broken[:100] = np.nan
    v = compute(spec, _inputs(good, broken, y))
    rules = _rules(v)
    assert rules["champion_finite_predictions"]["verdict"] == "warn" and rules["champion_finite_predictions"][
        "value"] == 100
    assert np.isfinite(rules["confidence"]["value"]) and v.record.decision == Decision.PROMOTE


def test_analytic_method_is_refused_for_a_metric_without_an_analytic_interval(spec) -> None:
    import pytest

    from daybreak.infra.errors import SpecError
    from daybreak.spec import parse_spec

    raw = spec.model_dump(mode="json")
    raw["gate"] |= {"metric": "pr_auc", "bootstrap": {**raw["gate"]["bootstrap"], "method": "analytic"}}
    with pytest.raises(SpecError, match=r"analytic.*pr_auc"):
        parse_spec(raw)


def test_the_record_says_how_the_intervals_were_computed(spec) -> None:
    """`daybreak report` shows the interval method, the resampling unit and the baselines."""
    y, a, b, frame = _hourly(np.random.default_rng(14), 19, 40)
    inputs = GateInputs(day="2013-01-05", candidate_version="2", champion_version="1", frame=frame,
                        holdout_hash="h", y=y, candidate=a, champion=b, prior=0.5)
    rec = compute(spec, inputs).record
    assert rec.interval == ("analytic by event_time:hour, 19 clusters, 95%, + day-to-day spread: "
                            "champion assumed")
    assert GateRecord.from_tags(rec.to_tags()).interval == rec.interval
    y, good, weak = _data(seed=15)
    assert compute(spec, _inputs(good, weak, y)).record.interval == (
        "analytic by row, 95%, + day-to-day spread: champion assumed")


def test_a_business_day_feed_of_many_entities_is_judged_by_row_and_noise_is_not_promoted(spec) -> None:
    """Data shaped unlike flights: one row per entity per business day, all stamped midnight, so a
    holdout day has one event hour. Auto clustering cannot resample one hour and falls back to the
    entities as units (rows); a pure-noise model is still refused by the prior baseline."""
    rng = np.random.default_rng(16)
    n = 800  # entities on 2013-01-04, a Friday
    y = (rng.random(n) < 0.4).astype(float)
    frame = pd.DataFrame({"event_time": pd.Timestamp("2013-01-04T00:00:00Z"), "entity": np.arange(n),
                          "origin": "JFK"})
    s = _gate(spec, floor=None)
    noise = GateInputs(day="2013-01-04", candidate_version="1", champion_version=None, frame=frame,
                       holdout_hash="h", y=y, candidate=rng.random(n), champion=None, prior=0.4)
    v = compute(s, noise)
    assert v.full["interval_unit"] == "row" and v.record.interval == "analytic by row, 95%"
    assert v.record.decision == Decision.REJECT and _rules(v)["baseline:prior"]["verdict"] == "fail"
    informed = np.clip(0.4 + 0.3 * (y - 0.4) + rng.normal(0, 0.15, n), 0, 1)
    good = compute(s, GateInputs(**{**noise.__dict__, "candidate": informed}))
    assert good.record.decision == Decision.PROMOTE, good.record.rules


# --- the day-to-day spread: between_days ---------------------------------------------------------

def _days_frame(frame: pd.DataFrame, days: list[str]) -> pd.DataFrame:
    """`frame` with its rows spread over `days` (in order) as the partition day column."""
    out = frame.copy()
    out["__day"] = np.array(days)[np.arange(len(frame)) * len(days) // len(frame)]
    return out


def test_the_gate_records_its_daily_estimates_and_widens_by_the_recorded_spread(spec) -> None:
    from daybreak.gate._gating import history_of

    s = _gate(spec, compare="improve", margin=0.0, floor=None, slices=spec.gate.slices.model_copy(
        update={"columns": []}))
    y, a, b, frame = _hourly(np.random.default_rng(21), 40, 40)
    frame = _days_frame(frame, ["2013-01-03", "2013-01-04", "2013-01-05"])

    def gate(history, policy=s):
        return compute(policy, GateInputs(day="2013-01-05", candidate_version="2", champion_version="1",
                                          frame=frame, holdout_hash="h", y=y, candidate=a, champion=b, prior=0.5,
                                          history=history))

    first = gate({})
    # recorded: the gain over the champion on this 3-day holdout, for later gates with 3-day holdouts
    daily = first.record.daily
    assert set(daily) == {"champion"}
    off = gate({}, _gate(s, bootstrap=s.gate.bootstrap.model_copy(update={"between_days": "off"})))
    within = off.full["bootstrap"]
    assert daily["champion"] | {"se": None} == {"day": "2013-01-05", "metric": "roc_auc", "unit": "event_time:hour",
                                               "days": 3, "value": within["gain"], "se": None}
    assert daily["champion"]["se"] > 0 and GateRecord.from_tags(first.record.to_tags()).daily == daily
    assert off.record.daily == daily  # recorded with between_days off too: turning it on finds a history
    # no history yet: the spread is assumed twice the holdout's own variance (sqrt 3 wider)
    w_first, w_off = (v.full["bootstrap"]["high"] - v.full["bootstrap"]["low"] for v in (first, off))
    assert first.full["between_days"]["champion"]["source"] == "assumed"
    assert 1.6 < w_first / w_off < 1.85 and off.full["between_days"] == {}
    # history of 3-day gates: gains swinging by 0.05 from gate to gate, each known to +-0.005
    swings = {f"2013-01-{d:02d}": {"champion": {"metric": "roc_auc", "unit": "event_time:hour", "days": 3,
                                                "value": 0.05 * (-1) ** d, "se": 0.005}} for d in range(1, 5)}
    swings |= {f"2012-12-{d:02d}": {"champion": swings["2013-01-01"]["champion"] | {"value": 0.05 * (-1) ** d}}
               for d in range(20, 32)}
    hist = history_of(swings)
    assert [e["day"] for e in hist["champion"]] == sorted(swings)
    v = gate(hist)
    spread = v.full["between_days"]["champion"]
    # 16 consecutive gates, 3-day holdouts: 13 differences between gates 3 days apart
    assert spread["source"] == "history" and spread["days"] == 14 and spread["sd"] > 0.05 and spread["df"] > 1
    assert v.full["bootstrap"]["high"] - v.full["bootstrap"]["low"] > 2 * w_off
    assert "day-to-day sd" in next(r for r in v.record.rules if r["rule"] == "confidence")["detail"]
    assert "champion sd" in v.record.interval
    # another metric's, another unit's or another holdout size's history is not this one's
    for change in ({"metric": "log_loss"}, {"unit": "row"}, {"days": 1}):
        other = {d: {"champion": e["champion"] | change} for d, e in swings.items()}
        assert gate(history_of(other)).full["between_days"]["champion"]["source"] == "assumed", change


def test_history_from_tags_is_read_as_untrusted() -> None:
    from daybreak.gate._gating import history_of

    assert GateRecord.from_tags({Tag.GATE_DAILY: "not json"}).daily == {}
    assert GateRecord.from_tags({Tag.GATE_DAILY: "[1, 2]"}).daily == {}
    assert GateRecord.from_tags({Tag.GATE_DAILY: '{"champion": 3, "x": {"value": 1}}'}).daily == {"x": {"value": 1}}
    good = {"metric": "roc_auc", "value": 0.1, "se": 0.01}
    bad = {"2013-01-01": {"champion": good | {"value": "0.1"}},
           "2013-01-02": {"champion": good | {"value": float("nan")}},
           "2013-01-03": {"champion": good | {"metric": None}},
           "2013-01-05": {"champion": good | {"value": 1e80}},  # finite, but no gate recorded it
           "2013-01-06": {"champion": good | {"se": -0.01}},
           "2013-01-07": {"champion": good | {"days": True}},
           "2013-01-04": {"champion": good}}
    assert history_of(bad) == {"champion": [{"day": "2013-01-04", "metric": "roc_auc", "days": 1, "value": 0.1,
                                             "se": 0.01}]}
    # a number tag that is not a number on an old version: read as absent, not an error
    rec = GateRecord.from_tags({Tag.GATE_CANDIDATE_METRIC: "oops", Tag.GATE_HOLDOUT_ROWS: "9" * 5000})
    assert rec.candidate_metric is None and rec.holdout_rows is None
