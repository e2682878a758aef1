"""The gate's analytic intervals against one evaluation and against the bootstrap (issue 22).

    python benchmarks/intervals.py --rows 1000000 --resamples 1000

On N holdout rows (two close models' scores, as in ``gate.py``), with and without clusters (720
"day-hours"; the champion's scores carry a shared shift per day-hour, so rows of an hour are
dependent), it times:

* one evaluation of ROC AUC (`daybreak.infra.metrics.evaluate`), the baseline;
* the analytic paired interval of the AUC gain (`interval(..., method="analytic")`: DeLong
  components, cluster-robust variance with clusters);
* the paired bootstrap of the same gain, `resamples` resamples (per cluster with clusters), once;

and reports the ratios to one evaluation and the largest |difference| between the analytic and
the bootstrap bounds, for ROC AUC and log loss. Not part of `make bench` (``run.py`` rewrites
RESULTS.md whole); its figures are quoted in RESULTS.md's "Gate: analytic intervals" section.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _data(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Labels, candidate, champion (as gate.py), day-hour clusters, and the champion with a
    per-day-hour shift of its log-odds (an hour it handles worse or better)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(rows) < 0.25).astype(np.float64)
    logit = rng.normal(0, 1, rows) + 1.2 * y
    a = 1 / (1 + np.exp(-logit))
    noise = rng.normal(0, 0.3, rows)
    b = 1 / (1 + np.exp(-(logit + noise)))
    hours = np.sort(rng.integers(0, 720, rows))  # 30 days x 24 hours, rows in event order
    shift = rng.normal(0, 0.3, 720)[hours]
    b_shocked = 1 / (1 + np.exp(-(logit + noise + shift)))
    return y, a, b, hours, b_shocked


def _median_time(fn, repeats: int) -> tuple[float, list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times, out


def bench_intervals(rows: int = 1_000_000, resamples: int = 1000, repeats: int = 5,
                    metrics_: tuple[str, ...] = ("roc_auc", "log_loss")) -> dict:
    """Medians of `repeats` for the evaluation and the analytic interval; the bootstrap once."""
    from daybreak.infra.metrics import evaluate, interval

    y, a, b, hours, b_shocked = _data(rows)
    out: dict = {"rows": rows, "resamples": resamples, "repeats": repeats, "clusters": 720, "cases": {}}
    for metric in metrics_:
        evaluate(metric, y, a), interval(metric, y, a, b, method="analytic")  # warm-up, untimed
        single, singles, _ = _median_time(lambda m=metric: evaluate(m, y, a), repeats)
        for case, champ, cl in (("rows", b, None), ("clusters", b_shocked, hours)):
            ana_s, ana_samples, ana = _median_time(
                lambda m=metric, c=champ, k=cl: interval(m, y, a, c, clusters=k, method="analytic"), repeats)
            t = time.perf_counter()
            boot = interval(metric, y, a, champ, clusters=cl, method="bootstrap", resamples=resamples, seed=0)
            boot_s = time.perf_counter() - t
            assert isinstance(ana, dict)
            diff = max(abs(ana["low"] - boot["low"]), abs(ana["high"] - boot["high"]))
            r = {"metric": metric, "case": case, "single_s": single, "single_samples_s": singles,
                 "analytic_s": ana_s, "analytic_samples_s": ana_samples, "bootstrap_s": boot_s,
                 "analytic_vs_single": ana_s / single, "bootstrap_vs_single": boot_s / single,
                 "bootstrap_vs_analytic": boot_s / ana_s, "gain": ana["value"],
                 "analytic": [ana["low"], ana["high"]], "bootstrap": [boot["low"], boot["high"]],
                 "max_bound_diff": diff, "bootstrap_undefined": boot["undefined"]}
            out["cases"][f"{metric}/{case}"] = r
            print(f"{metric} ({case}): one evaluation {single:.3f}s; analytic paired interval {ana_s:.3f}s "
                  f"= {ana_s / single:.2f}x; bootstrap x{resamples} {boot_s:.1f}s = {boot_s / single:.0f}x; "
                  f"analytic [{ana['low']:.5f}, {ana['high']:.5f}] vs bootstrap [{boot['low']:.5f}, "
                  f"{boot['high']:.5f}], max |diff| {diff:.5f}", flush=True)
    return out


def intervals_lines(r: dict) -> list[str]:
    lines = [f"Paired intervals of the gain on {r['rows']:,} holdout rows: analytic (median of {r['repeats']}) and "
             f"{r['resamples']}-resample bootstrap (once), as multiples of one evaluation of the metric (daybreak's "
             f"`evaluate`, median of {r['repeats']}); \"clusters\": {r['clusters']} day-hours, the champion's scores "
             "shifted per day-hour, cluster-robust variance and cluster bootstrap. Target: analytic at most 5x one "
             "evaluation, bounds within 0.002 of the bootstrap's.", "",
             "| metric | rows or clusters | analytic / one evaluation | bootstrap / one evaluation | "
             "bootstrap / analytic | analytic interval | bootstrap interval | max bound difference |",
             "| --- | --- | ---: | ---: | ---: | --- | --- | ---: |"]
    for v in r["cases"].values():
        ana, boot = v["analytic"], v["bootstrap"]
        lines.append(f"| {v['metric']} | {v['case']} | {v['analytic_vs_single']:.2f}x | "
                     f"{v['bootstrap_vs_single']:.0f}x | {v['bootstrap_vs_analytic']:.0f}x | "
                     f"[{ana[0]:.5f}, {ana[1]:.5f}] | [{boot[0]:.5f}, {boot[1]:.5f}] | {v['max_bound_diff']:.5f} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--metrics", nargs="+", default=["roc_auc", "log_loss"])
    ap.add_argument("--json", type=Path, help="also write the figures (and every sample) here")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from common import print_header

    print_header("gate analytic intervals vs one evaluation and the bootstrap", args.repeats)
    r = bench_intervals(args.rows, args.resamples, args.repeats, tuple(args.metrics))
    print("\n".join(intervals_lines(r)))
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
