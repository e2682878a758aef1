"""How much parsing the daybreak DAG files costs Airflow's DAG processor, next to an empty DAG.

Each sample is a fresh Python process (as the DAG processor's parsing is) that imports Airflow,
then parses one file with ``DagBag`` and times only the parse. Files are sampled round-robin in
the same run, so machine load hits them alike; the result is each file's median parse time and
its median ratio to the empty DAG's (per round, then the median of those ratios). It also lists
heavy modules the parse imports (there should be none).

    .venv/bin/python benchmarks/airflow_parse.py [--rounds 7]

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

PROBE = r'''
import json, sys, time
import airflow  # noqa: F401  (Airflow's own import is paid once per processor, not per file)
from airflow.dag_processing.dagbag import DagBag
import airflow.sdk  # noqa: F401
path = sys.argv[1]
before = set(sys.modules)
t0 = time.perf_counter()
bag = DagBag(dag_folder=path, safe_mode=False)
took = time.perf_counter() - t0
heavy = [m for m in %r if m in sys.modules and m not in before]
print("RESULT " + json.dumps({"seconds": took, "dags": sorted(bag.dag_ids), "errors": {k: str(v) for k, v in bag.import_errors.items()}, "heavy": heavy}))
''' % (HEAVY,)


def sample(path: Path, env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, str(path)], env=env, capture_output=True, text=True,
                          timeout=300)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"parsing {path} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    out = json.loads(line[len("RESULT "):])
    if out["errors"] or not out["dags"]:
        raise RuntimeError(f"parsing {path}: no DAG or import errors: {out['errors']}")
    return out


def bench_parse(rounds: int) -> dict:
    """Median parse time of each DAG file and its median ratio to the empty DAG's."""
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty_dag.py"
        empty.write_text(EMPTY_DAG)
        env = {**os.environ, "AIRFLOW_HOME": str(Path(tmp) / "airflow"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
               "AIRFLOW__CORE__DAGS_FOLDER": tmp, "PYTHONWARNINGS": "ignore"}
        files = {"empty": empty, **{f: ROOT / "dags" / f for f in DAG_FILES}}
        times: dict[str, list[float]] = {k: [] for k in files}
        heavy: dict[str, list[str]] = {}
        sample(empty, env)  # warm the OS file cache and .pyc files once
        for f in DAG_FILES:
            sample(files[f], env)
        for _ in range(rounds):
            for name, path in files.items():
                out = sample(path, env)
                times[name].append(out["seconds"])
                heavy[name] = out["heavy"]
    return {
        "benchmark": "airflow_dag_parse",
        "rounds": rounds,
        "method": "fresh process per sample; DagBag(file) timed after importing airflow; files round-robin",
        "empty_median_s": round(statistics.median(times["empty"]), 4),
        "files": {
            f: {"median_s": round(statistics.median(times[f]), 4),
                "median_ratio_to_empty": round(statistics.median(t / e for t, e in zip(times[f], times["empty"])), 2),
                "heavy_modules_imported": heavy[f]}
            for f in DAG_FILES
        },
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7, help="samples per file (one fresh process each)")
    result = bench_parse(ap.parse_args().rounds)
    print(json.dumps(result, indent=2))
    return 0 if not any(v["heavy_modules_imported"] for v in result["files"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
