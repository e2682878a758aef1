"""`make bench`: each daybreak stage against a plain baseline, in the same run, as ratios.

Writes benchmarks/RESULTS.md and benchmarks/results.json. Figures are medians of --repeats runs;
the machine (cores, memory) and versions are printed with them. Absolute seconds are noise on a
shared machine; the ratio to the baseline measured alongside is the figure that matters.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from common import machine, median_of, print_header  # noqa: E402


def median_time(fn, repeats: int) -> float:
    return median_of(fn, repeats)[0]


def bench_stage(repeats: int) -> dict:
    """Staging a day (read CSV under the contract, validate, write Parquet, publish) vs
    plain pyarrow read_csv + write_table of the same file."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from daybreak.demo import build_flights_landing
    from daybreak.infra.context import RunContext
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

    from daybreak.demo import build_flights_landing
    from daybreak.infra.context import RunContext
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
    from airflow_parse import bench_parse

    r = bench_parse(repeats)
    daily = r["files"]["daybreak_daily_retrain.py"]
    return {"name": "DAG file parse vs empty DAG (DagBag in a forked child, airflow already imported)",
            "baseline_s": r["empty_median_s"], "daybreak_s": daily["median_s"],
            "ratio": daily["median_ratio_to_empty"], "repeats": repeats,
            "other_files": {f: v for f, v in r["files"].items() if f != "daybreak_daily_retrain.py"},
            "heavy_modules_imported": daily["heavy_modules_imported"]}


def section(title: str, repeats: int | str, fn, *args, **kwargs) -> tuple[dict | None, dict]:
    """Run one benchmark: its header first, then its figures; a failure is recorded (and makes
    the exit status non-zero) but the other benchmarks still run."""
    print_header(title, repeats)
    t0 = time.perf_counter()
    try:
        out, err = fn(*args, **kwargs), None
    except Exception as e:
        import traceback

        traceback.print_exc()
        out, err = None, f"{type(e).__name__}: {e}"
    took = time.perf_counter() - t0
    print(f"== {title}: {took:.0f}s{'; FAILED: ' + err if err else ''}", flush=True)
    return out, {"title": title, "seconds": round(took), "load_after": round(os.getloadavg()[0], 2), "error": err}


def kept_sections(path: Path, lines: list[str]) -> list[str]:
    """Sections of the previous RESULTS.md this run does not write (measured by their own scripts,
    e.g. benchmarks/gate_power.py), kept as they were."""
    if not path.exists():
        return []
    written = {line for line in lines if line.startswith("## ")}
    kept: list[str] = []
    keep = False
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            keep = line not in written
        if keep:
            kept.append(line)
    return ["", *kept] if kept else []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5, help="repeats of the staging and DAG-parse benchmarks")
    ap.add_argument("--parse-repeats", type=int, default=15, help="samples per DAG file (forked children)")
    ap.add_argument("--feature-rows", type=int, nargs="*", default=[100_000, 1_000_000, 10_000_000],
                    help="sizes for the feature-step benchmark (none: skip it)")
    ap.add_argument("--feature-repeats", type=int, nargs="+", default=[5, 3, 2],
                    help="rounds of the feature benchmark: one number, or one per size (default: 5 at 100k "
                         "rows, whose runs take a tenth of a second and vary most on a shared machine, 3 at 1M, "
                         "2 at 10M)")
    ap.add_argument("--train-rows", type=int, default=1_000_000,
                    help="rows for the training benchmark (0: skip it)")
    ap.add_argument("--train-repeats", type=int, default=2)
    ap.add_argument("--gate-rows", type=int, default=1_000_000,
                    help="holdout rows for the gate's bootstrap benchmark (0: skip it)")
    ap.add_argument("--gate-repeats", type=int, default=3)
    ap.add_argument("--serve-seconds", type=float, default=4.0,
                    help="measured seconds per server, request size and round in the serving benchmark (0: skip it)")
    ap.add_argument("--serve-repeats", type=int, default=5)
    ap.add_argument("--abuse-seconds", type=float, default=4.0,
                    help="measured seconds per phase and round of the abusive-clients benchmark (0: skip it)")
    ap.add_argument("--abuse-repeats", type=int, default=3)
    ap.add_argument("--online-seconds", type=float, default=2.0,
                    help="measured seconds per kind of request, size and round in the online-features benchmark "
                         "(0: skip it, materialize too)")
    ap.add_argument("--online-repeats", type=int, default=3)
    ap.add_argument("--online-materialize-rows", type=int, default=1_000_000,
                    help="scaled flights rows the online benchmark materializes (0: skip that part)")
    ap.add_argument("--e2e-days", type=int, default=5, help="timed days of the end-to-end cycle (0: skip it)")
    ap.add_argument("--out", type=Path, default=HERE, help="where RESULTS.md, results.json and the PNG go")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from abuse import bench_abuse
    from e2e import bench_e2e
    from features import bench_features, growth, plot, repeats_label, verdicts
    from gate import bench_gate
    from intervals import bench_intervals
    from online import bench_online
    from serving import bench_serving
    from training import bench_training

    started = time.perf_counter()
    info = machine()
    print(f"machine: {info}", flush=True)
    sections, results = [], []
    for title, fn in (("staging, 31 small daily files", bench_stage), ("staging, one large drop", bench_stage_big),
                      ("DAG parse", bench_dag_parse)):
        n = args.parse_repeats if fn is bench_dag_parse else args.repeats
        r, meta = section(title, n, fn, n)
        sections.append(meta)
        if r:
            r["repeats"] = n
            results.append(r)
            rate = (f" ({r['daybreak_rows_per_s']:,.0f} vs {r['baseline_rows_per_s']:,.0f} rows/s)"
                    if "rows" in r else "")
            target = f", target <= {r['target_ratio']:.2f}x" if "target_ratio" in r else ""
            print(f"{r['name']}: daybreak {r['daybreak_s']:.3f}s vs baseline {r['baseline_s']:.3f}s "
                  f"= {r['ratio']:.2f}x{rate}{target}", flush=True)
    out: dict = {"machine": info, "repeats": args.repeats, "results": results}
    plan = [
        ("features", "feature step vs pandas, polars (eager, lazy) and DuckDB",
         " ".join(map(str, args.feature_repeats)), args.feature_rows,
         lambda: bench_features(args.feature_rows, args.feature_repeats)),
        ("training", "train step vs raw xgb.train; out-of-core memory", args.train_repeats, args.train_rows,
         lambda: bench_training(args.train_rows, args.train_repeats)),
        ("gate", "gate bootstrap vs one evaluation", args.gate_repeats, args.gate_rows,
         lambda: bench_gate(args.gate_rows, repeats=args.gate_repeats)),
        ("intervals", "analytic and cluster intervals vs one evaluation", args.gate_repeats, args.gate_rows,
         lambda: bench_intervals(args.gate_rows, repeats=args.gate_repeats)),
        ("serving", "serving vs mlflow models serve", args.serve_repeats, args.serve_seconds,
         lambda: bench_serving(seconds=args.serve_seconds, repeats=args.serve_repeats)),
        ("abuse", "normal clients under abusive ones", args.abuse_repeats, args.abuse_seconds,
         lambda: bench_abuse(seconds=args.abuse_seconds, repeats=args.abuse_repeats)),
        ("online", "online features: raw rows vs precomputed, materialize", args.online_repeats, args.online_seconds,
         lambda: bench_online(seconds=args.online_seconds, repeats=args.online_repeats,
                              materialize_rows=args.online_materialize_rows)),
        ("e2e", "end-to-end daily cycle, real flights", args.e2e_days, args.e2e_days,
         lambda: bench_e2e(args.e2e_days)),
    ]
    for key, title, repeats, enabled, fn in plan:
        if not enabled:
            out[key] = {}
            continue
        out[key], meta = section(title, repeats, fn)
        out[key] = out[key] or {}
        sections.append(meta)
        print(json.dumps(out[key], indent=1, default=str)[:4000], flush=True)
    png = None
    if out["features"]:
        out["features_verdicts"] = verdicts(out["features"])
    if len(out["features"]) > 1:
        out["features_growth"] = growth(out["features"])
        png = plot(out["features"], args.out / "scale_curves.png",
                   title=f"{info['cores']} cores, {info['memory_gib']} GiB; {repeats_label(out['features'])} "
                         "(each run a fresh process); daybreak (auto): as a user runs it, no Ray running; "
                         "daybreak on Ray: a local Ray started and warmed before the clock")
        print(f"wrote {png}", flush=True)
    total = time.perf_counter() - started
    out["sections"] = sections
    out["total_s"] = round(total)
    (args.out / "results.json").write_text(json.dumps(out, indent=2, default=str))
    results_md = args.out / "RESULTS.md"
    lines = report(out, args, png)
    results_md.write_text("\n".join(lines + kept_sections(results_md, lines)) + "\n")
    print(f"wrote {args.out / 'RESULTS.md'}; {total / 60:.1f} min in all", flush=True)
    return 1 if any(m["error"] for m in sections) else 0


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return f" {metadata.version(dist)}"
    except metadata.PackageNotFoundError:
        return " (not installed: skipped)"


def report(out: dict, args, png: Path | None) -> list[str]:
    from abuse import abuse_lines
    from e2e import e2e_lines
    from features import feature_table, repeats_label
    from gate import gate_lines
    from intervals import intervals_lines
    from online import online_lines
    from serving import serving_lines
    from training import training_lines

    info = out["machine"]
    vers = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    lines = ["# Benchmark results", "",
             f"Written by `make bench` (`benchmarks/run.py`) in {out['total_s'] / 60:.1f} min. Machine: "
             f"{info['cores']} cores ({info['cpu']}), {info['memory_gib']} GiB, {info['platform']}, load average "
             f"{info['load_average_1m']} at the start (shared with other work). Python {info['python']}; {vers}.",
             "", "Every figure is a median of the repeats given with it; every baseline was measured in the same run. "
             "Absolute seconds vary with the machine's load; the ratios are the figures to quote.", "",
             f"## Staging (median of {args.repeats}) and DAG parsing (median of {args.parse_repeats})", "",
             "| benchmark | daybreak (s) | baseline (s) | ratio |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['name']} | {r['daybreak_s']:.3f} | {r['baseline_s']:.3f} | {r['ratio']:.2f}x |"
              for r in out["results"]]
    parse = next((r for r in out["results"] if "other_files" in r), None)
    if parse:
        others = ", ".join(f"{f} {v['median_ratio_to_empty']:.2f}x" for f, v in parse["other_files"].items())
        lines += ["", f"Other DAG files vs the empty DAG: {others}. Heavy modules imported by the daily DAG's parse: "
                      f"{', '.join(parse['heavy_modules_imported']) or 'none'}."]
    if out["features"]:
        lines += ["", f"## Feature step ({repeats_label(out['features'])})", "",
                  "Flights resampled to N rows over the 9 days the longest window reads; the features of the last "
                  "day computed, each in its own fresh process, by daybreak three ways (auto: `build_features` as a "
                  "user calls it, with no Ray running, daybreak choosing in process or Ray; forced on a local Ray "
                  "started and warmed before the clock; forced in process), and by what a user would write "
                  "instead: eager pandas (merge_asof), eager polars (join_asof), lazy polars (scan_parquet ... "
                  f"sink_parquet on the streaming engine) and DuckDB{_version('duckdb')} (one SQL statement: "
                  "RANGE window frames over the history summed per key and time, ASOF LEFT JOIN), all reading "
                  "the same staged Parquet and writing Parquet; every output checked equal to daybreak's, value by "
                  "value. Peak memory: summed PSS of the "
                  "process tree sampled every 0.2 s (runs under a second can be under-sampled).", "",
                  *feature_table(out["features"])]
        if png:
            lines += ["", f"![feature step: time and peak memory vs rows]({png.name})"]
    if out["training"]:
        lines += ["", f"## Train step (median of {args.train_repeats}; out-of-core runs once each)", "",
                  *training_lines(out["training"])]
    if out["gate"]:
        lines += ["", "## Gate", "", *gate_lines(out["gate"])]
    if out.get("intervals"):
        lines += ["", "## Gate: analytic intervals (issue 22)", "", *intervals_lines(out["intervals"])]
    if out["serving"]:
        lines += ["", "## Serving", "", *serving_lines(out["serving"])]
    if out.get("abuse"):
        lines += ["", "## Abusive clients", "", *abuse_lines(out["abuse"])]
    if out.get("online"):
        lines += ["", "## Online features", "", *online_lines(out["online"])]
    if out["e2e"]:
        lines += ["", "## End-to-end daily cycle", "", *e2e_lines(out["e2e"])]
    lines += ["", "## Run", "", "| benchmark | wall time (s) | load average after | result |",
              "| --- | ---: | ---: | --- |"]
    lines += [f"| {m['title']} | {m['seconds']} | {m['load_after']} | "
              f"{('FAILED: ' + m['error']) if m['error'] else 'ok'} |"
              for m in out["sections"]]
    return lines


if __name__ == "__main__":
    sys.exit(main())
