"""`daybreak serve` with online features: raw rows in, the offline features' predictions out.

The served champion of the cycled demo home (a private copy: the server writes its prediction
log there). The online store is materialized to 2013-01-03, the 2013-01-04 events (flights and
weather, as staged) are pushed through ``POST /events``, and the day's flights are sent as raw
rows to ``POST /invocations?raw=1``. Their predictions must equal the predictions of the
offline feature partition's rows for the same flights, sent through the precomputed path to the
same server (so the same version), and the predictions partition the batch_score step writes for
the day. With the embedded SQLite store and with a real Redis server. The monitor step of the day
judges that raw-row traffic against the day's labels. Also: blocked rows say why, /events needs
the token, /health and /metrics show freshness, the prediction log holds the computed features.
"""

from __future__ import annotations

import shutil
from datetime import UTC, date, datetime
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from conftest import Served, until
from test_online import Redis

from daybreak import features as engine
from daybreak.deploy._predlog import read_log
from daybreak.features import read_features
from daybreak.infra.context import RunContext
from daybreak.online import materialize, open_store
from daybreak.score import batch_score, prediction_zone

MATERIALIZED, DAY = date(2013, 1, 3), date(2013, 1, 4)
TOKEN = "online-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# The demo's data is from 2013: the state is "stale" against today's clock by years.
ENV = {"DAYBREAK_SERVE_TOKEN": TOKEN, "DAYBREAK_ONLINE_MAX_STALENESS": "36500d"}


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    server = Redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


def _copy_home(cycled: dict, base: Path) -> Path:
    home = base / "home"
    shutil.copytree(cycled["home"], home, symlinks=True)
    return home


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def online(request: pytest.FixtureRequest, cycled: dict, spec, tmp_path_factory: pytest.TempPathFactory):
    """A private home with the online store materialized to MATERIALIZED, and a server on it."""
    folder = tmp_path_factory.mktemp(f"online-serve-{request.param}")
    home = _copy_home(cycled, folder)
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else None
    env = dict(ENV)
    if url:
        env["DAYBREAK_ONLINE_URL"] = url
    mp = pytest.MonkeyPatch()
    mp.setenv("DAYBREAK_HOME", str(home))
    try:
        store = open_store(url, spec.features.name, home=home)
        if url:  # the Redis server is shared by the module's tests: start from nothing
            import redis

            redis.Redis.from_url(url).flushdb()
        materialize(spec, RunContext.create(MATERIALIZED), store)
        store.close()
        server = Served(spec, home, folder, env)
    finally:
        mp.undo()
    try:
        yield {"server": server, "home": home, "backend": request.param}
    finally:
        server.stop()


def _staged(home: Path, source: str, day: date, monkeypatch: pytest.MonkeyPatch) -> pa.Table:
    monkeypatch.setenv("DAYBREAK_HOME", str(home))
    ctx = RunContext.create(day)
    part = ctx.store.partition(f"staged/{source}", day)
    return engine.read_table(part.files, ctx.store.fs)


def _records(t: pa.Table) -> list[dict]:
    """Rows as a client sends them: JSON values, times as ISO 8601 with their offset."""
    out = []
    for r in t.to_pylist():
        out.append({k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in r.items()
                    if not k.startswith("_")})
    return out


def _raw(flights: pa.Table) -> list[dict]:
    """The flights as a booking system has them: no label (nor what is known after arrival)."""
    return [{k: v for k, v in r.items() if k not in ("arr_delay", "arr_time", "air_time")} for r in _records(flights)]


def _split(rows: list[dict]) -> dict:
    cols = list(rows[0])
    return {"dataframe_split": {"columns": cols, "data": [[r.get(c) for c in cols] for r in rows]}}


def _push_day(url: str, home: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    out = {}
    for source in ("weather", "flights"):
        rows = _records(_staged(home, source, DAY, monkeypatch))
        r = httpx.post(f"{url}/events", json={"source": source, "rows": rows}, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text[:500]
        out[source] = r.json()
        assert out[source]["rows"] == len(rows) and out[source]["already_materialized"] == 0
    return out


def _key(df: pd.DataFrame, keys: list[str]) -> pd.Series:
    et = pd.to_datetime(df["event_time"], utc=True, format="ISO8601")
    return df[keys].astype(str).agg("|".join, axis=1) + "|" + et.map(lambda t: t.isoformat())


def _served_day(online: dict, spec, monkeypatch: pytest.MonkeyPatch) -> dict:
    """DAY's events pushed and its flights sent as raw rows (request ``raw-day``), once per server:
    the answer, the served version, the rows sent (with the event times the server computed) and
    the server's predictions by row identity (keys and event time)."""
    if "served" in online:
        return online["served"]
    url, home = online["server"].url, online["home"]

    # before any event: the materialized date, no pushed event yet
    health = httpx.get(f"{url}/health", headers=AUTH, timeout=10).json()
    assert health["online"]["materialized_date"] == MATERIALIZED.isoformat()
    assert health["online"]["newest_event"] is None

    pushed = _push_day(url, home, monkeypatch)
    assert pushed["flights"]["newest_event"].startswith("2013-01-0")

    flights = _staged(home, "flights", DAY, monkeypatch)
    rows = _raw(flights)
    r = httpx.post(f"{url}/invocations?raw=1", json=_split(rows), headers={**AUTH, "X-Request-Id": "raw-day"},
                   timeout=120)
    assert r.status_code == 200, r.text[:1000]
    body = r.json()
    assert len(body["predictions"]) == len(rows)
    assert body["blocked"] == [], body["blocked"][:3]
    sent = pd.DataFrame(rows)
    sent["event_time"] = [engine_time.isoformat() for engine_time in _event_times(spec, flights)]
    got = pd.Series(np.asarray([np.nan if p is None else p for p in body["predictions"]], np.float64),
                    index=_key(sent, list(spec.features.keys)).values)
    until(lambda: httpx.get(f"{url}/health", headers=AUTH, timeout=10).json()["prediction_log"]["written_rows"]
          >= len(rows), 30, "the prediction log never wrote the raw rows")
    online["served"] = {"pushed": pushed, "rows": rows, "body": body, "version": r.headers["x-model-version"],
                        "got": got}
    return online["served"]


def test_raw_rows_predict_as_batch_scoring(online: dict, spec, monkeypatch: pytest.MonkeyPatch) -> None:
    url, home = online["server"].url, online["home"]
    f = spec.features
    served = _served_day(online, spec, monkeypatch)
    pushed, rows, version, got = served["pushed"], served["rows"], served["version"], served["got"]

    # the offline partition's rows for the same flights, through the precomputed path
    monkeypatch.setenv("DAYBREAK_HOME", str(home))
    table, _, _ = read_features(spec, RunContext.create(DAY), [DAY])
    offline = table.to_pandas()
    names = f.feature_names()
    X = offline[names]
    pre = httpx.post(f"{url}/invocations", headers=AUTH, timeout=120, json={"dataframe_split": {
        "columns": names, "data": X.astype(object).where(X.notna(), None).values.tolist()}})
    assert pre.status_code == 200 and pre.headers["x-model-version"] == version, pre.text[:500]
    want = pd.Series(np.asarray(pre.json()["predictions"], np.float64), index=_key(offline, list(f.keys)).values)
    common = want.index.intersection(got.index)
    assert len(common) >= 0.95 * len(want) and len(want) > 500, (len(common), len(want))
    assert not np.isnan(got[common].to_numpy()).any()
    np.testing.assert_allclose(got[common].to_numpy(), want[common].to_numpy(), rtol=1e-9, atol=1e-9)

    # and batch scoring itself: the batch_score step's predictions partition of the day, row for row
    scored = batch_score(spec, RunContext.create(DAY), in_process=True)
    assert scored["model_version"] == version, (scored, version)
    part = RunContext.create(DAY).store.partition(prediction_zone(spec), DAY)
    batch = engine.read_table(part.files, part.fs).to_pandas()
    by_row = pd.Series(batch["prediction"].to_numpy(np.float64), index=_key(batch, list(f.keys)).values)
    assert by_row.index.is_unique and len(by_row) == len(offline)
    both = by_row.index.intersection(got.index)
    assert len(both) == len(common), (len(both), len(common))  # the rows the server predicted and the day labelled
    np.testing.assert_allclose(got[both].to_numpy(), by_row[both].to_numpy(), rtol=1e-9, atol=0)

    # freshness: /health and /metrics
    health = httpx.get(f"{url}/health", headers=AUTH, timeout=10).json()["online"]
    assert health["materialized_date"] == "2013-01-03"
    assert health["newest_event"] >= max(pushed["flights"]["newest_event"], pushed["weather"]["newest_event"])
    assert health["newest_event_age_seconds"] > 365 * 86400  # 2013's events
    metrics = httpx.get(f"{url}/metrics", headers=AUTH, timeout=10).text
    assert _gauge(metrics, "daybreak_online_state") == 1
    assert _gauge(metrics, "daybreak_online_materialized_date_timestamp_seconds") == \
        datetime(2013, 1, 3, tzinfo=UTC).timestamp()
    assert _gauge(metrics, "daybreak_online_newest_event_timestamp_seconds") == \
        datetime.fromisoformat(health["newest_event"]).timestamp()
    assert "daybreak_online_newest_event_age_seconds " in metrics
    assert 'daybreak_requests_total{code="200",path="/events"} 2.0' in metrics
    assert _gauge(metrics, 'daybreak_online_rows_total{outcome="predicted"}') >= len(rows)

    # the prediction log holds what the model saw: the computed features, with the identities
    ctx = RunContext.create(DAY)
    logged = read_log(spec, ctx.store, [DAY])
    assert logged is not None
    df = logged.to_pandas()
    mine = df[df["request_id"] == "raw-day"]
    assert len(mine) == len(rows)
    np.testing.assert_allclose(mine["prediction"].to_numpy(), got.to_numpy(), rtol=0, atol=0)
    mine = mine.assign(k=_key(mine, list(f.keys)).values).set_index("k")
    off = offline.assign(k=_key(offline, list(f.keys)).values).set_index("k")
    for name in names:
        if pd.api.types.is_numeric_dtype(off[name]):
            np.testing.assert_allclose(mine.loc[common, name].to_numpy(np.float64),
                                       off.loc[common, name].to_numpy(np.float64), rtol=1e-9, atol=1e-9,
                                       err_msg=name)
        else:
            assert mine.loc[common, name].tolist() == off.loc[common, name].tolist(), name


def test_the_monitor_judges_raw_row_traffic(online: dict, spec, monkeypatch: pytest.MonkeyPatch) -> None:
    """Raw-row requests are logged with the features the server computed, and the monitor step of
    the day judges them: it joins the log with the day's labels (staged with its data) and reports
    the live metric of the served version on those rows, the same as computed here from the
    server's answers and the labels."""
    import math

    from sklearn.metrics import roc_auc_score

    from daybreak.deploy import ONLINE
    from daybreak.monitor import monitor_model

    served = _served_day(online, spec, monkeypatch)
    monkeypatch.setenv("DAYBREAK_HOME", str(online["home"]))
    ctx = RunContext.create(DAY)
    f = spec.features
    labelled = read_features(spec, ctx, [DAY])[0].to_pandas()
    labels = pd.Series(labelled[f.label.name].to_numpy(np.float64), index=_key(labelled, list(f.keys)).values)
    judged = served["got"].to_frame("prediction").join(labels.rename("label"), how="inner")
    assert len(judged) > 500 and judged.index.is_unique
    assert spec.live_metric() == "roc_auc"
    want = roc_auc_score(judged["label"], judged["prediction"])

    result = monitor_model(spec, ctx)
    live = [v for v in result["versions"] if v["source"] == ONLINE]
    assert [v["version"] for v in live] == [served["version"]], result["versions"]
    assert live[0]["rows"] == len(judged), (live[0]["rows"], len(judged))
    assert math.isclose(live[0]["metrics"]["roc_auc"], want, rel_tol=1e-9), (live[0]["metrics"], want)
    assert live[0]["label_mean"] == pytest.approx(judged["label"].mean(), rel=1e-12)
    assert result["rows_logged"] >= len(served["rows"]) and result["conflicting_identities"] == 0


def _gauge(text: str, name: str) -> float:
    line = next(x for x in text.splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


def _event_times(spec, flights: pa.Table) -> list[datetime]:
    from daybreak.spec import evaluate

    return evaluate(spec.features.event_time, flights).cast(pa.timestamp("us", tz="UTC")).to_pylist()


def test_blocked_rows_carry_reasons(online: dict, spec, monkeypatch: pytest.MonkeyPatch) -> None:
    url, home = online["server"].url, online["home"]
    good = _raw(_staged(home, "flights", DAY, monkeypatch))[0]
    no_time = {**good, "time_hour": None}
    too_early = _raw(_staged(home, "flights", date(2013, 1, 2), monkeypatch))[0]  # before the state's horizon
    r = httpx.post(f"{url}/invocations?raw=1", json={"dataframe_records": [good, no_time, too_early]},
                   headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text[:500]
    body = r.json()
    assert body["predictions"][0] is not None and body["predictions"][1:] == [None, None]
    reasons = {b["row"]: " ".join(b["reasons"]) for b in body["blocked"]}
    assert set(reasons) == {1, 2}
    assert "no event time" in reasons[1] and "horizon" in reasons[2]
    metrics = httpx.get(f"{url}/metrics", headers=AUTH, timeout=10).text
    assert _gauge(metrics, 'daybreak_online_rows_total{outcome="blocked"}') >= 2

    # nothing to predict: 422 in MLflow's format, naming the rows and why
    r = httpx.post(f"{url}/invocations?raw=1", json={"inputs": [no_time]}, headers=AUTH, timeout=30)
    assert r.status_code == 422 and r.json()["error_code"] == "BAD_REQUEST"
    assert "row 0: no event time" in r.json()["message"] and r.json()["blocked"][0]["row"] == 0

    # a column of the wrong type, a body that is not rows: 400, no internals
    bad = httpx.post(f"{url}/invocations?raw=1", json={"inputs": [{**good, "time_hour": "yesterday"}]},
                     headers=AUTH, timeout=30)
    assert bad.status_code == 400 and "time_hour" in bad.json()["message"], bad.text
    assert httpx.post(f"{url}/invocations?raw=1", json={"rows": 3}, headers=AUTH, timeout=30).status_code == 400
    assert httpx.post(f"{url}/invocations?raw=1", json={"inputs": [good]}, timeout=30).status_code == 401


def test_events_need_the_token(online: dict) -> None:
    url = online["server"].url
    body = {"source": "weather", "rows": []}
    assert httpx.post(f"{url}/events", json=body, timeout=10).status_code == 401
    assert httpx.post(f"{url}/events", json=body, headers={"Authorization": "Bearer wrong"},
                      timeout=10).status_code == 401
    r = httpx.post(f"{url}/events", json={"source": "nope", "rows": []}, headers=AUTH, timeout=10)
    assert r.status_code == 400 and "unknown source" in r.json()["message"]
    assert httpx.get(f"{url}/events", headers=AUTH, timeout=10).status_code == 405
    assert httpx.post(f"{url}/events", content=b"{}", headers={**AUTH, "Content-Type": "text/csv"},
                      timeout=10).status_code == 415


def test_without_state_or_token(cycled: dict, spec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No online state: raw rows get 503 saying to materialize, precomputed requests work as
    before. No token: /events is refused (it writes)."""
    from fastapi.testclient import TestClient

    from daybreak.deploy._serve import create_app

    home = _copy_home(cycled, tmp_path)
    monkeypatch.setenv("DAYBREAK_HOME", str(home))
    monkeypatch.delenv("DAYBREAK_ONLINE_URL", raising=False)
    ctx = RunContext.create(DAY)
    table, _, _ = read_features(spec, ctx, [DAY])
    X = table.to_pandas()[spec.features.feature_names()].head(3)
    pre = {"dataframe_split": {"columns": list(X.columns), "data": X.astype(object).where(X.notna(), None)
                               .values.tolist()}}
    raw = {"inputs": _raw(_staged(home, "flights", DAY, monkeypatch))[:2]}
    with TestClient(create_app(spec, ctx)) as c:
        r = c.post("/invocations?raw=1", json=raw)
        assert r.status_code == 503 and "daybreak online materialize" in r.json()["message"]
        assert c.post("/invocations", json=pre).status_code == 200
        assert c.post("/events", json={"source": "flights", "rows": raw["inputs"]}).status_code == 403
        health = c.get("/health").json()
        assert health["online"]["materialized_date"] is None
        assert _gauge(c.get("/metrics").text, "daybreak_online_state") == 0
    assert not (home / "online").exists()  # looking does not create the embedded store


def test_stale_state_blocks_rows(cycled: dict, spec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the default bound (1d), 2013's state is stale against today's clock: every row is
    blocked, saying so, never predicted from old state."""
    from fastapi.testclient import TestClient

    from daybreak.deploy._serve import create_app

    home = _copy_home(cycled, tmp_path)
    monkeypatch.setenv("DAYBREAK_HOME", str(home))
    monkeypatch.delenv("DAYBREAK_ONLINE_URL", raising=False)
    monkeypatch.delenv("DAYBREAK_ONLINE_MAX_STALENESS", raising=False)
    store = open_store(None, spec.features.name, home=home)
    materialize(spec, RunContext.create(MATERIALIZED), store)
    store.close()
    raw = {"inputs": _raw(_staged(home, "flights", DAY, monkeypatch))[:2]}
    with TestClient(create_app(spec, RunContext.create(DAY))) as c:
        r = c.post("/invocations?raw=1", json=raw)
        assert r.status_code == 422, r.text[:300]
        assert [b["row"] for b in r.json()["blocked"]] == [0, 1]
        assert all("stale" in " ".join(b["reasons"]) for b in r.json()["blocked"])
        assert c.get("/health").json()["online"]["materialized_date"] == MATERIALIZED.isoformat()
