"""Where Ray starts to pay for the feature step: in process against a running local Ray, by size.

    python benchmarks/crossover.py [--rows 100000 300000 1000000 3000000] [--repeats 3] [--pandas]

For each size it generates and stages scaled flights (``benchmarks/features.py``'s ``generate``:
the same data as the feature benchmark), then times the features for the last day, each run in a
fresh process that has imported what it needs and says READY before the clock starts:

* process: ``build_features(in_process=True)``: the same dataflow on a thread pool in this process;
* ray: ``build_features(in_process=False)`` on a local Ray that is already running and warm
  (workers up, daybreak imported): what a long-lived driver sees, the best case for Ray;
* polars: ``benchmarks/features.py``'s eager polars implementation, the single-node reference
  (and pandas with ``--pandas``).

The implementations run interleaved, round by round (process, ray, polars, ...), so a neighbour's
load on the shared cores falls on all of them alike; the load average is printed with every run.
The figures are each implementation's median over the rounds. The in-process and Ray outputs must
be the same bytes (file by file) before any figure is reported. ``--cold`` also times, once per
size, Ray in a process that has not started it yet (what a CLI or an Airflow task pays).

The default threshold of ``daybreak.infra.compute`` (``DAYBREAK_RAY_MIN_ROWS``) is set from this
measurement: the smallest size at which a warm Ray beats the in-process path.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from glob import glob
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import features as fb  # noqa: E402  (benchmarks/features.py: data generation, polars, pandas)


def _context():
    from daybreak.infra.context import RunContext

    return RunContext.create(fb.DAY, run_id=f"cross-{time.time_ns()}")


def run_process(home: Path, out: Path, ready) -> None:
    from daybreak.features import build_features

    os.environ["DAYBREAK_HOME"] = str(home)
    spec = fb.scaled_spec()
    ready()
    res = build_features(spec, _context(), in_process=True)
    out.write_text(json.dumps({"uri": res["uri"], "rows": res["rows"], "skipped": res.get("skipped", False)}))


def run_ray(home: Path, out: Path, ready, warm: bool = True) -> None:
    import ray

    from daybreak.features import build_features
    from daybreak.infra.compute import ensure_ray

    os.environ["DAYBREAK_HOME"] = str(home)
    spec = fb.scaled_spec()
    if warm:
        ensure_ray("local")

        def warm_up(batch):  # workers up, with daybreak and pyarrow imported
            import daybreak.features._build  # noqa: F401

            return batch

        ray.data.range(64, override_num_blocks=8).map_batches(warm_up).groupby("id").count().materialize()
    ready()
    res = build_features(spec, _context(), in_process=False)
    out.write_text(json.dumps({"uri": res["uri"], "rows": res["rows"], "skipped": res.get("skipped", False)}))


def run_cold_ray(home: Path, out: Path, ready) -> None:
    run_ray(home, out, ready, warm=False)


IMPLS = {"process": run_process, "ray": run_ray, "cold_ray": run_cold_ray, "polars": fb.run_polars,
         "pandas": fb.run_pandas}


def child(which: str, home: str, out: str) -> None:
    def ready() -> None:
        print("READY", flush=True)
        sys.stdin.readline()

    IMPLS[which](Path(home), Path(out), ready)
    print("DONE", flush=True)


def measure(which: str, home: Path, out: Path) -> dict:
    """One run in a fresh process: seconds from GO to DONE, peak PSS of the process tree."""
    load = os.getloadavg()[0]
    proc = subprocess.Popen([sys.executable, __file__, "--child", which, str(home), str(out)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    line = proc.stdout.readline()
    if line.strip() != "READY":
        proc.kill()
        raise RuntimeError(f"{which}: did not start ({line!r})")
    peak = [fb._tree_pss(proc.pid)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], fb._tree_pss(proc.pid))
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    proc.stdin.write("GO\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    proc.stdin.close()
    proc.wait(timeout=300)
    if line.strip() != "DONE":
        raise RuntimeError(f"{which}: failed (exit {proc.returncode})")
    return {"seconds": seconds, "peak_mb": peak[0] / 2**20, "load": load, **json.loads(out.read_text())}


def _digest(uri: str) -> str:
    h = hashlib.sha256()
    for p in sorted(glob(os.path.join(uri, "*.parquet"))):
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


def crossover(sizes: list[int], repeats: int, impls: list[str], cold: bool) -> dict:
    results = {}
    for rows in sizes:
        with tempfile.TemporaryDirectory(prefix="dbcross") as tmp:
            home = Path(tmp)
            info = fb.generate(home, rows)
            print(f"{info['rows']:,} rows generated and staged", flush=True)
            samples: dict[str, list[dict]] = {k: [] for k in impls}
            digests: dict[str, str] = {}
            for k in range(repeats):
                for which in impls:
                    # a published partition would make the next run a no-op (same lineage): drop it
                    shutil.rmtree(home / "store" / "features", ignore_errors=True)
                    r = measure(which, home, home / f"{which}.json")
                    if r.get("skipped"):
                        raise AssertionError(f"{which} reused a published partition")
                    if which in ("process", "ray"):
                        digests.setdefault(which, _digest(r["uri"]))
                    samples[which].append(r)
                    print(f"  [{k + 1}/{repeats}] {which:8s} {r['seconds']:6.2f}s  peak {r['peak_mb']:6.0f} MB  "
                          f"load {r['load']:.2f}", flush=True)
            if len(set(digests.values())) > 1:
                raise AssertionError(f"in process and on Ray gave different bytes at {rows:,} rows: {digests}")
            if cold:
                shutil.rmtree(home / "store" / "features", ignore_errors=True)
                r = measure("cold_ray", home, home / "cold.json")
                samples["cold_ray"] = [r]
                print(f"  cold ray {r['seconds']:6.2f}s (Ray started after GO)", flush=True)
            results[info["rows"]] = {
                k: {"seconds": round(statistics.median(s["seconds"] for s in v), 2),
                    "peak_mb": round(statistics.median(s["peak_mb"] for s in v)),
                    "samples": [round(s["seconds"], 2) for s in v],
                    "load": [round(s["load"], 2) for s in v]}
                for k, v in samples.items()}
    return results


def table(results: dict) -> list[str]:
    """Markdown: each implementation's median seconds (peak MB), Ray's time over in process, and
    in process over the best single-node baseline measured (polars, pandas)."""
    names = list(next(iter(results.values())))
    lines = ["| input rows | " + " | ".join(f"{n} s (MB)" for n in names)
             + " | ray / process | process / best baseline |",
             "| ---: | " + " | ".join("---:" for _ in names) + " | ---: | ---: |"]
    for rows, r in results.items():
        nan = float("nan")
        ratio = r["ray"]["seconds"] / r["process"]["seconds"] if "ray" in r and "process" in r else nan
        base = [r[b]["seconds"] for b in ("polars", "pandas") if b in r]
        vs = r["process"]["seconds"] / min(base) if base and "process" in r else nan
        lines.append(f"| {rows:,} | " + " | ".join(f"{r[n]['seconds']:.2f} ({r[n]['peak_mb']})" for n in names)
                     + f" | {ratio:.2f} | {vs:.2f} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 300_000, 1_000_000, 3_000_000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pandas", action="store_true", help="also time pandas")
    ap.add_argument("--cold", action="store_true", help="also time a Ray started after the clock starts")
    ap.add_argument("--impls", nargs="+", choices=["process", "ray", "polars", "pandas"],
                    help="time only these (default: process, ray, polars, and pandas with --pandas)")
    ap.add_argument("--json", type=Path, help="write the results here too")
    ap.add_argument("--child", nargs=3, metavar=("IMPL", "HOME", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return 0
    from common import print_header

    print_header("feature step: in process vs a warm local Ray", args.repeats)
    impls = args.impls or ["process", "ray", "polars", *(["pandas"] if args.pandas else [])]
    results = crossover(args.rows, args.repeats, impls, args.cold)
    print(json.dumps(results, indent=2))
    print("\n".join(table(results)))
    if "ray" in impls and "process" in impls:
        ray_wins = [rows for rows, r in results.items() if r["ray"]["seconds"] < r["process"]["seconds"]]
        print(f"smallest size at which a warm Ray beats in process: {min(ray_wins):,}" if ray_wins
              else "in process beats a warm Ray at every size measured")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
