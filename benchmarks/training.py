"""The train step against a raw xgboost script on the same data, and out-of-core memory, in one run.

    python benchmarks/training.py --rows 1000000

Feature partitions for a 7-day window are made by computing the real flights features for a few
days and resampling their rows to N in all. Then, each in its own process:

Both sides run the spec's full ``num_boost_round`` (early stopping set that high), so the
training is the daily workload the spec asks for.

* step: ``train_model`` (read the window, encode, QuantileDMatrix, xgb.train with early stopping,
  MLflow run with the model, signature, importance plot, registration);
* raw: the same window read with pyarrow, the same encoding, QuantileDMatrix, the same
  ``xgb.train`` call, and the booster saved to a file: what a hand-written script does;
* out-of-core: ``train_model`` with ``training.memory_budget_mb`` set to a sixth of the
  window's estimated in-memory size, against the in-memory step's peak; then again on twice the
  rows with the same budget, to show the peak does not follow the data.

Peak memory is the process's own maximum RSS (``VmHWM``) minus its RSS just before training,
so imports do not count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DAY = date(2013, 1, 20)  # logical date: the window is Jan 13 .. Jan 19


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _hwm_mb() -> float:
    """This process's own peak RSS (VmHWM). Not getrusage's ru_maxrss: Linux carries that over
    fork and exec, so a child started by a big parent (run.py after the feature benchmark)
    reported the parent's 1.6 GB as its own peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _spec(budget_mb: float | None = None):
    from daybreak.spec import load_spec

    spec = load_spec(ROOT / "specs" / "flights.yaml")
    # All num_boost_round rounds on both sides: resampled rows stop early after a few rounds,
    # which would measure MLflow's fixed costs rather than training.
    return spec.model_copy(update={
        "training": spec.training.model_copy(update={"memory_budget_mb": budget_mb}),
        "model": spec.model.model_copy(update={"early_stopping_rounds": spec.model.num_boost_round})})


def prepare(home: Path, rows: int) -> None:
    """Real features for the window's days, resampled to `rows` rows in all."""
    import numpy as np
    import pyarrow.parquet as pq

    from daybreak.demo import build_flights_landing
    from daybreak.features import build_features, feature_zone
    from daybreak.infra.compute import ensure_ray
    from daybreak.infra.context import RunContext
    from daybreak.stage import stage

    os.environ["DAYBREAK_HOME"] = str(home)
    build_flights_landing(home / "store" / "landing", start=DAY - timedelta(days=16), end=DAY)
    spec = _spec()
    ensure_ray("local")
    for k in range(16, -1, -1):
        stage(spec, RunContext.create(DAY - timedelta(days=k)))
    rng = np.random.default_rng(0)
    days = spec.training.window(DAY)
    for d in days:
        ctx = RunContext.create(d)
        build_features(spec, ctx)
        part = ctx.store.partition(feature_zone(spec), d)
        t = pq.read_table(part.files[0])
        big = t.take(np.sort(rng.integers(0, t.num_rows, rows // len(days))))

        def write(fs, folder, big=big, part=part):
            pq.write_table(big, f"{folder}/part-00000.parquet", filesystem=fs)
            return {**part.manifest, "rows": big.num_rows, "run_id": "bench"}

        ctx.store.publish(feature_zone(spec), d, write, run=f"bench{rows}")
    build_features(spec, RunContext.create(DAY))  # the holdout day, for completeness


def child(which: str, home: str) -> None:
    import numpy as np
    import pyarrow.parquet
    import xgboost  # noqa: F401

    os.environ["DAYBREAK_HOME"] = home
    from daybreak.infra.context import RunContext
    from daybreak.train import train_model

    ctx = RunContext.create(DAY, run_id=f"bench-{which}-{time.time_ns()}")
    if which == "raw":
        import pyarrow as pa
        import xgboost as xgb

        from daybreak.features import read_features
        from daybreak.train._fit import _xgb_params, fit_encoders
        from daybreak.train.model_code import encode, encoded_names

        spec = _spec()
        base = _rss_mb()
        t0 = time.perf_counter()
        table, _, _ = read_features(spec, ctx, spec.training.window(DAY))
        df = pa.Table.to_pandas(table).sort_values(["event_time", *spec.features.keys], kind="stable")
        n_val = max(1, int(len(df) * spec.training.validation_fraction))
        fit, val = df.iloc[:-n_val], df.iloc[-n_val:]
        feats, label = spec.features.feature_names(), spec.features.label.name
        enc = fit_encoders(fit, spec)
        names = encoded_names(feats, enc)
        dfit = xgb.QuantileDMatrix(encode(fit, feats, enc), fit[label].to_numpy(np.float32), feature_names=names,
                                   missing=np.nan)
        dval = xgb.QuantileDMatrix(encode(val, feats, enc), val[label].to_numpy(np.float32), feature_names=names,
                                   missing=np.nan, ref=dfit)
        booster = xgb.train(_xgb_params(spec), dfit, num_boost_round=spec.model.num_boost_round,
                            evals=[(dval, "val")], early_stopping_rounds=spec.model.early_stopping_rounds,
                            verbose_eval=False)
        booster[: booster.best_iteration + 1].save_model(str(Path(home) / "raw.ubj"))
        out = {"rounds": booster.best_iteration + 1}
    else:
        spec = _spec(float(which.split("=")[1]) if which.startswith("ooc=") else None)
        # each run registers under its own name: the same lineage would otherwise return the
        # version registered by the run before (exactly once)
        spec = spec.model_copy(update={"model": spec.model.model_copy(update={"name": f"bench_{which}"})})
        from daybreak.infra import registry

        registry.setup_tracking(ctx, spec.name)  # the tracking DB exists before the clock starts
        base = _rss_mb()
        t0 = time.perf_counter()
        res = train_model(spec, ctx)
        assert res["status"] == "trained", res
        out = {"out_of_core": res["out_of_core"], "val_metric": res["val_metric"]}
    seconds = time.perf_counter() - t0
    peak = _hwm_mb()
    print(json.dumps({"seconds": seconds, "peak_above_start_mb": peak - base, **out}), flush=True)


def run(which: str, home: Path) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", which, str(home)], capture_output=True, text=True,
                       env=os.environ.copy(), timeout=3600)
    if p.returncode != 0:
        raise RuntimeError(f"{which} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def bench_training(rows: int, repeats: int = 3) -> dict:
    from daybreak.train._outofcore import estimated_bytes

    with tempfile.TemporaryDirectory(prefix="dbtrain") as tmp:
        home = Path(tmp)
        t0 = time.perf_counter()
        prepare(home, rows)
        print(f"training: {rows:,} rows of features prepared in {time.perf_counter() - t0:.0f}s", flush=True)
        # alternated, median of `repeats`: these machines are shared and noisy
        pairs = [(run("raw", home), run(f"step{i}", home)) for i in range(repeats)]
        raw, step = ({k: statistics.median(p[i][k] for p in pairs) if isinstance(pairs[0][i][k], float)
                      else pairs[0][i][k]
                      for k in pairs[0][i]} for i in (0, 1))
        data_mb = estimated_bytes(_spec(), rows) / 2**20
        budget = round(data_mb / 6, 1)
        ooc = run(f"ooc={budget}", home)
    with tempfile.TemporaryDirectory(prefix="dbtrain") as tmp:  # twice the rows, the same budget
        prepare(Path(tmp), 2 * rows)
        ooc2 = run(f"ooc={budget}", Path(tmp))
    import ray

    ray.shutdown()  # prepare's local Ray: not left idle under the benchmarks that follow
    out = {"rows": rows, "repeats": repeats, "raw_s": round(raw["seconds"], 2), "step_s": round(step["seconds"], 2),
           "overhead": round(step["seconds"] / raw["seconds"] - 1, 3), "rounds": raw["rounds"],
           "estimated_window_mb": round(data_mb), "budget_mb": budget,
           "in_memory_peak_mb": round(step["peak_above_start_mb"]),
           "out_of_core_peak_mb": round(ooc["peak_above_start_mb"]),
           "out_of_core_s": round(ooc["seconds"], 2), "val_auc_in_memory": round(step["val_metric"], 4),
           "val_auc_out_of_core": round(ooc["val_metric"], 4), "out_of_core_used": ooc["out_of_core"],
           "out_of_core_peak_mb_2x_rows": round(ooc2["peak_above_start_mb"]),
           "out_of_core_s_2x_rows": round(ooc2["seconds"], 2),
           "pairs": pairs}
    return out


def training_lines(r: dict) -> list[str]:
    return [f"Train step on {r['rows']:,} rows (median of {r['repeats']}): {r['step_s']:.1f} s vs raw xgb.train "
            f"script {r['raw_s']:.1f} s "
            f"({r['overhead']:+.1%} overhead; target at most +10%); {r['rounds']} boosting rounds each.",
            f"Out of core with a {r['budget_mb']} MB budget for a window of about {r['estimated_window_mb']} MB: "
            f"peak {r['out_of_core_peak_mb']} MB above start vs {r['in_memory_peak_mb']} MB in memory, "
            f"{r['out_of_core_s']:.1f} s, validation AUC {r['val_auc_out_of_core']} vs {r['val_auc_in_memory']}; "
            f"with twice the rows and the same budget, peak {r['out_of_core_peak_mb_2x_rows']} MB "
            f"({r['out_of_core_s_2x_rows']:.1f} s)."]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("WHICH", "HOME"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return 0
    sys.path.insert(0, str(HERE))
    from common import print_header

    print_header("train step vs raw xgb.train; out-of-core memory", args.repeats)
    r = bench_training(args.rows, args.repeats)
    print(json.dumps(r, indent=2))
    print("\n".join(training_lines(r)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
