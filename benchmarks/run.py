"""`make bench`: each daybreak stage against a plain baseline, in the same run, as ratios.

Writes benchmarks/RESULTS.md and benchmarks/results.json. Figures are medians of --repeats runs;
the machine (cores, memory) and versions are printed with them. Absolute seconds are noise on a
shared machine; the ratio to the baseline measured alongside is the figure that matters.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_stage(repeats: int) -> dict:
    """Staging a day (read CSV under the contract, validate, write Parquet, publish) vs
    plain pyarrow read_csv + write_table of the same file."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from daybreak.context import RunContext
    from daybreak.datasets import build_flights_landing
    from daybreak.spec import load_spec
    from daybreak.stage import stage

    spec = load_spec(ROOT / "specs" / "flights.yaml")
    days = [date(2013, 1, 1) + timedelta(days=k) for k in range(31)]
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        build_flights_landing(store / "landing", start=days[0], end=days[-1])
        files = [store / "landing" / "flights" / f"{d}.csv" for d in days]

        def baseline() -> None:
            out = Path(tmp) / "plain"
            out.mkdir(exist_ok=True)
            for f in files:
                pq.write_table(pacsv.read_csv(f), out / f"{f.stem}.parquet", compression="zstd")

        def daybreak_stage() -> None:
            import shutil

            shutil.rmtree(store / "staged", ignore_errors=True)  # force real work, no idempotent skip
            only_flights = spec.model_copy(update={"sources": {"flights": spec.sources["flights"]}})
            for d in days:
                stage(only_flights, RunContext.create(d, store=str(store), tracking_uri="sqlite:///unused.db"))

        base = median_time(baseline, repeats)
        ours = median_time(daybreak_stage, repeats)
        rows = sum(pacsv.read_csv(f).num_rows for f in files)
    return {"name": f"stage 31 daily files of flights ({rows} rows, full contract) vs pyarrow read+write",
            "rows": rows, "baseline_s": base, "daybreak_s": ours, "ratio": ours / base,
            "daybreak_rows_per_s": rows / ours, "baseline_rows_per_s": rows / base, "target_ratio": 1.25}


def bench_stage_big(repeats: int) -> dict:
    """One large, clean drop: 2013-01-02's 943 flights repeated 300 times with distinct flight
    numbers (282,900 rows), staged under the full contract."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from daybreak.context import RunContext
    from daybreak.datasets import build_flights_landing
    from daybreak.spec import load_spec
    from daybreak.stage import stage

    spec = load_spec(ROOT / "specs" / "flights.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        build_flights_landing(Path(tmp) / "days", start=date(2013, 1, 2), end=date(2013, 1, 2))
        lines = (Path(tmp) / "days" / "flights" / "2013-01-02.csv").read_text().splitlines(keepends=True)
        big = store / "landing" / "big" / "2013-01-02.csv"
        big.parent.mkdir(parents=True)
        with open(big, "w") as out:
            out.write(lines[0])
            for k in range(300):
                for ln in lines[1:]:
                    parts = ln.split(",")
                    parts[10] = str(int(parts[10]) + 10_000 * k)  # flight number: keeps the key unique
                    out.write(",".join(parts))
        src = spec.sources["flights"].model_copy(update={
            "path": "landing/big/{date}.csv", "rows": spec.sources["flights"].rows.model_copy(update={"max": None})})
        one = spec.model_copy(update={"sources": {"flights": src}})

        def baseline() -> None:
            pq.write_table(pacsv.read_csv(big), Path(tmp) / "plain.parquet", compression="zstd")

        def daybreak_stage() -> None:
            import shutil

            shutil.rmtree(store / "staged", ignore_errors=True)
            out = stage(one, RunContext.create("2013-01-02", store=str(store), tracking_uri="sqlite:///unused.db"))
            assert out["rows_quarantined"] == 0, out

        base = median_time(baseline, repeats)
        ours = median_time(daybreak_stage, repeats)
        rows = pacsv.read_csv(big).num_rows
    return {"name": f"stage one clean CSV drop of {rows} rows (full contract) vs pyarrow read+write", "rows": rows,
            "baseline_s": base, "daybreak_s": ours, "ratio": ours / base, "daybreak_rows_per_s": rows / ours,
            "baseline_rows_per_s": rows / base, "target_ratio": 1.25}


def bench_dag_parse(repeats: int) -> dict:
    """Parsing dags/daybreak_daily_retrain.py vs an empty DAG file (``airflow_parse.py``)."""
    sys.path.insert(0, str(HERE))
    from airflow_parse import bench_parse

    r = bench_parse(repeats)
    daily = r["files"]["daybreak_daily_retrain.py"]
    return {"name": "DAG file parse vs empty DAG (DagBag, airflow already imported)", "baseline_s": r["empty_median_s"],
            "daybreak_s": daily["median_s"], "ratio": daily["median_ratio_to_empty"]}


def machine() -> dict:
    import pyarrow

    import daybreak

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cores": os.cpu_count(), "memory_gib": round(mem, 1), "python": platform.python_version(),
            "pyarrow": pyarrow.__version__, "daybreak": daybreak.__version__}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--feature-rows", type=int, nargs="*", default=[1_000_000, 10_000_000],
                    help="sizes for the feature-step benchmark (none: skip it)")
    ap.add_argument("--train-rows", type=int, default=1_000_000,
                    help="rows for the training benchmark (0: skip it)")
    ap.add_argument("--gate-rows", type=int, default=1_000_000,
                    help="holdout rows for the gate's bootstrap benchmark (0: skip it)")
    ap.add_argument("--serve-seconds", type=float, default=10.0,
                    help="measured seconds per server and request size in the serving benchmark (0: skip it)")
    args = ap.parse_args()
    info = machine()
    print(f"machine: {info}; median of {args.repeats} runs", flush=True)
    results = []
    for bench in (bench_stage, bench_stage_big, bench_dag_parse):
        r = bench(args.repeats)
        results.append(r)
        rate = f" ({r['daybreak_rows_per_s']:,.0f} vs {r['baseline_rows_per_s']:,.0f} rows/s)" if "rows" in r else ""
        target = f", target <= {r['target_ratio']:.2f}x" if "target_ratio" in r else ""
        print(f"{r['name']}: daybreak {r['daybreak_s']:.3f}s vs baseline {r['baseline_s']:.3f}s "
              f"= {r['ratio']:.2f}x{rate}{target}", flush=True)
    sys.path.insert(0, str(HERE))
    from features import bench_features, feature_table

    feats = bench_features(args.feature_rows) if args.feature_rows else {}
    from training import bench_training, training_lines

    train = bench_training(args.train_rows) if args.train_rows else {}
    from gate import bench_gate, gate_lines

    gate = bench_gate(args.gate_rows) if args.gate_rows else {}
    from serving import bench_serving, serving_lines

    serving = bench_serving(seconds=args.serve_seconds) if args.serve_seconds else {}
    (HERE / "results.json").write_text(json.dumps({"machine": info, "repeats": args.repeats, "results": results,
                                                   "features": feats, "training": train, "gate": gate,
                                                   "serving": serving}, indent=2))
    lines = ["# Benchmark results", "", f"Machine: {info}. Median of {args.repeats} runs.", "",
             "| benchmark | daybreak (s) | baseline (s) | ratio |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['name']} | {r['daybreak_s']:.3f} | {r['baseline_s']:.3f} | {r['ratio']:.2f}x |" for r in results]
    if feats:
        lines += ["", "Feature step, one logical date over N staged rows (one run each, Ray already running):", "",
                  *feature_table(feats)]
    if train:
        lines += ["", *training_lines(train)]
    if gate:
        lines += ["", *gate_lines(gate)]
    if serving:
        lines += ["", *serving_lines(serving)]
    (HERE / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {HERE / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
