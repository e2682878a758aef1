"""Normal clients' latency while abusive clients send huge bodies to `daybreak serve` (issue 20).

    python benchmarks/abuse.py [--seconds 4] [--repeats 3] [--concurrency 8] [--rows 10] [--home DIR]

One `daybreak serve` (default limits) on loopback serves the flights champion (made as in
``serving.py``). The normal clients are ``serving.py``'s lean asyncio client: `concurrency`
keep-alive connections, each sending its next `rows`-row ``dataframe_split`` request as soon as
the last is answered. Each round measures them for `seconds` (after 1 s not counted) in each
phase, in turn:

- ``unloaded``: nobody else;
- ``60MiB declared``: 4 abusers each sending 60 MiB bodies (about 330k rows) back to back, with a
  ``Content-Length``;
- ``60MiB chunked``: the same bodies without a length (chunked), so the server must read up to
  its limit before refusing;
- ``max accepted``: 4 abusers each sending the biggest body the server accepts (just under
  ``MAX_BODY_BYTES``, about 90k rows), back to back: parsed, checked and predicted in full.

Abusers run in their own processes (raw sockets), so they do not share the clients' GIL. The
figure is the ratio of the normal clients' p99 (and throughput) in each phase to the unloaded
phase of the same round, median over rounds; the goal (issue 20) is a p99 at most 2x unloaded
while 4 clients send 60 MiB bodies. Also reported: what the abusers were answered, and the
server's peak RSS (its parse worker included) in each phase. Everything shares the machine's
cores: on 2 cores the abusers' own sending (kernel time copying into loopback sockets, counted
as theirs) and the parse worker take CPU the server would otherwise have, so each phase reports
the CPU seconds the server (with its worker) and the abusers used during it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(HERE))

PHASES = ("unloaded", "60MiB declared", "60MiB chunked", "max accepted")


def big_body(columns: list[str], rows: list[list], size: int) -> bytes:
    """A dataframe_split body of holdout rows, just under `size` bytes."""
    head = json.dumps({"dataframe_split": {"columns": columns, "data": []}}, separators=(",", ":")).encode()[:-3]
    encoded = [json.dumps(r, separators=(",", ":")).encode() for r in rows]
    out, total, k = [], len(head) + 3, 0
    while True:
        row = encoded[k % len(encoded)]
        if total + len(row) + 1 > size:
            break
        out.append(row)
        total += len(row) + 1
        k += 1
    return head + b",".join(out) + b"]}}"


def _answer(sock: socket.socket) -> int | None:
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    return int(data[9:12]) if data.startswith(b"HTTP/1.1 ") else None


def abuser(port: int, body: bytes, chunked: bool, stop, counts) -> None:
    """Sends `body` again and again on fresh connections until `stop`; counts the answers."""
    if chunked:
        head = (b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        piece = 2**20
        payload = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + piece]), body[i:i + piece])
                           for i in range(0, len(body), piece)) + b"0\r\n\r\n"
    else:
        head = (b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body))
        payload = body
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
                try:
                    s.sendall(head)
                    # (not head + payload: a 60 MiB copy per attempt is the abuser's CPU, not the server's)
                    s.sendall(payload)
                except OSError:
                    pass  # refused early, the connection closed under the sender
                status = _answer(s)
        except OSError:
            status = None
        key = str(status)
        counts[key] = counts.get(key, 0) + 1
    t = os.times()
    counts[f"cpu{os.getpid()}"] = t.user + t.system  # its kernel time sending included


async def _client(port: int, payloads: list[bytes], offset: int, warm_until: float, stop_at: float,
                  latencies: list[float], failures: list[int]) -> None:
    """``serving.py``'s closed-loop connection, but one the server closes (a 503 says
    ``Connection: close``) is opened again; the request counts as failed."""
    import asyncio

    requests = [b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(p), p) for p in payloads]
    k, writer = offset, None
    try:
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(requests[k % len(requests)])
            k += 1
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                lower = head.lower()
                at = lower.find(b"\r\ncontent-length:")
                await reader.readexactly(int(lower[at + 17:lower.index(b"\r\n", at + 2)]))
                status = int(head[9:12])
                if b"\r\nconnection: close" in lower:
                    writer.close()
                    writer = None
            except (ConnectionError, asyncio.IncompleteReadError):
                writer.close()
                writer, status = None, 0
            t1 = time.perf_counter()
            if t0 >= warm_until:
                latencies.append(t1 - t0)
                if status != 200:
                    failures.append(status)
    finally:
        if writer is not None:
            writer.close()


def load(port: int, payloads: list[bytes], concurrency: int, seconds: float, warmup: float) -> dict:
    import asyncio

    async def run() -> dict:
        latencies: list[float] = []
        failures: list[int] = []
        start = time.perf_counter()
        await asyncio.gather(*(_client(port, payloads, i, start + warmup, start + warmup + seconds, latencies, failures)
                               for i in range(concurrency)))
        latencies.sort()
        n = len(latencies)
        return {"requests": n, "failed": len(failures), "rps": n / seconds, "failures": sorted(set(failures)),
                "p50_ms": 1000 * latencies[n // 2], "p99_ms": 1000 * latencies[min(n - 1, int(n * 0.99))]}

    try:
        import uvloop

        return uvloop.run(run())
    except ImportError:
        return asyncio.run(run())


def _cpu(pid: int) -> float:
    """CPU seconds of a process and its children (the parse worker)."""
    import psutil

    p = psutil.Process(pid)
    total = sum(p.cpu_times()[:2])
    for c in p.children(recursive=True):
        try:
            total += sum(c.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


class RssPeak(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stop.wait(0.1):
            try:
                total = self.proc.memory_info().rss
                for c in self.proc.children(recursive=True):
                    total += c.memory_info().rss
            except psutil.NoSuchProcess:
                return
            self.peak = max(self.peak, total)


def bench_abuse(seconds: float = 4.0, repeats: int = 3, concurrency: int = 8, rows: int = 10,
                home: Path | None = None) -> dict:
    from serving import _free_port, _wait, bodies, prepare

    from daybreak.deploy._serve import MAX_BODY_BYTES

    saved_home = os.environ.get("DAYBREAK_HOME")
    with tempfile.TemporaryDirectory(prefix="dbabuse") as tmp:
        home = Path(home or tmp)
        home.mkdir(parents=True, exist_ok=True)
        prep = prepare(home)
        import yaml

        port = _free_port()
        conf = prep["spec"].model_dump(mode="json")
        conf["serving"].update(port=port)
        spec_file = home / "abuse-spec.yaml"
        spec_file.write_text(yaml.safe_dump(conf))
        env = {**os.environ, "DAYBREAK_HOME": str(home), "DAYBREAK_STORE": str(home / "store_abuse")}
        env.pop("DAYBREAK_SERVE_TOKEN", None)
        log = open(home / "abuse-serve.log", "w")  # noqa: SIM115 - the server's log, closed below
        proc = subprocess.Popen([str(BIN / "daybreak"), "serve", "--spec", str(spec_file)], env=env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=home)
        try:
            _wait(f"http://127.0.0.1:{port}/ping", proc)
            payloads = bodies(prep, rows)
            huge = big_body(prep["columns"], prep["rows"], 60 * 2**20)
            biggest = big_body(prep["columns"], prep["rows"], MAX_BODY_BYTES - 1024)
            print(f"abuse: bodies of {len(huge) / 2**20:.1f} MiB ({huge.count(b'],[') + 1} rows) and "
                  f"{len(biggest) / 2**20:.1f} MiB ({biggest.count(b'],[') + 1} rows)", flush=True)
            ctx = multiprocessing.get_context("fork")
            rounds: dict[str, list[dict]] = {p: [] for p in PHASES}
            for k in range(repeats):
                for phase in PHASES:
                    stop, manager = ctx.Event(), ctx.Manager()
                    counts = manager.dict()
                    body = biggest if phase == "max accepted" else huge
                    procs = [] if phase == "unloaded" else [
                        ctx.Process(target=abuser, args=(port, body, phase == "60MiB chunked", stop, counts))
                        for _ in range(4)]
                    for p in procs:
                        p.start()
                    rss = RssPeak(proc.pid)
                    rss.start()
                    cpu0 = _cpu(proc.pid)
                    try:
                        r = load(port, payloads, concurrency, seconds, warmup=1.0)
                    finally:
                        stop.set()
                        for p in procs:
                            p.join(timeout=180)
                        rss.stop.set()
                        rss.join()
                    r["server_cpu_s"] = _cpu(proc.pid) - cpu0
                    got = dict(counts)
                    r["abusers_cpu_s"] = sum(v for k, v in got.items() if k.startswith("cpu"))
                    r["abusers"] = {k: v for k, v in got.items() if not k.startswith("cpu")}
                    r["peak_rss_mb"] = rss.peak / 2**20
                    manager.shutdown()
                    rounds[phase].append(r)
                    print(f"abuse [{k + 1}/{repeats}] {phase:>15}: {r['rps']:7.1f} req/s, p50 {r['p50_ms']:6.1f} ms, "
                          f"p99 {r['p99_ms']:7.1f} ms, failed {r['failed']} of {r['requests']}; abusers answered "
                          f"{r['abusers']}; peak RSS {r['peak_rss_mb']:.0f} MB; CPU s: server "
                          f"{r['server_cpu_s']:.1f}, abusers {r['abusers_cpu_s']:.1f}", flush=True)
                    if proc.poll() is not None:
                        raise RuntimeError(f"the server exited with {proc.returncode} during {phase}")
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
            if saved_home is None:
                os.environ.pop("DAYBREAK_HOME", None)
            else:
                os.environ["DAYBREAK_HOME"] = saved_home
    out = {"seconds": seconds, "repeats": repeats, "concurrency": concurrency, "rows": rows, "phases": {}}
    base = rounds["unloaded"]
    for phase in PHASES:
        rs = rounds[phase]
        out["phases"][phase] = {
            "rps": statistics.median(r["rps"] for r in rs), "p50_ms": statistics.median(r["p50_ms"] for r in rs),
            "p99_ms": statistics.median(r["p99_ms"] for r in rs),
            "p99_ratio": statistics.median(r["p99_ms"] / b["p99_ms"] for r, b in zip(rs, base, strict=False)),
            "rps_ratio": statistics.median(r["rps"] / b["rps"] for r, b in zip(rs, base, strict=False)),
            "failed": sum(r["failed"] for r in rs), "requests": sum(r["requests"] for r in rs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "server_cpu_s": statistics.median(r["server_cpu_s"] for r in rs),
            "abusers_cpu_s": statistics.median(r["abusers_cpu_s"] for r in rs),
            "abusers": {s: sum(r["abusers"].get(s, 0) for r in rs) for s in {s for r in rs for s in r["abusers"]}},
            "rounds": rs}
    return out


def abuse_lines(r: dict) -> list[str]:
    lines = [f"Normal clients ({r['concurrency']} connections, {r['rows']}-row requests) while 4 abusers send "
             f"huge bodies, {r['seconds']:g} s per phase, median of {r['repeats']} rounds; ratios to the unloaded "
             f"phase of the same round (goal: p99 at most 2x while 4 clients send 60 MiB bodies):", "",
             "| phase | requests/s | p50 (ms) | p99 (ms) | p99 / unloaded | throughput / unloaded | failed | "
             "abusers answered | peak RSS (MB) | CPU s, server / abusers |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for phase, s in r["phases"].items():
        answered = ", ".join(f"{k}: {v}" for k, v in sorted(s["abusers"].items())) or "-"
        lines.append(f"| {phase} | {s['rps']:.1f} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | {s['p99_ratio']:.2f}x | "
                     f"{s['rps_ratio']:.2f}x | {s['failed']} of {s['requests']} | {answered} | "
                     f"{s['peak_rss_mb']:.0f} | {s['server_cpu_s']:.1f} / {s['abusers_cpu_s']:.1f} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=4.0, help="measured seconds per phase and round")
    ap.add_argument("--repeats", type=int, default=3, help="rounds (each runs every phase)")
    ap.add_argument("--concurrency", type=int, default=8, help="normal clients' connections")
    ap.add_argument("--rows", type=int, default=10, help="rows per normal request")
    ap.add_argument("--home", type=Path, help="keep the prepared home here; reused on the next run")
    args = ap.parse_args()
    from common import print_header

    print_header("normal clients under abusive ones", args.repeats)
    r = bench_abuse(args.seconds, args.repeats, args.concurrency, args.rows, args.home)
    print(json.dumps({k: v for k, v in r.items() if k != "phases"} | {
        "phases": {p: {k: v for k, v in s.items() if k != "rounds"} for p, s in r["phases"].items()}}, indent=1))
    print("\n".join(abuse_lines(r)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
