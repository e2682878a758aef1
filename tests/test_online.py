"""Online features equal the offline ones: a real day of flights, replayed event by event.

The online store is materialized to the day before, then the day's events (flights once their
departure delay is known, weather observations) are pushed in known-at order, and each flight's
features are asked for at its scheduled departure, as a client would. They must equal the
feature step's partition for that day, row for row (the property test's tolerance), with the
embedded SQLite store and with a real Redis server. Also: a killed materialize leaves the
previous state readable, a new process sees Redis' state, and what cannot be computed says why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import free_port, make_home

from daybreak import features as engine
from daybreak.features import EVENT_TIME, build_features, read_features
from daybreak.infra.context import RunContext
from daybreak.online import OnlineError, SQLiteStore, features_for, freshness, materialize, open_store, push
from daybreak.spec import evaluate
from daybreak.stage import stage

DAYS = [date(2013, 1, 1), date(2013, 1, 2), date(2013, 1, 3)]
DAY = DAYS[-1]  # the day replayed online; the store is materialized to the day before
TOL = {"rtol": 1e-9, "atol": 1e-9}  # tests/test_features_property.py's


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory, landing: Path, spec) -> Path:
    """A home with the flights staged for DAYS and the features of DAY built (in process, no Ray)."""
    home = make_home(tmp_path_factory.mktemp("online"), landing)
    old = os.environ.get("DAYBREAK_HOME")
    os.environ["DAYBREAK_HOME"] = str(home)
    try:
        for d in DAYS:
            stage(spec, RunContext.create(d))
        build_features(spec, RunContext.create(DAY), in_process=True)
    finally:
        if old is None:
            os.environ.pop("DAYBREAK_HOME", None)
        else:
            os.environ["DAYBREAK_HOME"] = old
    return home


@pytest.fixture
def ctx(staged: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DAYBREAK_HOME", str(staged))
    return lambda d: RunContext.create(d)


class Redis:
    """A real redis-server on loopback, in a temporary folder, stopped by its PID."""

    def __init__(self, folder: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        self.proc = subprocess.Popen([exe, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(folder),
                                      "--save", "", "--appendonly", "no", "--protected-mode", "yes"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        import redis

        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    server = Redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


def _staged(ctx: RunContext, source: str, day: date) -> pa.Table:
    part = ctx.store.partition(f"staged/{source}", day)
    return engine.read_table(part.files, ctx.store.fs)


def replay(spec, store, ctx_day: RunContext) -> pd.DataFrame:
    """Push DAY's events in known-at order and ask for each flight's features at its event time.

    A flight is pushed once its departure delay is known (the earliest known_at of the windows
    over it); a weather observation at its time. Requests at time t come after every push at or
    before t. Consecutive requests are asked for together (at the latest of their times).
    """
    f = spec.features
    flights = _staged(ctx_day, "flights", DAY)
    weather = _staged(ctx_day, "weather", DAY)
    with_time = flights.append_column(EVENT_TIME, evaluate(f.event_time, flights).cast(pa.timestamp("us", tz="UTC")))
    event_us = pc.cast(with_time.column(EVENT_TIME), pa.int64()).to_numpy(zero_copy_only=False)
    known = np.stack([pc.cast(evaluate(w.known_at, with_time).cast(pa.timestamp("us", tz="UTC")), pa.int64())
                      .fill_null(np.iinfo(np.int64).max).to_numpy(zero_copy_only=False) for w in f.windows])
    flight_push = np.minimum(known.min(axis=0), np.iinfo(np.int64).max)
    flight_push = np.where(flight_push == np.iinfo(np.int64).max, event_us, flight_push)
    weather_us = pc.cast(weather.column("time_hour"), pa.int64()).to_numpy(zero_copy_only=False)
    timeline = ([(int(t), 0, "flights", i) for i, t in enumerate(flight_push)]
                + [(int(t), 0, "weather", i) for i, t in enumerate(weather_us)]
                + [(int(t), 1, "request", i) for i, t in enumerate(event_us)])
    timeline.sort()
    results = []
    k = 0
    while k < len(timeline):
        kind = timeline[k][2]
        j = k
        while j < len(timeline) and timeline[j][2] == kind:
            j += 1
        rows = [e[3] for e in timeline[k:j]]
        if kind == "request":
            at = datetime.fromtimestamp(timeline[j - 1][0] / 1e6, UTC)
            got = features_for(spec, store, flights.take(rows), at)
            assert not any(got.blocked), [r for r in got.reasons if r][:3]
            results.append(got.table.to_pandas())
        else:
            push(spec, store, kind, (flights if kind == "flights" else weather).take(rows))
        k = j
    return pd.concat(results, ignore_index=True)


def offline(spec, ctx_day: RunContext) -> pd.DataFrame:
    table, _, missing = read_features(spec, ctx_day, [DAY])
    assert not missing
    return table.to_pandas()


def assert_parity(spec, online: pd.DataFrame, want: pd.DataFrame) -> None:
    f = spec.features
    ids = [*f.keys, EVENT_TIME]
    assert not want.duplicated(ids).any()
    merged = want[ids].merge(online, on=ids, how="left", validate="one_to_one")
    assert len(merged) == len(want) and len(want) > 500
    names = f.feature_names()
    categorical = set(f.categorical_names())
    for name in names:
        if name in categorical:
            assert merged[name].tolist() == want[name].tolist(), name
    numeric = [n for n in names if n not in categorical]
    pd.testing.assert_frame_equal(merged[numeric].astype(float).reset_index(drop=True),
                                  want[numeric].astype(float).reset_index(drop=True), check_dtype=False, **TOL)


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    """An empty online store of each backend (Redis: a namespace of its own on the module's server)."""
    if request.param == "sqlite":
        s = SQLiteStore(tmp_path / "online.sqlite")
    else:
        s = open_store(request.getfixturevalue("redis_server").url, f"t{tmp_path.name[-24:]}")
    yield s
    s.close()


def test_parity(spec, ctx, store) -> None:
    """The issue's parity: materialized to the day before, the day's events pushed as they become
    known, each flight asked for at its departure: the feature partition, row for row."""
    result = materialize(spec, ctx(DAYS[-2]), store)
    assert not result.skipped and result.entries["w0"] > 0 and result.entries["a0"] > 0
    assert freshness(store)["materialized_date"] == DAYS[-2].isoformat() and freshness(store)["newest_event"] is None
    assert_parity(spec, replay(spec, store, ctx(DAY)), offline(spec, ctx(DAY)))
    newest = datetime.fromisoformat(freshness(store)["newest_event"])  # the day's last departure
    assert spec.label_cut(DAY) - timedelta(hours=1) < newest < spec.label_cut(DAY)
    again = materialize(spec, ctx(DAYS[-2]), store)  # idempotent: the same inputs, nothing rewritten
    assert again.skipped and again.generation == result.generation


def test_events_count_only_once_known(spec, ctx, tmp_path: Path) -> None:
    """Every event of the day pushed before any request (departure delays known hours after the
    requests' times): each still counts only once its known_at has passed, as offline. And the
    comparison can fail: without the day's flights, the windows differ."""
    store = SQLiteStore(tmp_path / "early.sqlite")
    materialize(spec, ctx(DAYS[-2]), store)
    flights, weather = _staged(ctx(DAY), "flights", DAY), _staged(ctx(DAY), "weather", DAY)
    push(spec, store, "weather", weather)
    without = features_for(spec, store, flights, datetime(2013, 1, 4, 5, tzinfo=UTC)).table.to_pandas()
    with pytest.raises(AssertionError, match="carrier_dep_delay"):
        assert_parity(spec, without, offline(spec, ctx(DAY)))
    push(spec, store, "flights", flights)
    got = features_for(spec, store, flights, datetime(2013, 1, 4, 5, tzinfo=UTC))
    assert not any(got.blocked)
    assert_parity(spec, got.table.to_pandas(), offline(spec, ctx(DAY)))


def test_killed_materialize_keeps_previous_state(spec, ctx, store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A materialize that dies half way (after writing some of its generation) leaves the previous
    date's state current and readable; the next one succeeds and drops the partial generation."""
    materialize(spec, ctx(DAYS[0]), store)
    flights = _staged(ctx(DAYS[1]), "flights", DAYS[1]).slice(0, 50)
    before = features_for(spec, store, flights, datetime(2013, 1, 2, 12, tzinfo=UTC))
    areas_before = store.areas()
    real_write, calls = store.write, []

    def dies_half_way(area, entries):
        calls.append(area)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real_write(area, entries)

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(store, "write", dies_half_way)
        m.setattr(store, "drop", lambda area: None)  # killed: no clean-up either
        materialize(spec, ctx(DAYS[1]), store)
    assert store.current()["date"] == DAYS[0].isoformat()
    assert len(store.areas()) == len(areas_before) + 1  # the partial generation, not current
    after = features_for(spec, store, flights, datetime(2013, 1, 2, 12, tzinfo=UTC))
    assert after.table.equals(before.table)
    result = materialize(spec, ctx(DAYS[1]), store)
    assert store.current()["date"] == DAYS[1].isoformat()
    assert set(store.areas()) == {result.generation, *areas_before}  # the previous kept, the partial dropped


RESTARTED = """
import json, sys
from datetime import datetime
import pyarrow.parquet as pq
from daybreak.online import features_for, open_store
from daybreak.spec import load_spec
spec = load_spec(sys.argv[1])
rows = pq.read_table(sys.argv[3])
got = features_for(spec, open_store(sys.argv[2], "restart"), rows, datetime.fromisoformat(sys.argv[4]))
pq.write_table(got.table, sys.argv[5])
print(json.dumps(got.reasons))
"""


def test_redis_state_survives_a_restarted_reader(spec, ctx, redis_server: Redis, tmp_path: Path) -> None:
    """A new process (a restarted server) reading the same Redis sees the same state: the
    materialized date and the events pushed since, giving the same features."""
    import pyarrow.parquet as pq
    from conftest import SPEC

    store = open_store(redis_server.url, "restart")
    materialize(spec, ctx(DAYS[-2]), store)
    flights = _staged(ctx(DAY), "flights", DAY)
    push(spec, store, "flights", flights.slice(0, 400))
    push(spec, store, "weather", _staged(ctx(DAY), "weather", DAY))
    at = "2013-01-04T05:00:00+00:00"
    here = features_for(spec, store, flights, datetime.fromisoformat(at))
    pq.write_table(flights, tmp_path / "rows.parquet")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", RESTARTED, str(SPEC), redis_server.url, str(tmp_path / "rows.parquet"),
                          at, str(tmp_path / "out.parquet")], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert pq.read_table(tmp_path / "out.parquet").equals(here.table)
    import json

    assert json.loads(out.stdout.strip().splitlines()[-1]) == here.reasons


def test_what_cannot_be_computed_says_why(spec, ctx, tmp_path: Path) -> None:
    """Per row, a reason, never a silent default: stale state and rows before the materialized
    date are blocked (all their features null); a key the state does not hold is said."""
    store = SQLiteStore(tmp_path / "why.sqlite")
    flights = _staged(ctx(DAY), "flights", DAY)
    with pytest.raises(OnlineError, match="materialize"):
        features_for(spec, store, flights.slice(0, 3))
    materialize(spec, ctx(DAYS[-2]), store)
    names = spec.features.feature_names()

    stale = features_for(spec, store, flights.slice(0, 3), datetime(2013, 1, 9, tzinfo=UTC))
    assert all(stale.blocked) and all("stale" in r[0] for r in stale.reasons)
    assert all(stale.table.column(n).null_count == 3 for n in names)
    assert not any(features_for(spec, store, flights.slice(0, 3), datetime(2013, 1, 9, tzinfo=UTC),
                                max_staleness="7d").blocked)

    early = features_for(spec, store, _staged(ctx(DAYS[-2]), "flights", DAYS[-2]).slice(0, 2),
                         datetime(2013, 1, 3, 6, tzinfo=UTC))
    assert all(early.blocked) and "before the state's horizon" in early.reasons[0][0]

    missing = features_for(spec, store, flights.slice(0, 2).drop(["distance"]), datetime(2013, 1, 3, 6, tzinfo=UTC))
    assert all(missing.blocked) and "missing column 'distance'" in missing.reasons[0]

    odd = flights.slice(0, 1).to_pylist()[0] | {"carrier": "ZZ", "tailnum": "NOPE", "origin": "EWR"}
    got = features_for(spec, store, [odd], datetime(2013, 1, 3, 6, tzinfo=UTC))
    assert not got.blocked[0]
    text = "; ".join(got.reasons[0])
    assert "no history for carrier='ZZ'" in text and "no row for tailnum='NOPE'" in text
    row = got.table.to_pylist()[0]
    assert row["carrier_dep_delay_count_1d"] == 0 and row["plane_year"] is None  # as offline: empty, unknown


def test_both_backends_are_online_stores(store) -> None:
    from daybreak.online import OnlineStore

    assert isinstance(store, OnlineStore)
    assert "redis://" not in repr(store)  # a URL may hold a password: never shown


def test_a_pushed_dimension_row_updates_lookups(spec, ctx, store) -> None:
    """A snapshot row pushed (a plane's record corrected) wins over the materialized snapshot."""
    materialize(spec, ctx(DAYS[-2]), store)
    flights = _staged(ctx(DAY), "flights", DAY)
    row = next(r for r in flights.to_pylist() if r["tailnum"])
    at = datetime(2013, 1, 3, 12, tzinfo=UTC)
    before = features_for(spec, store, [row], at).table.to_pylist()[0]
    push(spec, store, "planes", [{"tailnum": row["tailnum"], "year": 1999, "seats": 7}], day=DAY)
    after = features_for(spec, store, [row], at).table.to_pylist()[0]
    assert (after["plane_year"], after["plane_seats"]) == (1999, 7) != (before["plane_year"], before["plane_seats"])
    materialize(spec, ctx(DAY), store)  # the next day's snapshot restates the table whole
    next_day = row | {"time_hour": row["time_hour"] + timedelta(days=1)}  # after the new state's horizon
    again = features_for(spec, store, [next_day], datetime(2013, 1, 4, 12, tzinfo=UTC)).table.to_pylist()[0]
    assert again["plane_year"] == before["plane_year"]


def test_unsupported_keys_are_refused_at_materialize(spec, ctx, tmp_path: Path) -> None:
    """A window keyed by a float column cannot be an exact state key: refused, naming the feature."""
    windows = list(spec.features.windows)
    windows[1] = windows[1].model_copy(update={"by": ["distance"]})
    odd = spec.model_copy(update={"features": spec.features.model_copy(update={"windows": windows})})
    with pytest.raises(OnlineError, match=r"features\.windows\[1\]: key column 'distance'"):
        materialize(odd, ctx(DAYS[-2]), SQLiteStore(tmp_path / "refused.sqlite"))


def test_events_of_a_materialized_day_never_count_twice(spec, ctx, tmp_path: Path) -> None:
    """Pushing again the events of a day already materialized changes nothing (they are in its
    staged partition, or, arriving late, not in the offline features either)."""
    store = SQLiteStore(tmp_path / "twice.sqlite")
    materialize(spec, ctx(DAYS[-2]), store)
    flights = _staged(ctx(DAY), "flights", DAY)
    at = datetime(2013, 1, 3, 18, tzinfo=UTC)
    before = features_for(spec, store, flights, at).table
    result = push(spec, store, "flights", _staged(ctx(DAYS[-2]), "flights", DAYS[-2]))
    assert result["entries"] == {} and result["already_materialized"] > 500
    assert features_for(spec, store, flights, at).table.equals(before)


def test_a_changed_spec_needs_a_new_materialize(spec, ctx, tmp_path: Path) -> None:
    """State materialized for one feature version never serves another's features."""
    store = SQLiteStore(tmp_path / "changed.sqlite")
    materialize(spec, ctx(DAYS[-2]), store)
    windows = list(spec.features.windows)
    windows[0] = windows[0].model_copy(update={"windows": ["2d", "7d"]})
    changed = spec.model_copy(update={"features": spec.features.model_copy(update={"windows": windows})})
    with pytest.raises(OnlineError, match="materialize again"):
        features_for(changed, store, _staged(ctx(DAY), "flights", DAY).slice(0, 2))
    assert not materialize(changed, ctx(DAYS[-2]), store).skipped


KILLED = """
import os, sys, time
from daybreak.infra.context import RunContext
from daybreak.online import materialize, open_store
from daybreak.spec import load_spec
spec, store = load_spec(sys.argv[1]), open_store(sys.argv[2], sys.argv[3], home=sys.argv[4])
real = store.write
def write_then_hang(area, entries):
    real(area, entries)
    print("written", flush=True)
    time.sleep(600)  # killed here, half way through the generation
store.write = write_then_hang
materialize(spec, RunContext.create(sys.argv[5]), store)
"""


def test_sigkilled_materialize_keeps_previous_state(spec, ctx, store, staged: Path, tmp_path: Path) -> None:
    """A materialize process killed (SIGKILL: no clean-up at all) after writing part of its
    generation: the previous date's state is still current and whole."""
    from conftest import SPEC

    materialize(spec, ctx(DAYS[0]), store)
    flights = _staged(ctx(DAYS[1]), "flights", DAYS[1]).slice(0, 50)
    at = datetime(2013, 1, 2, 12, tzinfo=UTC)
    before = features_for(spec, store, flights, at).table
    url = str(store.path) if isinstance(store, SQLiteStore) else store.url
    name = "" if isinstance(store, SQLiteStore) else store.ns.removeprefix("daybreak:")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "DAYBREAK_HOME": str(staged)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(SPEC), url, name, str(tmp_path), DAYS[1].isoformat()],
                            env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "written"
    finally:
        proc.kill()
        proc.wait()
    assert store.current()["date"] == DAYS[0].isoformat()
    assert features_for(spec, store, flights, at).table.equals(before)


def test_the_cycle_materializes_only_when_the_spec_opts_in(spec, staged: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The cycle's online step: off (the default) it opens no store, not even the SQLite file; with
    online.materialize the store's freshness says the date. A rerun changes nothing, an older date
    keeps the newer state (a backfill never turns the served state back), and the result names the
    backend but no URL or path."""
    import json

    from daybreak.cycle import run_cycle
    from daybreak.infra.cluster import ClusterConfigError
    from daybreak.online import materialize_online, spec_store

    home = tmp_path / "home"
    shutil.copytree(staged, home, symlinks=True)
    monkeypatch.setenv("DAYBREAK_HOME", str(home))
    monkeypatch.delenv("DAYBREAK_ONLINE_URL", raising=False)
    off = run_cycle(spec, RunContext.create(DAY), steps=["online"])["online"]
    assert off["enabled"] is False and off["skipped"] is True and "online.materialize" in off["reason"]
    assert not (home / "online").exists()

    on = spec.model_copy(update={"online": spec.online.model_copy(update={"materialize": True})})
    out = run_cycle(on, RunContext.create(DAY), steps=["online"])["online"]
    assert out["status"] == "materialized" and out["date"] == out["materialized_date"] == DAY.isoformat(), out
    assert out["backend"] == "sqlite" and out["rows"] == sum(out["entries"].values()) > 0, out
    assert str(home) not in json.dumps(out)
    store = spec_store(spec)
    try:
        assert freshness(store)["materialized_date"] == DAY.isoformat()
        assert freshness(store)["generation"] == out["generation"]
    finally:
        store.close()
    assert run_cycle(on, RunContext.create(DAY), steps=["online"])["online"]["status"] == "unchanged"
    older = run_cycle(on, RunContext.create(DAYS[-2]), steps=["online"])["online"]
    assert older["status"] == "kept_newer" and older["materialized_date"] == DAY.isoformat(), older

    # tasks on several machines: an embedded SQLite file would be another file on each
    with pytest.raises(ClusterConfigError, match="DAYBREAK_ONLINE_URL"):
        materialize_online(on, RunContext.create(DAY, distributed="Airflow's CeleryExecutor"))


def _body_rows(t: pa.Table) -> list[dict]:
    """Rows as a client sends them: JSON values, times as ISO 8601."""
    return [{k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in r.items() if not k.startswith("_")}
            for r in t.to_pylist()]


def test_raw_requests_computed_together_each_get_their_own_answer(spec, ctx, store,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's raw-row requests waiting for the online thread are computed in one batch
    (``OnlineServing.drain``): each request still gets exactly what it gets computed alone,
    with its own keys, times, blocked rows and reasons, and its own error (400) when its body
    or a column is bad, leaving the others' answers alone."""
    import threading

    from daybreak.online import BodyError, OnlineServing
    from daybreak.online import _serving as serving_module
    from daybreak.online._serving import Group, body_table, computed_group

    materialize(spec, ctx(DAYS[-2]), store)
    push(spec, store, "weather", _staged(ctx(DAY), "weather", DAY))
    flights = _staged(ctx(DAY), "flights", DAY)
    push(spec, store, "flights", flights.slice(0, 200))  # part of the day known: some keys have history
    rows = _body_rows(flights)
    cols = list(rows[0])
    early = _body_rows(_staged(ctx(DAYS[-2]), "flights", DAYS[-2]).slice(0, 2))  # before the state: blocked

    def split(rs: list[dict]) -> dict:
        return {"dataframe_split": {"columns": cols, "data": [[r.get(c) for c in cols] for r in rs]}}

    bodies: list[dict] = [
        split(rows[10:13]),  # three flights of the day, each at its own time
        split(rows[400:401]),  # a later one: keys pushed and not
        {"inputs": early + rows[600:601]},  # two rows blocked (before the horizon), one not
        split([rows[50] | {"carrier": "ZZ", "tailnum": "NOPE"}, rows[700]]),  # keys without state: notes
        {"inputs": [{k: v for k, v in r.items() if k != "distance"} for r in rows[20:22]]},  # a column missing
        split([rows[30] | {"time_hour": None}, rows[31]]),  # no event time for one row
        split([rows[40] | {"dep_delay": "late"}]),  # not a number: this request's 400
        {"rows": 3},  # not rows at all: this request's 400
        split(rows[100:140]),  # many at once
        split([rows[41] | {"carrier": "\ud800"}]),  # a lone surrogate (the json fallback reads it): its 400
        {"inputs": [rows[42] | {"event_time": "x"}]},  # daybreak's own column name: its 400
    ]
    fields = spec.features.feature_names()
    ids = [*spec.features.keys, EVENT_TIME]
    online = OnlineServing(spec, max_staleness="36500d")
    online._store = store  # the test's store (its own namespace on Redis)
    calls: list[int] = []
    real = serving_module.features_in_groups

    def counted(*args, **kwargs):
        calls.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(serving_module, "features_in_groups", counted)
    gate = threading.Event()
    online.pool.submit(gate.wait)  # the online thread busy: the requests queue up, as under load
    futures = [online.submit_raw(lambda b=b: b, 1000, fields, ids) for b in bodies]
    gate.set()
    answers = []
    for fut in futures:
        try:
            answers.append(fut.result(timeout=120))
        except BodyError as e:
            answers.append(e)
        except Exception as e:  # (a hang is a TimeoutError: the test fails)
            answers.append(e)
    online.pool.shutdown(wait=True)
    assert calls == [len(bodies) - 2]  # one computation for every request whose body is rows

    for body, got in zip(bodies, answers, strict=True):
        try:
            table = body_table(body, 1000)
            alone = features_for(spec, store, table, max_staleness="36500d")
        except (BodyError, ValueError) as e:
            assert isinstance(got, BodyError), (body, got)
            assert str(e)[:100] in str(got) or isinstance(e, BodyError)
            continue
        want = computed_group(Group(alone, [(0, 0, table.num_rows)]), fields, ids)[0]
        assert not isinstance(got, Exception), got
        assert (got.rows, got.blocked, got.notes) == (want.rows, want.blocked, want.notes)
        np.testing.assert_array_equal(got.predicted, want.predicted)
        assert got.columns.keys() == want.columns.keys()
        for name, values in want.columns.items():
            np.testing.assert_array_equal(got.columns[name], values, err_msg=name)

    blocked = {i: [b["row"] for b in a.blocked] for i, a in enumerate(answers) if not isinstance(a, Exception)}
    assert blocked == {0: [], 1: [], 2: [0, 1], 3: [], 4: [0, 1], 5: [0], 8: []}
    assert "before the state's horizon" in answers[2].blocked[0]["reasons"][0]
    assert "missing column 'distance'" in answers[4].blocked[0]["reasons"]
    assert answers[5].blocked[0]["reasons"] == ["no event time"]
    assert "no history for carrier='ZZ'" in " ".join(answers[3].notes[0]["reasons"])
    assert isinstance(answers[6], BodyError) and "dep_delay" in str(answers[6])
    assert isinstance(answers[7], BodyError)
    assert isinstance(answers[9], BodyError) and "carrier" in str(answers[9]), answers[9]
    assert isinstance(answers[10], BodyError) and "'event_time'" in str(answers[10]), answers[10]
    assert len(answers[8].predicted) == 40
    assert answers[0].columns["carrier"].tolist() == [r["carrier"] for r in rows[10:13]]
