"""How much parsing the daybreak DAG files costs Airflow's DAG processor, next to an empty DAG.

One process imports Airflow once; each sample is a child forked from it (as Airflow's DAG
processor forks a process per file) that parses one file with ``DagBag``; only the parse is
timed. Files are sampled round-robin in the same run, so machine load hits them alike; the result
is each file's median parse time and its median ratio to the empty DAG's (per round, then the
median of those ratios). It also lists heavy modules the parse imports (there should be none).

    .venv/bin/python benchmarks/airflow_parse.py [--rounds 15]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DAG_FILES = ["daybreak_daily_retrain.py", "daybreak_batch_score.py", "daybreak_approve.py"]
HEAVY = ("pyarrow", "pandas", "mlflow", "ray", "xgboost", "sklearn", "numpy")

EMPTY_DAG = '''from datetime import datetime

from airflow.sdk import dag


@dag(dag_id="empty", schedule="@daily", start_date=datetime(2013, 1, 1), catchup=False)
def empty() -> None:
    pass


empty()
'''

PROBE = rf"""
import json, os, sys, time
import airflow  # noqa: F401  (Airflow's own import is paid once per processor, not per file)
from airflow.dag_processing.dagbag import DagBag
import airflow.sdk  # noqa: F401
HEAVY = {HEAVY!r}


def parse_in_child(path):
    # A forked child parses the file, as Airflow's DAG processor does: only the parse is new work.
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        before = set(sys.modules)
        t0 = time.perf_counter()
        bag = DagBag(dag_folder=path, safe_mode=False)
        took = time.perf_counter() - t0
        heavy = [m for m in HEAVY if m in sys.modules and m not in before]
        out = {{"seconds": took, "dags": sorted(bag.dag_ids),
               "errors": {{k: str(v) for k, v in bag.import_errors.items()}}, "heavy": heavy}}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


plan = json.loads(sys.argv[1])
for path in plan["warm"]:
    parse_in_child(path)
items = list(plan["files"].items())
for k in range(plan["rounds"]):
    for name, path in items[k % len(items):] + items[:k % len(items)]:  # each file leads a round in turn
        print("RESULT " + json.dumps({{"name": name, **parse_in_child(path)}}), flush=True)
"""


def bench_parse(rounds: int) -> dict:
    """Median parse time of each DAG file and its median ratio to the empty DAG's."""
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty_dag.py"
        empty.write_text(EMPTY_DAG)
        env = {**os.environ, "AIRFLOW_HOME": str(Path(tmp) / "airflow"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
               "AIRFLOW__CORE__DAGS_FOLDER": tmp, "PYTHONWARNINGS": "ignore"}
        files = {"empty": str(empty), **{f: str(ROOT / "dags" / f) for f in DAG_FILES}}
        # one pass of every file first (warms the OS file cache and .pyc files), then `rounds`
        # round-robin passes, so machine load hits the files alike
        plan = {"warm": list(files.values()), "rounds": rounds, "files": files}
        proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(plan)], env=env, capture_output=True,
                              text=True, timeout=900)
        samples = [json.loads(ln[len("RESULT "):]) for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or len(samples) != rounds * len(files):
            raise RuntimeError(f"parsing failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        times: dict[str, list[float]] = {k: [] for k in files}
        heavy: dict[str, list[str]] = {}
        for out in samples:
            if out["errors"] or not out["dags"]:
                raise RuntimeError(f"parsing {out['name']}: no DAG or import errors: {out['errors']}")
            times[out["name"]].append(out["seconds"])
            heavy[out["name"]] = out["heavy"]
    return {
        "benchmark": "airflow_dag_parse",
        "rounds": rounds,
        "method": "one process imports airflow; each sample is a forked child parsing one file with DagBag "
                  "(as the DAG processor forks per file), timed around the parse; "
                  "files round-robin, the leading file rotating",
        "empty_median_s": round(statistics.median(times["empty"]), 4),
        "files": {
            f: {"median_s": round(statistics.median(times[f]), 4),
                "median_ratio_to_empty": round(statistics.median(
                    t / e for t, e in zip(times[f], times["empty"], strict=False)), 2),
                "heavy_modules_imported": heavy[f]}
            for f in DAG_FILES
        },
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15, help="samples per file (one forked child each)")
    rounds = ap.parse_args().rounds
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import print_header

    print_header("DAG parse vs an empty DAG", rounds)
    result = bench_parse(rounds)
    print(json.dumps(result, indent=2))
    return 0 if not any(v["heavy_modules_imported"] for v in result["files"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
