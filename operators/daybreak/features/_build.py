"""Features: staged partitions -> a point-in-time correct feature partition, computed on Ray.

For logical date D the step reads the base events of D and of the days its windows need before
D, and writes one row per base event of D to ``features/<name>/v=<feature-version>/date=D/``.
No feature of an event may depend on anything known at or after the event's time:

* trailing windows count a row only if its ``known_at`` time lies in ``(t - window, t)``;
* as-of joins take the latest dimension row with time ``<= t`` and ``>= t - tolerance``.

Windows need the whole look-back per key; rather than shuffle it by key, each window's history
is read narrowly and sorted once into an index (``build_window_index``), and D's events look
their windows up in it (``apply_windows``).

The reads, index builds and the day's rows are plain Ray tasks (one dataflow, no barrier in the
driver). Each task of the day's rows writes its rows, sorted, as a run; the runs are merged into
the published files. Every task holds a bounded slice, and the history each window keeps is
folded per (key, time), so memory stays flat as the input grows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from daybreak.infra.compute import ensure_ray
from daybreak.infra.context import RunContext
from daybreak.infra.errors import MissingInputError
from daybreak.infra.store import ROW_GROUP_ROWS
from daybreak.spec import FeatureSpec, Spec, evaluate, names_in, parse_duration, window_feature_names

if TYPE_CHECKING:
    import pyarrow.parquet as pq

log = logging.getLogger(__name__)

EVENT_TIME = "event_time"
_US = 1_000_000


def feature_zone(spec: Spec) -> str:
    return f"features/{spec.features.name}/v={spec.feature_version()}"


# --- pure, per-batch transforms (run inside Ray tasks; also usable without Ray) ----------------

def read_events(items: pa.Table, f: FeatureSpec, fs: Any) -> pa.Table:
    """Read the day's rows named by `items` (row groups of staged files): only the columns read later."""
    wanted = names_in(f.event_time) | carried_columns(f)
    return pa.concat_tables([prepare_events(t, f) for t in _read_slices(items, fs, wanted)])


def prepare_events(batch: pa.Table, f: FeatureSpec) -> pa.Table:
    """Add the event time; keep only the columns later stages read."""
    batch = batch.append_column(EVENT_TIME, _event_time(batch, f))
    keep = carried_columns(f)
    return batch.select([c for c in batch.column_names if c in keep])


def _event_time(batch: pa.Table, f: FeatureSpec) -> pa.ChunkedArray:
    et = evaluate(f.event_time, batch)
    if not pa.types.is_timestamp(et.type):
        raise TypeError(f"features.event_time must give a timestamp, got {et.type}")
    return et.cast(pa.timestamp("us", tz="UTC"))


# --- windows: a sorted index of each window's history, then lookups for the day's events ------

def read_window_inputs(items: pa.Table, f: FeatureSpec, fs: Any, i: int) -> pa.Table:
    """Window i's narrow history from the row groups named by `items`: only the columns it reads."""
    w = f.windows[i]
    wanted = names_in(f.event_time) | names_in(w.value) | names_in(w.known_at) | set(w.by)
    return pa.concat_tables([window_inputs(t, f, i) for t in _read_slices(items, fs, wanted)])


def _read_slices(items: pa.Table, fs: Any, wanted: set[str] | None = None) -> list[pa.Table]:
    """The row groups each item names, with only the `wanted` columns the file has (None: all)."""
    import pyarrow.parquet as pq

    out = []
    for item in items.to_pylist():
        pf = pq.ParquetFile(fs.open_input_file(item["path"]))
        cols = None if wanted is None else [c for c in pf.schema_arrow.names if c in wanted]
        out.append(pf.read_row_groups(item["row_groups"], columns=cols))
    return out


def window_inputs(batch: pa.Table, f: FeatureSpec, i: int) -> pa.Table:
    """Group keys, known-at time (int64 us) and value of the rows that can count in window i."""
    w = f.windows[i]
    et = _event_time(batch, f)
    batch = batch.append_column(EVENT_TIME, et)
    value = pc.cast(evaluate(w.value, batch), pa.float64())
    known = evaluate(w.known_at, batch).cast(pa.timestamp("us", tz="UTC"))
    # A row known later than max_delay after its event might lie beyond the history read for
    # some events; leave it out for every event, so results never depend on what was read.
    late = pc.fill_null(pc.greater(known, pc.add(et, _delay(w.max_delay))), False)
    n_late = pc.sum(late).as_py() or 0
    if n_late:
        log.warning("features.windows[%d]: %d row(s) known more than max_delay=%s after their event are left out",
                    i, n_late, w.max_delay)
    keep = pc.and_kleene(pc.invert(late), pc.invert(pc.is_nan(value)))
    keep = pc.and_kleene(keep, pc.is_valid(known))
    for col in w.by:  # a null key groups with nothing
        keep = pc.and_kleene(keep, pc.is_valid(batch.column(col)))
    rows = np.flatnonzero(pc.fill_null(keep, False).to_numpy(zero_copy_only=False))
    k = pc.cast(known, pa.int64()).to_numpy(zero_copy_only=False)[rows]
    v = value.to_numpy(zero_copy_only=False)[rows]
    # Sorted here, in parallel, in the index's order (key values, then time; stable), and rows
    # with the same key and time folded into one (count, sum, sum of squares, min, max): the
    # index task then only merges sorted runs, and what it holds is bounded by the distinct
    # (key, time) pairs, not by the rows. Keys leave as dictionary arrays (indices into the
    # slice's sorted distinct values): no strings are copied.
    ranks: Sequence[np.ndarray]
    dictionaries: Sequence[pa.Array]
    ranks, dictionaries = zip(*[_sorted_codes(batch.column(c)) for c in w.by], strict=False) if w.by else ((), ())
    ranks = [r[rows] for r in ranks]  # the dictionaries may keep a value no kept row has: harmless
    codes = _mixed_radix(ranks, dictionaries, len(rows))
    if len(rows):
        span = int(k.max()) - int(k.min()) + 1
        radix = math.prod(max(1, len(d)) for d in dictionaries)
        order = (np.argsort(codes * span + (k - k.min()), kind="stable") if radix * span < 2**62
                 else np.lexsort((k, codes)))
    else:
        order = np.arange(0)
    codes, k = codes[order], k[order]
    starts = _run_starts(codes, k)
    return pa.table({**{c: pa.DictionaryArray.from_arrays(pa.array(r[order][starts], pa.int32()), d)
                        for c, r, d in zip(w.by, ranks, dictionaries, strict=False)},
                     "__k": pa.array(k[starts], pa.int64()),
                     **_fold(starts, np.ones(len(k), np.int64), v[order], w.aggs)})


def _run_starts(*columns: np.ndarray) -> np.ndarray:
    """Where each run of equal rows begins, in columns sorted together (lexicographically)."""
    n = len(columns[0])
    new = np.zeros(n, bool)
    new[:1] = True
    for c in columns:
        new[1:] |= c[1:] != c[:-1]
    return np.flatnonzero(new)


def _fold(starts: np.ndarray, n: np.ndarray, v: np.ndarray, aggs: Any,
          s: np.ndarray | None = None, s2: np.ndarray | None = None,
          lo: np.ndarray | None = None, hi: np.ndarray | None = None) -> dict[str, pa.Array]:
    """Per run: row count, and what `aggs` need (sum, sum of squares, min, max). `v` gives the
    values of single rows; partial results of earlier folds (s, s2, lo, hi) take their place."""
    def red(op: np.ufunc, x: np.ndarray) -> pa.Array:
        return pa.array(op.reduceat(x, starts) if len(starts) else x[:0])

    out = {"__n": red(np.add, n)}
    if {"sum", "mean", "std"} & set(aggs):
        out["__s"] = red(np.add, v if s is None else s)
    if "std" in aggs:
        out["__s2"] = red(np.add, v * v if s2 is None else s2)
    if "min" in aggs:
        out["__min"] = red(np.minimum, v if lo is None else lo)
    if "max" in aggs:
        out["__max"] = red(np.maximum, v if hi is None else hi)
    return out


def _sorted_codes(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(code of each row, sorted distinct values): codes order rows as their values do.

    A dictionary-typed column (window_inputs' output, one dictionary per slice) is mapped onto
    the sorted union of its chunks' dictionaries without touching the values again.
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    if pa.types.is_dictionary(column.type):
        d = pc.unique(pa.concat_arrays([c.dictionary for c in chunks] or [pa.array([], column.type.value_type)]))
        d = d.take(pc.array_sort_indices(d))
        parts = [pc.index_in(c.dictionary, value_set=d).to_numpy(zero_copy_only=False).astype(np.int64)[
                 c.indices.to_numpy(zero_copy_only=False)] for c in chunks]
        return (np.concatenate(parts) if parts else np.zeros(0, np.int64)), d
    enc = pc.dictionary_encode(column)
    enc = enc.combine_chunks() if isinstance(enc, pa.ChunkedArray) else enc
    if not len(enc.dictionary):  # no rows, or only nulls
        return np.zeros(len(enc), np.int64), enc.dictionary
    order = pc.array_sort_indices(enc.dictionary).to_numpy()
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    # a null value gets code 0: callers have already dropped (or never had) rows with null keys
    return rank[enc.indices.fill_null(0).to_numpy(zero_copy_only=False)], enc.dictionary.take(pa.array(order))


def _mixed_radix(ranks: Any, dictionaries: Any, n: int) -> np.ndarray:
    codes = np.zeros(n, dtype=np.int64)
    for r, d in zip(ranks, dictionaries, strict=False):
        codes = codes * max(1, len(d)) + r
    return codes


_PARTIALS = ("__n", "__s", "__s2", "__min", "__max")


def fold_tables(by: list[str], aggs: list[str], *tables: pa.Table) -> pa.Table:
    """Merge folded window histories (``window_inputs``' output, or this function's) into one,
    sorted by (key, known-at) and folded again per (key, time).

    Keys become integer codes (mixed radix over each key column's sorted dictionary). Tables
    with the same key and time fold in argument order (a stable sort), so sums are the same on
    any number of nodes.
    """
    t = pa.concat_tables(tables) if tables else pa.table({"__k": pa.array([], pa.int64()),
                                                          "__n": pa.array([], pa.int64())})
    k = t.column("__k").to_numpy()
    ranks: Sequence[np.ndarray]
    dictionaries: Sequence[pa.Array]
    ranks, dictionaries = zip(*[_sorted_codes(t.column(c)) if c in t.column_names
                                else (np.zeros(0, np.int64), pa.array([], pa.string())) for c in by],
                              strict=False) if by else ((), ())
    order = np.lexsort((k, _mixed_radix(ranks, dictionaries, len(k))))
    k = k[order]
    ranks = [r[order] for r in ranks]
    starts = _run_starts(k, *ranks)
    col = {c: t.column(c).to_numpy()[order] for c in _PARTIALS if c in t.column_names}
    return pa.table({**{c: pa.DictionaryArray.from_arrays(pa.array(r[starts], pa.int32()), d)
                        for c, r, d in zip(by, ranks, dictionaries, strict=False)},
                     "__k": pa.array(k[starts], pa.int64()),
                     **_fold(starts, col["__n"], np.zeros(0), aggs, col.get("__s"), col.get("__s2"),
                             col.get("__min"), col.get("__max"))})


def build_window_index(by: list[str], aggs: list[str], *tables: pa.Table) -> dict[str, Any]:
    """One window's whole history, folded (``fold_tables``), as an index with running sums.

    (key code, time) packs into one sorted int64 array, so every "rows of this key known in
    (a, b)" question is two binary searches; the index holds one entry per distinct (key, time).
    """
    t = fold_tables(by, aggs, *tables)
    k = t.column("__k").to_numpy()
    ranks: Sequence[np.ndarray]
    dictionaries: Sequence[pa.Array]
    ranks, dictionaries = zip(*[_sorted_codes(t.column(c)) for c in by], strict=False) if by else ((), ())
    codes = _mixed_radix(ranks, dictionaries, len(k))
    dictionaries = list(dictionaries)
    radix = math.prod(max(1, len(d)) for d in dictionaries)
    # (code, time) packs into one int64 as code * span + (time - first); past 2**62, times are
    # replaced by their rank among the distinct times. Either way the packing keeps the order.
    first = int(k.min()) if len(k) else 0
    span = (int(k.max()) - first + 2) if len(k) else 2
    distinct = None
    if radix * span >= 2**62:
        distinct = np.unique(k)
        span = len(distinct) + 1
        if radix * span >= 2**62:
            raise ValueError(f"windows by {by}: too many distinct keys x times ({radix} x {span}) for one index")
        comp = codes * span + np.searchsorted(distinct, k)
    else:
        comp = codes * span + (k - first)
    index: dict[str, Any] = {"dictionaries": dictionaries, "distinct": distinct, "first": first, "span": span,
                             "comp": comp, "cn": _running_sum(t.column("__n").to_numpy())}
    if "__s" in t.column_names:
        index["cs"] = _running_sum(t.column("__s").to_numpy())
    if "__s2" in t.column_names:
        index["cs2"] = _running_sum(t.column("__s2").to_numpy())
    if "__min" in t.column_names:
        index["min"] = _RangeExtreme(t.column("__min").to_numpy(), np.minimum)
    if "__max" in t.column_names:
        index["max"] = _RangeExtreme(t.column("__max").to_numpy(), np.maximum)
    return index


def _running_sum(v: np.ndarray) -> np.ndarray:
    """cs[i] = v[0] + ... + v[i-1], so the sum of v[lo:hi] is cs[hi] - cs[lo]."""
    out = np.zeros(len(v) + 1, dtype=v.dtype)
    np.cumsum(v, out=out[1:])
    return out


def apply_windows(batch: pa.Table, f: FeatureSpec, indexes: list[Any]) -> pa.Table:
    """Trailing aggregates for each event, over its key's rows known in (t - window, t)."""
    import ray

    t = _ts_us(batch.column(EVENT_TIME))
    event_ok = batch.column(EVENT_TIME).is_valid().to_numpy(zero_copy_only=False)
    for i, w in enumerate(f.windows):
        idx = ray.get(indexes[i]) if isinstance(indexes[i], ray.ObjectRef) else indexes[i]
        q = np.zeros(batch.num_rows, dtype=np.int64)
        ok = event_ok.copy()
        for col, d in zip(w.by, idx["dictionaries"], strict=False):
            pos = pc.index_in(batch.column(col), value_set=d)  # null: a null key, or one never seen
            ok &= pos.is_valid().to_numpy(zero_copy_only=False)
            q = q * max(1, len(d)) + pos.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        comp, tt = idx["comp"], np.where(ok, t, 0)
        # Needles in sorted order keep the binary searches in cache. Packed (key, time - span)
        # orders like (key, time), so one order serves every span of the window.
        needles = _pack(idx, q, tt, strict=True)
        order = np.argsort(needles, kind="stable")
        hi = np.where(ok, _search(comp, needles, order), 0)
        names = iter(window_feature_names(w))
        for span in w.windows:
            lo_t = tt - int(parse_duration(span).total_seconds() * _US)
            lo = np.where(ok, _search(comp, _pack(idx, q, lo_t, strict=False), order), 0)
            for _agg, values in _aggregates(idx, w.aggs, lo, hi):
                batch = batch.append_column(next(names), pa.array(values, pa.float64()))
    return batch


def _aggregates(idx: dict[str, Any], aggs: Sequence[str], lo: np.ndarray,
                hi: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Each aggregate over the index rows lo[i]:hi[i], in the order of `aggs`."""
    count = (idx["cn"][hi] - idx["cn"][lo]).astype(np.float64)
    out = []
    with np.errstate(invalid="ignore", divide="ignore"):
        s = idx["cs"][hi] - idx["cs"][lo] if "cs" in idx else None
        mean = np.where(count > 0, s / count, np.nan) if s is not None else None
        for agg in aggs:
            if agg == "count":
                values = count
            elif agg == "sum":
                values = s
            elif agg == "mean":
                values = mean
            elif agg == "std":
                var = (idx["cs2"][hi] - idx["cs2"][lo] - count * mean * mean) / (count - 1)
                values = np.where(count > 1, np.sqrt(np.maximum(var, 0.0)), np.nan)
            else:
                values = idx[agg].query(lo, hi)
            out.append((agg, values))
    return out


def _delay(text: str) -> pa.Scalar:
    return pa.scalar(int(parse_duration(text).total_seconds() * _US), pa.duration("us"))


def carried_columns(f: FeatureSpec) -> set[str]:
    """Base columns read after the window stage: keys, join and group keys, expression inputs."""
    cols = {EVENT_TIME, *f.keys, *names_in(f.label.expr)}
    for c in f.columns:
        cols |= names_in(c.expr)
    for j in f.asof:
        cols |= set(j.by)
    for lk in f.lookups:
        cols |= set(lk.by)
    for w in f.windows:
        cols |= set(w.by)
    return cols


def _ts_us(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Timestamps as int64 microseconds; nulls become the minimum int64 (callers mask them)."""
    arr = pc.cast(col.cast(pa.timestamp("us", tz="UTC")), pa.int64())
    return arr.fill_null(np.iinfo(np.int64).min).to_numpy()


def _pack(idx: dict[str, Any], q: np.ndarray, t: np.ndarray, strict: bool) -> np.ndarray:
    """The packed value below which lie the key's rows known before t (strict) or at or before t."""
    span = idx["span"]
    if idx["distinct"] is None:
        offset = np.clip(t - idx["first"] + (0 if strict else 1), 0, span - 1)
    else:
        offset = np.searchsorted(idx["distinct"], t, "left" if strict else "right")
    return q * span + offset


def _search(sorted_values: np.ndarray, needles: np.ndarray, order: np.ndarray) -> np.ndarray:
    """np.searchsorted(sorted_values, needles), with `order` sorting the needles."""
    out = np.empty(len(needles), dtype=np.int64)
    out[order] = np.searchsorted(sorted_values, needles[order], "left")
    return out


class _RangeExtreme:
    """Min (or max) of ``values[lo:hi]`` for many ranges at once: a sparse table, O(n log n) to
    build and O(1) per query, all in numpy (no Python loop over rows)."""

    def __init__(self, values: np.ndarray, op: np.ufunc) -> None:
        self.op = op
        self.levels = [values]
        width = 1
        while 2 * width <= len(values):
            prev = self.levels[-1]
            self.levels.append(op(prev[:-width], prev[width:]))
            width *= 2

    def query(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        length = hi - lo
        out = np.full(len(lo), np.nan)
        ok = length > 0
        if not ok.any():
            return out
        level = np.floor(np.log2(length[ok])).astype(np.int64)
        a, b = lo[ok], hi[ok] - (1 << level)
        res = np.empty(len(a))
        for j in np.unique(level):
            sel = level == j
            res[sel] = self.op(self.levels[j][a[sel]], self.levels[j][b[sel]])
        out[ok] = res
        return out


def asof_join(batch: pa.Table, right: pa.Table, by: list[str], time: str, tolerance_us: int,
              columns: dict[str, str]) -> pa.Table:
    """Attach the latest `right` row per `by` with time in [event_time - tolerance, event_time]."""
    left = batch.select([*by, EVENT_TIME]).to_pandas()
    left["__pos"] = np.arange(len(left))
    left = left.sort_values(EVENT_TIME, kind="stable")
    rdf = right.select([*by, time, *sorted(set(columns.values()))]).to_pandas()
    rdf = rdf.dropna(subset=[time, *by]).rename(columns={time: "__rtime"}).sort_values("__rtime", kind="stable")
    rdf = rdf.rename(columns={src: f"__r_{src}" for src in set(columns.values())})
    if len(left) and left[EVENT_TIME].isna().any():
        raise ValueError("features.event_time is null for some rows; as-of joins need a time for every event")
    merged = pd.merge_asof(
        left, rdf, left_on=EVENT_TIME, right_on="__rtime", by=by or None,
        direction="backward", tolerance=pd.Timedelta(microseconds=tolerance_us), allow_exact_matches=True,
    ).sort_values("__pos")
    for out_name, src in columns.items():
        batch = batch.append_column(out_name, pa.array(merged[f"__r_{src}"].to_numpy(), from_pandas=True))
    return batch


def lookup_join(batch: pa.Table, right: pa.Table, by: list[str], columns: dict[str, str]) -> pa.Table:
    """Left join to a snapshot table; duplicate keys keep the last row so events are never multiplied."""
    rdf = right.select(by + sorted(set(columns.values()))).to_pandas().drop_duplicates(subset=by, keep="last")
    rdf = rdf.rename(columns={src: f"__r_{src}" for src in set(columns.values())})
    left = batch.select(by).to_pandas()
    merged = left.merge(rdf, on=by, how="left", sort=False)
    for out_name, src in columns.items():
        batch = batch.append_column(out_name, pa.array(merged[f"__r_{src}"].to_numpy(), from_pandas=True))
    return batch


def finalize(batch: pa.Table, f: FeatureSpec, task: str) -> pa.Table:
    """Evaluate row-level features and the label; keep keys, event time, features and label."""
    cols: dict[str, Any] = {k: batch.column(k) for k in f.keys}
    cols[EVENT_TIME] = batch.column(EVENT_TIME)
    for c in f.columns:
        v = evaluate(c.expr, batch)
        cols[c.name] = pc.cast(v, pa.string()) if c.categorical else pc.cast(v, pa.float64())
    for name in f.feature_names():
        if name not in cols:
            cols[name] = pc.cast(batch.column(name), pa.float64())
    label = evaluate(f.label.expr, batch)
    cols[f.label.name] = pc.cast(label, pa.int64() if task == "classification" else pa.float64())
    out = pa.table(cols)
    return out.filter(pc.is_valid(out.column(f.label.name)))


def day_rows(items: pa.Table, f: FeatureSpec, fs: Any, task: str, joins: list[tuple[str, dict[str, Any]]],
             *tables_and_indexes: Any) -> pa.Table:
    """The feature rows of one slice of the day's events: windows, joins, row-level features.

    `tables_and_indexes` holds the join tables (in the order of `joins`), then one index per window.
    """
    rights, indexes = tables_and_indexes[:len(joins)], list(tables_and_indexes[len(joins):])
    batch = read_events(items, f, fs)
    if f.windows:
        batch = apply_windows(batch, f, indexes)
    for (kind, kw), right in zip(joins, rights, strict=False):
        batch = asof_join(batch, right, **kw) if kind == "asof" else lookup_join(batch, right, **kw)
    return finalize(batch, f, task)


def day_run(items: pa.Table, f: FeatureSpec, fs: Any, task: str, joins: list[tuple[str, dict[str, Any]]],
            path: str, *tables_and_indexes: Any) -> dict[str, Any]:
    """Compute one slice's rows (``day_rows``), sort them, and write them to `path`: a sorted run
    for ``merge_runs``. Only a summary travels back: the rows never enter the object store."""
    import pyarrow.parquet as pq

    t = day_rows(items, f, fs, task, joins, *tables_and_indexes)
    t = t.sort_by([(c, "ascending") for c in [EVENT_TIME, *f.keys]])
    pq.write_table(t, path, filesystem=fs, row_group_size=MERGE_ROWS, compression="lz4")
    return {"path": path, "rows": t.num_rows, "schema": t.schema,
            "keys": {k: pc.unique(t.column(k)).drop_null() for k in f.keys}}


def _on_node(fn: Any, items: list[dict[str, Any]], *args: Any) -> tuple[Any, str]:
    """Run a per-slice function in a Ray task; also say which node ran it."""
    import ray

    return fn(pa.Table.from_pylist(items), *args), ray.get_runtime_context().get_node_id()


# --- the step ----------------------------------------------------------------------------

def _staged_files(ctx: RunContext, source: str, days: list[date]) -> tuple[list[str], dict[str, str], list[str]]:
    files, hashes, missing = [], {}, []
    for d in days:
        part = ctx.store.partition(f"staged/{source}", d)
        if part is None:
            missing.append(d.isoformat())
            continue
        files += part.files
        hashes[d.isoformat()] = part.manifest["content_hash"]
    return files, hashes, missing


def _read_table(files: list[str], fs: Any) -> pa.Table:
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(p, filesystem=fs) for p in files])


@dataclass
class _Inputs:
    base_files: list[str]
    base_hashes: dict[str, str]
    missing: list[str]
    dims: dict[str, tuple[list[str], dict[str, str]]]
    lineage: dict[str, Any]
    lineage_key: str
    today_files: list[str]


def _inputs(spec: Spec, ctx: RunContext) -> _Inputs:
    """The staged partitions the date's features are made from, and their lineage."""
    f = spec.features
    day = ctx.logical_date
    lookback_days = f.lookback_days()
    history = [day - timedelta(days=k) for k in range(lookback_days, 0, -1)]
    today_part = ctx.store.partition(f"staged/{f.base}", day)
    if today_part is None:
        raise MissingInputError(f"features: no staged partition of {f.base!r} for {day}; run the stage step first")
    base_files, base_hashes, missing = _staged_files(ctx, f.base, [*history, day])
    dims: dict[str, tuple[list[str], dict[str, str]]] = {}
    for j in f.asof:
        tol_days = math.ceil(parse_duration(j.tolerance) / timedelta(days=1))
        fl, hs, _ = _staged_files(ctx, j.source, [day - timedelta(days=k) for k in range(tol_days, -1, -1)])
        dims[j.source] = (fl, hs)
    for lk in f.lookups:
        part = ctx.store.partition(f"staged/{lk.source}", day)
        if part is None:
            raise MissingInputError(f"features: no staged snapshot of {lk.source!r} for {day}")
        dims[lk.source] = (part.files, {day.isoformat(): part.manifest["content_hash"]})

    lineage = {
        "feature_version": spec.feature_version(),
        "date": day.isoformat(),
        "inputs": {f.base: base_hashes, **{k: v[1] for k, v in dims.items()}},
    }
    lineage_key = hashlib.sha256(json.dumps(lineage, sort_keys=True).encode()).hexdigest()[:16]
    return _Inputs(base_files, base_hashes, missing, dims, lineage, lineage_key, today_part.files)


def recorded_lineage(spec: Spec, ctx: RunContext) -> str | None:
    """The lineage key of the published feature partition for the date, when it was made from the
    staged partitions as they are now; None otherwise."""
    current = ctx.store.partition(feature_zone(spec), ctx.logical_date)
    if current is None:
        return None
    key = _inputs(spec, ctx).lineage_key
    return key if current.manifest.get("lineage_key") == key else None


class FeaturesResult(TypedDict, total=False):
    """What ``build_features`` returns (and the orchestrators pass on)."""

    step: str
    date: str
    uri: str
    rows: int
    feature_version: str
    content_hash: str
    lineage_key: str
    missing_history: list[str]  # history days not staged
    skipped: bool  # the partition was kept as is (inputs unchanged)
    ray_nodes: list[str]  # the Ray nodes that built it (none when skipped)


def build_features(spec: Spec, ctx: RunContext) -> FeaturesResult:
    """Compute the feature partition for ``ctx.logical_date`` on Ray."""
    f = spec.features
    day = ctx.logical_date
    inp = _inputs(spec, ctx)
    base_files, base_hashes, missing, dims, lineage, lineage_key = (
        inp.base_files, inp.base_hashes, inp.missing, inp.dims, inp.lineage, inp.lineage_key)
    if missing:
        log.warning("features %s: history days not staged %s; windows near them see fewer rows", day, missing)
    zone = feature_zone(spec)
    current = ctx.store.partition(zone, day)
    if current is not None and current.manifest.get("lineage_key") == lineage_key:
        log.info("features %s: inputs unchanged, keeping %s", day, current.path)
        return _result(spec, current.uri, current.manifest, skipped=True)

    import ray

    ensure_ray(ctx.ray_address)
    rows_in = 0
    for d in base_hashes:
        part = ctx.store.partition(f"staged/{f.base}", date.fromisoformat(d))
        if part is None:  # listed by _inputs a moment ago, removed since
            raise MissingInputError(f"features: staged partition of {f.base!r} for {d} disappeared while reading")
        rows_in += part.manifest["rows"]
    # One read task per slice of whole row groups: about four per CPU, at most HISTORY_SLICE_ROWS
    # rows each (what a task holds is bounded, whatever the look-back's size).
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    slice_rows = min(HISTORY_SLICE_ROWS, max(100_000, rows_in // (4 * cpus)))
    slices = day_slices(base_files, ctx.store.fs, slice_rows)
    # A dataflow of plain tasks, submitted at once with no barrier in the driver: Ray starts each
    # task when its inputs exist, so reads, index builds and the day's rows overlap.
    # * windows: each window's narrow history (keys, known-at, value: nothing else is read) goes
    #   to one task that sorts it into an index; no row of the look-back is shuffled;
    # * the day's events, in slices of their own size (a history-sized slice could be the whole
    #   day): each task reads its slice and, once the indexes exist, computes its rows (an index
    #   passed as an argument is resolved before the task takes a CPU).
    on_node = ray.remote(_on_node).options(scheduling_strategy="SPREAD", num_returns=2)
    build = ray.remote(build_window_index)
    fold = ray.remote(fold_tables)
    f_ref, fs_ref = ray.put(f), ray.put(ctx.store.fs)
    indexes, node_refs = [], []
    for i, w in enumerate(f.windows):
        # Only the days this window needs (a 3h window reads 2 days even beside a 30d one).
        wanted = set(_staged_files(ctx, f.base, [day - timedelta(days=k) for k in range(w.lookback_days(), -1, -1)])[0])
        parts = [on_node.remote(read_window_inputs, [{"path": p, "row_groups": g}], f_ref, fs_ref, i)
                 for p, g in slices if p in wanted]
        node_refs += [n for _, n in parts]
        # Folded a few slices at a time, so the slices read are not all held until the index
        # task starts: what waits is about a folded slice per FOLD_FANIN read.
        tables = [t for t, _ in parts]
        while len(tables) > FOLD_FANIN:
            tables = [fold.remote(w.by, list(w.aggs), *tables[j:j + FOLD_FANIN])
                      for j in range(0, len(tables), FOLD_FANIN)]
        indexes.append(build.remote(w.by, list(w.aggs), *tables))
        del parts, tables  # the tasks hold the slices while they need them; then they go
    joins = []
    for j in f.asof:
        right = _read_table(dims[j.source][0], ctx.store.fs).select([*j.by, j.time, *sorted(set(j.columns.values()))])
        joins.append(("asof", ray.put(right), {"by": j.by, "time": j.time, "columns": j.columns,
                                              "tolerance_us": int(parse_duration(j.tolerance).total_seconds() * _US)}))
    for lk in f.lookups:
        right = _read_table(dims[lk.source][0], ctx.store.fs).select([*lk.by, *sorted(set(lk.columns.values()))])
        joins.append(("lookup", ray.put(right), {"by": lk.by, "columns": lk.columns}))
    # The day's rows: each slice's task writes its rows, sorted, as a run in the new partition's
    # folder; the runs are then merged in order into the published files. Slices have a fixed
    # size (never the cluster's), so the same inputs give the same runs and the same bytes.
    pending = ctx.store.begin(zone, day, run=ctx.run_id)
    try:
        runs_dir = f"{pending.folder}/_runs"
        ctx.store.fs.create_dir(runs_dir)
        runs, run_nodes = [], []
        for i, (p, g) in enumerate(day_slices(inp.today_files, ctx.store.fs, DAY_SLICE_ROWS)):
            run, node = on_node.remote(day_run, [{"path": p, "row_groups": g}], f_ref, fs_ref, spec.model.task,
                                       [(kind, kw) for kind, _, kw in joins], f"{runs_dir}/run-{i:05d}.parquet",
                                       *[r for _, r, _ in joins], *indexes)
            runs.append(run)
            run_nodes.append(node)
        del indexes, joins  # the pending tasks hold what they still need
        runs = ray.get(runs)
        nodes = set(ray.get(node_refs + run_nodes))
        rows = merge_runs(runs, f.keys, ctx.store.fs, pending.folder)
        ctx.store.fs.delete_dir(runs_dir)
        part = ctx.store.commit(pending, {
            **lineage, "lineage_key": lineage_key, "rows": rows, "run_id": ctx.run_id, "missing_history": missing,
            "features": f.feature_names(), "label": f.label.name, "categorical": f.categorical_names()})
    except BaseException:
        ctx.store.abort(pending)
        raise
    log.info("features %s: %d rows -> %s (on %d Ray node(s))", day, part.manifest["rows"], part.uri, len(nodes))
    return _result(spec, part.uri, part.manifest, skipped=False) | {"ray_nodes": sorted(nodes)}


def day_slices(files: list[str], fs: Any, slice_rows: int) -> list[tuple[str, list[int]]]:
    """(file, row groups) slices of about `slice_rows` rows, from the Parquet footers."""
    import pyarrow.parquet as pq

    out = []
    for path in files:
        meta = pq.ParquetFile(fs.open_input_file(path)).metadata
        groups: list[int] = []
        rows = 0
        for g in range(meta.num_row_groups):
            groups.append(g)
            rows += meta.row_group(g).num_rows
            if rows >= slice_rows:
                out.append((path, groups))
                groups, rows = [], 0
        if groups or meta.num_row_groups == 0:
            out.append((path, groups))
    return out


FILE_ROWS = 32 * ROW_GROUP_ROWS
DAY_SLICE_ROWS = ROW_GROUP_ROWS  # the day's rows per task (whole row groups)
HISTORY_SLICE_ROWS = ROW_GROUP_ROWS  # at most, per window read task (whole row groups)
MERGE_ROWS = 16_384  # row group size of the runs
FOLD_FANIN = 8  # folded window slices merged per task on the way to the index
MERGE_POOL_ROWS = ROW_GROUP_ROWS  # rows read ahead from all the runs together while merging


class PartWriter:
    """Write tables, in order, as part-00000.parquet, part-00001.parquet, ...: row groups of
    exactly ROW_GROUP_ROWS rows (whatever sizes arrive), FILE_ROWS per file, so the same rows
    always give the same bytes. Memory is one row group."""

    def __init__(self, fs: Any, folder: str) -> None:
        self.fs, self.folder = fs, folder
        self.writer: pq.ParquetWriter | None = None
        self.files, self.in_file, self.rows = 0, 0, 0
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.schema: pa.Schema | None = None

    def add(self, table: pa.Table) -> None:
        self.schema = self.schema or table.schema
        self.buffer.append(table)
        self.buffered += table.num_rows
        while self.buffered >= ROW_GROUP_ROWS:
            whole = pa.concat_tables(self.buffer)
            self._write(whole.slice(0, ROW_GROUP_ROWS))
            rest = whole.slice(ROW_GROUP_ROWS)
            self.buffer, self.buffered = [rest], rest.num_rows

    def _write(self, table: pa.Table) -> None:
        import posixpath

        import pyarrow.parquet as pq

        if self.writer is None or self.in_file >= FILE_ROWS:
            if self.writer is not None:
                self.writer.close()
            path = posixpath.join(self.folder, f"part-{self.files:05d}.parquet")
            self.writer = pq.ParquetWriter(path, table.schema, filesystem=self.fs, compression="zstd")
            self.files, self.in_file = self.files + 1, 0
        self.writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        self.in_file += table.num_rows
        self.rows += table.num_rows

    def close(self, schema: pa.Schema | None = None) -> int:
        """Flush; with no rows at all, still one (empty) file, so readers find the schema."""
        if self.buffered:
            self._write(pa.concat_tables(self.buffer).combine_chunks())
        first = self.schema or schema
        if self.writer is None and first:
            self._write(first.empty_table())
        if self.writer is not None:
            self.writer.close()
        return self.rows


def write_sorted(ds: Any, fs: Any, folder: str) -> int:
    """Stream a sorted Ray dataset into part files (``PartWriter``), in dataset order.

    Ray's own writer may concatenate blocks out of order within a file. Memory is a few
    batches, not the partition.
    """
    out = PartWriter(fs, folder)
    try:
        for batch in ds.iter_batches(batch_size=ROW_GROUP_ROWS, batch_format="pyarrow"):
            out.add(batch)
    except BaseException:
        out.close()
        raise
    schema = ds.schema()
    return out.close(getattr(schema, "base_schema", schema))


def _rows_upto(kc: np.ndarray, bound: tuple[int, ...]) -> int:
    """How many columns of `kc` (sorted tuples, one per column) are <= `bound`."""
    below, equal = np.zeros(kc.shape[1], bool), np.ones(kc.shape[1], bool)
    for col, v in zip(kc, bound, strict=False):
        below |= equal & (col < v)
        equal &= col == v
    return int((below | equal).sum())


def merge_runs(runs: list[dict[str, Any]], keys: list[str], fs: Any, folder: str) -> int:
    """Merge sorted runs (``day_run``) into one sorted sequence of part files, by (event time, keys).

    Each key column is coded as ranks in the sorted union of the runs' distinct values (nulls
    last, as Arrow sorts them), so rows compare as tuples of int64s. Runs are read a batch at a
    time (MERGE_POOL_ROWS over all runs): the rows of every run that sort at or before the
    smallest "last row read" of any run are final; they are sorted together and written, and the
    runs whose rows read are all written are read further. Memory is bounded by MERGE_POOL_ROWS and a row group.
    """
    import pyarrow.parquet as pq

    dicts = {}
    for k in keys:
        d = pc.unique(pa.concat_arrays([r["keys"][k] for r in runs])) if runs else pa.array([])
        dicts[k] = d.take(pc.array_sort_indices(d))

    def coded(t: pa.Table) -> np.ndarray:
        cols = [_ts_us(t.column(EVENT_TIME))]
        cols[0] = np.where(cols[0] == np.iinfo(np.int64).min, np.iinfo(np.int64).max, cols[0])  # nulls last
        for k in keys:
            pos = pc.index_in(t.column(k), value_set=dicts[k]).fill_null(len(dicts[k]))
            cols.append(pos.to_numpy(zero_copy_only=False).astype(np.int64))
        return np.stack(cols) if cols else np.zeros((0, t.num_rows), np.int64)

    per_run = max(1024, MERGE_POOL_ROWS // max(1, len(runs)))
    batches = [pq.ParquetFile(fs.open_input_file(r["path"])).iter_batches(per_run) for r in runs]
    buffers: dict[int, tuple[pa.Table, np.ndarray]] = {}  # run -> its rows read, not yet written
    frontier: dict[int, tuple[int, ...]] = {}  # run -> key of the last row read from it

    def read(i: int) -> None:
        b = next(batches[i], None)
        while b is not None and b.num_rows == 0:
            b = next(batches[i], None)
        if b is None:
            frontier.pop(i, None)
            return
        t, kc = pa.Table.from_batches([b]), coded(b)
        if i in buffers:
            t, kc = pa.concat_tables([buffers[i][0], t]), np.concatenate([buffers[i][1], kc], axis=1)
        buffers[i], frontier[i] = (t, kc), tuple(kc[:, -1])

    out = PartWriter(fs, folder)
    try:
        for i in range(len(runs)):
            read(i)
        while buffers:
            bound = min(frontier.values()) if frontier else None
            tables, codes = [], []
            for i, (t, kc) in list(buffers.items()):
                n = kc.shape[1] if bound is None else _rows_upto(kc, bound)  # a prefix: runs are sorted
                tables.append(t.slice(0, n))
                codes.append(kc[:, :n])
                if n == kc.shape[1]:
                    del buffers[i]
                else:
                    buffers[i] = (t.slice(n), kc[:, n:])
            order = np.lexsort(np.concatenate(codes, axis=1)[::-1])  # stable: ties keep run order
            out.add(pa.concat_tables(tables).take(order))
            for i in [i for i, v in frontier.items() if v == bound]:  # all their rows read are written
                read(i)
    except BaseException:
        out.close()
        raise
    return out.close(runs[0]["schema"] if runs else None)


def _result(spec: Spec, path: str, manifest: dict[str, Any], skipped: bool) -> FeaturesResult:
    return {
        "step": "features",
        "date": manifest["date"],
        "uri": str(path),
        "rows": manifest["rows"],
        "feature_version": spec.feature_version(),
        "content_hash": manifest["content_hash"][:16],
        "lineage_key": manifest["lineage_key"],
        "missing_history": manifest.get("missing_history", []),
        "skipped": skipped,
        "ray_nodes": [],
    }


DAY = "__day"  # with read_features(with_day=True): the partition (logical date) a row was published for


def read_features(spec: Spec, ctx: RunContext, days: list[date], load: bool = True,
                  with_day: bool = False) -> tuple[pa.Table | None, dict[str, str], list[str]]:
    """Published feature rows for `days` (in order; None without `load`), their content hashes,
    and the days missing. `with_day` adds the column DAY: each row's partition date."""
    zone = feature_zone(spec)
    tables, hashes, missing = [], {}, []
    for d in days:
        part = ctx.store.partition(zone, d)
        if part is None:
            missing.append(d.isoformat())
            continue
        hashes[d.isoformat()] = part.manifest["content_hash"]
        if load:
            table = _read_table(part.files, ctx.store.fs)
            if with_day:
                table = table.append_column(DAY, pa.array([d] * table.num_rows, pa.date32()))
            tables.append(table)
    if not tables:
        return None, hashes, missing
    return pa.concat_tables(tables, promote_options="default"), hashes, missing

