"""A deliberately plain, single-process implementation of the feature DSL: the tests' oracle.

It computes every feature of every event by brute force (filter, then aggregate) in pandas, with
none of the Ray step's tricks (sorting, cumulative sums, binary search, merge_asof), so the two
can only agree if both follow the DSL's definitions:

* a window for an event at time t counts rows whose value is known in (t - window, t);
* an as-of join takes the last row (in time, then file order) with time in [t - tolerance, t];
* a lookup takes the last row per key of the day's snapshot.
"""

from __future__ import annotations

import math
from datetime import timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from daybreak.infra.context import RunContext
from daybreak.infra.errors import MissingInputError
from daybreak.spec import Spec, evaluate, parse_duration, window_feature_names


def _staged(ctx: RunContext, source: str, days: list) -> list[pa.Table]:
    out = []
    for d in days:
        part = ctx.store.partition(f"staged/{source}", d)
        if part is not None:
            t = pa.concat_tables([pq.read_table(f, filesystem=ctx.store.fs) for f in part.files])
            out.append(t.append_column("__day", pa.repeat(pa.scalar(d.isoformat()), t.num_rows)))
    return out


def reference_features(spec: Spec, ctx: RunContext) -> pd.DataFrame:
    f = spec.features
    day = ctx.logical_date
    lookback = f.lookback_days()
    days = [day - timedelta(days=k) for k in range(lookback, -1, -1)]
    tables = _staged(ctx, f.base, days)
    if not tables or ctx.store.partition(f"staged/{f.base}", day) is None:
        raise MissingInputError(f"no staged partition of {f.base!r} for {day}")
    base = pa.concat_tables(tables)
    base = base.append_column("event_time", evaluate(f.event_time, base).cast(pa.timestamp("us", tz="UTC")))
    history = base.to_pandas()
    values = {}
    for i, w in enumerate(f.windows):
        v = evaluate(w.value, base).to_pandas().astype(float)
        known = pd.to_datetime(evaluate(w.known_at, base).cast(pa.timestamp("us", tz="UTC")).to_pandas(), utc=True)
        late = (known > history["event_time"] + pd.Timedelta(parse_duration(w.max_delay))).fillna(False)
        # each window reads only its own look-back days
        unread = history["__day"] < (day - timedelta(days=w.lookback_days())).isoformat()
        values[i] = (v.where(~(late | unread).to_numpy(), np.nan), known)
    targets = history.index[history["__day"] == day.isoformat()]
    rows = []
    for idx in targets:
        ev = history.loc[idx]
        t = ev["event_time"]
        row: dict = {}
        for i, w in enumerate(f.windows):
            v, known = values[i]
            same = np.ones(len(history), dtype=bool)
            for k in w.by:
                same &= (history[k] == ev[k]).to_numpy() & history[k].notna().to_numpy()
            names = iter(window_feature_names(w))
            for win in w.windows:
                span = pd.Timedelta(parse_duration(win))
                sel = same & v.notna().to_numpy() & known.notna().to_numpy()
                sel &= ((known > t - span) & (known < t)).to_numpy()
                xs = v[sel].to_numpy()
                for agg in w.aggs:
                    name = next(names)
                    if agg == "count":
                        row[name] = float(len(xs))
                    elif agg == "sum":
                        row[name] = float(xs.sum())
                    elif agg == "mean":
                        row[name] = float(xs.mean()) if len(xs) else np.nan
                    elif agg == "std":
                        row[name] = float(xs.std(ddof=1)) if len(xs) > 1 else np.nan
                    elif agg == "min":
                        row[name] = float(xs.min()) if len(xs) else np.nan
                    elif agg == "max":
                        row[name] = float(xs.max()) if len(xs) else np.nan
        rows.append(row)
    out = history.loc[targets].reset_index(drop=True)
    out = pd.concat([out, pd.DataFrame(rows, index=out.index)], axis=1)

    for j in f.asof:
        tol = pd.Timedelta(parse_duration(j.tolerance))
        span = math.ceil(tol / pd.Timedelta(days=1))
        dims = _staged(ctx, j.source, [day - timedelta(days=k) for k in range(span, -1, -1)])
        if dims:
            right = pa.concat_tables(dims).to_pandas()
        else:
            right = pd.DataFrame(columns=[j.time, *j.by, *j.columns.values()])
        right = right.reset_index(drop=True)
        right["__order"] = np.arange(len(right))
        picked: dict[str, list[object]] = {name: [] for name in j.columns}
        for _, ev in out.iterrows():
            t = ev["event_time"]
            cand = right[(right[j.time] <= t) & (right[j.time] >= t - tol) & right[j.time].notna()]
            for k in j.by:
                cand = cand[(cand[k] == ev[k]) & cand[k].notna()]
            last = cand.sort_values([j.time, "__order"]).tail(1)
            for name, src in j.columns.items():
                picked[name].append(last[src].iloc[0] if len(last) else None)
        for name in j.columns:
            out[name] = pd.to_numeric(pd.Series(picked[name], index=out.index, dtype=object), errors="coerce")

    for lk in f.lookups:
        snap = _staged(ctx, lk.source, [day])
        right = snap[0].to_pandas() if snap else pd.DataFrame(columns=[*lk.by, *lk.columns.values()])
        right = right.drop_duplicates(subset=lk.by, keep="last")
        merged = out[lk.by].merge(right[[*lk.by, *lk.columns.values()]], on=lk.by, how="left")
        for name, src in lk.columns.items():
            out[name] = pd.to_numeric(merged[src].to_numpy(), errors="coerce")

    table = pa.Table.from_pandas(out, preserve_index=False)
    result = {k: out[k] for k in f.keys}
    result["event_time"] = out["event_time"]
    for c in f.columns:
        v = evaluate(c.expr, table).to_pandas()
        result[c.name] = v.astype("string") if c.categorical else pd.to_numeric(v, errors="coerce").astype(float)
    for name in f.feature_names():
        if name not in result:
            result[name] = out[name].astype(float)
    label = evaluate(f.label.expr, table).to_pandas()
    result[f.label.name] = label
    df = pd.DataFrame(result)
    df = df[df[f.label.name].notna()].copy()
    df[f.label.name] = df[f.label.name].astype("int64" if spec.model.task == "classification" else "float64")
    return df.sort_values(["event_time", *f.keys], kind="stable").reset_index(drop=True)
