"""The online store as ``daybreak serve`` uses it: raw rows and pushed events read from request
bodies, features computed for the model, and the state's freshness for /health and /metrics.

Everything here is synchronous (pyarrow, numpy, the store's client) and runs on the server's one
online thread (``OnlineServing.pool``), never on the event loop: SQLite keeps a connection per
thread, and one thread serializes pushes and reads of one process (readers of another process,
or a materialize, see each generation whole: ``_store``). Raw-row requests queue for that thread
(``submit_raw``); those waiting when it is free are computed together (``drain``: one
``features_in_groups`` call, each row at its own event time, the answers split back per request),
so under load the cost per request falls instead of the queue growing.

The store is opened once, on first use, from ``DAYBREAK_ONLINE_URL`` (``redis://...``; unset:
the embedded SQLite file under ``$DAYBREAK_HOME/online/``). How old the state may be before a row
is blocked: ``DAYBREAK_ONLINE_MAX_STALENESS`` (a spec duration), else the spec's
``online.max_staleness`` (default ``1d``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from daybreak.features import US
from daybreak.infra.context import daybreak_home
from daybreak.online._online import (
    Group,
    OnlineError,
    features_in_groups,
    freshness,
    push,
)
from daybreak.online._store import URL_ENV, OnlineStore, is_redis
from daybreak.spec import Spec, parse_duration

log = logging.getLogger(__name__)

STALENESS_ENV = "DAYBREAK_ONLINE_MAX_STALENESS"
FORMATS = ("dataframe_split", "dataframe_records", "inputs")
FRESHNESS_KEYS = ("materialized_date", "materialized_at", "generation", "feature_version", "newest_event")
MAX_REASONS = 20
"""Rows named in an error message at most (the body's ``blocked`` list names them all)."""
RAW_BATCH_ROWS = 4096
"""Rows of raw-row requests computed together at most (a request bigger than this, alone)."""


class BodyError(ValueError):
    """A body that cannot be read as rows (the server answers 400 with its message)."""


def body_rows(body: Any, max_rows: int, extra: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Rows (dicts) of a JSON body: ``dataframe_split`` (columns and data), ``dataframe_records``
    or ``inputs`` (a list of objects), besides the keys `extra` (``source`` for /events)."""
    if not isinstance(body, dict):
        raise BodyError(f"body must be an object with one of {', '.join(FORMATS)}")
    keys = [k for k in body if k in (*FORMATS, "rows")]
    unknown = set(body) - set(keys) - set(extra)
    if len(keys) != 1 or unknown:
        raise BodyError(f"body must have exactly one of {', '.join(FORMATS)} (or rows)"
                        + (f"; unknown keys: {', '.join(sorted(map(str, unknown)))[:200]}" if unknown else ""))
    data = body[keys[0]]
    if keys[0] == "dataframe_split":
        if not isinstance(data, dict) or not isinstance(data.get("columns"), list) \
                or not isinstance(data.get("data"), list):
            raise BodyError("dataframe_split needs 'columns' and 'data' lists")
        cols = data["columns"]
        if not all(isinstance(c, str) for c in cols) or len(set(cols)) != len(cols):
            raise BodyError("dataframe_split: columns must be distinct names")
        if len(data["data"]) > max_rows:
            raise BodyError(f"{len(data['data']):,} rows in one request; at most {max_rows:,}")
        rows = []
        for r in data["data"]:
            if not isinstance(r, list) or len(r) != len(cols):
                raise BodyError(f"dataframe_split: every row must be a list of {len(cols)} values")
            rows.append(dict(zip(cols, r, strict=True)))
        return rows
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise BodyError(f"{keys[0]} must be a list of objects (one per row)")
    if len(data) > max_rows:
        raise BodyError(f"{len(data):,} rows in one request; at most {max_rows:,}")
    return data


def body_table(body: Any, max_rows: int) -> pa.Table:
    """A raw-row body's rows as a table (not empty). Raises BodyError."""
    split = split_columns(body, max_rows)
    if split is not None:
        fast = split_tables([split])[0]
        if fast is not None:
            return fast
    rows = body_rows(body, max_rows)
    if not rows:
        raise BodyError("no rows")
    return _table(rows)


def _rows_in(body: Any) -> int:
    """About how many rows a raw-row body not in ``split_columns``' shape holds (at least 1), for
    the batch's row budget."""
    if isinstance(body, dict) and len(body) == 1:
        data = next(iter(body.values()))
        if isinstance(data, list):
            return max(len(data), 1)
        if isinstance(data, dict):
            lengths = [len(v) for v in data.values() if isinstance(v, list)]
            return max([*lengths, 1])
    return 1


Split = tuple[tuple[str, ...], list[tuple[Any, ...]]]
"""A ``dataframe_split`` body's column names and values, column by column."""
_SCALARS = frozenset({int, float, str, bool, type(None)})
_INFERRED = (pa.int64(), pa.float64(), pa.string(), pa.bool_(), pa.null())


def split_columns(body: Any, max_rows: int) -> Split | None:
    """A well-formed ``dataframe_split`` body with rows, column by column; None for anything
    else (``body_rows`` says what is wrong, if anything)."""
    if not isinstance(body, dict) or len(body) != 1 or not isinstance(body.get("dataframe_split"), dict):
        return None
    data = body["dataframe_split"]
    cols, rows = data.get("columns"), data.get("data")
    if not isinstance(cols, list) or not isinstance(rows, list) or not rows or len(rows) > max_rows or not cols \
            or not all(isinstance(c, str) for c in cols) or len(set(cols)) != len(cols) \
            or not all(isinstance(r, list) and len(r) == len(cols) for r in rows):
        return None
    return tuple(cols), list(zip(*rows, strict=True))


def split_tables(splits: Sequence[Split]) -> list[pa.Table | None]:
    """Tables of ``split_columns`` bodies, typed as ``_table`` of each body's rows alone types
    them; None for a body to read as rows (``body_table``: a value that is no scalar, a column
    of mixed types). Bodies with the same columns whose every column holds values of the same
    Python types are built as one table, then cut: a column's type is inferred from its values'
    Python types (an int64 overflow aside, which is built alone), so each body's columns get the
    types they get alone, at a fraction of the cost per body."""
    out: list[pa.Table | None] = [None] * len(splits)
    groups: dict[tuple[tuple[str, ...], tuple[frozenset[type], ...]], list[int]] = {}
    for i, (cols, values) in enumerate(splits):
        kinds = tuple(frozenset(map(type, v)) for v in values)
        if all(k <= _SCALARS for k in kinds):
            groups.setdefault((cols, kinds), []).append(i)
    for (cols, _), members in groups.items():
        table = _built(cols, [[x for i in members for x in splits[i][1][j]] for j in range(len(cols))])
        if table is None and len(members) > 1:  # built alone, each as it would be
            for i in members:
                out[i] = _built(cols, splits[i][1])
            continue
        start = 0
        for i in members:
            n = len(splits[i][1][0])
            out[i] = table if len(members) == 1 else table.slice(start, n)  # type: ignore[union-attr]
            start += n
    return out


def _built(cols: Sequence[str], values: Sequence[Sequence[Any]]) -> pa.Table | None:
    try:
        arrays = [pa.array(v) for v in values]
    except Exception:  # (Arrow's errors, an overflow, text that is not UTF-8): read as rows, each alone
        return None
    if not all(a.type in _INFERRED for a in arrays):  # an int beyond int64, say
        return None
    return pa.table(dict(zip(cols, arrays, strict=True)))


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    for r in rows:
        for k, v in r.items():
            if isinstance(v, (dict, list)):
                raise BodyError(f"column {k!r}: values must be numbers, strings, booleans or null")
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise BodyError(f"the rows do not form a table: {str(e)[:300]}") from None
    except UnicodeEncodeError:  # a lone surrogate: JSON's escapes allow it, UTF-8 does not
        bad = next((k for r in rows for k, v in r.items() if isinstance(v, str) and not _utf8(v)), "?")
        raise BodyError(f"column {bad[:100]!r}: a text value is not valid Unicode (a lone surrogate "
                        f"escape)") from None


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass
class Computed:
    """A raw-row request's features: the model's columns for its unblocked rows, and per row why
    it was blocked (or what the offline computation left empty)."""

    rows: int
    columns: dict[str, np.ndarray]  # the model's inputs (and the identity columns), unblocked rows only
    predicted: np.ndarray  # indexes of the unblocked rows
    blocked: list[dict[str, Any]]  # {"row": i, "reasons": [...]}
    notes: list[dict[str, Any]]  # unblocked rows with reasons (a key without history, say)


@dataclass
class _RawJob:
    body: Callable[[], Any]
    max_rows: int
    fields: tuple[str, ...]
    ids: tuple[str, ...]
    future: Future[Computed]


def computed_group(group: Group, fields: Sequence[str], ids: Sequence[str]) -> list[Computed]:
    """``computed`` of each request of a group (in the order of its members): the columns
    converted once for all, then cut per request."""
    got = group.features
    names = set(got.table.column_names)
    missing = [n for n in fields if n not in names]
    if missing:
        raise OnlineError(f"the model's inputs {missing[:5]} are not features of the spec being served")
    whole: dict[str, np.ndarray] = {}
    for name in dict.fromkeys([*fields, *ids]):
        if name not in names:
            continue
        col = got.table.column(name)
        if pa.types.is_floating(col.type) or pa.types.is_integer(col.type):
            whole[name] = col.to_numpy(zero_copy_only=False).astype(np.float64) if name in fields else \
                np.array(col.to_pylist(), dtype=object)
        else:
            whole[name] = np.array([None if v is None else (v.isoformat() if isinstance(v, datetime) else v)
                                    for v in col.to_pylist()], dtype=object)
    blocked_all = np.asarray(got.blocked, bool)
    out = []
    for _, start, n in group.members:
        stop = start + n
        blocked_rows = blocked_all[start:stop]
        ok = np.flatnonzero(~blocked_rows)
        if blocked_rows.any():
            cols = {name: v[start:stop][ok] for name, v in whole.items()}
        else:
            cols = {name: v[start:stop] for name, v in whole.items()}
        reasons = got.reasons[start:stop]
        blocked = [{"row": i, "reasons": r} for i, (r, b) in enumerate(zip(reasons, blocked_rows.tolist(), strict=True))
                   if b]
        notes = [{"row": i, "reasons": r} for i, (r, b) in enumerate(zip(reasons, blocked_rows.tolist(), strict=True))
                 if r and not b]
        out.append(Computed(n, cols, ok, blocked, notes))
    return out


class OnlineServing:
    """The server's view of the online store: one store, one thread."""

    def __init__(self, spec: Spec, url: str | None = None, max_staleness: str | None = None) -> None:
        self.spec = spec
        self.url = url if url is not None else (os.environ.get(URL_ENV) or None)
        self.max_staleness = max_staleness or os.environ.get(STALENESS_ENV) or spec.online.max_staleness
        parse_duration(self.max_staleness)  # a bad value fails at start, naming it
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="online")
        self._store: OnlineStore | None = None
        self._lock = threading.Lock()
        self.last: dict[str, Any] = {}  # the freshness last read (what /metrics exports)
        self.last_error: str | None = None
        self._raw: deque[_RawJob] = deque()  # raw-row requests waiting for the online thread

    @property
    def backend(self) -> str:
        return "redis" if is_redis(self.url) else "sqlite"

    def store(self, create: bool = False) -> OnlineStore:
        """The store, opened on first use. Raises OnlineError when the embedded store was never
        materialized (its file is not created by looking; `create`: a push creates it)."""
        with self._lock:
            if self._store is None:
                from daybreak.online import open_store

                if not create and not self.url and not self.embedded_path().exists():
                    raise OnlineError(self.no_state())
                self._store = open_store(self.url, self.spec.features.name, home=daybreak_home())
            return self._store

    def embedded_path(self) -> Path:
        return daybreak_home() / "online" / f"{self.spec.features.name}.sqlite"

    def no_state(self) -> str:
        return (f"the online store of {self.spec.features.name!r} has no state: run `daybreak online materialize "
                f"--date D` first")

    # --- raw-row requests: queued, then computed together on the online thread ----------------
    def submit_raw(self, body: Callable[[], Any], max_rows: int, fields: Sequence[str],
                   ids: Sequence[str]) -> Future[Computed]:
        """Queue a raw-row request (`body` reads its JSON body, on the online thread); its future
        is done when the features are: the requests waiting when the online thread is free are
        computed in one ``features_in_groups`` call (``drain``), so the cost per request falls as
        they queue up."""
        fut: Future[Computed] = Future()
        with self._lock:
            self._raw.append(_RawJob(body, max_rows, tuple(fields), tuple(ids), fut))
        self.pool.submit(self.drain)
        return fut

    def drain(self) -> None:
        """On the online thread: compute the raw-row requests waiting (up to RAW_BATCH_ROWS rows;
        the rest stay for the next drain, one of which is queued per request)."""
        taken: list[tuple[_RawJob, Any, Split | None]] = []
        rows = 0
        while rows < RAW_BATCH_ROWS:
            with self._lock:
                if not self._raw:
                    break
                job = self._raw.popleft()
            if not job.future.set_running_or_notify_cancel():  # its request is gone
                continue
            try:
                body = job.body()
            except Exception as e:  # BodyError: this request's answer
                job.future.set_exception(e)
                continue
            split = split_columns(body, job.max_rows)
            taken.append((job, body, split))
            rows += len(split[1][0]) if split is not None else _rows_in(body)
        try:
            self._compute_taken(taken)
        except BaseException as e:  # a bug: no request waits forever for its answer
            for job, _, _ in taken:
                if not job.future.done():
                    job.future.set_exception(e if isinstance(e, Exception) else RuntimeError("stopped"))
            if not isinstance(e, Exception):
                raise

    def _compute_taken(self, taken: list[tuple[_RawJob, Any, Split | None]]) -> None:
        built = iter(split_tables([split for _, _, split in taken if split is not None]))
        jobs: list[tuple[_RawJob, pa.Table]] = []
        for job, body, split in taken:
            table = next(built) if split is not None else None
            try:
                jobs.append((job, table if table is not None else body_table(body, job.max_rows)))
            except Exception as e:  # BodyError: this request's answer
                job.future.set_exception(e)
        if not jobs:
            return
        try:
            groups, errors = features_in_groups(self.spec, self.store(), [t for _, t in jobs],
                                                max_staleness=self.max_staleness)
        except Exception as e:  # no state, the store down, a bug: every request's
            for job, _ in jobs:
                job.future.set_exception(e)
            return
        for i, wrong in errors.items():  # its own error: a column not of its type (the contract's), say
            jobs[i][0].future.set_exception(BodyError(str(wrong)[:500]) if isinstance(wrong, ValueError) else wrong)
        for g in groups:
            inputs: dict[tuple[tuple[str, ...], tuple[str, ...]], list[tuple[int, int, int]]] = {}
            for m in g.members:  # the model's inputs (and the identities logged) of each request
                inputs.setdefault((jobs[m[0]][0].fields, jobs[m[0]][0].ids), []).append(m)
            for (fields, ids), members in inputs.items():
                try:
                    answers = computed_group(Group(g.features, members), fields, ids)
                except Exception as e:
                    for i, _, _ in members:
                        jobs[i][0].future.set_exception(e)
                    continue
                for (i, _, _), answer in zip(members, answers, strict=True):
                    jobs[i][0].future.set_result(answer)

    def push(self, body: Any, max_rows: int) -> dict[str, Any]:
        """``POST /events``: ``{"source": ..., "rows": [...]}`` (or a dataframe format)."""
        if not isinstance(body, dict) or not isinstance(body.get("source"), str):
            raise BodyError("body must be an object with 'source' (a source of the spec) and 'rows'")
        source = body["source"]
        if source not in self.spec.sources:
            raise BodyError(f"unknown source {source[:100]!r}; the spec's are {', '.join(self.spec.sources)}")
        rows = body_rows(body, max_rows, extra=("source",))
        table = _table(rows)
        try:
            out = push(self.spec, self.store(create=True), source, table)
        except ValueError as e:
            raise BodyError(str(e)[:500]) from None
        newest = out.pop("newest_us")
        out["newest_event"] = None if newest is None else datetime.fromtimestamp(newest / US, UTC).isoformat()
        self.refresh()
        return {"source": source, **out}

    def refresh(self) -> dict[str, Any]:
        """Read the state's freshness (kept in ``last`` for /metrics)."""
        fresh: dict[str, Any] = dict.fromkeys(FRESHNESS_KEYS)  # nothing materialized, nothing pushed
        try:
            fresh.update(freshness(self.store()))
            self.last_error = None
        except OnlineError:  # the embedded store was never written
            self.last_error = None
        except Exception as e:
            from daybreak.infra.errors import redact

            self.last_error = redact(f"{type(e).__name__}: {e}")[:500]
        fresh["newest_event_age_seconds"] = _age(fresh.get("newest_event"))
        fresh["materialized_age_seconds"] = _age(fresh.get("materialized_at"))
        fresh["backend"] = self.backend
        fresh["max_staleness"] = self.max_staleness
        if self.last_error:
            fresh["error"] = self.last_error
        fresh["read_at"] = time.time()
        self.last = fresh
        return fresh

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:  # raw-row requests no drain will take now: answered, not left waiting
            left, self._raw = list(self._raw), deque()
        for job in left:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(OnlineError("the server is stopping; retry shortly"))
        if self._store is not None:
            try:
                self._store.close()
            except Exception:
                pass


def _age(iso: str | None) -> float | None:
    if not iso:
        return None
    return max(time.time() - datetime.fromisoformat(iso).timestamp(), 0.0)


def date_seconds(text: str | None) -> float | None:
    """A materialized date as Unix seconds (its midnight UTC), for a gauge."""
    if not text:
        return None
    d = date.fromisoformat(text)
    return datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp()


def blocked_message(blocked: list[dict[str, Any]]) -> str:
    shown = "; ".join(f"row {b['row']}: {', '.join(b['reasons'])}" for b in blocked[:MAX_REASONS])
    more = f" (and {len(blocked) - MAX_REASONS} more rows)" if len(blocked) > MAX_REASONS else ""
    return f"no row could be given features: {shown}{more}"
