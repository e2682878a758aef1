"""Features: staged partitions -> a point-in-time correct feature partition, computed in process or on Ray.

For logical date D the step reads the base events of D and of the days its windows need before
D, and writes one row per base event of D to ``features/<name>/v=<feature-version>/date=D/``.
No feature of an event may depend on anything not known before the event (DESIGN.md, "Time"):

* trailing windows count a row only if its ``known_at`` time lies in ``(t - window, t)``; row
  windows (``rows: [N]``) take the last N such rows within the window's look-back, lags the n-th
  latest; rows are ordered by known-at time, then event time, then input order (staged files
  oldest day first, row groups and rows in file order): a total order, the same on any number of
  nodes. A window may aggregate another events source, keyed by the same ``by`` columns;
* as-of joins take, among the joined source's rows with equal ``by`` values, time in
  ``[t - tolerance, t]`` and ``known_at <= t`` (``< t`` with ``strict``), the one with the latest
  time, then the last in input order; rows known more than ``max_delay`` after their time never
  match (what was read must not decide a match);
* derived columns (``features.columns``) are then computed in order over the base row, the
  window and join outputs and the columns before them; the label last (it may read all of these,
  e.g. a delta label ``y - y_lag_1``), and with ``label.known_at`` the row's LABEL_KNOWN_AT.

Windows need the whole look-back per key; rather than shuffle it by key, each window's history
is read narrowly and sorted once into an index (``build_window_index``), and D's events look
their windows up in it (``apply_windows``).

The reads, index builds and the day's rows are plain Ray tasks (one dataflow, no barrier in the
driver) or, below ``infra.compute``'s threshold and with no cluster configured, the same calls
on a thread pool in this process (``_Tasks``): the same bytes either way. Each task of the day's
rows writes its rows, sorted, as a run (in process: keeps it in memory); the runs are merged
into the published files. Every task holds a bounded slice, and the history of a window of plain
aggregates is folded per (key, time), so memory stays flat as the input grows; a window that
needs each row's own value (last/first, rows, lag) keeps one entry per row. Before publishing,
a target-leak check (``features.leak_check``) looks for a feature that reproduces the label.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import itertools
import json
import logging
import math
import os
import sys
import threading
from collections.abc import Iterator, Sequence, Set
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, TypedDict

import numpy as np
import pandas  # noqa: F401  (lookup_join converts to pandas: loaded with the module, not on the first slice)
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq  # (with the module: the step reads Parquet from its first slice)

from daybreak.infra.compute import THREADS_ENV, choose_compute, ensure_ray, process_threads
from daybreak.infra.context import RunContext
from daybreak.infra.errors import ContractError, MissingInputError
from daybreak.infra.store import ROW_GROUP_ROWS
from daybreak.spec import (
    LABEL_KNOWN_AT,
    AsofJoin,
    FeatureSpec,
    Spec,
    WindowAgg,
    evaluate,
    names_in,
    parse_duration,
    window_feature_names,
)

log = logging.getLogger(__name__)

EVENT_TIME = "event_time"
US = 1_000_000


@functools.lru_cache(maxsize=1024)
def _names(expr: str) -> frozenset[str]:
    """``names_in``, walked once per expression: the step asks again for every slice read and
    every feature leak-checked (at 100k rows about 130 walks of ~17 us each)."""
    return frozenset(names_in(expr))


def feature_zone(spec: Spec) -> str:
    return f"features/{spec.features.name}/v={spec.feature_version()}"


# --- pure, per-batch transforms (run inside Ray tasks; also usable without Ray) ----------------

def read_events(items: pa.Table, f: FeatureSpec, fs: Any) -> pa.Table:
    """Read the day's rows named by `items` (row groups of staged files): only the columns read later."""
    wanted = _names(f.event_time) | carried_columns(f)
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

def _per_row(w: WindowAgg) -> bool:
    """Whether window `w` needs each row's own value, in order (``last``/``first``, ``rows``,
    ``lag``), rather than sums and extremes per (key, time): then its history is not folded."""
    return bool(w.rows or w.lag or {"last", "first"} & set(w.aggs))


def _other_source(f: FeatureSpec, w: WindowAgg) -> bool:
    return f.window_source(w) != f.base


def read_window_inputs(items: pa.Table, f: FeatureSpec, fs: Any, i: int) -> pa.Table:
    """Window i's narrow history from the row groups named by `items` (each with its ``ordinal``:
    the slice's place in input order): only the columns it reads."""
    w = f.windows[i]
    time = w.time if _other_source(f, w) and w.time is not None else f.event_time
    wanted = _names(time) | _names(w.value) | _names(w.known_at) | set(w.by)
    ordinals = items.column("ordinal").to_pylist() if "ordinal" in items.column_names else [0] * items.num_rows
    return pa.concat_tables([window_inputs(t, f, i, o)
                             for t, o in zip(_read_slices(items, fs, wanted), ordinals, strict=True)])


def _read_slices(items: pa.Table, fs: Any, wanted: Set[str] | None = None) -> list[pa.Table]:
    """The row groups each item names, with only the `wanted` columns the file has (None: all).

    Read on the calling thread: the step's tasks (on the pool, or Ray's) are its parallelism;
    Arrow's own threads under them only add hand-offs (a third more CPU for a 10k-row slice)."""
    out = []
    for item in items.to_pylist():
        pf = pq.ParquetFile(fs.open_input_file(item["path"]))
        cols = None if wanted is None else [c for c in pf.schema_arrow.names if c in wanted]
        out.append(pf.read_row_groups(item["row_groups"], columns=cols, use_threads=False))
    return out


_ORDINAL_SHIFT = 32  # a row's input order: its slice's ordinal << 32, plus its row in the slice


def window_inputs(batch: pa.Table, f: FeatureSpec, i: int, ordinal: int = 0) -> pa.Table:
    """Group keys, known-at time (int64 us) and value of the rows that can count in window i.

    `batch` is a slice of the window's source (the base source, or the window's ``source``, whose
    event time is its ``time``); `ordinal` is the slice's place in input order.
    """
    w = f.windows[i]
    et = (evaluate(w.time, batch).cast(pa.timestamp("us", tz="UTC")) if _other_source(f, w) and w.time
          else _event_time(batch, f))
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
    # a row with no event time cannot be held to max_delay (so whether it counts would depend on
    # what was read): like one with no known-at time, it is not a row
    keep = pc.and_kleene(keep, pc.and_kleene(pc.is_valid(known), pc.is_valid(et)))
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

    def keys(order: np.ndarray, sel: np.ndarray) -> dict[str, pa.Array]:
        return {c: pa.DictionaryArray.from_arrays(pa.array(r[order][sel], pa.int32()), d)
                for c, r, d in zip(w.by, ranks, dictionaries, strict=False)}

    if _per_row(w):
        # Every row kept, in the total order (key, known-at, event time, input order): last,
        # first, rows and lag need each row's value and place.
        e = _ts_us(et)[rows]
        o = (np.int64(ordinal) << _ORDINAL_SHIFT) + rows.astype(np.int64)
        order = np.lexsort((o, e, k, codes))
        every = np.arange(len(rows))
        return pa.table({**keys(order, every), "__k": pa.array(k[order], pa.int64()),
                         "__e": pa.array(e[order], pa.int64()), "__o": pa.array(o[order], pa.int64()),
                         "__v": pa.array(v[order], pa.float64())})
    order = _key_time_order(codes, k, dictionaries)
    codes, k = codes[order], k[order]
    starts = _run_starts(codes, k)
    return pa.table({**keys(order, starts), "__k": pa.array(k[starts], pa.int64()),
                     **_fold(starts, np.ones(len(k), np.int64), v[order], w.aggs)})


def _key_time_order(codes: np.ndarray, k: np.ndarray, dictionaries: Sequence[pa.Array]) -> np.ndarray:
    """``np.lexsort((k, codes))``: the stable order by key code, then time; packed into one int64
    key where it fits (``_stable_argsort``, several times faster)."""
    if not len(k):
        return np.arange(0)
    span = int(k.max()) - int(k.min()) + 1
    radix = math.prod(max(1, len(d)) for d in dictionaries)
    if radix * span >= 2**62:
        return np.lexsort((k, codes))
    return _stable_argsort(codes * span + (k - k.min()), radix * span)


def _stable_argsort(key: np.ndarray, bound: int) -> np.ndarray:
    """``np.argsort(key, kind="stable")`` for keys in [0, bound): with room in an int64, each key
    carries its position in its low bits, so the keys are distinct and a plain sort of the values
    (several times faster than a stable argsort) gives the same permutation."""
    shift = max(1, (len(key) - 1).bit_length())
    if bound >= 1 << (63 - shift):
        return np.argsort(key, kind="stable")
    packed = np.sort((key.astype(np.int64) << shift) | np.arange(len(key), dtype=np.int64))
    return packed & ((1 << shift) - 1)


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
_ROW_COLUMNS = ("__e", "__o", "__v")  # a per-row history's event time, input order and value


def fold_tables(by: list[str], aggs: list[str], *tables: pa.Table) -> pa.Table:
    """Merge folded window histories (``window_inputs``' output, or this function's) into one,
    sorted by (key, known-at) and folded again per (key, time).

    Keys become integer codes (mixed radix over each key column's sorted dictionary). Tables
    with the same key and time fold in argument order (a stable sort), so sums are the same on
    any number of nodes. Per-row histories (with ``__v``) are merged in their total order (key,
    known-at, event time, input order) and not folded.
    """
    t = pa.concat_tables(tables) if tables else pa.table({"__k": pa.array([], pa.int64()),
                                                          "__n": pa.array([], pa.int64())})
    k = t.column("__k").to_numpy()
    ranks: Sequence[np.ndarray]
    dictionaries: Sequence[pa.Array]
    ranks, dictionaries = zip(*[_sorted_codes(t.column(c)) if c in t.column_names
                                else (np.zeros(0, np.int64), pa.array([], pa.string())) for c in by],
                              strict=False) if by else ((), ())
    codes = _mixed_radix(ranks, dictionaries, len(k))

    def keys(sel: np.ndarray) -> dict[str, pa.Array]:
        return {c: pa.DictionaryArray.from_arrays(pa.array(r[sel], pa.int32()), d)
                for c, r, d in zip(by, ranks, dictionaries, strict=False)}

    if "__v" in t.column_names:
        rc = {c: t.column(c).to_numpy() for c in _ROW_COLUMNS}
        order = np.lexsort((rc["__o"], rc["__e"], k, codes))
        return pa.table({**keys(order), "__k": pa.array(k[order], pa.int64()),
                         **{c: pa.array(x[order]) for c, x in rc.items()}})
    order = _key_time_order(codes, k, dictionaries)
    k = k[order]
    ranks = [r[order] for r in ranks]
    starts = _run_starts(k, *ranks)
    col = {c: t.column(c).to_numpy()[order] for c in _PARTIALS if c in t.column_names}
    return pa.table({**keys(starts), "__k": pa.array(k[starts], pa.int64()),
                     **_fold(starts, col["__n"], np.zeros(0), aggs, col.get("__s"), col.get("__s2"),
                             col.get("__min"), col.get("__max"))})


def _packed(codes: np.ndarray, k: np.ndarray, dictionaries: list[pa.Array], by: list[str]) -> dict[str, Any]:
    """(key code, time) of rows sorted by them, packed into one sorted int64 array ``comp``, so
    every "rows of this key with time in (a, b)" question is two binary searches (``_pack``).

    The packing is code * span + (time - first); past 2**62, times are replaced by their rank
    among the distinct times. Either way it keeps the order.
    """
    radix = math.prod(max(1, len(d)) for d in dictionaries)
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
    return {"dictionaries": dictionaries, "distinct": distinct, "first": first, "span": span, "comp": comp}


def build_window_index(by: list[str], aggs: list[str], *tables: pa.Table) -> dict[str, Any]:
    """One window's whole history (``fold_tables``) as an index with running sums.

    A folded history holds one entry per distinct (key, time); a per-row one an entry per row, in
    the total order, with its value (``v``) for last/first/rows/lag. Either way ``comp`` is
    sorted, so binary searches find each event's rows.
    """
    t = fold_tables(by, aggs, *tables)
    k = t.column("__k").to_numpy()
    ranks: Sequence[np.ndarray]
    dictionaries: Sequence[pa.Array]
    ranks, dictionaries = zip(*[_sorted_codes(t.column(c)) for c in by], strict=False) if by else ((), ())
    codes = _mixed_radix(ranks, dictionaries, len(k))
    index = _packed(codes, k, list(dictionaries), by)
    if "__v" in t.column_names:  # per row: each entry is one row
        v = t.column("__v").to_numpy()
        index |= {"v": v, "cn": np.arange(len(v) + 1, dtype=np.int64)}
        if {"sum", "mean", "std"} & set(aggs):
            index["cs"] = _running_sum(v)
        if "std" in aggs:
            index["cs2"] = _running_sum(v * v)
        for agg, op in (("min", np.minimum), ("max", np.maximum)):
            if agg in aggs:
                index[agg] = _RangeExtreme(v, op)
        return index
    index["cn"] = _running_sum(t.column("__n").to_numpy())
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
    """Each window's features for each event of `batch` (``_window_features``)."""
    t = _ts_us(batch.column(EVENT_TIME))
    event_ok = batch.column(EVENT_TIME).is_valid().to_numpy(zero_copy_only=False)
    for i, w in enumerate(f.windows):
        idx = _resolve(indexes[i])
        for name, values in zip(window_feature_names(w), _window_features(batch, w, idx, t, event_ok), strict=True):
            # no value (an empty window, a missing lag) is null, so coalesce() in a derived
            # column or the label sees it as missing
            batch = batch.append_column(name, pa.array(values, pa.float64(), from_pandas=True))
    return batch


def _window_features(batch: pa.Table, w: WindowAgg, idx: dict[str, Any], t: np.ndarray,
                     event_ok: np.ndarray) -> list[np.ndarray]:
    """Window `w`'s features (in ``window_feature_names`` order) over the key's rows known
    strictly before t: time spans over the rows known in (t - span, t); row windows over the last
    N of the rows known in (t - w.span(), t); lags the n-th latest of those."""
    q, ok = _query_codes(idx, batch, w.by, event_ok)
    comp, tt = idx["comp"], np.where(ok, t, 0)
    # Needles in sorted order keep the binary searches in cache. Packed (key, time - span)
    # orders like (key, time), so one order serves every span of the window.
    needles = _before(idx, q, tt)
    order = np.argsort(needles)  # any order that sorts them: it only keeps the searches in cache
    hi = np.where(ok, _search(comp, needles, order), 0)

    def after(span: timedelta) -> np.ndarray:
        """Where the rows known after t - span begin (the windows' open lower end)."""
        lo_t = tt - int(span.total_seconds() * US)
        return np.where(ok, _search(comp, _pack(idx, q, lo_t, strict=False), order), 0)

    out = []
    for span in w.windows:
        out += [values for _, values in _aggregates(idx, w.aggs, after(parse_duration(span)), hi)]
    if w.rows or w.lag:
        lo = after(w.span())  # the look-back: rows known in (t - span, t)
        for n in w.rows:  # the last n of them
            out += [values for _, values in _aggregates(idx, w.aggs, np.maximum(lo, hi - n), hi)]
        for n in w.lag:  # the n-th latest of them
            out.append(_value_at(idx, hi - n, hi - n >= lo))
    return out


def _query_codes(idx: dict[str, Any], batch: pa.Table, by: list[str],
                 event_ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each event's key code in the index's dictionaries, and whether it can match at all (its
    time is known and each key value occurs in the index)."""
    q = np.zeros(batch.num_rows, dtype=np.int64)
    ok = event_ok.copy()
    for col, d in zip(by, idx["dictionaries"], strict=False):
        if not len(d):  # an empty history: nothing matches (and its dictionary may be untyped)
            return q, ok & False
        pos = pc.index_in(batch.column(col), value_set=d)  # null: a null key, or one never seen
        ok &= pos.is_valid().to_numpy(zero_copy_only=False)
        q = q * max(1, len(d)) + pos.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    if len(by) > len(idx["dictionaries"]):  # an empty history: nothing matches
        ok &= False
    return q, ok


def _value_at(idx: dict[str, Any], pos: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The per-row index's value at `pos` where `valid`, else NaN."""
    out = np.full(len(pos), np.nan)
    if valid.any():
        out[valid] = idx["v"][pos[valid]]
    return out


def _aggregates(idx: dict[str, Any], aggs: Sequence[str], lo: np.ndarray,
                hi: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Each aggregate over the index rows lo[i]:hi[i], in the order of `aggs`."""
    count = (idx["cn"][hi] - idx["cn"][lo]).astype(np.float64)
    out = []
    with np.errstate(invalid="ignore", divide="ignore"):
        s = idx["cs"][hi] - idx["cs"][lo] if "cs" in idx else np.zeros(len(lo))
        mean = np.where(count > 0, s / count, np.nan)
        for agg in aggs:
            if agg == "count":
                values = count
            elif agg == "sum":
                values = s
            elif agg == "mean":
                values = mean
            elif agg == "std":
                s2 = idx["cs2"][hi] - idx["cs2"][lo] if "cs2" in idx else np.zeros(len(lo))
                var = (s2 - count * mean * mean) / (count - 1)
                # Below what the running sums can resolve (their rounding, about eps times the sums
                # subtracted), a variance is zero: equal values give a std of 0, not sqrt(1e-15).
                if "cs2" in idx:
                    noise = 8 * np.finfo(np.float64).eps * (np.abs(idx["cs2"][hi]) + np.abs(idx["cs2"][lo])
                                                            + count * mean * mean) / np.maximum(count - 1, 1)
                    var = np.where(var <= noise, 0.0, var)
                values = np.where(count > 1, np.sqrt(np.maximum(var, 0.0)), np.nan)
            elif agg == "last":  # the latest row in the total order
                values = _value_at(idx, hi - 1, count > 0)
            elif agg == "first":
                values = _value_at(idx, lo, count > 0)
            else:
                values = idx[agg].query(lo, hi) if agg in idx else np.full(len(lo), np.nan)
            out.append((agg, values))
    return out


def _delay(text: str) -> pa.Scalar:
    return pa.scalar(int(parse_duration(text).total_seconds() * US), pa.duration("us"))


def feature_inputs(f: FeatureSpec) -> set[str]:
    """Base columns computing the features reads after the window stage: join and group keys, and
    what the derived columns read (a name that is a window or join output, or a derived column
    defined before, by then is not a base column). ``daybreak.online`` asks a request for these."""
    cols: set[str] = set()
    defined = f.output_names()
    for c in f.columns:
        cols |= _names(c.expr) - defined
        defined.add(c.name)
    for j in f.asof:
        cols |= set(j.by)
    for lk in f.lookups:
        cols |= set(lk.by)
    for w in f.windows:
        cols |= set(w.by)
    return cols


def carried_columns(f: FeatureSpec) -> set[str]:
    """Base columns read after the window stage: the event time, keys, ``feature_inputs``, and
    the base columns the label and its known_at read."""
    cols = {EVENT_TIME, *f.keys} | feature_inputs(f)
    cols |= _names(f.label.expr) - f.output_names() - {c.name for c in f.columns}
    known = f.label.known_at_expr()
    if known is not None:
        cols |= _names(known)
    return cols


def _ts_us(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Timestamps as int64 microseconds; nulls become the minimum int64 (callers mask them)."""
    arr = pc.cast(col.cast(pa.timestamp("us", tz="UTC")), pa.int64())
    return arr.fill_null(np.iinfo(np.int64).min).to_numpy()


def _before(idx: dict[str, Any], q: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The packed value below which lie the key's rows known strictly before t: the upper end of
    every window, row window and lag (one place, so a test can flip it and see the oracle differ)."""
    return _pack(idx, q, t, strict=True)


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


def asof_history(right: pa.Table, j: AsofJoin) -> dict[str, Any]:
    """The rows of an as-of join's source that can match, as a searchable index.

    `right` is the source's staged rows of the days the join reads (``j.lookback_days()``),
    oldest day first, in file order. Rows with a null time, key or known_at never match, nor do
    rows known more than ``max_delay`` after their time (for every event, so what was read never
    decides a match). The rest are sorted by (key, time, input order), packed as windows are
    (``_packed``), with each row's known-at time and the joined columns in the same order.
    """
    cols = sorted(set(j.columns.values()))
    t = right.column(j.time).cast(pa.timestamp("us", tz="UTC"))
    known = evaluate(j.known_at_expr(), right).cast(pa.timestamp("us", tz="UTC"))
    late = pc.fill_null(pc.greater(known, pc.add(t, _delay(j.max_delay or "0s"))), False)
    n_late = pc.sum(late).as_py() or 0
    if n_late:
        log.warning("features.asof (%s): %d row(s) known more than max_delay=%s after their time never match",
                    j.source, n_late, j.max_delay or "0s")
    keep = pc.and_kleene(pc.and_kleene(pc.is_valid(t), pc.is_valid(known)), pc.invert(late))
    for col in j.by:
        keep = pc.and_kleene(keep, pc.is_valid(right.column(col)))
    rows = np.flatnonzero(pc.fill_null(keep, False).to_numpy(zero_copy_only=False))
    ranks: Sequence[np.ndarray]
    dictionaries: Sequence[pa.Array]
    ranks, dictionaries = zip(*[_sorted_codes(right.column(c)) for c in j.by], strict=False) if j.by else ((), ())
    codes = _mixed_radix([r[rows] for r in ranks], dictionaries, len(rows))
    k = _ts_us(t)[rows]
    order = np.lexsort((rows, k, codes))  # (key, time, input order)
    index = _packed(codes[order], k[order], list(dictionaries), j.by)
    index["known"] = _ts_us(known)[rows][order]
    index["values"] = right.select(cols).take(pa.array(rows[order]))
    return index


def _known_by(known: np.ndarray, t: np.ndarray, strict: bool) -> np.ndarray:
    """Whether rows known at `known` are known for events at `t`: at or before t, or strictly
    before with ``strict`` (one place, so a test can flip it and see the oracle differ)."""
    return known < t if strict else known <= t


def asof_join(batch: pa.Table, index: dict[str, Any], by: list[str], tolerance_us: int, columns: dict[str, str],
              strict: bool = False) -> pa.Table:
    """Attach, per event, the joined row with equal `by` values, time in [t - tolerance, t] and
    known by t (``_known_by``) with the latest time, then the last in input order; null columns
    when none (or when the event has no time)."""
    idx = _resolve(index)
    t = _ts_us(batch.column(EVENT_TIME))
    q, ok = _query_codes(idx, batch, by, batch.column(EVENT_TIME).is_valid().to_numpy(zero_copy_only=False))
    tt = np.where(ok, t, 0)
    comp = idx["comp"]
    hi = np.where(ok, np.searchsorted(comp, _pack(idx, q, tt, strict=False), "left"), 0)  # time <= t
    lo = np.where(ok, np.searchsorted(comp, _pack(idx, q, tt - tolerance_us, strict=True), "left"), 0)
    # From the latest candidate back, the first one known by t. Only rows of the last max_delay
    # before t can be unknown, so few steps are taken; each is one vectorised pass.
    found = np.full(batch.num_rows, -1, dtype=np.int64)
    pos = hi - 1
    active = np.flatnonzero(ok & (pos >= lo))
    while len(active):
        known = _known_by(idx["known"][pos[active]], tt[active], strict)
        found[active[known]] = pos[active[known]]
        rest = active[~known]
        pos[rest] -= 1
        active = rest[pos[rest] >= lo[rest]]
    take = pa.array(found, mask=found < 0)
    values = idx["values"]
    for out_name, src in columns.items():
        batch = batch.append_column(out_name, values.column(src).take(take))
    return batch


def lookup_join(batch: pa.Table, right: pa.Table, by: list[str], columns: dict[str, str]) -> pa.Table:
    """Left join to a snapshot table; duplicate keys keep the last row so events are never multiplied."""
    # converted on this thread, as the step's reads are (``read_table``)
    rdf = right.select(by + sorted(set(columns.values()))).to_pandas(use_threads=False)
    rdf = rdf.drop_duplicates(subset=by, keep="last")
    rdf = rdf.rename(columns={src: f"__r_{src}" for src in set(columns.values())})
    left = batch.select(by).to_pandas(use_threads=False)
    merged = left.merge(rdf, on=by, how="left", sort=False)
    for out_name, src in columns.items():
        batch = batch.append_column(out_name, pa.array(merged[f"__r_{src}"].to_numpy(), from_pandas=True))
    return batch


def _put(batch: pa.Table, name: str, column: Any) -> pa.Table:
    """`batch` with `column` as `name`: a derived column may take a base column's name, and then
    replaces it for the expressions after it."""
    i = batch.schema.get_field_index(name)
    return batch.set_column(i, name, column) if i >= 0 else batch.append_column(name, column)


def finalize(batch: pa.Table, f: FeatureSpec, task: str) -> pa.Table:
    """After windows and joins: derived columns in order, then the label (both may read base
    columns, window and join outputs and the columns before them) and, with ``label.known_at``,
    when the label is known (over the base row). Keeps keys, event time, features, label and
    LABEL_KNOWN_AT; drops rows without a label."""
    cols: dict[str, Any] = {k: batch.column(k) for k in f.keys}
    cols[EVENT_TIME] = batch.column(EVENT_TIME)
    known_expr = f.label.known_at_expr()
    # the base row's: before a derived column can take a base column's name
    label_known = None if known_expr is None else evaluate(known_expr, batch)
    for c in f.columns:
        v = evaluate(c.expr, batch)
        v = pc.cast(v, pa.string()) if c.categorical else pc.cast(v, pa.float64())
        batch = _put(batch, c.name, v)
        cols[c.name] = v
    for name in f.feature_names():
        if name not in cols:
            cols[name] = pc.cast(batch.column(name), pa.float64())
    label = evaluate(f.label.expr, batch)
    cols[f.label.name] = pc.cast(label, pa.int64() if task == "classification" else pa.float64())
    if label_known is not None:
        if not pa.types.is_timestamp(label_known.type):
            raise TypeError(f"features.label.known_at must give a timestamp, got {label_known.type}")
        cols[LABEL_KNOWN_AT] = label_known.cast(pa.timestamp("us", tz="UTC"))
    out = pa.table(cols)
    y = out.column(f.label.name)
    has_label = pc.is_valid(y) if not pa.types.is_floating(y.type) else pc.invert(pc.is_nan(y))
    return out.filter(pc.fill_null(has_label, False))


def day_rows(items: pa.Table, f: FeatureSpec, fs: Any, task: str, joins: list[tuple[str, dict[str, Any]]],
             *tables_and_indexes: Any) -> pa.Table:
    """The feature rows of one slice of the day's events: windows, joins, then derived columns
    and the label (``finalize``).

    `tables_and_indexes` holds the join tables (in the order of `joins`: an as-of join's
    ``asof_history``, a lookup's snapshot), then one index per window.
    """
    rights, indexes = tables_and_indexes[:len(joins)], list(tables_and_indexes[len(joins):])
    batch = read_events(items, f, fs)
    if f.windows:
        batch = apply_windows(batch, f, indexes)
    for (kind, kw), right in zip(joins, rights, strict=False):
        batch = asof_join(batch, right, **kw) if kind == "asof" else lookup_join(batch, right, **kw)
    return finalize(batch, f, task)


def day_run(items: pa.Table, f: FeatureSpec, fs: Any, task: str, joins: list[tuple[str, dict[str, Any]]],
            path: str | None, *tables_and_indexes: Any) -> dict[str, Any]:
    """Compute one slice's rows (``day_rows``), sort them, and write them to `path`: a sorted run
    for ``merge_runs``. Only a summary travels back: the rows never enter the object store.
    In process (`path` None) the run stays in memory (``table``), and is merged the same way."""
    t = day_rows(items, f, fs, task, joins, *tables_and_indexes)
    t = t.sort_by([(c, "ascending") for c in [EVENT_TIME, *f.keys]])
    out = {"path": path, "rows": t.num_rows, "schema": t.schema,
           "keys": {k: pc.unique(t.column(k)).drop_null() for k in f.keys}}
    if path is None:
        return out | {"table": t}
    pq.write_table(t, path, filesystem=fs, row_group_size=MERGE_ROWS, compression="lz4")
    return out


def _on_node(fn: Any, items: list[dict[str, Any]], *args: Any) -> tuple[Any, str]:
    """Run a per-slice function in a Ray task; also say which node ran it."""
    import ray

    return fn(pa.Table.from_pylist(items), *args), ray.get_runtime_context().get_node_id()


def _here(fn: Any, items: list[dict[str, Any]], *args: Any) -> tuple[Any, str]:
    """``_on_node`` in this process (no Ray to ask)."""
    return fn(pa.Table.from_pylist(items), *args), IN_PROCESS


IN_PROCESS = "in-process"


def _resolve(value: Any) -> Any:
    """An object ref's value (an argument nested where Ray does not resolve it); else `value`.
    Without importing Ray when it is not loaded: then nothing is a ref."""
    ray = sys.modules.get("ray")
    if ray is not None and isinstance(value, ray.ObjectRef):
        return ray.get(value)
    return value


class _Pool:
    """A few threads running calls whose arguments may be the futures of earlier calls.

    A call is queued only once every future among its arguments is done (its values are passed
    in their place), so a thread never waits for another call and a bounded pool cannot
    deadlock. The queue is ordered by submission: of the calls ready, the earliest runs first,
    so a window's folds and index run as soon as their reads are done, before later reads (as
    Ray's scheduler does, what waits is bounded). The calls are pure functions of their
    arguments: which thread runs them, and when, changes nothing in what they return.
    """

    def __init__(self, threads: int) -> None:
        self._ready: list[tuple[int, Any, tuple[Any, ...], list[Future[Any]]]] = []
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"daybreak-features-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Any, args: tuple[Any, ...], num_returns: int) -> list[Future[Any]]:
        outs: list[Future[Any]] = [Future() for _ in range(num_returns)]
        seq = next(self._seq)
        deps = {id(a): a for a in args if isinstance(a, Future)}
        # The arguments are let go once queued: a done future is kept by its callbacks, and would
        # otherwise keep every other input of this call (and their values) as long as it lives.
        pending: dict[str, Any] = {"args": args, "left": len(deps)}
        lock = threading.Lock()

        def queue() -> None:
            mine = pending.pop("args")
            try:
                values = tuple(a.result() if isinstance(a, Future) else a for a in mine)
            except BaseException as e:  # an input failed: so does this call, without running
                for o in outs:
                    o.set_exception(e)
                return
            finally:
                del mine
            with self._cv:
                if self._closed:  # the step has ended (it failed): nothing waits for this call
                    return
                heapq.heappush(self._ready, (seq, fn, values, outs))
                self._cv.notify()

        def one_done(_: Future[Any]) -> None:
            with lock:
                pending["left"] -= 1
                last = pending["left"] == 0
            if last:
                queue()

        if not deps:
            queue()
        for d in deps.values():
            d.add_done_callback(one_done)
        del args, deps
        return outs

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._ready and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                todo = [heapq.heappop(self._ready)]
            self._run(todo)

    @staticmethod
    def _run(todo: list[tuple[int, Any, tuple[Any, ...], list[Future[Any]]]]) -> None:
        """Run the queued call in `todo`, taken out of it: only this frame holds its arguments,
        and lets them go before its results wake the calls that wait for them."""
        _, fn, args, outs = todo.pop()
        try:
            result = fn(*args)
        except BaseException as e:
            for o in outs:
                o.set_exception(e)
            return
        finally:
            del args
        if len(outs) == 1:
            outs[0].set_result(result)
        else:
            for o, r in zip(outs, result, strict=True):
                o.set_result(r)

    def help_until(self, futures: list[Any]) -> None:
        """Run queued calls on the calling thread too, until `futures` are done: the caller works
        instead of sleeping (one thread fewer to wake: on a busy machine each wake-up waits for
        a CPU)."""
        waited = [f for f in futures if isinstance(f, Future)]

        def wake(_: Future[Any]) -> None:
            with self._cv:
                self._cv.notify_all()

        for f in waited:
            f.add_done_callback(wake)
        while True:
            with self._cv:
                while not self._ready and not self._closed and not all(f.done() for f in waited):
                    self._cv.wait()
                if self._closed or all(f.done() for f in waited):
                    return
                todo = [heapq.heappop(self._ready)]
            self._run(todo)

    def close(self) -> None:
        """Drop the calls not started (once the step has its results, or has failed, nothing waits
        for them); let the running ones end."""
        with self._cv:
            self._closed = True
            self._ready.clear()
            self._cv.notify_all()
        for t in self._threads:
            t.join()


class _Tasks:
    """Where the step's dataflow runs: Ray tasks, or (`in_process`) the same functions on the
    same arguments in this process: on `threads` threads, the caller's among them (pyarrow and
    numpy release the GIL), or, with one thread, as plain calls in submission order. The
    slicing never depends on where it runs, so each call returns the same thing everywhere, and
    the output is the same bytes. Plain calls also serve tests that patch a helper of this module (a Ray worker would
    not see the patch)."""

    def __init__(self, in_process: bool, address: str | None, threads: int = 1) -> None:
        self.in_process = in_process
        self._remote: dict[tuple[Any, int, bool], Any] = {}
        # the caller is one of the threads: it runs calls while it waits for results (``get``)
        self._pool = _Pool(threads - 1) if in_process and threads > 1 else None
        if not in_process:
            ensure_ray(address)

    def put(self, value: Any) -> Any:
        if self.in_process:
            return value
        import ray

        return ray.put(value)

    def call(self, fn: Any, *args: Any, num_returns: int = 1, spread: bool = False) -> Any:
        """fn(*args) now (plain calls), as a future (on the pool), or as a Ray task (its object refs)."""
        if self.in_process:
            fn = _here if fn is _on_node else fn
            if self._pool is None:
                return fn(*args)
            outs = self._pool.submit(fn, args, num_returns)
            return outs[0] if num_returns == 1 else outs
        key = (fn, num_returns, spread)
        if key not in self._remote:
            import ray

            opts: dict[str, Any] = {"num_returns": num_returns}
            if spread:
                opts["scheduling_strategy"] = "SPREAD"
            self._remote[key] = ray.remote(fn).options(**opts)
        return self._remote[key].remote(*args)

    def get(self, refs: Any) -> Any:
        if not self.in_process:
            import ray

            return ray.get(refs)
        if self._pool is not None:
            self._pool.help_until(refs if isinstance(refs, list) else [refs])
        if isinstance(refs, list):
            return [r.result() if isinstance(r, Future) else r for r in refs]
        return refs.result() if isinstance(refs, Future) else refs

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()


# --- the step ----------------------------------------------------------------------------

def staged_files(ctx: RunContext, source: str, days: list[date], seen: dict[tuple[str, date], Any] | None = None,
                  ) -> tuple[list[str], dict[str, str], list[str]]:
    """The staged files of `source` for `days`, their content hashes by day, and the days not
    staged. `seen` keeps the partitions looked up (each is a manifest read), for the next call."""
    files, hashes, missing = [], {}, []
    for d in days:
        if seen is None or (source, d) not in seen:
            found = ctx.store.partition(f"staged/{source}", d)
            if seen is None:
                part = found
            else:
                part = seen[(source, d)] = found
        else:
            part = seen[(source, d)]
        if part is None:
            missing.append(d.isoformat())
            continue
        files += part.files
        hashes[d.isoformat()] = part.manifest["content_hash"]
    return files, hashes, missing


def read_table(files: list[str], fs: Any, columns: list[str] | None = None, threads: bool = True) -> pa.Table:
    """The files' rows (`columns` only, if given), in order; with `threads`, decoded on Arrow's
    threads (the feature step reads on its own: its tasks run beside it, and a process that never
    starts Arrow's pool saves its start, ~10 ms of a 100k-row step)."""
    # By name: a source's days may list its columns in another order (its contract reordered in the spec).
    return pa.concat_tables([pq.ParquetFile(fs.open_input_file(p)).read(columns=columns, use_threads=threads)
                             for p in files], promote_options="default")


@dataclass
class _Inputs:
    base_files: list[str]
    base_hashes: dict[str, str]
    missing: list[str]  # the base source's history days not staged (that its calendar expects)
    missing_sources: dict[str, list[str]]  # every windowed source's: {source: days}
    asof_files: list[list[str]]  # per as-of join, oldest day first
    lookup_files: list[list[str]]  # per lookup: the day's snapshot
    window_files: dict[str, list[str]]  # per other windowed source, oldest day first
    lineage: dict[str, Any]
    lineage_key: str
    today_files: list[str]
    parts: dict[tuple[str, date], Any]  # the staged partitions looked up, by (source, day)


def days_back(day: date, n: int) -> list[date]:
    """The n days before `day` and `day`, oldest first."""
    return [day - timedelta(days=k) for k in range(n, -1, -1)]


def staged_inputs(spec: Spec, ctx: RunContext) -> _Inputs:
    """The staged partitions the date's features are made from, and their lineage."""
    f = spec.features
    day = ctx.logical_date
    today_part = ctx.store.partition(f"staged/{f.base}", day)
    if today_part is None:
        raise MissingInputError(f"features: no staged partition of {f.base!r} for {day}; run the stage step first")
    seen: dict[tuple[str, date], Any] = {}
    base_files, base_hashes, missing = staged_files(ctx, f.base, days_back(day, f.lookback_days()), seen)
    missing = [d for d in missing if spec.expects(date.fromisoformat(d), f.base)]  # a day with no drop is no gap
    hashes: dict[str, dict[str, str]] = {f.base: base_hashes}

    def add(source: str, hs: dict[str, str]) -> None:  # a source read twice: the union of its days
        hashes[source] = {**hashes.get(source, {}), **hs}

    missing_sources = {f.base: missing} if missing else {}
    window_files: dict[str, list[str]] = {}
    for source in sorted({f.window_source(w) for w in f.windows} - {f.base}):
        fl, hs, gone = staged_files(ctx, source, days_back(day, f.lookback_days(source)), seen)
        window_files[source] = fl
        add(source, hs)
        gone = [d for d in gone if spec.expects(date.fromisoformat(d), source)]
        if gone:
            missing_sources[source] = gone
    asof_files = []
    for j in f.asof:
        fl, hs, _ = staged_files(ctx, j.source, days_back(day, j.lookback_days()), seen)
        asof_files.append(fl)
        add(j.source, hs)
    lookup_files = []
    for lk in f.lookups:
        part = ctx.store.partition(f"staged/{lk.source}", day)
        if part is None:
            raise MissingInputError(f"features: no staged snapshot of {lk.source!r} for {day}")
        lookup_files.append(part.files)
        add(lk.source, {day.isoformat(): part.manifest["content_hash"]})

    lineage = {"feature_version": spec.feature_version(), "date": day.isoformat(), "inputs": hashes}
    lineage_key = hashlib.sha256(json.dumps(lineage, sort_keys=True).encode()).hexdigest()[:16]
    return _Inputs(base_files, base_hashes, missing, missing_sources, asof_files, lookup_files, window_files,
                   lineage, lineage_key, today_part.files, seen)


def recorded_lineage(spec: Spec, ctx: RunContext) -> str | None:
    """The lineage key of the published feature partition for the date, when it was made from the
    staged partitions as they are now; None otherwise."""
    current = ctx.store.partition(feature_zone(spec), ctx.logical_date)
    if current is None:
        return None
    key = staged_inputs(spec, ctx).lineage_key
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
    missing_history: list[str]  # the base source's expected history days not staged
    missing_history_sources: dict[str, list[str]]  # every windowed source's, {source: days}
    leak_check: dict[str, Any]  # the target-leak check's outcome
    skipped: bool  # the partition was kept as is (inputs unchanged)
    ray_nodes: list[str]  # the Ray nodes that built it (none when skipped or built in process)
    compute: str  # where it was built: "process" or "ray" (absent when skipped)


def build_features(spec: Spec, ctx: RunContext, *, in_process: bool | None = None) -> FeaturesResult:
    """Compute the feature partition for ``ctx.logical_date``: in this process (`in_process`
    True), on Ray (False), or (None) as ``infra.compute.choose_compute`` decides from the
    configured cluster and the rows read. Either way the same dataflow (``_Tasks``), and the
    same bytes."""
    f = spec.features
    day = ctx.logical_date
    inp = staged_inputs(spec, ctx)
    missing, lineage, lineage_key = inp.missing, inp.lineage, inp.lineage_key
    if inp.missing_sources:
        log.warning("features %s: history days not staged %s; windows near them see fewer rows", day,
                    inp.missing_sources)
    zone = feature_zone(spec)
    current = ctx.store.partition(zone, day)
    if current is not None and current.manifest.get("lineage_key") == lineage_key:
        log.info("features %s: inputs unchanged, keeping %s", day, current.path)
        return _result(spec, current.uri, current.manifest, skipped=True)

    # The rows read: the base source's look-back, and that of every other windowed source.
    rows_in = sum(inp.parts[(source, d)].manifest["rows"]
                  for source in (f.base, *inp.window_files)
                  for d in days_back(day, f.lookback_days(source)) if inp.parts.get((source, d)) is not None)
    if in_process is None:
        choice = choose_compute(ctx.ray_address, ctx.distributed, rows_in)
        in_process = not choice.ray
        log.info("features %s: %s rows, %s (%s)", day, f"{rows_in:,}", choice.where, choice.why)
    tasks = _Tasks(in_process, ctx.ray_address, _threads(rows_in) if in_process else 1)
    try:
        return _build(spec, ctx, inp, tasks, lineage, lineage_key, missing, zone)
    finally:
        tasks.close()


def _threads(rows_in: int) -> int:
    """Threads of the in-process dataflow: ``process_threads()``, but one (plain calls, in
    order) below POOL_MIN_ROWS rows read, unless DAYBREAK_THREADS asks for more."""
    if rows_in < POOL_MIN_ROWS and not os.environ.get(THREADS_ENV, "").strip():
        return 1
    return process_threads()


def _build(spec: Spec, ctx: RunContext, inp: _Inputs, tasks: _Tasks, lineage: dict[str, Any], lineage_key: str,
           missing: list[str], zone: str) -> FeaturesResult:
    f = spec.features
    day = ctx.logical_date
    # One read task per slice of whole row groups, at most HISTORY_SLICE_ROWS rows each (what a
    # task holds is bounded, whatever the look-back's size). A fixed size, never the CPUs': the
    # folds of a window's history (float sums) then group the same rows everywhere.
    slice_rows = HISTORY_SLICE_ROWS
    # Each slice keeps its place in input order (its ordinal): per-row windows order ties by it.
    slices = {f.base: day_slices(inp.base_files, ctx.store.fs, slice_rows)}
    for source, files in inp.window_files.items():
        slices[source] = day_slices(files, ctx.store.fs, slice_rows)
    # A dataflow of plain tasks, submitted at once with no barrier in the driver: Ray starts each
    # task when its inputs exist, so reads, index builds and the day's rows overlap.
    # * windows: each window's narrow history (keys, known-at, value: nothing else is read) goes
    #   to one task that sorts it into an index; no row of the look-back is shuffled;
    # * the day's events, in slices of their own size (a history-sized slice could be the whole
    #   day): each task reads its slice and, once the indexes exist, computes its rows (an index
    #   passed as an argument is resolved before the task takes a CPU).
    f_ref, fs_ref = tasks.put(f), tasks.put(ctx.store.fs)
    indexes, node_refs = [], []
    for i, w in enumerate(f.windows):
        source = f.window_source(w)
        # Only the days this window needs (a 3h window reads 2 days even beside a 30d one).
        wanted = set(staged_files(ctx, source, days_back(day, w.lookback_days()), inp.parts)[0])
        parts = [tasks.call(_on_node, read_window_inputs, [{"path": p, "row_groups": g, "ordinal": o}], f_ref,
                            fs_ref, i, num_returns=2, spread=True)
                 for o, (p, g) in enumerate(slices[source]) if p in wanted]
        node_refs += [n for _, n in parts]
        # Folded a few slices at a time, so the slices read are not all held until the index
        # task starts: what waits is about a folded slice per FOLD_FANIN read.
        tables = [t for t, _ in parts]
        while len(tables) > FOLD_FANIN:
            tables = [tasks.call(fold_tables, w.by, list(w.aggs), *tables[j:j + FOLD_FANIN])
                      for j in range(0, len(tables), FOLD_FANIN)]
        indexes.append(tasks.call(build_window_index, w.by, list(w.aggs), *tables))
        del parts, tables  # the tasks hold the slices while they need them; then they go
    joins = []
    for j, files in zip(f.asof, inp.asof_files, strict=True):
        right = read_table(files, ctx.store.fs, threads=False) if files else None
        index = asof_history(right if right is not None else empty_source(spec, j.source), j)
        joins.append(("asof", tasks.put(index), {
            "by": j.by, "columns": j.columns, "strict": j.strict,
            "tolerance_us": int(parse_duration(j.tolerance).total_seconds() * US)}))
    for lk, files in zip(f.lookups, inp.lookup_files, strict=True):
        right = read_table(files, ctx.store.fs, threads=False).select([*lk.by, *sorted(set(lk.columns.values()))])
        joins.append(("lookup", tasks.put(right), {"by": lk.by, "columns": lk.columns}))
    # The day's rows: each slice's task writes its rows, sorted, as a run in the new partition's
    # folder; the runs are then merged in order into the published files. Slices have a fixed
    # size (never the cluster's), so the same inputs give the same runs and the same bytes.
    pending = ctx.store.begin(zone, day, run=ctx.run_id)
    try:
        runs_dir = None if tasks.in_process else f"{pending.folder}/_runs"  # in process, runs stay in memory
        if runs_dir:
            ctx.store.fs.create_dir(runs_dir)
        runs, run_nodes = [], []
        for i, (p, g) in enumerate(day_slices(inp.today_files, ctx.store.fs, DAY_SLICE_ROWS)):
            run, node = tasks.call(_on_node, day_run, [{"path": p, "row_groups": g}], f_ref, fs_ref,
                                   spec.model.task, [(kind, kw) for kind, _, kw in joins],
                                   runs_dir and f"{runs_dir}/run-{i:05d}.parquet",
                                   *[r for _, r, _ in joins], *indexes,
                                   num_returns=2, spread=True)
            runs.append(run)
            run_nodes.append(node)
        del indexes, joins  # the pending tasks hold what they still need
        runs = tasks.get(runs)
        nodes = set(tasks.get(node_refs + run_nodes))
        rows = merge_runs(runs, f.keys, ctx.store.fs, pending.folder)
        if runs_dir:
            ctx.store.fs.delete_dir(runs_dir)
        leak = leak_check(spec, _data_files(ctx.store.fs, pending.folder), ctx.store.fs)
        part = ctx.store.commit(pending, {
            **lineage, "lineage_key": lineage_key, "rows": rows, "run_id": ctx.run_id, "missing_history": missing,
            "missing_history_sources": inp.missing_sources, "leak_check": leak,
            "features": f.feature_names(), "label": f.label.name, "categorical": f.categorical_names()})
    except BaseException:
        ctx.store.abort(pending)
        raise
    if tasks.in_process:
        log.info("features %s: %d rows -> %s (in process)", day, part.manifest["rows"], part.uri)
        return _result(spec, part.uri, part.manifest, skipped=False) | {"compute": "process"}
    log.info("features %s: %d rows -> %s (on %d Ray node(s))", day, part.manifest["rows"], part.uri, len(nodes))
    return _result(spec, part.uri, part.manifest, skipped=False) | {"ray_nodes": sorted(nodes), "compute": "ray"}


def empty_source(spec: Spec, source: str) -> pa.Table:
    """No rows of `source`, with its contract's columns (an as-of join with nothing staged)."""
    from daybreak.spec import arrow_type

    return pa.table({c: pa.array([], type=arrow_type(t.type)) for c, t in spec.sources[source].columns.items()})


def _data_files(fs: Any, folder: str) -> list[str]:
    """The part files written to a run folder (as ``Store.commit`` will list them)."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(folder))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and not i.base_name.startswith((".", "_")))


# --- the run-time target-leak check ------------------------------------------------------------

LEAK_MIN_ROWS = 500
"""Rows (with the feature and the label) the leak check needs before it judges a feature."""
LEAK_MIN_CLASS_ROWS = 50
"""Classification: rows of each class it needs."""
LEAK_READ_ONCE_ROWS = 2 * ROW_GROUP_ROWS
"""Days up to this many rows are read for the check at once, larger ones a column at a time."""
LEAK_EQUAL_SHARE = 0.99
"""Regression: a feature equal to the label on this share of rows reproduces it..."""
LEAK_MIN_ABS_R = 0.9999
"""...as does one whose Pearson correlation with the label is at least this (in absolute value)."""


def leak_suspects(table: pa.Table, f: FeatureSpec, task: str) -> dict[str, str]:
    """The numeric features of `table` (a day's feature rows) that reproduce the label, each with
    why: validation cannot see a leak through data (a snapshot that holds the outcome, a column
    the source fills in after the fact); this sees its effect.

    * classification (two classes): the feature separates them perfectly, a rank ROC AUC (ties
      count half) of exactly 1 or 0, on at least LEAK_MIN_ROWS rows with LEAK_MIN_CLASS_ROWS of
      each class;
    * regression: on at least LEAK_MIN_ROWS rows, the feature equals the label on
      LEAK_EQUAL_SHARE of them (unless the label itself takes one value on that share: a sparse
      label is matched by any mostly-zero feature), or |Pearson r| >= LEAK_MIN_ABS_R.

    Rows where the feature or the label is null (or NaN) are left out. Categorical features are
    not checked: a category that decides the label on one day's rows is common and legitimate
    (a rare merchant, a one-flight route), and an identifier-like category would decide it
    trivially; their leaks come through a numeric encoding of the same column, which is checked.
    """
    label = table.column(f.label.name).to_numpy(zero_copy_only=False).astype(np.float64)
    skipped = set(f.categorical_names()) | past_values(f)
    out: dict[str, str] = {}
    for name in f.feature_names():
        if name in skipped or name not in table.column_names:
            continue
        x = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
        keep = ~(np.isnan(x) | np.isnan(label))
        x, y = x[keep], label[keep]
        if len(x) < LEAK_MIN_ROWS:
            continue
        why = _separates(x, y) if task == "classification" else _reproduces(x, y)
        if why:
            out[name] = why
    return out


def past_values(f: FeatureSpec) -> set[str]:
    """Features made only of values known strictly before the event: window outputs (validation
    has checked their known_at against the label's) and derived columns reading nothing else.
    They are not leak-checked: a label that persists from day to day is reproduced by its own
    lag (``lag: 1`` of a state that rarely changes; a price level beside yesterday's), and that
    is the point of the feature, not a leak."""
    past = {n for w in f.windows for n in window_feature_names(w)}
    for c in f.columns:
        names = _names(c.expr)
        if names and names <= past:
            past.add(c.name)
        else:
            past.discard(c.name)  # a derived column may take a name: it is then what it reads
    return past


def _separates(x: np.ndarray, y: np.ndarray) -> str | None:
    classes = np.unique(y)
    if len(classes) != 2:
        return None
    pos = y == classes[1]
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if min(n1, n0) < LEAK_MIN_CLASS_ROWS:
        return None
    # The rank ROC AUC (ties counting half) is exactly 1 when every positive lies strictly above
    # every negative, and exactly 0 when strictly below: no ranking needed to tell.
    if x[pos].min() > x[~pos].max():
        auc = 1
    elif x[pos].max() < x[~pos].min():
        auc = 0
    else:
        return None
    return f"separates the classes perfectly (ROC AUC {auc} on {len(x)} rows)"


def _reproduces(x: np.ndarray, y: np.ndarray) -> str | None:
    equal = float(np.mean(x == y))
    # a label that is nearly always one value (mostly 0) is matched by any feature nearly always
    # that value: equality tells nothing then, and an exact copy still shows in the correlation
    _, counts = np.unique(y, return_counts=True)
    if equal >= LEAK_EQUAL_SHARE and counts.max() < LEAK_EQUAL_SHARE * len(y):
        return f"equals the label on {equal:.1%} of {len(x)} rows"
    if np.std(x) > 0 and np.std(y) > 0:
        r = float(np.corrcoef(x, y)[0, 1])
        if abs(r) >= LEAK_MIN_ABS_R:
            return f"correlates with the label at r = {r:.6f} on {len(x)} rows"
    return None


def leak_check(spec: Spec, files: list[str], fs: Any) -> dict[str, Any]:
    """Run ``leak_suspects`` on the day's rows (the run's files, not yet published) as
    ``features.leak_check`` says: block raises a ContractError naming the feature(s), so
    nothing is published; warn logs them. Returns what the manifest records."""
    f = spec.features
    mode = f.leak_check
    if mode == "off":
        return {"mode": "off"}
    def read(columns: list[str]) -> pa.Table:
        return read_table(files, fs, columns, threads=False)

    skipped = set(f.categorical_names()) | past_values(f)
    checked = [n for n in f.feature_names() if n not in skipped]
    rows = sum(pq.ParquetFile(fs.open_input_file(p)).metadata.num_rows for p in files)
    # A small day is read once; a large one a column at a time (memory: two columns of the day).
    whole = read([f.label.name, *checked]) if files and rows <= LEAK_READ_ONCE_ROWS else None
    label = (whole.select([f.label.name]) if whole is not None else read([f.label.name]) if files
             else pa.table({f.label.name: pa.array([], pa.float64())}))
    suspects: dict[str, str] = {}
    for name in checked:
        if label.num_rows:
            column = whole.column(name) if whole is not None else read([name]).column(name)
            suspects |= leak_suspects(label.append_column(name, column), f, spec.model.task)
    if suspects:
        detail = "; ".join(f"{n!r} {why}" for n, why in suspects.items())
        msg = (f"features {spec.features.name}: target leak suspected: {detail}. The feature(s) reproduce the "
               f"label {f.label.name!r} on the day's rows, so they would hand the model the answer (check "
               "what they read: a source filled in after the outcome, a snapshot holding it)")
        if mode == "block":
            raise ContractError(msg + "; nothing published. If this is expected, set features.leak_check: warn")
        log.warning("%s (features.leak_check: warn: published anyway)", msg)
    return {"mode": mode, "rows": label.num_rows, "suspects": suspects}


def day_slices(files: list[str], fs: Any, slice_rows: int) -> list[tuple[str, list[int]]]:
    """(file, row groups) slices of about `slice_rows` rows, from the Parquet footers."""
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
# Rows read below which the in-process step runs on one thread (``_threads``): the whole input
# is then at most one read task's rows, and a second thread only adds hand-offs; on a machine
# whose other cores are busy, each one waits for a CPU. The feature step on benchmarks/features.py's
# flights, fresh processes, 2 cores shared with other work (ms; DAYBREAK_THREADS=2 vs 1):
#   100k rows: best 83-94 vs 87-90; medians 200-260 vs 90 (half the 2-thread runs 260-640)
#   300k rows: best 133 vs 153 (the pool pays from here when a second core is free)
POOL_MIN_ROWS = ROW_GROUP_ROWS


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
    """Stream a sorted Ray dataset (or a table) into part files (``PartWriter``), in order.

    Ray's own writer may concatenate blocks out of order within a file. Memory is a few
    batches, not the partition.
    """
    out = PartWriter(fs, folder)
    if isinstance(ds, pa.Table):
        for batch in ds.to_batches(max_chunksize=ROW_GROUP_ROWS):
            out.add(pa.Table.from_batches([batch]))
        return out.close(ds.schema)
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

    def batches_of(run: dict[str, Any]) -> Iterator[pa.RecordBatch | pa.Table]:
        """A run's rows `per_run` at a time (the last batch shorter), from its file or its table."""
        if "table" not in run:
            return pq.ParquetFile(fs.open_input_file(run["path"])).iter_batches(per_run)
        t = run.pop("table")  # held here only: each batch let go once merged
        return (t.slice(i, per_run) for i in range(0, t.num_rows, per_run))

    batches = [batches_of(r) for r in runs]
    buffers: dict[int, tuple[pa.Table, np.ndarray]] = {}  # run -> its rows read, not yet written
    frontier: dict[int, tuple[int, ...]] = {}  # run -> key of the last row read from it

    def read(i: int) -> None:
        b = next(batches[i], None)
        while b is not None and b.num_rows == 0:
            b = next(batches[i], None)
        if b is None:
            frontier.pop(i, None)
            return
        t, kc = (b if isinstance(b, pa.Table) else pa.Table.from_batches([b])), coded(b)
        if i in buffers:
            t, kc = pa.concat_tables([buffers[i][0], t]), np.concatenate([buffers[i][1], kc], axis=1)
        buffers[i], frontier[i] = (t, kc), tuple(kc[:, -1])

    out = PartWriter(fs, folder)
    if len(runs) == 1:  # already in order: written as it is read (what the merge would write)
        try:
            for b in batches[0]:
                if b.num_rows:
                    out.add(b if isinstance(b, pa.Table) else pa.Table.from_batches([b]))
        except BaseException:
            out.close()
            raise
        return out.close(runs[0]["schema"])
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
        "missing_history_sources": manifest.get("missing_history_sources", {}),
        "leak_check": manifest.get("leak_check", {}),
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
            table = read_table(part.files, ctx.store.fs)
            if with_day:
                table = table.append_column(DAY, pa.array([d] * table.num_rows, pa.date32()))
            tables.append(table)
    if not tables:
        return None, hashes, missing
    return pa.concat_tables(tables, promote_options="default"), hashes, missing

