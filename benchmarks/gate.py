"""The gate's paired bootstrap on a large holdout, against one evaluation of the metric.

    python benchmarks/gate.py --rows 1000000 --resamples 1000

For ROC AUC and log loss on N holdout rows (two close models' scores), it times:

* one evaluation of the metric with scikit-learn, the baseline;
* daybreak's vectorised paired bootstrap, `resamples` resamples of both models;
* a naive bootstrap (resample indices, call scikit-learn twice per resample), on a few
  resamples, extrapolated to `resamples`.

and reports the ratios. Both bootstraps give intervals of the same gain; the benchmark checks
they agree within Monte Carlo noise before reporting.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _data(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(rows) < 0.25).astype(np.float64)
    logit = rng.normal(0, 1, rows) + 1.2 * y
    a = 1 / (1 + np.exp(-logit))
    b = 1 / (1 + np.exp(-(logit + rng.normal(0, 0.3, rows))))  # a close rival
    return y, a, b


def bench_gate(rows: int = 1_000_000, resamples: int = 1000, naive_resamples: int = 5, repeats: int = 3) -> dict:
    """Medians: of 5 single evaluations, of `repeats` bootstraps; the naive loop is timed once
    over `naive_resamples` resamples and extrapolated."""
    import statistics

    from sklearn import metrics as skm

    from daybreak.infra.metrics import paired_bootstrap

    y, a, b = _data(rows)
    single_fn = {"roc_auc": lambda yy, p: skm.roc_auc_score(yy, p), "log_loss": lambda yy, p: skm.log_loss(yy, p)}
    out = {"rows": rows, "resamples": resamples, "repeats": repeats, "single_repeats": 5, "metrics": {}}
    for metric, fn in single_fn.items():
        singles = []
        for _ in range(5):
            t = time.perf_counter()
            fn(y, a)
            singles.append(time.perf_counter() - t)
        single = statistics.median(singles)
        boots = []
        for _ in range(repeats):
            t = time.perf_counter()
            boot = paired_bootstrap(metric, y, a, b, resamples=resamples, seed=0)
            boots.append(time.perf_counter() - t)
        vectorised = statistics.median(boots)
        rng = np.random.default_rng(1)
        gains = []
        t = time.perf_counter()
        for _ in range(naive_resamples):
            idx = rng.integers(0, rows, rows)
            ca, cb = fn(y[idx], a[idx]), fn(y[idx], b[idx])
            gains.append(ca - cb if metric == "roc_auc" else cb - ca)
        naive = (time.perf_counter() - t) / naive_resamples * resamples
        spread = boot["high"] - boot["low"]
        assert abs(np.mean(gains) - boot["gain"]) < spread, (metric, gains, boot["low"], boot["high"])
        out["metrics"][metric] = {
            "single_s": single, "bootstrap_s": vectorised, "naive_estimate_s": naive,
            "single_samples_s": singles, "bootstrap_samples_s": boots,
            "bootstrap_vs_single": vectorised / single, "naive_vs_bootstrap": naive / vectorised,
            "interval": [boot["low"], boot["high"]],
        }
        print(f"{metric}: one evaluation {single:.3f}s; paired bootstrap x{resamples} {vectorised:.1f}s "
              f"= {vectorised / single:.0f} evaluations; naive loop ~{naive:.0f}s "
              f"({naive / vectorised:.1f}x slower)", flush=True)
    return out


def gate_lines(r: dict) -> list[str]:
    lines = [f"Gate: paired bootstrap on {r['rows']:,} holdout rows x {r['resamples']} resamples (both models), "
             f"against one scikit-learn evaluation of the metric (medians: bootstrap of {r.get('repeats', 1)} runs, "
             f"single evaluation of {r.get('single_repeats', 1)}):", "",
             "| metric | one evaluation (s) | paired bootstrap (s) | bootstrap / one evaluation | "
             "naive loop (s, extrapolated) | naive / vectorised |", "| --- | --- | --- | --- | --- | --- |"]
    for m, v in r["metrics"].items():
        lines.append(f"| {m} | {v['single_s']:.3f} | {v['bootstrap_s']:.1f} | {v['bootstrap_vs_single']:.0f}x | "
                     f"{v['naive_estimate_s']:.0f} | {v['naive_vs_bootstrap']:.1f}x |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from common import print_header

    print_header("gate bootstrap vs one evaluation", args.repeats)
    r = bench_gate(args.rows, args.resamples, repeats=args.repeats)
    print("\n".join(gate_lines(r)))
    (HERE / "gate_results.json").write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
