"""Online equals offline for every feature kind, on random event tables (not flights).

The property test's spec (tests/test_features_property.py): time, row-count and lag windows with
std/min/max/last/first, a window keyed by a category with its own known_at, a lag of the label's
column (label.known_at), a window over another events source, as-of joins with known_at, strict
and max_delay (one of the base source onto itself), and derived columns over window and join
outputs. The store is materialized to the first day, the second day's events are pushed, and
the features of the second day's rows asked for: they equal the feature step's, row for row.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from datetime import date, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_features_property import DAY0, SPEC, _build, events, readings

from daybreak import features as engine
from daybreak.features import EVENT_TIME
from daybreak.infra.context import RunContext
from daybreak.online import SQLiteStore, features_for, materialize, push
from daybreak.spec import parse_spec

DAY1, DAY2 = DAY0.date(), DAY0.date() + timedelta(days=1)


def _single_series() -> dict:
    """The spec with no entity key in its first window and first as-of join: one series each."""
    spec = copy.deepcopy(SPEC)
    spec["features"]["windows"][0]["by"] = []
    spec["features"]["asof"][0]["by"] = []
    return spec


def _spec(spec_dict: dict | None = None):
    spec = parse_spec(spec_dict or SPEC)  # as _build stages it: no minimum row count
    return spec.model_copy(update={"sources": {
        k: v.model_copy(update={"rows": v.rows.model_copy(update={"min": 0})}) for k, v in spec.sources.items()}})


def _staged(ctx: RunContext, source: str, day: date):
    part = ctx.store.partition(f"staged/{source}", day)
    return engine.read_table(part.files, ctx.store.fs)


def online_equals_offline(home: Path, ev: list, rd: list, label_on_day2: bool, monkeypatch: pytest.MonkeyPatch,
                          spec_dict: dict | None = None) -> None:
    want, _ = _build(home, ev, rd, label_on_day2, in_process=True, spec_dict=spec_dict)
    spec = _spec(spec_dict)
    monkeypatch.setenv("DAYBREAK_HOME", str(home))
    store = SQLiteStore(home / "online.sqlite")
    materialize(spec, RunContext.create(DAY1), store)
    ctx2 = RunContext.create(DAY2)
    # the day's files in order, each in one push: their rows keep the staged input order
    push(spec, store, "readings", _staged(ctx2, "readings", DAY2), day=DAY2)
    rows = _staged(ctx2, "events", DAY2)
    push(spec, store, "events", rows, day=DAY2)
    got = features_for(spec, store, rows, datetime.combine(DAY2 + timedelta(days=1), datetime.min.time(), DAY0.tzinfo))
    assert not any(got.blocked), got.reasons
    f = spec.features
    ids = [*f.keys, EVENT_TIME]
    online = want[ids].merge(got.table.to_pandas(), on=ids, how="left", validate="one_to_one")
    names = f.feature_names()
    assert len(online) == len(want)
    for name in f.categorical_names():
        assert online[name].tolist() == want[name].tolist(), name
    numeric = [n for n in names if n not in f.categorical_names()]
    pd.testing.assert_frame_equal(online[numeric].astype(float), want[numeric].astype(float),
                                  check_dtype=False, rtol=1e-9, atol=1e-9)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ev=events, rd=readings, label_on_day2=st.booleans())
@example(ev=[("a", 0, None, "hot", 0.0)] * 7 + [("a", 1440, None, "hot", 0.0), ("a", 0, 2.0, "hot", 0.0)]
         + [("a", 5, 2.44, "hot", 0.0)] * 2, rd=[], label_on_day2=False)
@example(ev=[("a", 600, 3.0, "hot", 10.0), ("a", 1470, 1.5, "cold", 20.0), ("a", 1500, 2.0, "hot", 30.0),
             ("a", 1500, 5.0, "cold", 40.0), ("a", 1530, 7.0, "hot", 50.0), ("b", 1600, 4.0, "hot", 1.0),
             ("b", 1600, 6.0, "cold", 2.0), ("c", 1640, None, "hot", 3.0), ("c", 1650, 8.0, "hot", 4.0)],
         rd=[("a", 1500, 1.0, 0), ("a", 1495, 2.0, 5), ("a", 1470, 3.0, 10), ("b", 1540, 9.0, 45),
             ("b", 1590, 4.0, 10), ("a", 1530, 6.0, 0), ("d", 100, 1.0, 0)], label_on_day2=True)
def test_online_equals_offline_for_every_kind(ev, rd, label_on_day2, tmp_path_factory, monkeypatch) -> None:
    online_equals_offline(tmp_path_factory.mktemp("kinds"), ev, rd, label_on_day2, monkeypatch)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ev=events, rd=readings)
def test_online_equals_offline_single_series(ev, rd, tmp_path_factory, monkeypatch) -> None:
    """A window and an as-of join with ``by: []``: a single series, no entity key."""
    online_equals_offline(tmp_path_factory.mktemp("series"), ev, rd, True, monkeypatch, _single_series())


def _guide_example(title: str, workdir: Path) -> Path:
    """Run the bring-your-own-data guide's data script and write its spec (docs, not a copy)."""
    from test_byod_guide import _section

    spec_path = None
    for lang, name, body in _section(title):
        if lang == "python":
            subprocess.run([sys.executable, "-c", body], cwd=workdir, check=True, timeout=120)
        elif lang == "yaml" and name:
            (workdir / name).write_text(body)
            spec_path = workdir / name
    assert spec_path is not None
    return spec_path


def test_online_equals_offline_on_business_days(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guide's stores on business days (row and lag windows over the label's column, known
    12h after the event; no drop on weekends and Memorial Day): materialized to Friday, Tuesday's
    rows asked for at 08:00 (Monday is a holiday) equal Tuesday's feature partition: the
    previous business day is Friday. Staleness counts the calendar's days: no drop was due after
    Friday's until Tuesday's, so the state is fresh on Tuesday morning by default (1d), and stale
    on Wednesday morning once Tuesday's drop was due and not materialized."""
    from daybreak.features import build_features, read_features
    from daybreak.spec import load_spec
    from daybreak.stage import stage

    spec = load_spec(_guide_example("## 4. Example", tmp_path))
    monkeypatch.setenv("DAYBREAK_HOME", str(tmp_path))
    friday, tuesday = date(2024, 5, 24), date(2024, 5, 28)
    days = sorted(date.fromisoformat(p.stem) for p in (tmp_path / "store" / "landing" / "sales").glob("*.csv"))
    for d in [d for d in days if d <= tuesday]:
        stage(spec, RunContext.create(d))
    build_features(spec, RunContext.create(tuesday), in_process=True)
    want, _, _ = read_features(spec, RunContext.create(tuesday), [tuesday])
    want = want.to_pandas()

    store = SQLiteStore(tmp_path / "online.sqlite")
    materialize(spec, RunContext.create(friday), store)
    rows = _staged(RunContext.create(tuesday), "sales", tuesday)
    at = datetime(2024, 5, 28, 8, tzinfo=DAY0.tzinfo)
    stale = features_for(spec, store, rows, at + timedelta(days=1))
    assert all(stale.blocked) and "stale" in stale.reasons[0][0], stale.reasons[0]
    assert "2024-05-28" in stale.reasons[0][0], stale.reasons[0]  # says which drop is missing
    assert not any(features_for(spec, store, rows, at + timedelta(days=1), max_staleness="2d").blocked)
    got = features_for(spec, store, rows, at)
    assert not any(got.blocked), got.reasons
    f = spec.features
    ids = [*f.keys, EVENT_TIME]
    online = want[ids].merge(got.table.to_pandas(), on=ids, how="left", validate="one_to_one")
    names = f.feature_names()
    assert len(online) == len(want) == 30 and online["units_lag_1"].notna().all()
    pd.testing.assert_frame_equal(online[names].astype(float), want[names].astype(float), check_dtype=False,
                                  rtol=1e-9, atol=1e-9)
