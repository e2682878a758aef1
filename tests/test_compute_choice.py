"""Where the feature step and batch scoring compute (issue 25): in process below a threshold and
with no cluster configured, Ray otherwise; the same bytes either way; a small cycle never starts Ray."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ROOT, SPEC, free_port, make_home
from test_feature_kinds import SERIES_DAY0, _series_spec, _write_csv

from daybreak.features import _build as engine
from daybreak.features import build_features, feature_zone
from daybreak.infra import compute
from daybreak.infra.compute import COMPUTE_ENV, MIN_ROWS_ENV, RAY_MIN_ROWS, THREADS_ENV, ComputeConfigError
from daybreak.infra.context import RunContext
from daybreak.spec import parse_spec
from daybreak.stage import stage

FLIGHT_DAYS = [date(2013, 1, 1), date(2013, 1, 2)]


@pytest.fixture(autouse=True)
def _no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (COMPUTE_ENV, MIN_ROWS_ENV, THREADS_ENV, "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)


# --- the decision --------------------------------------------------------------------------------

def test_the_choice_follows_the_cluster_the_rows_and_the_override(monkeypatch: pytest.MonkeyPatch) -> None:
    small, large = RAY_MIN_ROWS - 1, RAY_MIN_ROWS
    assert not compute.use_ray(None, None, small) and not compute.use_ray("local", None, small)
    assert compute.use_ray(None, None, large)
    # a configured cluster: Ray whatever the size (an address, RAY_ADDRESS, a distributed executor)
    assert compute.use_ray("ray://head:10001", None, 10)
    assert compute.use_ray(None, "Airflow's CeleryExecutor", 10)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert compute.use_ray(None, None, 10)
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert not compute.use_ray(None, None, 10)
    # the threshold, and the override both ways
    monkeypatch.setenv(MIN_ROWS_ENV, "1_000")
    assert compute.use_ray(None, None, 1000) and not compute.use_ray(None, None, 999)
    monkeypatch.setenv(COMPUTE_ENV, "ray")
    assert compute.use_ray(None, None, 0)
    monkeypatch.setenv(COMPUTE_ENV, "process")
    assert not compute.use_ray("ray://head:10001", "Airflow's CeleryExecutor", 10**9)
    choice = compute.choose_compute(None, None, 5)
    assert choice.where == "in process" and COMPUTE_ENV in choice.why
    for var, bad in ((COMPUTE_ENV, "gpu"), (MIN_ROWS_ENV, "many")):
        monkeypatch.setenv(COMPUTE_ENV, "auto")
        monkeypatch.setenv(var, bad)
        with pytest.raises(ComputeConfigError, match=var):
            compute.choose_compute(None, None, 5)
        monkeypatch.delenv(var)


def test_the_thread_pool_runs_a_dataflow_in_order_of_dependencies_and_passes_failures_on() -> None:
    """More calls waiting on others than threads (a pool that let a thread wait for an input
    would deadlock); results land where the plain calls' would; a failure reaches whoever asks
    for a result that needed it, with its own type, and what depended on it never runs."""
    import threading

    ran: list[str] = []
    lock = threading.Lock()

    def add(name: str, *xs: int) -> int:
        with lock:
            ran.append(name)
        return sum(xs) + 1

    def fail(*_: Any) -> int:
        raise FileNotFoundError("gone")

    tasks = engine._Tasks(True, None, threads=2)
    try:
        leaves = [tasks.call(add, f"leaf{i}", i) for i in range(20)]
        mids = [tasks.call(add, f"mid{i}", *leaves[i:i + 5]) for i in range(0, 20, 5)]
        pair = tasks.call(engine._on_node, lambda t, k: t.num_rows + k, [{"a": 1}, {"a": 2}], 10, num_returns=2)
        top = tasks.call(add, "top", *mids, 7)
        bad = tasks.call(fail, top)
        after = tasks.call(add, "after", bad)
        assert tasks.get(top) == add("check", *[add("", *[add("", i) for i in range(j, j + 5)])
                                                 for j in range(0, 20, 5)], 7)
        assert tasks.get(pair) == [12, engine.IN_PROCESS]
        with pytest.raises(FileNotFoundError, match="gone"):
            tasks.get(after)
    finally:
        tasks.close()
    assert "after" not in ran and ran.index("top") > max(ran.index(f"mid{i}") for i in range(0, 20, 5))


# --- the same bytes in process (plain calls, a thread pool) and on Ray ------------------------------

def _partition_bytes(ctx: RunContext, spec: Any) -> tuple[list[bytes], str]:
    part = ctx.store.partition(feature_zone(spec), ctx.logical_date)
    assert part is not None
    return [Path(f).read_bytes() for f in part.files], part.manifest["content_hash"]


def _three_ways(home: Path, spec: Any, day: date, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The day's features built with plain calls, on a pool of 4 threads, and on Ray: each a new
    partition (the one before is removed), same run id. Returns each way's bytes and result."""
    pools: list[int] = []

    class CountingPool(engine._Pool):
        def submit(self, *args: Any) -> Any:
            pools.append(1)
            return super().submit(*args)

    monkeypatch.setattr(engine, "_Pool", CountingPool)
    out = {}
    for way, threads, in_process in (("plain", "1", True), ("threads", "4", True), ("ray", "1", False)):
        monkeypatch.setenv(THREADS_ENV, threads)
        shutil.rmtree(home / "store" / "features", ignore_errors=True)
        ctx = RunContext.create(day, run_id="same")
        res = build_features(spec, ctx, in_process=in_process)
        assert not res["skipped"] and res["compute"] == ("process" if in_process else "ray")
        assert bool(res["ray_nodes"]) == (not in_process)
        out[way] = (*_partition_bytes(ctx, spec), res)
        if way == "plain":
            assert not pools, "one thread: plain calls, no pool"
        if way == "threads":
            assert len(pools) > 3, "the thread pool ran the dataflow"
    return out


def _assert_same(built: dict[str, Any]) -> None:
    files, digest, res = built["plain"]
    assert res["rows"] > 0 and files
    for way in ("threads", "ray"):
        assert built[way][1] == digest, f"{way}: content hash differs from in process"
        assert built[way][0] == files, f"{way}: the Parquet files' bytes differ from in process"
        assert built[way][2]["rows"] == res["rows"]


def test_flights_features_are_the_same_bytes_in_process_on_threads_and_on_ray(
        tmp_path: Path, landing: Path, spec, monkeypatch: pytest.MonkeyPatch, ray_local) -> None:
    home = make_home(tmp_path, landing)
    monkeypatch.setenv("DAYBREAK_HOME", str(home))
    for d in FLIGHT_DAYS:
        stage(spec, RunContext.create(d))
    _assert_same(_three_ways(home, spec, FLIGHT_DAYS[-1], monkeypatch))


def _ticker_spec() -> dict:
    """Per-entity business-day feeds (tests/test_feature_kinds.py's tickers): row windows, lags,
    first/max over each ticker's rows."""
    return {
        "name": "stocks",
        "sources": {"quotes": {"path": "landing/quotes/{date}.csv", "columns": {
            "ticker": "string", "ts": "timestamp[us, UTC]", "open": "float64", "close": "float64",
            "volume": "int64"}}},
        "features": {
            "name": "stocks", "base": "quotes", "event_time": "ts", "keys": ["ticker"],
            "label": {"name": "up", "expr": "close > c_lag_1", "known_at": "7h"},
            "columns": [{"name": "gap", "expr": "open / c_lag_1 - 1"},
                        {"name": "ticker_code", "expr": "ticker", "categorical": True}],
            "windows": [{"by": ["ticker"], "value": "close", "lag": [1, 2], "rows": [3], "aggs": ["mean", "first"],
                         "lookback": "14d", "prefix": "c_"},
                        {"by": ["ticker"], "value": "float(volume)", "rows": [5], "aggs": ["mean", "max", "std"],
                         "windows": ["3d"], "lookback": "14d", "prefix": "vol_"}]},
        "model": {"name": "stocks"},
    }


def test_other_shapes_are_the_same_bytes_in_process_on_threads_and_on_ray(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ray_local) -> None:
    """A single series with no entity key (a window over another source, lags, row windows) and
    per-entity business-day feeds (tickers trading on weekdays, several quotes a day)."""
    series_home, tickers_home = tmp_path / "series", tmp_path / "tickers"
    monkeypatch.setenv("DAYBREAK_HOME", str(series_home))
    series = parse_spec(_series_spec())
    rng = np.random.default_rng(11)
    days = [SERIES_DAY0 + timedelta(days=k) for k in range(12)]
    for k, d in enumerate(days):
        noon = datetime(d.year, d.month, d.day, 12, tzinfo=UTC)
        _write_csv(series_home, "demand", d, "ts,y", [f"{noon.isoformat()},{(k * 37) % 23 + rng.normal():.6f}"])
        _write_csv(series_home, "temps", d, "ts,temp",
                   [f"{(noon - timedelta(hours=h)).isoformat()},{rng.normal(5, 3):.6f}" for h in range(1, 12)])
        stage(series, RunContext.create(d))
    _assert_same(_three_ways(series_home, series, days[-1], monkeypatch))

    monkeypatch.setenv("DAYBREAK_HOME", str(tickers_home))
    tickers = parse_spec(_ticker_spec())
    weekdays = [d for d in (date(2024, 3, 1) + timedelta(days=k) for k in range(18)) if d.weekday() < 5]
    for d in weekdays:
        rows = [f"{t},{d}T{h:02d}:30:00+00:00,{rng.uniform(90, 110):.4f},{rng.uniform(90, 110):.4f},"
                f"{rng.integers(1000, 9000)}" for t in ("AAA", "BBB", "CCC", "DDD") for h in range(14, 21)]
        _write_csv(tickers_home, "quotes", d, "ticker,ts,open,close,volume", rows)
        stage(tickers, RunContext.create(d))
    _assert_same(_three_ways(tickers_home, tickers, weekdays[-1], monkeypatch))


# --- the choice made by the step itself -----------------------------------------------------------

@pytest.fixture
def staged_flights(tmp_path: Path, landing: Path, spec, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = make_home(tmp_path, landing)
    monkeypatch.setenv("DAYBREAK_HOME", str(home))
    for d in FLIGHT_DAYS:
        stage(spec, RunContext.create(d))
    return home


def test_a_small_day_is_built_in_process_and_the_override_or_a_cluster_forces_ray(
        staged_flights: Path, spec, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        ray_local) -> None:
    import ray

    day = FLIGHT_DAYS[-1]
    with caplog.at_level("INFO", logger="daybreak.features._build"):
        res = build_features(spec, RunContext.create(day))
    assert res["compute"] == "process" and res["ray_nodes"] == []
    said = [r.getMessage() for r in caplog.records if "in process (below" in r.getMessage()]
    assert said and f"below {RAY_MIN_ROWS:,}; {COMPUTE_ENV}=ray to force Ray" in said[0], said

    shutil.rmtree(staged_flights / "store" / "features")
    monkeypatch.setenv(COMPUTE_ENV, "ray")
    res = build_features(spec, RunContext.create(day))
    assert res["compute"] == "ray" and res["ray_nodes"]

    # a configured cluster (here the suite's own Ray, by its address): Ray however small the day
    monkeypatch.setenv(COMPUTE_ENV, "auto")
    shutil.rmtree(staged_flights / "store" / "features")
    res = build_features(spec, RunContext.create(day, ray_address=ray.get_runtime_context().gcs_address))
    assert res["compute"] == "ray" and res["ray_nodes"]

    # the threshold from the environment: 0 rows means always Ray
    monkeypatch.setenv(MIN_ROWS_ENV, "0")
    shutil.rmtree(staged_flights / "store" / "features")
    assert build_features(spec, RunContext.create(day))["compute"] == "ray"


# --- a small cycle never starts Ray; its batch scoring is the same bytes on Ray ---------------------

CYCLE = textwrap.dedent("""
    import json, sys
    from daybreak.cycle import run_cycle
    from daybreak.infra.context import RunContext
    from daybreak.score import batch_score
    from daybreak.spec import load_spec

    spec = load_spec(sys.argv[1])
    out = {"days": [run_cycle(spec, RunContext.create(d))["summary"] for d in sys.argv[2:]]}
    champion = any(s.get("champion_version") for s in out["days"])
    out["score"] = batch_score(spec, RunContext.create(sys.argv[-1])) if champion else None
    ray = sys.modules.get("ray")
    out["ray_imported"] = ray is not None
    out["ray_initialized"] = bool(ray is not None and ray.is_initialized())
    print("RESULT " + json.dumps(out, default=str))
""")


def _run_cycle(home: Path, env_extra: dict[str, str] | None = None) -> dict[str, Any]:
    env = {**os.environ, "DAYBREAK_HOME": str(home), "PYTHONPATH": str(ROOT / "operators"),
           # nothing listens here: deploy finds no endpoint, and says so (another test may serve 5055)
           "DAYBREAK_SERVE_URL": f"http://127.0.0.1:{free_port()}", **(env_extra or {})}
    for var in (COMPUTE_ENV, MIN_ROWS_ENV, "RAY_ADDRESS"):
        if var not in (env_extra or {}):
            env.pop(var, None)
    proc = subprocess.run([sys.executable, "-c", CYCLE, str(SPEC), *[d.isoformat() for d in FLIGHT_DAYS]],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def cycled_home(tmp_path_factory: pytest.TempPathFactory, landing: Path) -> dict[str, Any]:
    home = make_home(tmp_path_factory.mktemp("cycle"), landing)
    return {"home": home, "result": _run_cycle(home)}


def test_a_small_daily_cycle_never_starts_ray(cycled_home: dict[str, Any]) -> None:
    """Stage, features, monitor, train, gate, promote, deploy and batch scoring on two small
    days, in a process of their own (this one may have Ray from other tests): Ray is never
    even imported."""
    got = cycled_home["result"]
    assert len(got["days"]) == 2
    assert got["score"] is not None and got["score"]["rows"] > 0, "the cycle promoted a champion to score with"
    assert not got["ray_initialized"]
    assert not got["ray_imported"], "a step on the daily path imported Ray"


class _FixedNow(datetime):
    @classmethod
    def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
        return datetime(2026, 1, 2, 3, 4, 5, tzinfo=tz)


def test_batch_scoring_is_the_same_bytes_in_process_and_on_ray(cycled_home: dict[str, Any], spec,
                                                               monkeypatch: pytest.MonkeyPatch, ray_local) -> None:
    from daybreak.score import _score, batch_score, prediction_zone

    home = cycled_home["home"]
    monkeypatch.setenv("DAYBREAK_HOME", str(home))
    monkeypatch.setattr(_score, "datetime", _FixedNow)  # the same scored_at both times
    day = FLIGHT_DAYS[-1]
    out = {}
    for in_process in (True, False):
        shutil.rmtree(home / "store" / "predictions", ignore_errors=True)
        ctx = RunContext.create(day, run_id="same")
        res = batch_score(spec, ctx, in_process=in_process)
        assert not res["skipped"] and res["rows"] > 0
        part = ctx.store.partition(prediction_zone(spec), day)
        out[in_process] = ([Path(f).read_bytes() for f in part.files], part.manifest["rows"])
    assert out[True] == out[False]
