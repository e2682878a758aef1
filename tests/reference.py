"""A deliberately plain, single-process implementation of the feature DSL: the tests' oracle.

It computes every feature of every event by brute force (filter, then aggregate) in pandas, with
none of the Ray step's tricks (indexes, cumulative sums, binary search, merge_asof), so the two
can only agree if both follow the DSL's definitions (spec/_model.py's docstrings):

* a row of a window's history is a row of its source (the base source, or the window's
  ``source`` with event time ``time``) with a value, a key and a known-at time, known no more
  than max_delay after its event, on a day the window reads; rows are ordered by known-at time,
  then event time, then input order (staged partitions oldest day first, in file order);
* a time span counts the key's rows known in (t - span, t); ``rows: [N]`` takes the last N of
  the rows known in (t - w.span(), t), ``lag: [n]`` the n-th latest of them; ``last``/``first``
  are the latest/earliest value in the order above;
* an as-of join takes, among rows with equal keys, time in [t - tolerance, t] and known_at <= t
  (< t with strict), and known_at no more than max_delay after their time, the one with the
  latest time, then the last in input order;
* a lookup takes the last row per key of the day's snapshot;
* derived columns are computed in order over the base row and the outputs above (each may
  replace a base column of its name for the later ones), then the label, then (with
  label.known_at) LABEL_KNOWN_AT over the base row.
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from daybreak.infra.context import RunContext
from daybreak.infra.errors import MissingInputError
from daybreak.spec import LABEL_KNOWN_AT, Spec, evaluate, parse_duration, window_feature_names

UTC_US = pa.timestamp("us", tz="UTC")


def _staged(ctx: RunContext, source: str, days: list) -> list[pa.Table]:
    out = []
    for d in days:
        part = ctx.store.partition(f"staged/{source}", d)
        if part is not None:
            t = pa.concat_tables([pq.read_table(f, filesystem=ctx.store.fs) for f in part.files])
            out.append(t.append_column("__day", pa.repeat(pa.scalar(d.isoformat()), t.num_rows)))
    return out


def _days(day, n: int) -> list:
    return [day - timedelta(days=k) for k in range(n, -1, -1)]


def _times(arr) -> pd.Series:
    return pd.Series(pd.to_datetime(arr.cast(UTC_US).to_pandas(), utc=True))


def _agg(xs: np.ndarray, agg: str) -> float:
    """One aggregate of `xs`, the window's values in the rows' order (oldest first)."""
    if agg == "count":
        return float(len(xs))
    if agg == "sum":
        return float(xs.sum())
    if not len(xs):
        return np.nan
    if agg == "std":
        return float(xs.std(ddof=1)) if len(xs) > 1 else np.nan
    return float({"mean": np.mean, "min": np.min, "max": np.max, "last": lambda a: a[-1],
                  "first": lambda a: a[0]}[agg](xs))


def _window_history(spec: Spec, ctx: RunContext, i: int, base: pa.Table) -> pd.DataFrame:
    """Window i's rows: key columns, event time, known-at, value and input order; only the rows
    that can count (value, key and known-at present, not late, on a day the window reads)."""
    f, day = spec.features, ctx.logical_date
    w = f.windows[i]
    if f.window_source(w) == f.base:
        table = base
    else:
        tables = _staged(ctx, w.source, _days(day, w.lookback_days()))
        table = pa.concat_tables(tables) if tables else None
        if table is None:
            return pd.DataFrame(columns=[*w.by, "event_time", "known", "value", "order", "__day"])
        table = table.append_column("event_time", evaluate(w.time, table).cast(UTC_US))
    h = pd.DataFrame({k: table.column(k).to_pandas() for k in w.by})
    h["event_time"] = _times(table.column("event_time"))
    h["known"] = _times(evaluate(w.known_at, table))
    h["value"] = evaluate(w.value, table).to_pandas().astype(float)
    h["order"] = np.arange(len(h))
    h["__day"] = table.column("__day").to_pandas()
    late = h["known"] > h["event_time"] + pd.Timedelta(parse_duration(w.max_delay))
    unread = h["__day"] < (day - timedelta(days=w.lookback_days())).isoformat()
    usable = h["value"].notna() & h["known"].notna() & h["event_time"].notna() & ~late.fillna(False) & ~unread
    for k in w.by:
        usable &= h[k].notna()
    return h[usable]


def _window_row(w, h: pd.DataFrame, ev: dict) -> list[float]:
    """Window w's features for one event, in window_feature_names order."""
    t = ev["event_time"]
    same = np.ones(len(h), dtype=bool)
    for k in w.by:
        same &= (h[k] == ev[k]).to_numpy() if pd.notna(ev[k]) else False
    mine = h[same]
    out = []

    def known_in(span) -> np.ndarray:
        rows = mine[(mine["known"] > t - span) & (mine["known"] < t)] if pd.notna(t) else mine.iloc[:0]
        return rows.sort_values(["known", "event_time", "order"])["value"].to_numpy()

    for win in w.windows:
        xs = known_in(pd.Timedelta(parse_duration(win)))
        out += [_agg(xs, agg) for agg in w.aggs]
    look = known_in(pd.Timedelta(w.span()))
    for n in w.rows:
        out += [_agg(look[-n:], agg) for agg in w.aggs]
    for n in w.lag:
        out.append(float(look[-n]) if len(look) >= n else np.nan)
    return out


def _asof(spec: Spec, ctx: RunContext, j, events: pd.DataFrame) -> dict[str, list]:
    tables = _staged(ctx, j.source, _days(ctx.logical_date, j.lookback_days()))
    cols = list(dict.fromkeys([j.time, *j.by, *j.columns.values()]))
    if not tables:
        return {name: [None] * len(events) for name in j.columns}
    table = pa.concat_tables(tables)
    right = pd.DataFrame({c: table.column(c).to_pandas() for c in cols})
    right["__time"] = _times(table.column(j.time))
    right["__known"] = _times(evaluate(j.known_at_expr(), table))
    right["__order"] = np.arange(len(right))
    late = right["__known"] > right["__time"] + pd.Timedelta(parse_duration(j.max_delay or "0s"))
    usable = right["__time"].notna() & right["__known"].notna() & ~late.fillna(False)
    for k in j.by:
        usable &= right[k].notna()
    right = right[usable]
    tol = pd.Timedelta(parse_duration(j.tolerance))
    picked: dict[str, list] = {name: [] for name in j.columns}
    for _, ev in events.iterrows():
        t = ev["event_time"]
        if pd.isna(t):
            cand = right.iloc[:0]
        else:
            known = right["__known"] < t if j.strict else right["__known"] <= t
            cand = right[(right["__time"] <= t) & (right["__time"] >= t - tol) & known]
        for k in j.by:
            cand = cand[cand[k] == ev[k]] if pd.notna(ev[k]) else cand.iloc[:0]
        last = cand.sort_values(["__time", "__order"]).tail(1)
        for name, c in j.columns.items():
            picked[name].append(last[c].iloc[0] if len(last) else None)
    return picked


def reference_features(spec: Spec, ctx: RunContext) -> pd.DataFrame:
    f = spec.features
    day = ctx.logical_date
    tables = _staged(ctx, f.base, _days(day, f.lookback_days()))
    if not tables or ctx.store.partition(f"staged/{f.base}", day) is None:
        raise MissingInputError(f"no staged partition of {f.base!r} for {day}")
    base = pa.concat_tables(tables)
    base = base.append_column("event_time", evaluate(f.event_time, base).cast(UTC_US))
    targets = np.flatnonzero(base.column("__day").to_numpy(zero_copy_only=False) == day.isoformat())
    rows = base.take(pa.array(targets))  # the day's events, every base column in its own type
    events = pd.DataFrame({c: rows.column(c).to_pandas() for c in rows.column_names})
    events["event_time"] = _times(rows.column("event_time"))

    outputs: dict[str, list] = {}
    for i, w in enumerate(f.windows):
        h = _window_history(spec, ctx, i, base)
        per_event = [_window_row(w, h, ev) for ev in events.to_dict("records")]
        for k, name in enumerate(window_feature_names(w)):
            outputs[name] = [r[k] for r in per_event]
    for j in f.asof:
        for name, values in _asof(spec, ctx, j, events).items():
            outputs[name] = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").astype(float).tolist()
    for lk in f.lookups:
        snap = _staged(ctx, lk.source, [day])
        right = snap[0].to_pandas() if snap else pd.DataFrame(columns=[*lk.by, *lk.columns.values()])
        right = right.drop_duplicates(subset=lk.by, keep="last")
        merged = events[lk.by].merge(right[[*lk.by, *lk.columns.values()]], on=lk.by, how="left")
        for name, src in lk.columns.items():
            outputs[name] = pd.to_numeric(merged[src], errors="coerce").astype(float).tolist()

    table = rows
    for name, values in outputs.items():
        table = table.append_column(name, pa.array(values, pa.float64(), from_pandas=True))  # NaN: no value
    known_expr = f.label.known_at_expr()
    label_known = evaluate(known_expr, table).cast(UTC_US) if known_expr is not None else None
    result: dict[str, object] = {k: events[k] for k in f.keys}
    result["event_time"] = events["event_time"]
    for c in f.columns:
        v = evaluate(c.expr, table)
        v = v.cast(pa.string()) if c.categorical else v.cast(pa.float64())
        i = table.schema.get_field_index(c.name)
        table = table.set_column(i, c.name, v) if i >= 0 else table.append_column(c.name, v)
        s = v.to_pandas()
        result[c.name] = s.astype("string") if c.categorical else pd.to_numeric(s, errors="coerce").astype(float)
    for name in f.feature_names():
        if name not in result:
            result[name] = pd.Series(outputs[name], dtype=float)
    result[f.label.name] = evaluate(f.label.expr, table).to_pandas()
    if label_known is not None:
        result[LABEL_KNOWN_AT] = _times(label_known)
    df = pd.DataFrame({k: pd.Series(v).reset_index(drop=True) for k, v in result.items()})
    df = df[df[f.label.name].notna()].copy()
    df[f.label.name] = df[f.label.name].astype("int64" if spec.model.task == "classification" else "float64")
    return df.sort_values(["event_time", *f.keys], kind="stable").reset_index(drop=True)
