"""`make demo`: build the flights landing zone and run the Airflow DAG in process for 14 days."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_dag():
    path = ROOT / "dags" / "daybreak_daily_retrain.py"
    mod_spec = importlib.util.spec_from_file_location("daybreak_daily_retrain", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.dag


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--spec", default=str(ROOT / "specs" / "flights.yaml"))
    ap.add_argument("--start", default="2013-01-01")
    ap.add_argument("--days", type=int, default=14)
    args = ap.parse_args()

    from daybreak.cli import setup_logging, summary_line
    from daybreak.cycle import day_summary
    from daybreak.demo import build_flights_landing
    from daybreak.infra.context import RunContext, daybreak_home
    from daybreak.spec import load_spec

    setup_logging()
    import logging

    logging.getLogger().setLevel(logging.WARNING)  # the demo prints its own summary lines
    spec = load_spec(args.spec)
    start = date.fromisoformat(args.start)
    end = start + timedelta(days=args.days - 1)
    ctx0 = RunContext.create(start)
    landing = ctx0.store.path("landing")
    res = build_flights_landing(landing, start=start - timedelta(days=7), end=end)
    print(f"landing zone: {res['flights']} flights in {res['flight_days']} daily files under {landing}", flush=True)

    # Airflow and Ray log every task in detail; keep that in a file and the terminal for the summary.
    log_path = daybreak_home() / "demo.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = os.fdopen(os.dup(1), "w", buffering=1)
    with open(log_path, "a") as log_file:
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
    print(f"running the Airflow DAG daybreak_daily_retrain in process (dag.test) for {args.days} days; "
          f"task logs: {log_path}", file=out)
    g = spec.gate
    rule = (f"beat the champion by more than {g.margin}" if g.compare == "improve"
            else f"lose at most {g.margin} to the champion")
    conf = f" at {g.bootstrap.level:.0%} confidence" if g.bootstrap else ""
    print(f"metric: {g.metric} on each day's flights (the holdout); gate: floor {g.floor}, candidate must {rule}{conf}",
          file=out)

    dag = load_dag()
    from airflow.utils.state import DagRunState

    for k in range(args.days):
        day = start + timedelta(days=k)
        t0 = time.monotonic()
        dr = dag.test(logical_date=datetime(day.year, day.month, day.day, tzinfo=UTC),
                      run_conf={"spec": args.spec})
        took = time.monotonic() - t0
        if dr is None or dr.state != DagRunState.SUCCESS:
            print(f"{day}: DAG run failed ({getattr(dr, 'state', None)}); see {log_path}", file=out)
            return 1
        print(f"{summary_line(day_summary(spec, RunContext.create(day)))}  ({took:.0f}s)", file=out)

    home = daybreak_home()
    print("\nDone. Next:", file=out)
    print(f"  MLflow UI:    .venv/bin/mlflow ui --backend-store-uri sqlite:///{home}/mlflow.db --port 5000", file=out)
    print(f"  Serve model:  DAYBREAK_HOME={home} .venv/bin/daybreak serve --spec {args.spec}", file=out)
    print("                then: curl -s localhost:5055/version", file=out)
    print(f"  History:      DAYBREAK_HOME={home} .venv/bin/daybreak history --spec {args.spec}", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
