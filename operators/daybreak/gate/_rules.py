"""The gate's rules, pure: labels and predictions in, rules out. No registry, store or clock.

Every rule is a dict: ``rule`` (its name), ``kind``, ``metric``, ``value``, ``threshold``,
``verdict`` (pass, fail, warn, skip) and a ``detail`` a person reads. Kinds:

* ``size``: enough holdout rows (and rows of each class) to judge at all; failing one makes the
  decision INSUFFICIENT_DATA, and nothing else is judged;
* ``absolute``: finite predictions; floors (ceilings for lower-is-better metrics), judged on the
  interval's lower (upper) end when ``gate.floor_confidence`` says so;
* ``baseline``: beat each naive predictor of ``gate.baselines`` by more than ``baseline_margin``,
  at the interval's lower end;
* ``relative`` and ``confidence``: the gain over the champion (point, then interval) must clear
  the margin; the champion is compared only on rows it was not selected or trained on;
* ``slice``: no slice much worse than the champion;
* ``data`` (from the data checks): a failing one blocks.

Intervals come from :func:`daybreak.infra.metrics.interval`: DeLong or the CLT on per-row losses
when they apply, else the bootstrap, resampling whole clusters (``gate.bootstrap.cluster_by``;
by default the event hour), because rows of one hour share weather and traffic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from daybreak.features import DAY, EVENT_TIME
from daybreak.infra import metrics
from daybreak.infra.records import Decision
from daybreak.spec import Spec


def decide(rules: list[dict[str, Any]]) -> str:
    if any(r["kind"] == "size" and r["verdict"] == "fail" for r in rules):
        return Decision.INSUFFICIENT
    if any(r["kind"] == "data" and r["verdict"] == "fail" for r in rules):
        return Decision.BLOCKED
    return Decision.REJECT if any(r["verdict"] == "fail" for r in rules) else Decision.PROMOTE


def size_rules(spec: Spec, y: np.ndarray, clusters: np.ndarray | None = None,
               unit: str = "row") -> list[dict[str, Any]]:
    """Enough holdout rows, for classification enough of each class, and enough resampling
    clusters (when intervals are on and rows are clustered), to judge."""
    g = spec.gate
    n = len(y)
    rules = [{"rule": "min_rows", "kind": "size", "metric": None, "value": n, "threshold": g.min_rows,
              "verdict": "pass" if n >= g.min_rows else "fail",
              "detail": f"{n} holdout rows; at least {g.min_rows} (gate.min_rows) are needed to judge"}]
    if spec.model.task == "classification":
        least = int(min((y == 1).sum(), (y == 0).sum())) if n else 0
        rules.append({"rule": "min_class_rows", "kind": "size", "metric": None, "value": least,
                      "threshold": g.min_class_rows, "verdict": "pass" if least >= g.min_class_rows else "fail",
                      "detail": f"{int((y == 1).sum())} positive and {int((y == 0).sum())} negative holdout rows; "
                                f"each class needs {g.min_class_rows} (gate.min_class_rows)"})
    if clusters is not None and g.bootstrap is not None:
        k = len(np.unique(clusters))
        least = metrics.MIN_VALID_CLUSTERS
        rules.append({"rule": "min_clusters", "kind": "size", "metric": None, "value": k, "threshold": least,
                      "verdict": "pass" if k >= least else "fail",
                      "detail": f"{k} clusters of {unit} in the holdout; intervals need at least {least} "
                                "(gate.bootstrap.cluster_by, or more holdout days)"})
    return rules


def clusters_for(spec: Spec, frame: Any) -> tuple[np.ndarray | None, str]:
    """(cluster id per row or None for independent rows, the unit's name)."""
    b = spec.gate.bootstrap
    units = b.cluster_by if b is not None else []
    if units is None:  # auto: the event hour when there are enough hours to resample
        if frame is None or EVENT_TIME not in frame:
            return None, "row"
        hours = _unit(frame, "event_time:hour")
        if len(np.unique(hours)) >= metrics.MIN_VALID_CLUSTERS:
            return hours, "event_time:hour"
        return None, "row"  # e.g. daily rows of many entities, all stamped midnight: entities as units
    if not units:
        return None, "row"
    codes = pd.DataFrame({i: _unit(frame, u) for i, u in enumerate(units)})
    return codes.groupby(list(codes.columns), sort=False).ngroup().to_numpy(np.int64), "+".join(units)


def _unit(frame: Any, unit: str) -> np.ndarray:
    col, _, trunc = unit.partition(":")
    values = frame[col]
    if trunc == "day" and DAY in frame:  # the partition's date (the spec's day), not the UTC date
        values = frame[DAY].astype(str)
    elif trunc:
        values = pd.to_datetime(values, utc=True).dt.floor("h" if trunc == "hour" else "D")
    codes, _ = pd.factorize(values, use_na_sentinel=False)
    return np.asarray(codes, np.int64)


def baseline_predictions(spec: Spec, frame: Any, prior: float | None) -> dict[str, np.ndarray | None]:
    """Each baseline's predictions on the holdout rows (None: it cannot be computed, e.g. the
    prior of a version trained before the label mean was recorded and no window to read it)."""
    from daybreak.spec import evaluate

    n = 0 if frame is None else len(frame)
    if prior is None and spec.gate.metric in metrics.RANKING:
        prior = 0.5  # a constant ranks nothing: its ROC AUC is 0.5 (and PR AUC the positive rate) whatever it is
    out: dict[str, np.ndarray | None] = {}
    for b in spec.gate.baselines:
        pred: np.ndarray | None
        if b.kind == "prior":
            pred = None if prior is None else np.full(n, prior, np.float64)
        elif b.kind == "constant":
            pred = np.full(n, float(b.value or 0.0), np.float64)
        else:
            if b.kind == "feature":
                raw = pd.to_numeric(frame[b.column], errors="coerce").to_numpy(np.float64)
            else:
                import pyarrow as pa

                table = pa.Table.from_pandas(frame, preserve_index=False)
                raw = np.asarray(evaluate(str(b.expr), table).to_numpy(zero_copy_only=False), np.float64)
            pred = np.where(np.isfinite(raw), raw, np.nan if prior is None else prior)
        out[b.label()] = pred
    return out


def _confident(iv: dict[str, Any], bound: float, *, strict: bool = True, lower: bool = True) -> bool:
    """Whether the interval's lower (or upper) end clears `bound`, and the interval is one to trust:
    finite, and (bootstrap) with at most 1% of resamples where the metric is undefined."""
    end = iv["low"] if lower else iv["high"]
    if not math.isfinite(end) or iv.get("undefined", 0) > 0.01 * (iv.get("resamples") or 1):
        return False
    if lower:
        return end > bound if strict else end >= bound
    return end < bound if strict else end <= bound


History = Mapping[str, Sequence[Mapping[str, Any]]]  # quantity -> recorded daily estimates, oldest first


class Intervals:
    """The spec's interval settings, bound to one holdout's clusters, days and the recorded daily
    estimates of earlier gates (``history``: quantity -> [{"day", "metric", "unit", "value", "se",
    ...}], oldest first, the lookback's days before this holdout).

    Called with a ``key`` (the quantity; today only ``champion``, the gain over the champion),
    an interval also (a) records the quantity's estimate on this holdout in ``daily``, for the next
    gates; and (b) with ``between_days: history``, is widened by how much that estimate moved from
    gate to gate beyond its own error, over the earlier gates with a holdout of as many days
    (``metrics.added_variance``): the holdout's own error says how well it measures its own days,
    not how much the next days will differ. That spread holds the day effects (averaged over the
    holdout's days, as this estimate's are) and the two models' own difference (a seed, a sample).
    Its degrees of freedom count how few gates it was estimated from. Below MIN_HISTORY_DAYS (10)
    recorded gates the spread's variance is assumed twice the holdout's own (on real flights it is
    about 0.8 of it at one day: benchmarks/RESULTS.md), with the holdout's own degrees of freedom.
    With holdouts of k days, successive gates share k-1 days and their estimates move less than
    disjoint holdouts' would, so the spread is taken between gates k days apart.

    Floors and baselines keep the holdout's own interval: they ask whether the candidate clears a
    fixed bar on the holdout's population, and a metric's own day-to-day spread is mostly how hard
    the day was (flights: a model's daily AUC moves by about 0.09), so with it no model would ever
    clear a baseline on a day or three of holdout (benchmarks/RESULTS.md)."""

    def __init__(self, spec: Spec, clusters: np.ndarray | None, unit: str, days: np.ndarray | None = None,
                 history: History | None = None) -> None:
        self.conf = spec.gate.bootstrap
        self.threshold = spec.gate.threshold
        self.clusters, self.unit, self.days = clusters, unit, days
        self.history = history or {}
        self.used: set[str] = set()  # the methods the intervals resolved to
        self.daily: dict[str, dict[str, Any]] = {}
        self.spread: dict[str, dict[str, Any]] = {}

    @property
    def on(self) -> bool:
        return self.conf is not None

    def _interval(self, metric: str, y: np.ndarray, pred: np.ndarray, other: np.ndarray | None,
                  clusters: np.ndarray | None) -> dict[str, Any]:
        c = self.conf
        assert c is not None
        return metrics.interval(metric, y, pred, other, clusters=clusters, level=c.level, method=c.method,
                                resamples=c.resamples, seed=c.seed, threshold=self.threshold)

    def __call__(self, metric: str, y: np.ndarray, pred: np.ndarray, other: np.ndarray | None = None,
                 rows: np.ndarray | None = None, key: str | None = None) -> dict[str, Any]:
        c = self.conf
        assert c is not None
        clusters, days = self.clusters, self.days
        if rows is not None:
            y, pred = y[rows], pred[rows]
            other = None if other is None else other[rows]
            clusters = None if clusters is None else clusters[rows]
            days = None if days is None else days[rows]
        iv = self._interval(metric, y, pred, other, clusters)
        self.used.add(iv["method"])
        iv = iv | {"unit": self.unit}
        if key is None:
            return iv
        if iv["method"] == "none":
            return iv
        k = 1 if days is None or not len(days) else len(set(days.tolist()))
        newest = None if days is None or not len(days) else str(max(days.tolist()))
        # the estimate later gates with a holdout of as many days compare with (recorded even when
        # between_days is off, so that turning it on finds a history)
        self.daily[key] = {"day": newest, "metric": metric, "unit": self.unit, "days": k, "value": iv["value"],
                           "se": iv["se"]}
        if c.between_days == "off":
            return iv
        past = [h for h in self.history.get(key, []) if h.get("metric") == metric
                and h.get("unit", self.unit) == self.unit and h.get("days", 1) == k]
        added = metrics.added_variance([h["value"] for h in past], [h["se"] for h in past], iv["se"], iv.get("df"),
                                       days=[h["day"] for h in past], lag=k)
        spread = {n: v for n, v in added.items() if n != "extra"} | {"holdout_days": k}
        self.spread[key] = spread
        return metrics.widen(iv, added["extra"], added["df"]) | {"between_days": spread}

    def describe(self, iv: dict[str, Any]) -> str:
        if iv["method"] == "none":
            return f"no interval: {iv.get('reason')}"
        how = iv["method"] + (f", {iv['resamples']} resamples (seed {iv['seed']})" if iv["method"] == "bootstrap"
                              else "")
        unit = f"by {iv['unit']}" + (f", {iv['clusters']} clusters" if iv.get("clusters") else "")
        return f"{iv['level']:.0%} interval [{iv['low']:.4g}, {iv['high']:.4g}] ({how}; {unit}{_spread_text(iv)})"


def _spread_text(iv: dict[str, Any]) -> str:
    s = iv.get("between_days")
    if not s:
        return ""
    if s["source"] == "history":
        df = "" if s.get("df") is None else f", {s['df']:.1f} df"
        return f"; + day-to-day sd {s['sd']:.3g} from {s['days']} recorded gates{df}"
    return (f"; + day-to-day spread assumed {metrics.ASSUMED_SPREAD:g}x the holdout's variance ({s['days']} of "
            f"{metrics.MIN_HISTORY_DAYS} gates recorded)")


def _bound_rule(spec: Spec, metric: str, value: float, threshold: float, y: np.ndarray, candidate: np.ndarray,
                iv: Intervals, confident: bool) -> dict[str, Any]:
    hib = metrics.DIRECTION[metric]
    rule: dict[str, Any] = {"rule": "floor" if hib else "ceiling", "kind": "absolute", "metric": metric,
                            "value": value, "threshold": threshold}
    ok = math.isfinite(value) and (value >= threshold if hib else value <= threshold)
    if confident and iv.on:
        ci = iv(metric, y, candidate)
        rule["bound"] = ci["low"] if hib else ci["high"]
        rule["detail"] = (f"{metric} {value:.4g}; its {'lower' if hib else 'upper'} end "
                          f"{rule['bound']:.4g} must be {'>=' if hib else '<='} {threshold:g}: {iv.describe(ci)}")
        ok = ok and _confident(ci, threshold, strict=False, lower=hib)
    return rule | {"verdict": "pass" if ok else "fail"}


def _baseline_rule(spec: Spec, name: str, y: np.ndarray, candidate: np.ndarray, pred: np.ndarray | None,
                   iv: Intervals) -> tuple[dict[str, Any], dict[str, Any]]:
    g = spec.gate
    m = g.metric
    rule: dict[str, Any] = {"rule": f"baseline:{name}", "kind": "baseline", "metric": m,
                            "threshold": g.baseline_margin}
    if pred is None:
        detail = "cannot be computed (no label mean recorded for the candidate's training window)"
        return rule | {"value": None, "verdict": "fail", "detail": detail}, {"name": name, "metric": None}
    value = metrics.evaluate(m, y, pred, g.threshold)
    point = metrics.gain(m, metrics.evaluate(m, y, candidate, g.threshold), value)
    judged, detail = point, f"gain {point:.4g} over the baseline ({m} {value:.4g})"
    ok = math.isfinite(point) and point > g.baseline_margin
    if iv.on:
        ci = iv(m, y, candidate, pred)
        judged = ci["low"]
        detail += f"; lower end {judged:.4g}: {iv.describe(ci)}"
        ok = ok and _confident(ci, g.baseline_margin)
    detail += f"; must be > {g.baseline_margin:g}"
    return (rule | {"value": judged, "verdict": "pass" if ok else "fail", "detail": detail},
            {"name": name, "metric": value, "gain": point})


def judge(spec: Spec, y: np.ndarray, candidate: np.ndarray, champion: np.ndarray | None,
          frame: Any = None, *, baselines: dict[str, np.ndarray | None] | None = None,
          fresh: np.ndarray | None = None, clustering: tuple[np.ndarray | None, str] | None = None,
          history: History | None = None) -> dict[str, Any]:
    """Score the candidate, the champion and the baselines on the same rows and apply the model
    rules (everything but data checks). `frame` holds the slice and cluster columns, row-aligned
    with `y`; `fresh` marks the rows the champion may be judged on (not its own selection or
    training rows; default all)."""
    g = spec.gate
    y = np.asarray(y, np.float64)
    clusters, unit = clustering if clustering is not None else clusters_for(spec, frame)
    days = None if frame is None or DAY not in frame else np.array([str(d)[:10] for d in frame[DAY]])
    iv = Intervals(spec, clusters, unit, days, history)
    names = list(dict.fromkeys([g.metric, *(g.report_metrics or metrics.metrics_for(spec.model.task)), *g.floors]))
    cand = {m: metrics.evaluate(m, y, candidate, g.threshold) for m in names}
    rows = np.ones(len(y), bool) if fresh is None else np.asarray(fresh, bool)
    broken = 0 if champion is None else int((~np.isfinite(champion)).sum())
    if broken and champion is not None:  # a champion that cannot score some rows is compared on the others
        rows = rows & np.isfinite(champion)
    note = ""
    if champion is not None and rows.sum() < g.min_rows:
        # Every holdout row is one the champion was selected (or trained) on, e.g. a forced retrain
        # of the champion's own date. Its scores there are inflated (winner's curse), so comparing
        # on them favours it: never a false promotion, at worst a missed one. Compare on all rows.
        note = (f" (on all rows, though only {int(rows.sum())} were not in the champion's own gate holdout or "
                "training window: its scores there are inflated, which favours it)")
        rows = np.isfinite(champion)
    champ = None if champion is None else {m: metrics.evaluate(m, y[rows], champion[rows], g.threshold)
                                           for m in names}
    bad = int((~np.isfinite(candidate)).sum())
    rules: list[dict[str, Any]] = [{
        "rule": "finite_predictions", "kind": "absolute", "metric": None, "value": bad, "threshold": 0,
        "verdict": "fail" if bad else "pass",
        "detail": f"{bad} of {len(candidate)} candidate predictions are NaN or infinite"}]
    if broken and champion is not None:
        rules.append({"rule": "champion_finite_predictions", "kind": "absolute", "metric": None, "value": broken,
                      "threshold": 0, "verdict": "warn",
                      "detail": f"{broken} of {len(champion)} champion predictions are NaN or infinite; the "
                                "champion is compared on the other rows"})
    confident = g.floor_confidence == "always" or (g.floor_confidence == "auto" and champion is None)
    bounds = {**g.floors, **({g.metric: g.floor} if g.floor is not None else {})}
    rules += [_bound_rule(spec, m, cand[m], t, y, candidate, iv, confident) for m, t in bounds.items()]
    scored: list[dict[str, Any]] = []
    for name, pred in (baselines or {}).items():
        rule, row = _baseline_rule(spec, name, y, candidate, pred, iv)
        rules.append(rule)
        scored.append(row)
    boot = None
    slices: list[dict[str, Any]] = []
    if champion is not None and champ is not None:  # both or neither
        boot, more = _champion_rules(spec, y, candidate, champion, rows, cand, champ, iv, note)
        rules += more
        if frame is not None and g.slices.columns and rows.sum() >= g.min_rows:
            rules_s, slices = _slices(spec, y[rows], candidate[rows], champion[rows], frame[rows])
            rules += rules_s
    return {"metrics": {"candidate": cand, "champion": champ}, "rules": rules, "bootstrap": boot, "slices": slices,
            "baselines": scored, "interval_unit": unit,
            "clusters": None if clusters is None else len(np.unique(clusters)),
            "interval": describe_intervals(spec, iv.used, unit, clusters, iv.spread),
            "daily": iv.daily, "between_days": iv.spread}


def describe_intervals(spec: Spec, used: set[str], unit: str, clusters: np.ndarray | None,
                       spread: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """One line for the record: the methods used, the resampling unit, the clusters, the level and
    how the day-to-day spread was taken."""
    conf = spec.gate.bootstrap
    if conf is None:
        return "off (gate.bootstrap is null: point estimates only)"
    methods = "/".join(sorted(used)) or conf.method
    count = "" if clusters is None else f", {len(np.unique(clusters))} clusters"
    days = ", within the holdout only (between_days: off)" if conf.between_days == "off" else (
        ", + day-to-day spread: " + ", ".join(
            f"{k} " + (f"sd {s['sd']:.3g} ({s['days']} days)" if s["source"] == "history" else "assumed")
            for k, s in spread.items()) if spread else "")
    return f"{methods} by {unit}{count}, {conf.level:.0%}{days}"


def _champion_rules(spec: Spec, y: np.ndarray, candidate: np.ndarray, champion: np.ndarray, rows: np.ndarray,
                    cand: dict[str, float], champ: dict[str, float], iv: Intervals,
                    note: str = "") -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    g = spec.gate
    need = g.required_margin()
    fresh = int(rows.sum())
    cand_m = cand[g.metric] if fresh == len(y) else metrics.evaluate(g.metric, y[rows], candidate[rows], g.threshold)
    point = metrics.gain(g.metric, cand_m, champ[g.metric])
    ok = math.isfinite(point) and (point > need if g.compare == "improve" else point >= need)
    on = note or ("" if fresh == len(y) else f" (on the {fresh} of {len(y)} rows the champion was not selected on)")
    rules = [{"rule": g.compare, "kind": "relative", "metric": g.metric, "value": point, "threshold": need,
              "verdict": "pass" if ok else "fail",
              "detail": f"gain over the champion (positive: candidate better), must be "
                        f"{'>' if g.compare == 'improve' else '>='} {need:g}{on}"}]
    if not iv.on:
        return None, rules
    ci = iv(g.metric, y, candidate, champion, None if fresh == len(y) else rows, key="champion")
    ok = _confident(ci, need, strict=g.compare == "improve")
    rules.append({"rule": "confidence", "kind": "confidence", "metric": g.metric, "value": ci["low"],
                  "threshold": need, "verdict": "pass" if ok else "fail",
                  "detail": f"{iv.describe(ci)} of the gain{on}"
                            + (f"; {ci['undefined']} resamples undefined" if ci["undefined"] else "")})
    boot = {"gain": ci["value"], "low": ci["low"], "high": ci["high"], "level": ci["level"], "method": ci["method"],
            "unit": ci["unit"], "clusters": ci.get("clusters"), "resamples": ci.get("resamples"),
            "seed": ci.get("seed"), "undefined": ci["undefined"], "gains": ci.get("gains")}
    return boot, rules


def _slices(spec: Spec, y: np.ndarray, candidate: np.ndarray, champion: np.ndarray,
            frame: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    s = spec.gate.slices
    metric = s.metric or spec.gate.metric
    rules, table = [], []
    for col in s.columns:
        keys = frame[col].astype("string").fillna("(null)").to_numpy()
        values, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        worst: dict[str, Any] | None = None
        for i in np.flatnonzero(counts >= s.min_rows):
            rows = inverse == i
            c = metrics.evaluate(metric, y[rows], candidate[rows], spec.gate.threshold)
            h = metrics.evaluate(metric, y[rows], champion[rows], spec.gate.threshold)
            g = metrics.gain(metric, c, h)
            row = {"column": col, "value": str(values[i]), "rows": int(counts[i]), "candidate": c, "champion": h,
                   "gain": g, "verdict": "skip" if not math.isfinite(g) else ("pass" if g >= -s.tolerance else "fail")}
            table.append(row)
            if math.isfinite(g) and (worst is None or g < worst["gain"]):
                worst = row
        judged = [r for r in table if r["column"] == col and r["verdict"] != "skip"]
        failed = [r["value"] for r in judged if r["verdict"] == "fail"]
        rules.append({"rule": f"slice:{col}", "kind": "slice", "metric": metric,
                      "value": None if worst is None else worst["gain"], "threshold": -s.tolerance,
                      "verdict": "skip" if worst is None else ("fail" if failed else "pass"),
                      "detail": (f"no slice with {s.min_rows}+ rows and a defined {metric}" if worst is None else
                                 f"worst {col}={worst['value']} ({worst['rows']} rows); {len(failed)} of "
                                 f"{len(judged)} slices worse than the champion by more than {s.tolerance:g}"
                                 + (f": {failed[:10]}" if failed else ""))})
    return rules, table
