"""`daybreak serve` against `mlflow models serve --env-manager local` and a trivial server (the
ceiling): same model, same client.

    python benchmarks/serving.py [--seconds 4] [--repeats 5] [--concurrency 32] [--rows 1 100]
    python benchmarks/serving.py --repeats 1 --seconds 1 --warmup 0.5 --home /tmp/h   # a quick iteration

The champion of the flights demo (the daily cycle run for 2013-01-01 .. 2013-01-02) is served by
both servers at once, on loopback, each as its own process with its defaults (mlflow: one
uvicorn worker; daybreak: one process, see the README). Both must return the same predictions
for the request bodies before anything is timed.

The client is the same for both: an asyncio HTTP/1.1 client holding `concurrency` keep-alive
connections, each sending its next request as soon as the last one is answered (a closed loop),
for `seconds` after `warmup` seconds that are not counted; the servers take turns, `repeats`
rounds, and the figures are medians over the rounds.

The ceiling (``ceiling``) is the least any Python server of this protocol does per request: a
plain ASGI app under uvicorn with daybreak serve's settings (uvloop, httptools, no access log, the
same connection limit and keep-alive) that reads the body, parses it with ``orjson.loads`` and
answers a constant JSON. Its own process, taking its turn like the others; daybreak's req/s is
reported as a percentage of it (per round, then the median), which is the figure that survives
a noisy shared machine. Once the spec has the prediction log's
``monitoring.log.sample_rate`` (issue 11), a third server, ``daybreak serve`` with the log off,
takes its turn too, and the log's cost is the throughput ratio on / off. Bodies are `dataframe_split` JSON of
holdout rows, 1 row and 100 rows, prepared before the clock starts. It reports requests/s, p50
and p99 latency and failed requests (any status but 200), and the ratios daybreak / mlflow. The
client shares the machine with the servers, so it is kept lean (raw sockets, no HTTP library).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent


def prepare(home: Path) -> dict:
    """A home whose registry has a champion (made unless `home` has one), and the holdout rows."""
    os.environ["DAYBREAK_HOME"] = str(home)
    from daybreak.gate import holdout
    from daybreak.infra import registry
    from daybreak.infra.context import RunContext
    from daybreak.spec import load_spec

    spec = load_spec(ROOT / "specs" / "flights.yaml")
    ctx = RunContext.create("2013-01-02")
    if not (home / "mlflow.db").exists() or registry.alias_version(
            registry.client(ctx), spec.model.name, spec.promotion.alias) is None:
        import ray

        from daybreak.cycle import run_cycle
        from daybreak.demo import build_flights_landing
        from daybreak.infra.compute import ensure_ray

        build_flights_landing(home / "store" / "landing", start=date(2013, 1, 1), end=date(2013, 1, 2))
        ensure_ray("local")
        for d in ("2013-01-01", "2013-01-02"):
            run_cycle(spec, RunContext.create(d), deploy=False)
        ray.shutdown()
    X = holdout(spec, ctx)[spec.features.feature_names()]
    return {"spec": spec, "columns": list(X.columns),
            "rows": X.astype(object).where(X.notna(), None).values.tolist(),
            "tracking_uri": f"sqlite:///{home / 'mlflow.db'}"}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


CEILING_ANSWER = b'{"predictions": [0.0]}'


async def ceiling_app(scope: dict, receive, send) -> None:
    """The trivial server: read the body, ``orjson.loads`` it, answer a constant (ceiling)."""
    import orjson

    if scope["type"] != "http":  # lifespan
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})
        return
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    if scope["path"] == "/invocations":
        orjson.loads(b"".join(chunks))
        body, status = CEILING_ANSWER, 200
    else:
        body, status = b'{"status": "ok"}', 200
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


def run_ceiling(port: int) -> None:
    """The ceiling server, with daybreak serve's uvicorn settings (``_serve.serve``): the default
    loop (uvloop when installed), httptools, no access log, the same connection limit and
    keep-alive. (daybreak's httptools protocol adds a header timeout: part of what it costs.)"""
    import uvicorn

    from daybreak.deploy._serve import MAX_CONNECTIONS

    uvicorn.run(ceiling_app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                http="httptools", limit_concurrency=MAX_CONNECTIONS, timeout_keep_alive=5)


def log_setting_supported() -> bool:
    """True once the spec takes ``monitoring.log.sample_rate`` and ``daybreak serve`` reads it
    (issue 11, the prediction log)."""
    import inspect

    import yaml

    from daybreak.deploy import _serve as serve
    from daybreak.spec._model import parse_spec

    if "sample_rate" not in inspect.getsource(serve):
        return False
    raw = yaml.safe_load((ROOT / "specs" / "flights.yaml").read_text())
    raw.setdefault("monitoring", {}).setdefault("log", {})["sample_rate"] = 0
    try:
        parse_spec(raw)
    except Exception:
        return False
    return True


def with_log_rate(spec, rate: float):
    """The spec with ``monitoring.log.sample_rate`` set to `rate`."""
    from daybreak.spec._model import parse_spec

    raw = spec.model_dump(mode="json")
    mon = raw.get("monitoring") or {}
    mon["log"] = {**(mon.get("log") or {}), "sample_rate": rate}
    raw["monitoring"] = mon
    return parse_spec(raw)


def start_servers(home: Path, prep: dict, logs: Path,
                  log_compare: bool = False) -> dict[str, tuple[subprocess.Popen, int]]:
    """mlflow and daybreak serve (its defaults, so the prediction log as the spec has it: on);
    with `log_compare`, also daybreak serve with the log off (sample_rate 0), and the log on
    explicitly (sample_rate 1.0) for "daybreak"; each daybreak server with its own store, so
    what each logged can be counted."""
    import yaml

    # mlflow starts `uvicorn` from PATH, as in an activated virtualenv
    env = {**os.environ, "DAYBREAK_HOME": str(home), "MLFLOW_TRACKING_URI": prep["tracking_uri"],
           "PYTHONWARNINGS": "ignore", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    name, alias = prep["spec"].model.name, prep["spec"].promotion.alias
    specs = {"daybreak": prep["spec"]}
    if log_compare:
        specs = {"daybreak": with_log_rate(prep["spec"], 1.0), "daybreak_log_off": with_log_rate(prep["spec"], 0)}
    ports = {"mlflow": _free_port(), "ceiling": _free_port(), **{k: _free_port() for k in specs}}
    cmds = {"mlflow": [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{name}@{alias}", "--env-manager",
                       "local", "-h", "127.0.0.1", "-p", str(ports["mlflow"])],
            "ceiling": [sys.executable, str(Path(__file__).resolve()), "--ceiling-port", str(ports["ceiling"])]}
    for which, spec in specs.items():
        spec_file = home / f"spec_{which}.yaml"
        spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
        cmds[which] = [str(BIN / "daybreak"), "serve", "--spec", str(spec_file), "--port", str(ports[which])]
        if log_compare:
            (home / f"store_{which}").mkdir(exist_ok=True)
    procs = {}
    try:
        for which, cmd in cmds.items():
            own = dict(env)
            if log_compare and which in specs:  # `daybreak serve` logs under $DAYBREAK_STORE
                own["DAYBREAK_STORE"] = str(home / f"store_{which}")
            with open(logs / f"{which}.log", "w") as out:
                procs[which] = (subprocess.Popen(cmd, env=own, stdout=out, stderr=subprocess.STDOUT, cwd=home),
                                ports[which])
        for proc, port in procs.values():
            _wait(f"http://127.0.0.1:{port}/ping", proc)
    except BaseException:
        stop_servers(procs)
        raise
    return procs


def logged_files(home: Path, which: str) -> int:
    """Parquet files under a daybreak server's own store (what its prediction log wrote)."""
    return sum(1 for _ in (home / f"store_{which}").rglob("*.parquet"))


def stop_servers(procs: dict[str, tuple[subprocess.Popen, int]]) -> None:
    for proc, _ in procs.values():
        proc.terminate()
    for proc, _ in procs.values():
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def bodies(prep: dict, rows: int, count: int = 16) -> list[bytes]:
    """`count` different dataframe_split bodies of `rows` consecutive holdout rows each."""
    data = prep["rows"]
    out = []
    for k in range(count):
        start = (k * rows) % max(1, len(data) - rows)
        out.append(json.dumps({"dataframe_split": {"columns": prep["columns"],
                                                   "data": data[start:start + rows]}}).encode())
    return out


def check_same_predictions(ports: dict[str, int], payloads: list[bytes]) -> None:
    import httpx
    import numpy as np

    for body in payloads[:4]:
        got = {}
        for which, port in ports.items():
            if which == "ceiling":
                continue
            r = httpx.post(f"http://127.0.0.1:{port}/invocations", content=body,
                           headers={"Content-Type": "application/json"}, timeout=60)
            if r.status_code != 200:
                raise RuntimeError(f"{which} answered {r.status_code}: {r.text[:300]}")
            got[which] = np.asarray(r.json()["predictions"], dtype=np.float64)
        if not all(np.array_equal(got["mlflow"], v) for v in got.values()):
            raise RuntimeError(f"the servers' predictions differ: {got}")


async def _connection(port: int, payloads: list[bytes], offset: int, warm_until: float, stop_at: float,
                      latencies: list[float], failures: list[int], path: str = "/invocations") -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    target = path.encode()
    requests = [b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (target, len(p), p) for p in payloads]
    k = offset
    try:
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            writer.write(requests[k % len(requests)])
            k += 1
            head = await reader.readuntil(b"\r\n\r\n")
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            if at < 0:
                raise RuntimeError(f"response without Content-Length: {head[:200]!r}")
            length = int(lower[at + 17:lower.index(b"\r\n", at + 2)])
            await reader.readexactly(length)
            t1 = time.perf_counter()
            if t0 >= warm_until:
                latencies.append(t1 - t0)
                if head[9:12] != b"200":
                    failures.append(int(head[9:12]))
    finally:
        writer.close()


async def _load(port: int, payloads: list[bytes], concurrency: int, seconds: float, warmup: float,
                path: str = "/invocations") -> dict:
    latencies: list[float] = []
    failures: list[int] = []
    start = time.perf_counter()
    warm_until, stop_at = start + warmup, start + warmup + seconds
    await asyncio.gather(*(_connection(port, payloads, i, warm_until, stop_at, latencies, failures, path)
                           for i in range(concurrency)))
    latencies.sort()
    n = len(latencies)
    if n == 0:  # (a very short run on a stalled machine)
        return {"requests": 0, "failed": 0, "rps": 0.0, "p50_ms": float("nan"), "p99_ms": float("nan")}
    return {"requests": n, "failed": len(failures), "rps": n / seconds,
            "p50_ms": 1000 * latencies[n // 2], "p99_ms": 1000 * latencies[min(n - 1, int(n * 0.99))]}


def load(port: int, payloads: list[bytes], concurrency: int, seconds: float, warmup: float,
         path: str = "/invocations") -> dict:
    """`concurrency` connections in a closed loop posting `payloads` to `path` (with its query)."""
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    return runner(_load(port, payloads, concurrency, seconds, warmup, path))


def bench_serving(sizes: list[int] = (1, 100), seconds: float = 4.0, concurrency: int = 32,
                  warmup: float = 1.5, home: Path | None = None, repeats: int = 5,
                  log_compare: bool | None = None) -> dict:
    """`repeats` rounds per request size; in each round every server gets `seconds` of load in
    turn (after `warmup`), so load on the machine hits them alike. Figures are the medians over
    the rounds; the log's cost is the median of the per-round throughput ratios (on / off)."""
    import statistics

    if log_compare is None:
        log_compare = log_setting_supported()
    out = {"concurrency": concurrency, "seconds": seconds, "warmup": warmup, "repeats": repeats,
           "log_compare": log_compare, "sizes": {}}
    if not log_compare:
        print("serving: the prediction log's sample_rate is not in daybreak's spec/serve yet: "
              "log on vs off is not measured", flush=True)
    saved_home = os.environ.get("DAYBREAK_HOME")
    with tempfile.TemporaryDirectory(prefix="dbserve") as tmp:
        home = Path(home or tmp)
        home.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        prep = prepare(home)
        print(f"serving: champion ready in {time.perf_counter() - t0:.0f}s; starting the servers", flush=True)
        procs = start_servers(home, prep, home, log_compare)
        ports = {which: port for which, (_, port) in procs.items()}
        try:
            for rows in sizes:
                payloads = bodies(prep, rows)
                check_same_predictions(ports, payloads)
                rounds: dict[str, list[dict]] = {which: [] for which in ports}
                order = list(ports)
                for k in range(repeats):
                    for which in order[k % len(order):] + order[:k % len(order)]:  # each server leads in turn
                        r = load(ports[which], payloads, concurrency, seconds, warmup)
                        rounds[which].append(r)
                        print(f"serving {rows:>3}-row requests [{k + 1}/{repeats}] {which:>16}: {r['rps']:8.1f} req/s, "
                              f"p50 {r['p50_ms']:7.1f} ms, p99 {r['p99_ms']:7.1f} ms, failed {r['failed']} of "
                              f"{r['requests']}", flush=True)
                res = {which: {**{m: statistics.median(x[m] for x in v) for m in ("rps", "p50_ms", "p99_ms")},
                               "failed": sum(x["failed"] for x in v), "requests": sum(x["requests"] for x in v),
                               "rounds": v}
                       for which, v in rounds.items()}
                res["throughput_ratio"] = res["daybreak"]["rps"] / res["mlflow"]["rps"]
                # % of the ceiling per round (they ran seconds apart), then the median
                for which in [w for w in ("daybreak", "daybreak_log_off") if w in rounds]:
                    per = [100 * d["rps"] / c["rps"] for d, c in zip(rounds[which], rounds["ceiling"], strict=True)]
                    res[which]["pct_of_ceiling"] = statistics.median(per)
                    res[which]["pct_of_ceiling_rounds"] = per
                res["p99_ratio"] = res["daybreak"]["p99_ms"] / res["mlflow"]["p99_ms"]
                res["p50_ratio"] = res["daybreak"]["p50_ms"] / res["mlflow"]["p50_ms"]
                if log_compare:
                    per_round = [on["rps"] / off["rps"]
                                 for on, off in zip(rounds["daybreak"], rounds["daybreak_log_off"], strict=False)]
                    res["log_on_vs_off_throughput"] = statistics.median(per_round)
                    res["log_on_vs_off_rounds"] = per_round
                    res["log_on_vs_off_p99"] = res["daybreak"]["p99_ms"] / res["daybreak_log_off"]["p99_ms"]
                out["sizes"][str(rows)] = res
        finally:
            stop_servers(procs)
            if saved_home is None:
                os.environ.pop("DAYBREAK_HOME", None)
            else:
                os.environ["DAYBREAK_HOME"] = saved_home
        if log_compare:  # after a clean stop, so what was buffered is written
            out["logged_files"] = {"on": logged_files(home, "daybreak"), "off": logged_files(home, "daybreak_log_off")}
            if out["logged_files"]["on"] == 0 or out["logged_files"]["off"] != 0:
                raise AssertionError(f"the prediction log did not behave as set (Parquet files written with it on, "
                                     f"off): {out['logged_files']}; see {home}/daybreak*.log")
    return out


def serving_lines(r: dict) -> list[str]:
    servers = ["ceiling", "mlflow", "daybreak"] + (["daybreak_log_off"] if r.get("log_compare") else [])
    lines = [f"Serving, `daybreak serve` (one process, micro-batching) vs `mlflow models serve --env-manager local` "
             f"(one worker), same model and client, {r['concurrency']} connections, {r['seconds']:g} s each after "
             f"{r['warmup']:g} s of warm-up, servers taking turns, median of {r.get('repeats', 1)} rounds "
             f"(goal: at least 5x the throughput, p99 at most 1/5):", "",
             "| rows per request | server | requests/s | % of ceiling | p50 (ms) | p99 (ms) | failed |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    label = {"ceiling": "ceiling (uvicorn + orjson.loads, constant answer)", "mlflow": "mlflow models serve",
             "daybreak": "daybreak serve" + (" (log on)" if r.get("log_compare") else ""),
             "daybreak_log_off": "daybreak serve (log off)"}
    for rows, res in r["sizes"].items():
        for which in servers:
            s = res.get(which)
            if s is None:  # (results from before the ceiling was measured)
                continue
            pct = f"{s['pct_of_ceiling']:.1f}%" if "pct_of_ceiling" in s else ""
            lines.append(f"| {rows} | {label[which]} | {s['rps']:.1f} | {pct} | {s['p50_ms']:.1f} | "
                         f"{s['p99_ms']:.1f} | {s['failed']} of {s['requests']} |")
    lines.append("")
    for rows, res in r["sizes"].items():
        if "pct_of_ceiling" in res.get("daybreak", {}):
            each = ", ".join(f"{x:.1f}" for x in res["daybreak"]["pct_of_ceiling_rounds"])
            lines.append(f"- {rows} row(s): daybreak serve does {res['daybreak']['pct_of_ceiling']:.1f}% of the "
                         f"ceiling's requests/s (per round: {each}).")
        lines.append(f"- {rows} row(s): daybreak {res['throughput_ratio']:.1f}x the throughput, p50 "
                     f"{res['p50_ratio']:.3f}x, p99 {res['p99_ratio']:.3f}x mlflow's.")
    if r.get("log_compare"):
        lines += ["", f"Prediction log (issue 11), `monitoring.log.sample_rate` 1.0 vs 0, same run "
                      f"(goal: costs at most 10% throughput; Parquet files it wrote on/off: "
                      f"{r['logged_files']['on']}/{r['logged_files']['off']}):", ""]
        for rows, res in r["sizes"].items():
            each = ", ".join(f"{x:.2f}" for x in res["log_on_vs_off_rounds"])
            cost = 1 - res["log_on_vs_off_throughput"]
            said = f"costs {cost:.1%} of the throughput" if cost > 0 else "no measurable cost"
            lines.append(f"- {rows} row(s): throughput with the log on / off = {res['log_on_vs_off_throughput']:.2f} "
                         f"({said}; per round {each}); p99 on / off {res['log_on_vs_off_p99']:.2f}.")
    else:
        lines += ["", "Prediction log on vs off: not measured (the spec has no `monitoring.log.sample_rate` yet)."]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 100], help="rows per request")
    ap.add_argument("--seconds", type=float, default=4.0, help="measured seconds per server, size and round")
    ap.add_argument("--warmup", type=float, default=1.5, help="seconds of load not counted, before each measurement")
    ap.add_argument("--repeats", type=int, default=5, help="rounds (servers take turns in each)")
    ap.add_argument("--concurrency", type=int, default=32, help="connections, each with one request in flight")
    ap.add_argument("--home", type=Path, help="keep the prepared home (registry, store, server logs) here; "
                                              "reused on the next run")
    ap.add_argument("--ceiling-port", type=int, help=argparse.SUPPRESS)  # run the ceiling server (internal)
    args = ap.parse_args()
    if args.ceiling_port:
        run_ceiling(args.ceiling_port)
        return 0
    if args.repeats < 1 or args.seconds <= 0 or args.warmup < 0:
        ap.error("--repeats must be at least 1, --seconds above 0, --warmup not negative")
    sys.path.insert(0, str(HERE))
    from common import print_header

    print_header("serving vs mlflow models serve", args.repeats)
    r = bench_serving(args.rows, args.seconds, args.concurrency, args.warmup, args.home, args.repeats)
    print(json.dumps(r, indent=2))
    print("\n".join(serving_lines(r)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
