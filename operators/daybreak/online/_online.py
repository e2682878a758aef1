"""Online features: the spec's features for raw rows at request time, equal to the offline ones.

The state holds, per entity, exactly what the features read at request time (``_parts``):

* a window (``w<i>``): its history as the feature step folds it (``window_inputs``: per (key,
  known-at) the count, sum, sum of squares, min and max; per row the event time, input order and
  value for last/first, row counts and lags), scored by known-at;
* an as-of join (``a<j>``): the joined source's rows (the columns its time, known_at, keys and
  outputs read), scored by their time;
* a lookup (``l<k>``): the snapshot's rows, the last one per key winning.

``materialize`` loads it as of the end of a date from the staged partitions, through the feature
step's own readers, keeping only what a request after that date can read (the longest window's
span, the join's tolerance), as a new generation made current in one switch. ``push`` adds
events as they arrive, to the area of their day. ``features_for`` reads, for the requested rows'
keys and times, the entries of the current generation and of the live days after it, rebuilds
the feature step's indexes over them and runs its window and join functions: the offline
computation over a smaller history. An entry counts in a window only once its known-at has
passed (strictly before the event), exactly as offline, whenever it was pushed.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from itertools import repeat
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from daybreak.features import (
    EVENT_TIME,
    HISTORY_SLICE_ROWS,
    US,
    apply_windows,
    asof_history,
    asof_join,
    build_window_index,
    day_slices,
    days_back,
    empty_source,
    feature_inputs,
    fold_tables,
    lookup_join,
    prepare_events,
    read_table,
    read_window_inputs,
    staged_files,
    staged_inputs,
    window_inputs,
)
from daybreak.infra.context import RunContext
from daybreak.infra.errors import DaybreakError
from daybreak.online._store import Entry, OnlineStore, Query
from daybreak.spec import DEFAULT_MAX_STALENESS, Spec, arrow_type, evaluate, names_in, parse_duration

log = logging.getLogger(__name__)

PUSHED_ORDER = 1 << 62
"""A pushed row's input order (per-row windows order ties by it) starts here: after every staged row's."""


class OnlineError(DaybreakError):
    """The online store cannot serve the spec (an unsupported feature, nothing materialized)."""


# --- what the state holds ----------------------------------------------------------------------

@dataclass(frozen=True)
class _Part:
    name: str  # w0, a0, l0
    kind: str  # window | asof | lookup
    index: int
    source: str
    by: tuple[str, ...]
    span_us: int  # how far before a request's time its entries can matter (0: any time)
    columns: tuple[str, ...] = ()  # asof/lookup: the source columns kept


def _us(d: timedelta) -> int:
    return int(d.total_seconds() * US)


def _parts(spec: Spec) -> list[_Part]:
    f = spec.features
    out = []
    for i, w in enumerate(f.windows):
        out.append(_Part(f"w{i}", "window", i, f.window_source(w), tuple(w.by), _us(w.span())))
    for j, a in enumerate(f.asof):
        cols = {a.time} | names_in(a.known_at_expr()) | set(a.by) | set(a.columns.values())
        out.append(_Part(f"a{j}", "asof", j, a.source, tuple(a.by), _us(parse_duration(a.tolerance)),
                         tuple(sorted(cols))))
    for k, lk in enumerate(f.lookups):
        out.append(_Part(f"l{k}", "lookup", k, lk.source, tuple(lk.by), 0,
                         tuple(sorted(set(lk.by) | set(lk.columns.values())))))
    return out


def _layout_hash(spec: Spec) -> str:
    """Changes whenever what the state holds would: the feature definitions and source contracts."""
    return spec.feature_version()


_KEY_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer, pa.types.is_boolean)


def check_supported(spec: Spec) -> None:
    """Refuse, naming the feature, what the online store cannot compute as the feature step does.

    Every feature kind is computed online (time, row-count and lag windows with every
    aggregate, windows over another source, as-of joins with known_at/strict/max_delay, lookups,
    derived columns); what is refused is an entity key of a type the state's keys (JSON) are not
    proved to match exactly as the feature step's index does: only string, integer and boolean
    keys are (a float key's NaN or -0.0, a time key's units would each need their own proof).

    Raises:
        OnlineError: naming the feature and its key column.
    """
    for p in _parts(spec):
        contract = spec.sources[p.source].columns
        for col in p.by:
            if col in contract and not any(is_(arrow_type(contract[col].type)) for is_ in _KEY_TYPES):
                what = {"window": f"windows[{p.index}]", "asof": f"asof[{p.index}]",
                        "lookup": f"lookups[{p.index}]"}[p.kind]
                raise OnlineError(f"features.{what}: key column {col!r} of {p.source!r} has type "
                                  f"{contract[col].type}: not supported online (entity keys must be strings, "
                                  "integers or booleans)")


# --- encoding rows as JSON payloads -------------------------------------------------------------

def _to_json_values(col: pa.ChunkedArray | pa.Array) -> list[Any]:
    """A column's values as JSON-able Python values: times as int microseconds, dates as days."""
    t = col.type
    if pa.types.is_dictionary(t):
        return col.to_pylist()
    if pa.types.is_timestamp(t):
        return pc.cast(col.cast(pa.timestamp("us", tz=t.tz)), pa.int64()).to_pylist()
    if pa.types.is_date(t):
        return pc.cast(col.cast(pa.date32()), pa.int32()).to_pylist()
    return col.to_pylist()


def _from_json_values(values: list[Any], t: pa.DataType) -> pa.Array:
    if pa.types.is_timestamp(t):
        return pa.array(values, pa.int64()).cast(pa.timestamp("us", tz=t.tz)).cast(t)
    if pa.types.is_date(t):
        return pa.array(values, pa.int32()).cast(pa.date32()).cast(t)
    return pa.array(values, t)


def _keys(table: pa.Table, by: Sequence[str]) -> list[str | None]:
    """Each row's entity key (JSON of its ``by`` values); None for a row with a null key part."""
    if not by:
        return ["[]"] * table.num_rows
    cols = [_to_json_values(table.column(c)) for c in by]
    memo: dict[tuple[Any, ...], str | None] = {}
    out: list[str | None] = []
    for values in zip(*cols, strict=True):
        key = memo.get(values, memo)
        if key is memo:
            key = memo[values] = None if any(v is None for v in values) else json.dumps(list(values))
        out.append(key)  # type: ignore[arg-type]
    return out


def _entries(part: _Part, table: pa.Table, score: list[Any], payload_cols: Sequence[str],
             first_seq: int, keep: np.ndarray | None = None) -> list[Entry]:
    """One entry per row of `table` (where `keep`): key, score and the payload columns."""
    keys = _keys(table, part.by)
    cols = {c: _to_json_values(table.column(c)) for c in payload_cols}
    out = []
    for i, key in enumerate(keys):
        if key is None or score[i] is None or (keep is not None and not keep[i]):
            continue
        payload = {"q": first_seq + i, **{c: v[i] for c, v in cols.items()}}
        out.append((part.name, key, int(score[i]), json.dumps(payload, separators=(",", ":"))))
    return out


def _window_entries(part: _Part, t: pa.Table, first_seq: int, keep: np.ndarray | None = None) -> list[Entry]:
    payload = [c for c in t.column_names if c.startswith("__") and c != "__k"]
    return _entries(part, t, t.column("__k").to_pylist(), payload, first_seq, keep)


def _source_rows(spec: Spec, part: _Part, table: pa.Table) -> pa.Table:
    """The part's columns of a source table, typed as its contract says (absent ones null)."""
    contract = spec.sources[part.source].columns
    cols = {}
    for c in part.columns:
        t = arrow_type(contract[c].type) if c in contract else pa.string()
        cols[c] = table.column(c).cast(t) if c in table.column_names else pa.nulls(table.num_rows, t)
    return pa.table(cols)


def _asof_time_us(spec: Spec, part: _Part, rows: pa.Table) -> list[Any]:
    a = spec.features.asof[part.index]
    return _to_json_values(rows.column(a.time).cast(pa.timestamp("us", tz="UTC")))


# --- materialize --------------------------------------------------------------------------------

@dataclass
class MaterializeResult:
    date: str
    generation: str
    entries: dict[str, int]  # per part
    skipped: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"step": "online.materialize", "date": self.date, "generation": self.generation,
                "entries": self.entries, "skipped": self.skipped, "seconds": round(self.seconds, 3)}


def _end_of_day_us(spec: Spec, day: date) -> int:
    return int(spec.label_cut(day).timestamp() * US)


def _due(spec: Spec, plan: _Plan, materialized: str) -> tuple[int, date]:
    """How far the state materialized for `materialized` is complete: the end of that date and of
    the days after it on which the base source's calendar expects no drop (a business-day feed
    materialized on Friday is as fresh on Monday morning as a daily feed materialized on Sunday),
    and the next day whose drop is due. Cached per date on the plan."""
    hit = plan.due.get(materialized)
    if hit is None:
        day, cal = _date(materialized), spec.calendar()
        for _ in range(366):
            if cal.expects(day + timedelta(days=1)):
                break
            day += timedelta(days=1)
        hit = plan.due[materialized] = (_end_of_day_us(spec, day), day + timedelta(days=1))
    return hit


def materialize(spec: Spec, ctx: RunContext, store: OnlineStore) -> MaterializeResult:
    """Load the state as of the end of ``ctx.logical_date`` from the staged partitions.

    Written as a new generation, made current by one switch only once whole: a materialize that
    fails or is killed leaves the previous state readable (its partial generation is dropped
    by the next one). Idempotent: with the same staged inputs and features for the date already
    current, nothing is rewritten. Live days up to the date are dropped (their events are in the
    staged data now), as are older generations but the previous one (a reader may still be on it).

    Raises:
        OnlineError: a feature the online store cannot compute (``check_supported``).
        MissingInputError: the date's base partition or snapshot is not staged.
    """
    started = time.monotonic()
    check_supported(spec)
    f = spec.features
    day = ctx.logical_date
    inp = staged_inputs(spec, ctx)
    layout = _layout_hash(spec)
    cur = store.current()
    if cur and cur.get("date") == day.isoformat() and cur.get("lineage_key") == inp.lineage_key \
            and cur.get("layout") == layout:
        log.info("online: state of %s already current (%s)", day, cur["area"])
        return MaterializeResult(day.isoformat(), cur["area"], cur.get("entries", {}), skipped=True,
                                 seconds=time.monotonic() - started)
    horizon = _end_of_day_us(spec, day)
    fs = ctx.store.fs
    area = f"g{uuid.uuid4().hex[:12]}"
    counts: dict[str, int] = {}
    try:
        for part in _parts(spec):
            if part.kind == "window":
                w = f.windows[part.index]
                files = staged_files(ctx, part.source, days_back(day, w.lookback_days()), inp.parts)[0]
                slices = day_slices(files, fs, HISTORY_SLICE_ROWS)
                tables = [read_window_inputs(pa.Table.from_pylist([{"path": p, "row_groups": g, "ordinal": o}]),
                                               f, fs, part.index) for o, (p, g) in enumerate(slices)]
                folded = (fold_tables(list(w.by), list(w.aggs), *tables) if tables
                          else window_inputs(empty_source(spec, part.source), f, part.index))
                # a request after the date reads rows known in (t - span, t), t >= the end of the date
                keep = folded.column("__k").to_numpy() > horizon - part.span_us
                entries = _window_entries(part, folded, 0, keep)
            elif part.kind == "asof":
                files = inp.asof_files[part.index]
                rows = _source_rows(spec, part, read_table(files, fs) if files else empty_source(spec, part.source))
                times = _asof_time_us(spec, part, rows)
                keep = np.array([t is not None and t >= horizon - part.span_us for t in times], bool)
                entries = _entries(part, rows, times, part.columns, 0, keep)
            else:
                rows = _source_rows(spec, part, read_table(inp.lookup_files[part.index], fs))
                entries = _entries(part, rows, [0] * rows.num_rows, part.columns, 0)
            store.write(area, entries)
            counts[part.name] = len(entries)
    except BaseException:
        try:
            store.drop(area)
        except Exception:  # the next materialize drops it
            log.warning("online: could not drop the partial generation %s", area, exc_info=True)
        raise
    previous = cur["area"] if cur else None
    store.switch({"area": area, "date": day.isoformat(), "horizon_us": horizon, "lineage_key": inp.lineage_key,
                  "columns": _window_columns(spec),
                  "layout": layout, "entries": counts, "materialized_at": datetime.now(UTC).isoformat()})
    for other in store.areas():
        if (other.startswith("g") and other not in (area, previous)) or (
                other.startswith("d") and _area_day(other) <= day):
            store.drop(other)
    seconds = time.monotonic() - started
    log.info("online: materialized %s as %s (%s) in %.1fs", day, area, counts, seconds)
    return MaterializeResult(day.isoformat(), area, counts, seconds=seconds)


def _window_columns(spec: Spec) -> dict[str, dict[str, str]]:
    """Each window's entry columns and their types, as the feature step's ``window_inputs``
    gives them (kept with the generation, so a request does not recompute them)."""
    f = spec.features
    out = {}
    for p in _parts(spec):
        if p.kind == "window":
            schema = window_inputs(empty_source(spec, p.source), f, p.index).schema
            out[p.name] = {n: str(schema.field(n).type) for n in schema.names if n.startswith("__")}
    return out


def _area_day(area: str) -> date:
    return datetime.strptime(area[1:], "%Y%m%d").date()


# --- push ---------------------------------------------------------------------------------------

def _arrow(rows: Any) -> pa.Table:
    """Rows (an Arrow table, a pandas frame or a list of dicts) as a table."""
    if isinstance(rows, pa.Table):
        return rows
    if isinstance(rows, list):
        return pa.Table.from_pylist(rows)
    return pa.Table.from_pandas(rows, preserve_index=False)


def _as_table(rows: Any, spec: Spec, source: str) -> pa.Table:
    """Rows (an Arrow table, a pandas frame or a list of dicts) with the contract's types."""
    t = _arrow(rows)
    contract = spec.sources[source].columns
    for c in t.column_names:
        if c in contract:
            want = arrow_type(contract[c].type)
            if t.column(c).type != want:
                try:
                    t = t.set_column(t.schema.get_field_index(c), c, t.column(c).cast(want))
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                    raise ValueError(f"column {c!r}: not a {contract[c].type} ({e})") from None
    return t


def _event_days(spec: Spec, source: str, t: pa.Table, day: date | None) -> list[date]:
    """The day each row belongs to (the staged partition it would be in)."""
    et = spec.sources[source].event_time
    if day is not None or et is None or et.column not in t.column_names:
        today = day or datetime.now(UTC).astimezone(_zone(spec.date_zone())).date()
        return [today] * t.num_rows
    zone = et.date_timezone or et.timezone or "UTC"
    ts = t.column(et.column)
    local = pc.cast(ts.cast(pa.timestamp(ts.type.unit, tz=zone)), pa.date32()).to_pylist()
    today = datetime.now(UTC).astimezone(_zone(spec.date_zone())).date()
    return [d if d is not None else today for d in local]  # a row without a time counts in no window


def _zone(name: str) -> Any:
    from zoneinfo import ZoneInfo

    return ZoneInfo(name)


def _event_time_us(spec: Spec, source: str, rows: pa.Table) -> int | None:
    """The latest event time among pushed rows (what the state's freshness is judged by: a
    known-at may lie far ahead of it, e.g. a label known 30 days later)."""
    f = spec.features
    if source == f.base:
        expr: str | None = f.event_time
    else:
        expr = next((w.time for w in f.windows if w.source == source and w.time), None)
        expr = expr or next((a.time for a in f.asof if a.source == source), None)
    if expr is None or rows.num_rows == 0:
        return None
    try:
        t = evaluate(expr, rows)
    except Exception:  # a column the expression reads is absent: no time to judge by
        return None
    if not pa.types.is_timestamp(t.type):
        return None
    latest = pc.max(pc.cast(t.cast(pa.timestamp("us", tz="UTC")), pa.int64())).as_py()
    return None if latest is None else int(latest)


def push(spec: Spec, store: OnlineStore, source: str, rows: Any, *, day: date | None = None) -> dict[str, Any]:
    """Add events of `source` as they arrive: to every window over it, as-of join onto it and
    lookup of it. Each day's events are one atomic write to that day's live area.

    Args:
        spec: the pipeline spec.
        store: the online store.
        source: the source the rows belong to (the base source or a joined/windowed one).
        rows: the raw rows (an Arrow table, a pandas frame or a list of dicts).
        day: the day the rows belong to (default: from the source's event_time, else today).

    Rows of a day already materialized are left out (counted in ``already_materialized``):
    that day's state is its staged partition's, as offline, so an event never counts twice.

    Returns:
        What was written: rows, entries per part, the newest event time pushed (None for a
        source with no event time, e.g. a snapshot), rows left out.
    """
    if source not in spec.sources:
        raise ValueError(f"unknown source {source!r}")
    f = spec.features
    parts = [p for p in _parts(spec) if p.source == source]
    t = _as_table(rows, spec, source)
    days = _event_days(spec, source, t, day)
    written: dict[str, int] = defaultdict(int)
    newest = None
    cur = store.current()
    done = _date(cur["date"]) if cur else None
    late = sum(1 for d in days if done is not None and d <= done)
    if late:  # their day's state comes from its staged partition, which they are in or not: as offline
        log.warning("online push: %d row(s) of %s on days already materialized (through %s) are left out",
                    late, source, done)
    for d in sorted(set(days)):
        if done is not None and d <= done:
            continue
        sel = t.filter(pa.array([x == d for x in days]))
        first = store.next_seq(sel.num_rows * max(1, len(parts)))
        entries: list[Entry] = []
        for n, part in enumerate(parts):
            seq = first + n * sel.num_rows
            if part.kind == "window":
                w_in = window_inputs(sel, f, part.index, 0)
                if "__o" in w_in.column_names:  # per row: after every staged row, in push order
                    o = pc.add(w_in.column("__o"), pa.scalar(PUSHED_ORDER + seq, pa.int64()))
                    w_in = w_in.set_column(w_in.schema.get_field_index("__o"), "__o", o)
                new = _window_entries(part, w_in, seq)
            elif part.kind == "asof":
                rows_ = _source_rows(spec, part, sel)
                new = _entries(part, rows_, _asof_time_us(spec, part, rows_), part.columns, seq)
            else:
                rows_ = _source_rows(spec, part, sel)
                new = _entries(part, rows_, [0] * rows_.num_rows, part.columns, seq)
            entries += new
            written[part.name] += len(new)
        # a snapshot row has no event time: it says nothing of how fresh the events are
        latest = _event_time_us(spec, source, sel)
        store.push(f"d{d:%Y%m%d}", entries, latest)
        if latest is not None:
            newest = latest if newest is None else max(newest, latest)
    return {"rows": t.num_rows, "entries": dict(written), "newest_us": newest, "already_materialized": late}


# --- features at request time -------------------------------------------------------------------

@dataclass
class OnlineFeatures:
    """The features of the requested rows, in the model's order, and why any could not be computed.

    ``table`` holds the spec's keys, the event time and the features (``feature_names()``, the
    model's order). ``reasons[i]`` lists what is missing for row i: ``blocked[i]`` rows (no event
    time, a required column absent, state stale or pruned past the row's time) have every
    feature null, never a default; the others have the offline values, which are themselves null
    or empty-window values where a key has no state (and the reason says so).
    """

    table: pa.Table
    features: list[str]
    reasons: list[list[str]] = field(default_factory=list)
    blocked: list[bool] = field(default_factory=list)

    def feature_frame(self) -> Any:
        return self.table.select(self.features).to_pandas()


def _needed_columns(spec: Spec) -> set[str]:
    """Base columns the features read (not the label): the event time's, and the feature step's
    ``feature_inputs``."""
    f = spec.features
    return (names_in(f.event_time) | feature_inputs(f)) - {EVENT_TIME}


_KEY_JSON: dict[tuple[type, Any], str] = {}
"""A one-column key's JSON, by its value (the same keys come again and again)."""
_KEY_JSON_MAX = 200_000
_KEY_JSON_LONGEST = 256  # characters: 200,000 keys of at most this hold some 60 MB


def _key_codes(table: pa.Table, by: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Each row's entity key as a code into a list of keys (JSON of the ``by`` values, as
    ``_keys``), -1 for a row with a null key part: each distinct key encoded once."""
    n = table.num_rows
    if not by:
        return np.zeros(n, np.int64), ["[]"]
    if len(by) == 1:
        enc = pc.dictionary_encode(table.column(by[0])).combine_chunks()
        codes = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        if len(_KEY_JSON) > _KEY_JSON_MAX:
            _KEY_JSON.clear()
        encoded = []
        for v in _to_json_values(enc.dictionary):
            hit = _KEY_JSON.get((type(v), v))  # by type too: True and 1 are equal keys of a dict
            if hit is None:
                hit = json.dumps([v])
                if len(hit) <= _KEY_JSON_LONGEST:  # (a long key a client made up is not kept)
                    _KEY_JSON[(type(v), v)] = hit
            encoded.append(hit)
        return codes, encoded
    keys: list[str] = []
    memo: dict[str, int] = {}
    out = np.empty(n, np.int64)
    for i, key in enumerate(_keys(table, by)):
        out[i] = -1 if key is None else memo.setdefault(key, len(memo))
        if len(memo) > len(keys):
            keys.append(key)  # type: ignore[arg-type]
    return out, keys


def _ranges(codes: np.ndarray, keys: list[str], t: np.ndarray, ok: np.ndarray) -> dict[str, tuple[int, int]]:
    """Per key: the earliest and latest request time among the rows that can use it."""
    sel = ok & (codes >= 0)
    if not sel.any():
        return {}
    c, tt = codes[sel], t[sel]
    lo = np.full(len(keys), np.iinfo(np.int64).max, np.int64)
    hi = np.full(len(keys), np.iinfo(np.int64).min, np.int64)
    np.minimum.at(lo, c, tt)
    np.maximum.at(hi, c, tt)
    out: dict[str, tuple[int, int]] = {}
    for j in np.unique(c).tolist():
        k, a, b = keys[j], int(lo[j]), int(hi[j])
        got = out.get(k)  # two codes of one key (a float's NaNs, say): one range
        out[k] = (a, b) if got is None else (min(got[0], a), max(got[1], b))
    return out


def _queries(areas: list[str], part: _Part, ranges: dict[str, tuple[int, int]]) -> list[Query]:
    """The reads of the part's entries of each key, in the areas, within [earliest - span, latest]
    (any time for a lookup)."""
    if part.kind == "lookup":
        return [(area, part.name, key, float("-inf"), float("inf")) for key in ranges for area in areas]
    return [(area, part.name, key, float(lo - part.span_us), float(hi))
            for key, (lo, hi) in ranges.items() for area in areas]


_PAYLOADS: dict[str, dict[str, Any]] = {}
"""Payloads decoded (never changed once decoded): a live day's entries are read again and again.
Cleared past _PAYLOADS_MAX (about 0.5 KB each: some 50 MB at most)."""
_PAYLOADS_MAX = 100_000

Found = dict[str, list[tuple[int, int, dict[str, Any]]]]
"""Per key, its entries read, (score, sequence, payload), in (score, sequence) order."""


def _found(queries: Sequence[Query], results: Sequence[list[tuple[float, str]]]) -> Found:
    """Each key's entries read, ordered by (score, sequence)."""
    found: Found = defaultdict(list)
    memo = _PAYLOADS
    if len(memo) > _PAYLOADS_MAX:
        memo.clear()
    for (_, _, key, _, _), res in zip(queries, results, strict=True):
        if not res:
            continue
        into = found[key]
        for score, payload in res:
            p = memo.get(payload)
            if p is None:
                p = memo[payload] = json.loads(payload)
            into.append((int(score), p["q"], p))
    for v in found.values():
        v.sort(key=_score_seq)
    return dict(found)


def _score_seq(e: tuple[int, int, dict[str, Any]]) -> tuple[int, int]:
    return e[0], e[1]


_GENERATIONS: dict[tuple[str, str, str], tuple[list[int], list[tuple[int, int, dict[str, Any]]]]] = {}
"""Per (generation, part, key): all its entries, in (score, sequence) order, and their scores. A
generation never changes once current (and its name is never used again), so what was read of
it is read once; a live day's area is read every time. Cleared past _GENERATIONS_MAX entries
(about 0.5 KB each: some 250 MB at most; a state bigger than that is read as before, in part)."""
_GENERATIONS_MAX = 500_000
_generations_size = [0]  # entries held


def _with_generation(gen: str, part: _Part, ranges: dict[str, tuple[int, int]], days: Found,
                     cached: dict[str, tuple[list[int], list[tuple[int, int, dict[str, Any]]]]],
                     fetched: Found, fetched_keys: list[str]) -> Found:
    """The part's entries of each key within its range: the generation's (`cached`: what was read
    of it before; `fetched` now, for `fetched_keys`), and the live days' (`days`), in (score,
    sequence) order."""
    cached = dict(cached)
    for k in fetched_keys:
        entries = fetched.get(k, [])
        cached[k] = _GENERATIONS[(gen, part.name, k)] = ([e[0] for e in entries], entries)
        _generations_size[0] += len(entries) + 1 + len(k) // 512  # a key a client sent counts by its size
    out: Found = {}
    for k, (lo, hi) in ranges.items():
        scores, entries = cached[k]
        if part.kind != "lookup" and entries:
            entries = entries[bisect_left(scores, lo - part.span_us):bisect_right(scores, hi)]
        live = days.get(k)
        if live:
            entries = sorted([*entries, *live], key=_score_seq)
        if entries:
            out[k] = entries
    return out


def _entity(by: Sequence[str], key: str) -> str:
    return ", ".join(f"{c}={v!r}" for c, v in zip(by, json.loads(key), strict=True))


@dataclass(frozen=True)
class _Plan:
    """What a request's computation needs of the spec and depends on nothing else: made once per
    spec (``_plan``), not per request."""

    parts: tuple[_Part, ...]
    layout: str
    needed: tuple[tuple[str, pa.DataType], ...]  # base columns the features read, with their types
    keys: tuple[tuple[str, pa.DataType], ...]  # the spec's keys, with their types
    features: tuple[str, ...]
    due: dict[str, tuple[int, date]] = field(default_factory=dict)  # ``_due``, by materialized date


_PLANS: dict[int, tuple[Spec, _Plan]] = {}


def _plan(spec: Spec) -> _Plan:
    """The spec's plan (a spec is immutable: cached while the spec lives, a few at most)."""
    hit = _PLANS.get(id(spec))
    if hit is not None and hit[0] is spec:
        return hit[1]
    f = spec.features
    contract = spec.sources[f.base].columns

    def typed(cols: Sequence[str]) -> tuple[tuple[str, pa.DataType], ...]:
        return tuple((c, arrow_type(contract[c].type) if c in contract else pa.string()) for c in cols)

    plan = _Plan(tuple(_parts(spec)), _layout_hash(spec), typed(sorted(_needed_columns(spec))), typed(f.keys),
                 tuple(f.feature_names()))
    if len(_PLANS) >= 8:
        _PLANS.clear()
    _PLANS[id(spec)] = (spec, plan)
    return plan


@dataclass
class _Prepared:
    """Raw rows with the contract's types, each column the features read (null where absent),
    the event time, and why each row is blocked so far."""

    batch: pa.Table
    reasons: list[list[str]]
    blocked: np.ndarray


def _prepare(spec: Spec, plan: _Plan, raw_rows: Any) -> _Prepared:
    """Raises ValueError: a column that is not of its contract's type."""
    f = spec.features
    batch = _as_table(raw_rows, spec, f.base)
    if EVENT_TIME in batch.column_names:
        raise ValueError(f"column {EVENT_TIME!r} is daybreak's own (each row's event time, computed from "
                         f"features.event_time): leave it out or rename it")
    n = batch.num_rows
    reasons: list[list[str]] = [[] for _ in range(n)]
    blocked = np.zeros(n, bool)
    for col, t in plan.needed:
        if col not in batch.column_names:
            batch = batch.append_column(col, pa.nulls(n, t))
            for r in reasons:
                r.append(f"missing column {col!r}")
            blocked[:] = True
    for col, t in plan.keys:
        if col not in batch.column_names:
            batch = batch.append_column(col, pa.nulls(n, t))
    return _Prepared(prepare_events(batch, f), reasons, blocked)


def features_for(spec: Spec, store: OnlineStore, raw_rows: Any, at: datetime | None = None, *,
                 max_staleness: str = DEFAULT_MAX_STALENESS) -> OnlineFeatures:
    """The spec's features for raw rows of the base source, each at its event time.

    Args:
        spec: the pipeline spec.
        store: the online store (materialized).
        raw_rows: rows of the base source (Arrow table, pandas frame or list of dicts): the
            columns the features read (see ``OnlineFeatures`` for a row lacking one).
        at: the request's time (default: now); with the rows' own times, how stale the state
            may be is judged against it.
        max_staleness: a row is blocked when the newest state (the materialized date's end or
            the newest pushed event) is older than this before `at` or the row's time. Days the
            base source's calendar expects no drop do not count: materialized on Friday, a
            business-day feed's state is fresh until Monday's drop is due.

    Raises:
        OnlineError: nothing was materialized yet, or for another feature version.
    """
    plan = _plan(spec)
    meta = _check_state(spec, plan, store.current())  # before the rows: no state says so whatever the rows
    return _compute(spec, plan, store, meta, _prepare(spec, plan, raw_rows), at, max_staleness)


@dataclass
class Group:
    """Requests computed together: their rows' features, one after the other, and where each
    request's are (request, first row, rows)."""

    features: OnlineFeatures
    members: list[tuple[int, int, int]]


def features_in_groups(spec: Spec, store: OnlineStore, many: Sequence[Any], at: datetime | None = None, *,
                       max_staleness: str = DEFAULT_MAX_STALENESS) -> tuple[list[Group], dict[int, Exception]]:
    """The features of several requests' rows, computed together: requests whose rows have the
    same columns of the same types are prepared (types, event time) and computed as one table,
    their rows concatenated (each row at its own event time, as ever: what a row gets never
    depends on the other rows). Cheaper per request than a ``features_for`` each: the state's
    metadata, the store reads (one round trip for every key of every request), the indexes and
    the expressions are shared. Returns the groups and, per request, the error it alone raises
    (a column not of its contract's type: ValueError).

    Raises:
        OnlineError: nothing was materialized yet, or for another feature version (every request's).
    """
    plan = _plan(spec)
    meta = _check_state(spec, plan, store.current())
    errors: dict[int, Exception] = {}
    raw: dict[pa.Schema, list[tuple[int, pa.Table]]] = {}
    tables: dict[int, pa.Table] = {}
    for i, rows in enumerate(many):
        try:
            t = _arrow(rows)
        except (ValueError, TypeError) as e:
            errors[i] = ValueError(f"the rows do not form a table: {e}")
            continue
        raw.setdefault(t.schema, []).append((i, t))
        tables[i] = t
    # pieces of rows prepared together (a group of requests, or one), by the columns they came to
    ready: dict[pa.Schema, list[tuple[list[tuple[int, int]], _Prepared]]] = {}
    for same in raw.values():
        try:
            whole = pa.concat_tables([t for _, t in same]).combine_chunks() if len(same) > 1 else same[0][1]
            pieces = [([(i, t.num_rows) for i, t in same], _prepare(spec, plan, whole))]
        except Exception:  # a value some request's rows have: each request alone, for its own answer
            pieces = []
            for i, t in same:
                try:
                    pieces.append(([(i, t.num_rows)], _prepare(spec, plan, t)))
                except Exception as e:
                    errors[i] = e
        for piece in pieces:
            ready.setdefault(piece[1].batch.schema, []).append(piece)
    groups = []
    for parts in ready.values():
        one = parts[0][1] if len(parts) == 1 else _Prepared(
            pa.concat_tables([p.batch for _, p in parts]).combine_chunks(), [r for _, p in parts for r in p.reasons],
            np.concatenate([p.blocked for _, p in parts]))
        spans, start = [], 0
        for sizes, _ in parts:
            for i, n in sizes:
                spans.append((i, start, n))
                start += n
        try:
            groups.append(Group(_compute(spec, plan, store, meta, one, at, max_staleness), spans))
        except Exception as e:  # a value some request's rows have (an overflow in an expression, say)
            if len(spans) == 1:
                errors[spans[0][0]] = e
                continue
            for i, _, _ in spans:  # each request alone, for its own answer
                try:
                    alone = _compute(spec, plan, store, meta, _prepare(spec, plan, tables[i]), at, max_staleness)
                    groups.append(Group(alone, [(i, 0, alone.table.num_rows)]))
                except Exception as one_error:
                    errors[i] = one_error
    return groups, errors


def _check_state(spec: Spec, plan: _Plan, meta: dict[str, Any] | None) -> dict[str, Any]:
    f = spec.features
    if meta is None:
        raise OnlineError(f"the online store of {f.name!r} has no state: run `daybreak online materialize` first")
    if meta.get("layout") != plan.layout:
        raise OnlineError(f"the online state of {f.name!r} was materialized for feature version {meta.get('layout')}, "
                          f"the spec's is {plan.layout}: materialize again")
    return meta


def _compute(spec: Spec, plan: _Plan, store: OnlineStore, meta: dict[str, Any], prepared: _Prepared,
             at: datetime | None, max_staleness: str) -> OnlineFeatures:
    f = spec.features
    batch, reasons, blocked = prepared.batch, prepared.reasons, prepared.blocked.copy()
    times = pc.cast(batch.column(EVENT_TIME), pa.int64()).to_pylist()
    t_us = np.array([x if x is not None else 0 for x in times], np.int64)
    now_us = int((at or datetime.now(UTC)).timestamp() * US)
    due_until, next_due = _due(spec, plan, meta["date"])
    newest = store.newest_us() or 0
    watermark = max(int(meta["horizon_us"]), due_until, newest)
    bound = _us(parse_duration(max_staleness))
    horizon = meta["horizon_us"]
    missing = f" (the drop of {next_due} is not materialized)" if watermark == due_until > newest else ""
    for i, x in enumerate(times):
        if x is None:
            reasons[i].append("no event time")
            blocked[i] = True
        elif x < horizon:
            reasons[i].append(f"event time {_iso(x)} is before the state's horizon {_iso(horizon)} "
                              f"(materialized through {meta['date']})")
            blocked[i] = True
        elif max(now_us, x) - watermark > bound:
            reasons[i].append(f"stale: the newest state is from {_iso(watermark)}, more than {max_staleness} "
                              f"before {_iso(max(now_us, x))}{missing}")
            blocked[i] = True
    ok = ~blocked
    areas = [meta["area"]] + [a for a in store.areas() if a.startswith("d") and _area_day(a) > _date(meta["date"])]

    # every part's reads in one round trip; a generation's entries read once (``_GENERATIONS``)
    gen, days = meta["area"], areas[1:]
    if len(_GENERATIONS) and _generations_size[0] > _GENERATIONS_MAX:
        _GENERATIONS.clear()
        _generations_size[0] = 0
    keyed = [(part, *_key_codes(batch, part.by)) for part in plan.parts]
    asked = []
    for part, codes, keys in keyed:
        ranges = _ranges(codes, keys, t_us, ok)
        cached, fill = {}, []
        for k in ranges:
            hit = _GENERATIONS.get((gen, part.name, k))
            if hit is None:
                fill.append(k)
            else:
                cached[k] = hit
        asked.append((ranges, cached, fill, [(gen, part.name, k, float("-inf"), float("inf")) for k in fill],
                      _queries(days, part, ranges)))
    results = store.read([q for _, _, _, qg, qd in asked for q in (*qg, *qd)])
    indexes = []
    joins: list[tuple[_Part, Any]] = []
    start = 0
    for (part, codes, keys), (ranges, cached, fill, qg, qd) in zip(keyed, asked, strict=True):
        fetched = _found(qg, results[start:start + len(qg)])
        start += len(qg)
        live = _found(qd, results[start:start + len(qd)])
        start += len(qd)
        got = _with_generation(gen, part, ranges, live, cached, fetched, fill)
        absent = [j for j, k in enumerate(keys) if k not in got]
        rows = np.flatnonzero(ok & np.isin(codes, absent)) if absent else np.zeros(0, np.int64)
        if len(rows):
            label = {"window": "windows", "asof": "asof", "lookup": "lookups"}[part.kind]
            what = {"window": "no history", "asof": "no row in the tolerance", "lookup": "no row"}[part.kind]
            said: dict[int, str] = {}  # per key, once
            for i in rows.tolist():
                c = int(codes[i])
                text = said.get(c)
                if text is None:
                    text = said[c] = f"{label}[{part.index}] ({part.source}): {what} for {_entity(part.by, keys[c])}"
                reasons[i].append(text)
        if part.kind == "window":
            indexes.append(_window_index(spec, part, batch, got, meta["columns"][part.name]))
        elif part.kind == "asof":
            joins.append((part, _join_table(spec, part, got)))
        else:
            joins.append((part, (codes, keys, got)))
    if f.windows:
        batch = apply_windows(batch, f, indexes)
    for part, right in joins:
        if part.kind == "asof":
            a = f.asof[part.index]
            batch = asof_join(batch, asof_history(right, a), a.by, part.span_us, a.columns, a.strict)
        else:
            batch = _lookup(spec, part, batch, *right)
    out = _derived(batch, spec, blocked)
    return OnlineFeatures(out, list(plan.features), reasons, blocked.tolist())


def _iso(us: int) -> str:
    return datetime.fromtimestamp(us / US, UTC).isoformat()


def _date(text: str) -> date:
    return date.fromisoformat(text)


def _window_index(spec: Spec, part: _Part, batch: pa.Table, got: Found,
                  types: dict[str, str]) -> Any:
    """The feature step's index over the entries read, typed as its own (``window_inputs``'
    columns; keys typed like the request's columns, as the offline index is made of them too)."""
    f = spec.features
    w = f.windows[part.index]
    payload = [n for n in types if n != "__k"]
    per_key = [(json.loads(key), len(entries)) for key, entries in got.items()]
    flat = [e for entries in got.values() for e in entries]
    keys = [[v for values, n in per_key for v in repeat(values[j], n)] for j in range(len(w.by))]
    cols: dict[str, list[Any]] = {"__k": [e[0] for e in flat], **{c: [e[2].get(c) for e in flat] for c in payload}}
    table = pa.table({**{c: _from_json_values(keys[j], batch.column(c).type) for j, c in enumerate(w.by)},
                      **{c: pa.array(v, pa.type_for_alias(types[c])) for c, v in cols.items()}})
    return build_window_index(list(w.by), list(w.aggs), table)


def _join_table(spec: Spec, part: _Part, got: Found) -> pa.Table:
    """The joined source's rows read, in (score, sequence) order: its input order."""
    contract = spec.sources[part.source].columns
    rows = [p for _, _, p in sorted((e for entries in got.values() for e in entries), key=_score_seq)]
    return pa.table({c: _from_json_values([p.get(c) for p in rows], arrow_type(contract[c].type))
                     for c in part.columns})


def _lookup(spec: Spec, part: _Part, batch: pa.Table, codes: np.ndarray, keys: list[str], got: Found) -> pa.Table:
    """The lookup's columns for each row: of the last entry of its key (in (score, sequence)
    order: the snapshot's last row of the key wins), typed as the feature step's ``lookup_join``
    gives them (its pandas merge: an integer column with a missing value becomes float64, a
    column with no value at all is null-typed), without its per-call cost. Types it is not
    proved to match for (times, dates, ...) go through ``lookup_join`` itself."""
    lk = spec.features.lookups[part.index]
    contract = spec.sources[part.source].columns
    types = {src: arrow_type(contract[src].type) for src in set(lk.columns.values())}
    if not all(_lookup_type_ok(t) for t in types.values()):
        return lookup_join(batch, _join_table(spec, part, got), list(lk.by), dict(lk.columns))
    last_of = [got[k][-1][2] if k in got else None for k in keys]
    last = [None if c < 0 else last_of[c] for c in codes.tolist()]
    built: dict[str, pa.Array] = {}
    for src, t in types.items():
        values = [None if p is None else p.get(src) for p in last]
        if all(v is None for v in values):  # pandas: all NaN (an int column's float64, else object)
            arr = pa.nulls(len(values), pa.float64() if pa.types.is_integer(t) or pa.types.is_floating(t) else
                           pa.null())
        else:
            arr = _from_json_values(values, t)
            if pa.types.is_floating(t):  # NaN is missing to pandas
                arr = pa.array(arr.to_numpy(zero_copy_only=False), t, from_pandas=True)
            elif pa.types.is_integer(t) and arr.null_count:
                arr = arr.cast(pa.float64())
        built[src] = arr
    for out_name, src in lk.columns.items():
        batch = batch.append_column(out_name, built[src])
    return batch


def _lookup_type_ok(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_string(t) or pa.types.is_boolean(t)


def _derived(batch: pa.Table, spec: Spec, blocked: np.ndarray) -> pa.Table:
    """Derived columns in order (as the feature step's ``finalize``, without the label), then
    keys, event time and features in the model's order; blocked rows' features null."""
    f = spec.features
    cols: dict[str, Any] = {k: batch.column(k) for k in f.keys}
    cols[EVENT_TIME] = batch.column(EVENT_TIME)
    for c in f.columns:
        v = evaluate(c.expr, batch)
        v = pc.cast(v, pa.string()) if c.categorical else pc.cast(v, pa.float64())
        i = batch.schema.get_field_index(c.name)
        batch = batch.set_column(i, c.name, v) if i >= 0 else batch.append_column(c.name, v)
        cols[c.name] = v
    mask = pa.array(blocked)
    for name in f.feature_names():
        v = cols[name] if name in cols else pc.cast(batch.column(name), pa.float64())
        cols[name] = pc.if_else(mask, pa.scalar(None, v.type), v) if blocked.any() else v
    return pa.table(cols)


def freshness(store: OnlineStore) -> dict[str, Any]:
    """What ``/health`` and ``/metrics`` report of the online state: the date materialized (and
    when), its generation and feature version, and the newest pushed event's time."""
    meta = store.current() or {}
    newest = store.newest_us()
    return {"materialized_date": meta.get("date"), "materialized_at": meta.get("materialized_at"),
            "generation": meta.get("area"), "feature_version": meta.get("layout"),
            "newest_event": None if newest is None else _iso(newest)}
