"""Online serving of the champion with the MLflow scoring protocol, hot-swapping on alias moves.

A background thread polls the champion alias (with one client, failing fast when the registry
does not answer); ``POST /refresh`` wakes it for a check now (the deploy step calls it, so a new
champion need not wait for the poll) and answers once that check, and any swap, is done. When
the alias moves, the new version is loaded and warmed up off the request path, then swapped in
with one reference assignment.

Requests are micro-batched. The batcher takes the requests waiting when it becomes free, runs
one predict over all their rows and hands each request its slice, so a predict's fixed cost is
paid once per batch instead of once per request. Batches of the fast path (below) are predicted
by the model code's own ``predict_columns`` on numpy columns: the encoding without pandas and
xgboost's ``inplace_predict``, without the pyfunc's schema enforcement (the fast path checked the
signature's columns and types itself). It gives the pyfunc's floats to the bit (checked at load
on the input example; a version whose model code has no ``predict_columns``, or disagrees, is
served through ``model.predict(pd.DataFrame(...))``). A batch of the fast path is predicted on the
event loop when this version's big batches were measured to take at most ``INLINE_SECONDS`` of
CPU for as many rows, or, not measured yet, when it is small (``INLINE_PREDICT_ROWS``): less than
handing it to a thread costs in GIL switches. Slower ones, and bodies MLflow's parser read, go to
the one predict thread. An idle server answers a lone request at once; under load (the last
batch ended within 5 ms, or two of its predicts), a batch waits for as many requests as the last
one answered: two predicts' time, or 0.1 ms for each request still missing (1 ms at most; the
loop's work to answer and read one is 40-80 us), at most 10 ms. A batch takes the current model
once, so every request in it is answered by exactly one version (the ``X-Model-Version``
header); batches run one after another, so the version a client sees never goes back unless the
alias itself is moved back (a rollback). A request of more than ``MAX_BATCH_ROWS`` rows is
predicted in slices of that size, each batch taking the small requests waiting first and then
the next slice, so one big request never holds the others back for its whole predict; its
slices all use the version its first one used, and so do the batches it shares.

Every answered batch is handed to the prediction log (``predlog.py``): a queue append on the
predict thread; a child process converts and writes (``serve``; a writer thread elsewhere).
Requests may carry the spec's row identity columns next to the features (logged for the label
join, not given to the model).

Bodies of the usual shapes (``dataframe_split``, ``dataframe_records`` or ``inputs`` holding
exactly the signature's columns, numbers in double columns, text in string ones) become columns
directly; anything else (and ``text/csv`` or Parquet bodies) goes through MLflow's own parser and
schema check, one request at a time, so errors and odd inputs behave as MLflow's server's do.

Online features (``daybreak.online``). ``POST /invocations?raw=1`` takes rows of the spec's base
source as they happen (for the flights demo: carrier, flight, origin, dest, time_hour, minute,
distance, ... — the columns the features read; timestamps as ISO 8601 text with a zone offset)
instead of the model's features, in the same JSON formats (``dataframe_split``,
``dataframe_records``, ``inputs``; JSON only). The flag is explicit, not guessed from the
columns: a client knows which it sends, and a wrong body gets an error about the body it meant
to send. The server computes the features with ``features_for`` from the online store, on the
store's own thread (``OnlineServing``: off the loop), each row at its own event time, then
predicts the rows that have features through the batcher like any request and logs the
computed features (what the model saw) to the prediction log. The answer is 200 with one
prediction per row, ``null`` for a row that could not be given features, and why::

    {"predictions": [12.3, null],
     "blocked": [{"row": 1, "reasons": ["no event time"]}],
     "notes": [{"row": 0, "reasons": ["windows[1] (flights): no history for carrier='ZZ'"]}]}

``blocked`` rows get no prediction, never a default (no event time, a column the features read
missing, state older than ``DAYBREAK_ONLINE_MAX_STALENESS`` (default 1d) before the row's time
or now, or a time before the materialized state); ``notes`` name what the offline computation
also leaves empty for a row that is predicted (a key without history). When no row can be
predicted: 422 in MLflow's error format, naming the rows and reasons, with the same
``blocked`` list. No online state yet (nothing materialized, or for another feature version):
503 saying to run ``daybreak online materialize``; precomputed requests are not affected. The
identity columns of raw rows (the keys and the event time) are logged only when the server has
a token (and the request carries it); without one they are left out of the log (see below).

``POST /events`` adds events to the online store as they arrive (``daybreak.online.push``):
``{"source": "<a source of the spec>", "rows": [{...}, ...]}`` (or ``dataframe_split`` /
``dataframe_records`` beside ``source``), JSON only, the body and row limits of
``/invocations``. It writes, so it needs the bearer token, and is refused (403) on a server
without one. The answer: ``{"source", "rows", "entries": {part: n}, "newest_event",
"already_materialized"}`` (rows of a day already materialized are left out: that day's state is
its staged partition's).

The store is opened once, on first use, from ``DAYBREAK_ONLINE_URL`` (``redis://...``; unset:
SQLite under ``$DAYBREAK_HOME/online/``). ``/health`` (details) has ``online``: the date
materialized and when, the newest pushed event and its age in seconds; ``/metrics`` exports
them as ``daybreak_online_*`` gauges.

Clients are not trusted (DESIGN.md, "Trust model"). Every limit below is a module constant, and
can be set by a keyword argument of ``serve``/``create_app`` or by the environment variable named
with it (keyword, then environment, then the constant):

- ``max_body_bytes`` (``DAYBREAK_SERVE_MAX_BODY_BYTES``, 16 MiB): a declared ``Content-Length``
  over it gets 413 before anything is read; a chunked body is cut off at it (413). About 90,000
  rows of the flights model's 20 columns (about 175 bytes a row).
- ``max_rows`` (``DAYBREAK_SERVE_MAX_ROWS``, 100,000): rows per request, 413 naming the limit.
- ``max_inflight_bytes`` (``DAYBREAK_SERVE_MAX_INFLIGHT_BYTES``, 64 MiB): body bytes being read
  or parsed at once, all requests together, counting bodies over 64 KiB (declared lengths are
  reserved up front): past it, 503 with ``Retry-After``. Small bodies never count, so a few big
  ones cannot turn the usual requests away (the connection limit bounds them). With the row
  limit and the pending-row limit (``MAX_PENDING_ROWS``) this bounds what abusive clients can
  make the server hold.
- ``header_timeout`` (``DAYBREAK_SERVE_HEADER_TIMEOUT``, 10 s): from a connection's start, or a
  request's first byte, until its headers are complete; then 408 and the connection is closed.
  uvicorn has no such timeout (only keep-alive between requests): ``_http.py``. Headers past
  64 KiB (``_http.MAX_HEADER_BYTES``) get 431 and the connection is closed.
- ``body_timeout`` (``DAYBREAK_SERVE_BODY_TIMEOUT``, 30 s): the whole body must arrive within it
  (16 MiB at about 0.5 MB/s); then 408 and the connection is closed. Deadlines are checked by one
  sweep every ``SWEEP_SECONDS`` (or a quarter of the timeout), not by a timer per request.
- ``max_connections`` (``DAYBREAK_SERVE_MAX_CONNECTIONS``, 256): uvicorn's
  ``limit_concurrency``; requests on connections past it get 503.
- ``parse_processes`` (``DAYBREAK_SERVE_PARSE_PROCESSES``, 1): see below; 0 parses big bodies on
  a thread instead.

Parsing. A body of at most ``INLINE_BYTES`` (64 KiB, a few hundred rows) in the usual shape is
parsed with orjson on the event loop: under a millisecond, less than handing it to a thread would
cost. Anything else is parsed and checked off the loop before it is queued: small bodies on a
thread, bigger ones in a worker process. orjson (and the standard parser) hold the GIL for the
whole parse, so a thread would not keep the loop answering: measured on the flights rows,
orjson takes 20 ms for 1.8 MiB, 350 ms for 18 MiB and 3.9 s for 81 MiB, and turning the rows
into columns as long again; in a process, the loop only unpickles the columns (numpy arrays).
A worker that dies (say, out of memory) is replaced; its request gets a 500.

Each request's cells are checked before it joins a batch: orjson refuses ``NaN``/``Infinity``
and out-of-range numbers, so a body it parses has finite numbers; a body only the standard
parser reads has its double columns converted and checked here (``NaN`` stays a missing value,
as MLflow's parser makes it; ``Infinity``, ``-Infinity`` and numbers beyond a double are refused
with a 400 naming the column). Bodies for MLflow's parser get its schema check too. So a bad
request fails alone, before it can fail a batch; if a batch still fails, its requests are
answered one by one and their errors carry no native trace.

Errors use MLflow's body, ``{"error_code": ..., "message": ...}``, without tracebacks or file
paths; 5xx bodies say only what happened and the request id. ``Content-Type`` must be what
MLflow's scoring server reads (``application/json``, ``text/csv``,
``application/vnd.apache.parquet``, parameter ``charset=utf-8`` only): anything else, a missing
one included, gets 415, so a browser cannot post cross-site without a CORS preflight (a
``fetch`` with a bare body sends none). There are no API docs routes.

With ``DAYBREAK_SERVE_TOKEN`` set, ``/invocations``, ``/events`` and ``/refresh`` need
``Authorization: Bearer <token>`` and ``/health`` shows its details (version, loaded_at, last_error,
prediction log, online store) only with it;
``/ping`` and ``/version`` need none; ``/metrics`` (Prometheus, ``_metrics.py``) needs it too unless
``DAYBREAK_METRICS_PUBLIC=1``. Identity columns decide which labels the monitor joins to a
prediction, so a request carrying them is refused (403) when no token is configured: an
anonymous client could otherwise log predictions under real flights' identities and drive a
rollback. ``last_error`` has credentials stripped from URIs (``errors.redact``).
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool, ProcessPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import lru_cache, partial
from itertools import chain, count, repeat
from operator import eq, itemgetter
from types import NoneType
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.requests import Request

from daybreak.deploy._metrics import ServerMetrics
from daybreak.deploy._predlog import PredictionLog, use_system_allocator
from daybreak.infra import registry
from daybreak.infra.context import RunContext
from daybreak.infra.errors import redact
from daybreak.spec import Spec

if TYPE_CHECKING:
    from mlflow.types import Schema

    from daybreak.online import OnlineServing

log = logging.getLogger(__name__)

# A bigger request is predicted in slices of this many rows; smaller ones are grouped up to it.
MAX_BATCH_ROWS = 2000
# Backpressure: past this many rows waiting, new requests get 503 with Retry-After rather than
# a queue (and latency, and memory) that only grows.
MAX_PENDING_ROWS = 50 * MAX_BATCH_ROWS
# Limits on what clients send (see the module docstring; each can be set by keyword or environment).
MAX_BODY_BYTES = 16 * 2**20
MAX_ROWS = 100_000
PARQUET_BATCH_ROWS = 8 * 1024
"""Rows of a Parquet body decoded at a time (its rows and bytes are counted after each batch)."""
MAX_INFLIGHT_BYTES = 64 * 2**20
HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 30.0
MAX_CONNECTIONS = 256
PARSE_PROCESSES = 1
INLINE_BYTES = 64 * 2**10
CONVERT_ROWS = 32
"""A ``dataframe_split`` body of at least this many rows has its double columns converted to
float64 as it is checked (``fast_columns``): below it, a numpy call per column costs more than
checking each value's type (measured: 20% less work a 100-row request, twice as much a 1-row one)."""
SWEEP_SECONDS = 0.5
"""How often body deadlines are checked (at most; a quarter of the body timeout when shorter)."""
REFRESH_TIMEOUT = 120.0
"""``POST /refresh`` waits this long at most for the check (and the load of a new version)."""
CHECK_INTERVAL = 1.0
"""Seconds between the starts of two registry checks, at least: ``POST /refresh`` calls within it
share the check that starts when it ends (a caller with the token cannot make the server hammer
the registry)."""
# A batch of at most this many rows, all of the fast path, on a model with a fast predict, is
# predicted on the event loop (a few hundred microseconds): handing it to the predict thread costs
# more than that in GIL hand-offs (the loop and the thread take turns on one interpreter lock).
# (Measured: 256 doubled 1-row throughput over 0.)
RAW_BYTES_PER_ROW = 1024
"""A logged request's body goes to the log's child process as it is (``RawBatch``) when it is at
most this many bytes a row (one row more, for the column names): a body padded with whitespace
costs the log's queue no more than its columns would."""

INLINE_PREDICT_ROWS = 256
# A bigger batch of the fast path is predicted on the loop too when this version's big batches took
# at most this much CPU for as many rows (``Batcher._inline``; and a small one goes to the thread
# when they took more): the loop answers nothing else meanwhile, but the predict thread's GIL
# hand-offs cost more. (Measured on the flights model, 100-row requests, 32 connections: 2,401-2,504
# requests/s against 2,236-2,326 with the thread, A/B in the same minutes, the same p99.)
INLINE_SECONDS = 0.004
# Under load, the longest a batch waits for the requests of the last one to come back (see
# ``Batcher.run``): a 100-row batch of the flights model takes about 3 ms.
GATHER_SECONDS = 0.01
# ... and, when that is longer than two predicts, this long for each of them still missing, up to
# GATHER_MISSING_SECONDS: the loop writes the last batch's answers and reads the next requests
# meanwhile (40-80 us a 1-row request on 2 busy cores), so 32 clients need about a millisecond to
# come back; with 3 clients, a request waits at most 0.2 ms for the other two.
GATHER_PER_REQUEST_SECONDS = 100e-6
GATHER_MISSING_SECONDS = 0.001
# A request this soon after the last batch ended finds the server under load (its clients are
# coming back); later, the server was idle and a lone request is predicted at once.
LOAD_SECONDS = 0.005
# Input column types the fast path builds itself, and the JSON values it accepts for them.
FAST_TYPES: dict[str, tuple[type, ...]] = {"double": (float, int), "string": (str,)}
FORMATS = ("dataframe_split", "dataframe_records", "inputs")
JSON_TYPE, CSV_TYPE, PARQUET_TYPE = "application/json", "text/csv", "application/vnd.apache.parquet"
CONTENT_TYPES = (JSON_TYPE, CSV_TYPE, PARQUET_TYPE)
# MLflow's error codes (mlflow.protos.databricks_pb2) for the statuses this server answers.
ERROR_CODES = {400: "BAD_REQUEST", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "ENDPOINT_NOT_FOUND",
               405: "BAD_REQUEST", 408: "DEADLINE_EXCEEDED", 413: "RESOURCE_LIMIT_EXCEEDED", 415: "BAD_REQUEST",
               422: "BAD_REQUEST", 431: "RESOURCE_LIMIT_EXCEEDED", 500: "INTERNAL_ERROR",
               503: "TEMPORARILY_UNAVAILABLE"}

Fields = tuple[tuple[str, str, bool], ...]  # (name, type, optional) of each input column
# A request's rows, one sequence per column: lists or tuples (the fast path's, on the loop), or numpy
# arrays (checked or parsed off it); a ``dataframe_split`` body's are a ``Block``
Columns = Mapping[str, Sequence | np.ndarray]


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = MAX_BODY_BYTES
    max_rows: int = MAX_ROWS
    max_inflight_bytes: int = MAX_INFLIGHT_BYTES
    header_timeout: float = HEADER_TIMEOUT
    body_timeout: float = BODY_TIMEOUT
    max_connections: int = MAX_CONNECTIONS
    parse_processes: int = PARSE_PROCESSES

    @classmethod
    def resolve(cls, **given: Any) -> Limits:
        """Keyword arguments, else ``DAYBREAK_SERVE_<NAME>``, else the module constant."""
        out: dict[str, Any] = {}
        for name, f in cls.__dataclass_fields__.items():
            kind = float if isinstance(f.default, float) else int
            if given.get(name) is not None:
                out[name] = kind(given[name])
            elif os.environ.get(f"DAYBREAK_SERVE_{name.upper()}"):
                raw = os.environ[f"DAYBREAK_SERVE_{name.upper()}"]
                try:
                    out[name] = kind(raw)
                except ValueError:
                    raise ValueError(f"DAYBREAK_SERVE_{name.upper()}={raw!r} is not a number") from None
            if name in out and out[name] < 0:
                raise ValueError(f"{name} must not be negative")
        unknown = set(given) - set(cls.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown serving limits: {', '.join(sorted(unknown))}")
        return cls(**out)


@dataclass(frozen=True)
class Loaded:
    version: str
    model: Any
    loaded_at: float
    fields: Fields | None  # the input columns when the fast path can build the model's frames
    # The model's own predict on the fast path's columns (``DaybreakModel.predict_columns``: no
    # pandas, no pyfunc schema enforcement, which the fast path has done itself), when the
    # version's model code has one and it agreed with the pyfunc on the input example at load.
    fast: Callable[[dict[str, np.ndarray]], Any] | None = None


def fast_predict(model: Any, fields: Fields | None) -> Callable[[dict[str, np.ndarray]], Any] | None:
    """The python model's ``predict_columns`` (model code logged since it has one), or None: then
    batches go through the pyfunc (``model.predict(pd.DataFrame(columns))``). It must give the
    pyfunc's floats to the bit: checked here on the logged input example, turned into columns as
    a client's JSON would be; any difference and the version is served through the pyfunc."""
    if not fields:
        return None
    try:
        fast = getattr(model.unwrap_python_model(), "predict_columns", None)
    except Exception:  # not a python model
        return None
    example = getattr(model, "input_example", None)
    if fast is None or not isinstance(example, pd.DataFrame) or example.empty:
        return None
    import orjson

    body = orjson.loads(example.to_json(orient="split", index=False))  # NaN -> null, as a client sends it
    cols = fast_columns({"dataframe_split": body}, fields)
    if cols is None:
        return None
    data = batch_columns([cols], fields)
    try:
        want = np.asarray(model.predict(pd.DataFrame(data)))
        got = np.asarray(fast(data))
    except Exception:
        log.warning("the model's predict_columns failed on the input example: serving through the pyfunc",
                    exc_info=True)
        return None
    if got.dtype != want.dtype or got.shape != want.shape or not np.array_equal(got, want, equal_nan=True):
        log.warning("the model's predict_columns differs from its pyfunc on the input example: serving through "
                    "the pyfunc")
        return None
    return cast("Callable[[dict[str, np.ndarray]], Any]", fast)


def fast_fields(model: Any) -> Fields | None:
    """The signature's columns if all are of a type the fast path builds, else None."""
    schema = model.metadata.get_input_schema()
    if schema is None or not schema.has_input_names():
        return None
    out = []
    for spec in schema.inputs:
        kind = getattr(getattr(spec, "type", None), "name", None)
        if kind not in FAST_TYPES:
            return None
        out.append((spec.name, kind, not spec.required))
    return tuple(out)


def _columns_ok(given: Any, names: set[str], ids: frozenset[str]) -> bool:
    """The signature's columns, plus any of the identity columns (logged, not given to the model)."""
    return names <= given and (len(given) == len(names) or given - names <= ids)


def fast_columns(body: dict, fields: Fields, ids: frozenset[str] = frozenset(),
                 json_strings: int | None = None) -> Columns | None:
    """The body's rows as one sequence per column, or None to leave the body to MLflow's parser.

    Only bodies whose frame MLflow would build to the same values are taken: one format key and
    nothing else, exactly the signature's columns (any order) plus any of the identity columns
    `ids`, at least one row, and values of the column's JSON type (None only in optional columns).
    The checks run as C loops (``map``, ``set``): a 100-row body is about 2,000 values.

    `json_strings`: how many JSON strings the body's text holds, when the caller could count them
    exactly (``parse_fast``: no backslash, so no escaped quote, and no ``true``/``false``, so no
    boolean). For a ``dataframe_split`` body, when the text columns (and identity columns) hold
    every string value the body has, the optional double columns can hold only numbers, nulls or
    containers: they are converted to float64 at once (a container fails the conversion) instead
    of having each value's type checked, which was the costliest part of a 100-row request.
    """
    if len(body) != 1:
        return None
    ((fmt, data),) = body.items()
    if fmt == "dataframe_split":
        block = _split_block(data, fields, ids, json_strings)
        if block is not SLOW:
            return block
    names, wanted, groups = _field_info(fields)
    try:
        if fmt == "dataframe_split":
            columns, rows = data["columns"], data["data"]
            if (len(set(columns)) != len(columns) or not _columns_ok(set(columns), wanted, ids)
                    or set(map(type, rows)) != {list} or set(map(len, rows)) != {len(columns)}):
                return None
            cols = dict(zip(columns, zip(*rows, strict=False), strict=False))
        elif fmt == "dataframe_records" or (fmt == "inputs" and type(data) is list):
            if type(data) is not list or not data or set(map(type, data)) != {dict}:
                return None
            given = data[0].keys()
            if not _columns_ok(set(given), wanted, ids) or not all(map(eq, map(dict.keys, data), repeat(given))):
                return None
            keys = list(given)
            cols = dict(zip(keys, zip(*map(itemgetter(*keys), data), strict=False), strict=False)) \
                if len(keys) > 1 else {keys[0]: [r[keys[0]] for r in data]}
        elif fmt == "inputs" and type(data) is dict:
            if (not _columns_ok(set(data.keys()), wanted, ids) or set(map(type, data.values())) != {list}
                    or len(set(map(len, data.values()))) != 1 or not data[names[0]]):
                return None
            cols = data
        else:
            return None
    except TypeError:  # unhashable column names and the like: MLflow's parser says what is wrong
        return None
    counting = json_strings is not None and fmt == "dataframe_split" and len(data["data"]) >= CONVERT_ROWS
    numeric: list[str] = []  # optional double columns left to the conversion (``counting``)
    text_values = 0  # string values seen in the columns checked
    for allowed, group in groups:  # one set per group of columns, not one per column
        if counting and str not in allowed and NoneType in allowed:
            numeric += [n for n in group if n not in ids]  # identity columns keep what the client sent
            group = tuple(n for n in group if n in ids)
        types = list(map(type, chain.from_iterable(map(cols.__getitem__, group))))
        if not set(types).issubset(allowed):
            return None
        text_values += types.count(str)
    if numeric:
        assert json_strings is not None
        for name in cols.keys() - wanted:  # identity columns carried beside the features
            text_values += list(map(type, cols[name])).count(str)
        # every JSON string: the format key, "columns", "data", the column names and the values
        if json_strings - 3 - len(cols) != text_values:
            types = list(map(type, chain.from_iterable(map(cols.__getitem__, numeric))))
            return cols if set(types).issubset(FAST_TYPES["double"] + (NoneType,)) else None
        for name in numeric:
            try:
                arr = np.array(cols[name], dtype=np.float64)  # None -> NaN, as batch_columns makes it
            except (TypeError, ValueError):  # a container: not a double column's value
                return None
            if arr.ndim != 1:
                return None
            cols[name] = arr
    return cols


SLOW = cast("Block", object())  # ``SplitPlan.read``: leave the body to fast_columns' general checks


def _split_block(data: Any, fields: Fields, ids: frozenset[str], json_strings: int | None) -> Block | None:
    """A ``dataframe_split`` body's rows read by its columns' plan (``SplitPlan``), None when the
    fast path does not take it, or SLOW: then only ``fast_columns``' general checks can tell."""
    if type(data) is not dict or len(data) != 2 or "columns" not in data or "data" not in data:
        return None
    columns, rows = data["columns"], data["data"]
    if type(columns) is not list or type(rows) is not list or not rows:
        return None
    key = tuple(columns)
    try:
        plan = _PLANS.get(key)
        if plan is None or plan.fields is not fields or plan.ids is not ids:
            plan = _split_plan(key, fields, ids)
            if plan is not None:
                if len(_PLANS) >= 64:
                    _PLANS.clear()
                _PLANS[key] = plan
    except TypeError:  # unhashable column names and the like: MLflow's parser says what is wrong
        return None
    if plan is None:
        return None
    return plan.read(rows, json_strings if len(rows) >= CONVERT_ROWS else None)


class Block(Mapping):
    """A ``dataframe_split`` body's rows as the fast path reads them: the double columns as one
    float64 matrix (rows x columns, converted once per request, and concatenated once per batch
    by ``batch_columns``), the text and identity columns as tuples. A mapping of the column
    names to their values, like the other formats' columns."""

    __slots__ = ("doubles", "index", "other")

    def __init__(self, doubles: np.ndarray, index: dict[str, int], other: dict[str, Sequence]) -> None:
        self.doubles, self.index, self.other = doubles, index, other

    def __getitem__(self, name: str) -> Sequence | np.ndarray:
        j = self.index.get(name)
        return self.other[name] if j is None else self.doubles[:, j]

    def __contains__(self, name: object) -> bool:
        return name in self.index or name in self.other

    def __iter__(self) -> Iterator[str]:
        return chain(self.index, self.other)

    def __len__(self) -> int:
        return len(self.index) + len(self.other)

    def cut(self, start: int, stop: int) -> Block:
        return Block(self.doubles[start:stop], self.index, {k: v[start:stop] for k, v in self.other.items()})


def _getter(positions: Sequence[int]) -> Callable[[list], tuple]:
    """A row's values at `positions`, as a tuple (``itemgetter`` gives a bare value for one)."""
    if len(positions) == 1:
        (k,) = positions
        return lambda row: (row[k],)
    return itemgetter(*positions)


def _doubles(columns: list[tuple], rows: int) -> np.ndarray | Block | None:
    """Columns of numbers and nulls as a float64 matrix (`rows` x columns, column-major), nulls as
    NaN; None when a value is not a number (a container), SLOW when one is too large for a double.
    Converted as columns: numpy's cost goes with the sequences it walks as much as with the values
    (100 rows of 17 doubles: 24 us as 17 columns against 30 us as 100 rows)."""
    try:
        doubles = np.array(columns, dtype=np.float64)  # None -> NaN, as MLflow's parser makes it
    except OverflowError:
        return SLOW
    except (TypeError, ValueError):  # a container: not a double column's value
        return None
    if doubles.shape != (len(columns), rows):
        return None
    return doubles.T


class SplitPlan:
    """How to read the rows of a ``dataframe_split`` body with a given list of columns (checked
    once per list: ``_split_plan``): which positions hold double columns, text columns and
    identity columns, and what each may hold."""

    def __init__(self, columns: tuple[str, ...], fields: Fields, ids: frozenset[str]) -> None:
        self.fields, self.ids = fields, ids  # (``_PLANS`` checks them by identity)
        kinds = {name: (kind, optional) for name, kind, optional in fields}
        pos = {name: k for k, name in enumerate(columns)}
        doubles = [n for n in columns if n in kinds and kinds[n][0] == "double"]
        texts = [n for n in columns if n in kinds and kinds[n][0] == "string"]
        self.width = len(columns)
        self.index = {n: j for j, n in enumerate(doubles)}
        self.double_at = [pos[n] for n in doubles]
        self.doubles = _getter(self.double_at) if doubles else None
        self.required_at = [pos[n] for n in doubles if not kinds[n][1]]  # double columns that may not be null
        self.required = _getter(self.required_at) if self.required_at else None
        self.texts = {n: frozenset((str, NoneType) if kinds[n][1] else (str,)) for n in texts}  # what each may hold
        self.carried = [n for n in columns if n not in kinds]  # the identity columns
        self.other_names = texts + self.carried
        self.other_at = [(n, pos[n]) for n in self.other_names]
        self.text_at = [(pos[n], allowed) for n, allowed in self.texts.items()]

    def read(self, rows: list, json_strings: int | None) -> Block | None:
        """The rows as a Block; None if a value is not of its column's type (MLflow's parser then
        decides); SLOW when only the general checks of ``fast_columns`` can tell (a number too
        large for a double)."""
        if len(rows) == 1:  # the usual online request: the same checks, without the per-row machinery
            return self._one(rows[0])
        if set(map(type, rows)) != {list} or set(map(len, rows)) != {self.width}:
            return None
        # Column by column (``zip`` regroups the rows' values in C), not row by row: the text and
        # identity columns come out as they are kept, and the doubles convert faster (``_doubles``).
        # Measured on the flights model, a 100-row body: 102 us parsed against 125 us by rows.
        by_column = list(zip(*rows, strict=True))  # (the widths are checked above)
        other: dict[str, Sequence] = {name: by_column[k] for name, k in self.other_at}
        strings = 0
        for name, allowed in self.texts.items():
            kinds = list(map(type, other[name]))
            if not allowed.issuperset(kinds):
                return None
            strings += kinds.count(str)
        n = len(rows)
        if self.doubles is None:
            return Block(np.empty((n, 0)), self.index, other)
        values = [by_column[k] for k in self.double_at]
        # Every JSON string: the format key, "columns", "data", the column names and the values. When
        # the text and identity columns hold them all, the double columns hold only numbers, nulls or
        # containers (the conversion fails on a container); otherwise each value's type is checked.
        counted = json_strings is not None and json_strings - 3 - self.width == strings + sum(
            list(map(type, other[name])).count(str) for name in self.carried)
        if not counted and not _NUMBERS.issuperset(map(type, chain.from_iterable(values))):
            return None
        if any(None in by_column[k] for k in self.required_at):
            return None
        doubles = _doubles(values, n)
        if not isinstance(doubles, np.ndarray):  # None, or SLOW
            return doubles
        return Block(doubles, self.index, other)

    def _one(self, row: Any) -> Block | None:
        """``read`` of a single row."""
        if type(row) is not list or len(row) != self.width:
            return None
        for k, allowed in self.text_at:
            if type(row[k]) not in allowed:
                return None
        other: dict[str, Sequence] = {name: (row[k],) for name, k in self.other_at}
        if self.doubles is None:
            return Block(np.empty((1, 0)), self.index, other)
        values = self.doubles(row)
        if not _NUMBERS.issuperset(map(type, values)):
            return None
        if self.required is not None and None in self.required(row):
            return None
        try:
            doubles = np.array(values, dtype=np.float64)[None]  # None -> NaN, as MLflow's parser makes it
        except OverflowError:
            return SLOW
        return Block(doubles, self.index, other)


_NUMBERS = frozenset((float, int, NoneType))  # what a double column's JSON values may be


_PLANS: dict[tuple[str, ...], SplitPlan] = {}
"""The last plans made, by list of columns, used when made for the same fields and identity columns
(the same objects: comparing them, or hashing them for ``_split_plan``'s cache, costs more)."""


@lru_cache(maxsize=64)  # clients send the same few lists of columns (bounded: an odd one costs a check)
def _split_plan(columns: tuple[str, ...], fields: Fields, ids: frozenset[str]) -> SplitPlan | None:
    """How to read a ``dataframe_split`` body with these columns, or None when they are not the
    signature's columns exactly (any order) plus any of the identity columns `ids`."""
    _, wanted, _ = _field_info(fields)
    if len(set(columns)) != len(columns) or not _columns_ok(set(columns), wanted, ids):
        return None
    return SplitPlan(columns, fields, ids)


@lru_cache(maxsize=16)
def _field_info(fields: Fields) -> tuple[list[str], set[str], tuple[tuple[frozenset[type], tuple[str, ...]], ...]]:
    """The signature's column names (a list and a set), and its columns grouped by the JSON types
    their values may have. (Callers must not change them: they are shared.)"""
    groups: dict[frozenset[type], list[str]] = {}
    for name, kind, optional in fields:
        groups.setdefault(frozenset(FAST_TYPES[kind] + ((type(None),) if optional else ())), []).append(name)
    names = [f[0] for f in fields]
    return names, set(names), tuple((allowed, tuple(group)) for allowed, group in groups.items())


def batch_columns(parts: list[Columns], fields: Fields) -> dict[str, np.ndarray]:
    """Every part's rows as numpy columns, with the dtypes MLflow's parser gives the signature's types.
    Parts are tuples (parsed on the loop) or numpy arrays (checked or parsed off it)."""
    data = {}
    index = parts[0].index if type(parts[0]) is Block else None
    if index is not None and all(type(p) is Block and p.index is index for p in parts):  # same columns, same plan
        blocks = cast("list[Block]", parts)
        # Column-major: each double column one contiguous array, for the model's encoder and the
        # prediction log, which read them column by column (a row-major matrix's column is a
        # strided gather, paid twice and, in the log's thread, out of cache).
        doubles = np.empty((sum(len(b.doubles) for b in blocks), len(index)), order="F")
        np.concatenate([b.doubles for b in blocks], out=doubles)
        for name, _, _ in fields:
            j = index.get(name)
            if j is not None:
                data[name] = doubles[:, j]
            else:
                data[name] = np.array(list(chain.from_iterable(b.other[name] for b in blocks)), dtype=object)
        return data
    for name, kind, _ in fields:
        dtype = np.float64 if kind == "double" else object
        cols = [p[name] for p in parts]
        if any(map(isinstance, cols, repeat(np.ndarray))):
            data[name] = np.concatenate([np.asarray(c, dtype=dtype) for c in cols])
        else:
            data[name] = np.array(list(chain.from_iterable(cols)), dtype=dtype)  # None -> NaN
    return data


@dataclass
class RawBatch:
    """A batch's logged requests as their bodies, for a prediction log in a child process
    (``_predlog._Child``): there `columns` reads them again with the loop's own parse, and the
    columns are the ones the model was given. Shipping the bodies costs the server a reference
    each; shipping the columns cost a copy, and for text about 40 ns a value under the lock."""

    fields: Fields
    ids: frozenset[str]
    raws: list[bytes]
    request_ids: list[str]

    def columns(self) -> tuple[dict[str, np.ndarray], list[tuple[str, int, dict | None]]]:
        """The batch's model input (``batch_columns``) and its requests (id, rows, identity columns)."""
        if not any(_may_count_strings(raw, self.fields) for raw in self.raws):
            merged = self._merged()
            if merged is not None:
                return merged
        return self._each()

    def _merged(self) -> tuple[dict[str, np.ndarray], list[tuple[str, int, dict | None]]] | None:
        """``columns`` of small bodies read as one, when every body is ``dataframe_split`` with the
        same list of columns (what clients send): their rows are read by the columns' plan at once,
        each value's type checked (``SplitPlan.read`` without a string count), so the values are
        those each body gives alone. None: read body by body (``_each``). Measured in the log's
        child on the flights model, 1-row requests in batches of 20: 5.8 us a request against
        11.1 us body by body. (Big bodies go body by body: counting their strings costs less than
        checking each value's type.)"""
        import orjson

        columns: Any = None
        rows: list = []
        counts: list[int] = []
        try:
            for raw in self.raws:
                body = orjson.loads(raw)
                split = body.get("dataframe_split") if type(body) is dict and len(body) == 1 else None
                if type(split) is not dict or len(split) != 2:
                    return None
                data = split.get("data")
                if columns is None:
                    columns = split.get("columns")
                elif split.get("columns") != columns:
                    return None
                if type(data) is not list or not data or type(columns) is not list:
                    return None
                rows += data
                counts.append(len(data))
        except orjson.JSONDecodeError:
            return None
        block = _split_block({"columns": columns, "data": rows}, self.fields, self.ids, None)
        if type(block) is not Block:
            return None
        carried = [k for k in self.ids if k in block]
        requests: list[tuple[str, int, dict | None]] = []
        start = 0
        for request_id, n in zip(self.request_ids, counts, strict=True):
            ids = {k: list(block[k][start:start + n]) for k in carried} or None
            requests.append((request_id, n, ids))
            start += n
        return batch_columns([block], self.fields), requests

    def _each(self) -> tuple[dict[str, np.ndarray], list[tuple[str, int, dict | None]]]:
        parts: list[Columns] = []
        requests: list[tuple[str, int, dict | None]] = []
        for raw, request_id in zip(self.raws, self.request_ids, strict=True):
            parsed = parse_fast(raw, self.fields, self.ids, sys.maxsize)
            if parsed is None or parsed.columns is None:
                raise ValueError(f"request {request_id}: its body no longer parses on the fast path")
            cols = parsed.columns
            parts.append(cols)
            ids = ({k: list(cols[k]) for k in self.ids if k in cols} or None) if parsed.ids else None
            requests.append((request_id, parsed.rows, ids))
        return batch_columns(parts, self.fields), requests


class Refused(Exception):
    """A request answered with an error before it reaches the predict thread."""

    def __init__(self, status: int, message: str):
        super().__init__(status, message)  # both in args: it is pickled back from a parse worker
        self.status, self.message = status, message


@dataclass
class Parsed:
    """A request's rows, checked: columns (the fast path) or a frame (MLflow's parser)."""

    rows: int
    columns: Columns | None = None
    frame: Any = None
    ids: bool = False  # carries identity columns
    raw: bytes | None = None  # the JSON body `parse_fast` read on the loop (a log in a child process reads it again)


_PATH = re.compile(r"(?<![:/\w])(?:[A-Za-z]:)?(?:[/\\][\w.\-+@~]+){2,}[/\\]?")


def clean(message: object, limit: int = 2000) -> str:
    """A message for a client: no credentials in URIs, no file paths, no traceback, bounded."""
    text = redact(message)
    text = text.split("\nTraceback", 1)[0].split("Stack trace:", 1)[0]
    text = _PATH.sub("<path>", text)
    return text if len(text) <= limit else text[:limit] + "..."


def _parse_json(raw: bytes) -> tuple[Any, bool]:
    """The body, and whether orjson read it (then every number is finite and fits a double)."""
    import orjson

    try:
        return orjson.loads(raw), True
    except orjson.JSONDecodeError:
        try:
            return json.loads(raw), False
        except RecursionError:
            raise Refused(400, "body is nested too deeply") from None
        except (ValueError, UnicodeDecodeError):
            raise Refused(400, "body is not valid JSON") from None


@lru_cache(maxsize=4)
def _schema(schema_json: str) -> Any:
    from mlflow.types import Schema

    return Schema.from_json(schema_json)


def _rows_limit(rows: int, max_rows: int) -> None:
    if rows > max_rows:
        raise Refused(413, f"{rows:,} rows in one request; at most {max_rows:,} (DAYBREAK_SERVE_MAX_ROWS): "
                           f"send fewer rows per request")


def _finite_doubles(cols: dict[str, Any], fields: Fields) -> None:
    """Double columns as float64 arrays; refuses infinities and numbers beyond a double (NaN is a
    missing value, as MLflow's parser makes it)."""
    for name, kind, _ in fields:
        if kind != "double":
            continue
        try:
            arr = np.array(cols[name], dtype=np.float64)
        except OverflowError:
            raise Refused(400, f"column {name!r}: a number is too large for a double") from None
        if np.isinf(arr).any():
            raise Refused(400, f"column {name!r}: Infinity is not a valid value (NaN or null for missing)")
        cols[name] = arr


def _finite_frame(frame: Any) -> None:
    for name in frame.columns:
        col = frame[name]
        if col.dtype.kind == "f" and np.isinf(col.to_numpy()).any():
            raise Refused(400, f"column {name!r}: Infinity is not a valid value (NaN or null for missing)")


def _json_strings(raw: bytes) -> int | None:
    """How many JSON strings a body without a backslash holds (its quotes over two), or None when
    it may hold a boolean (``true``/``false`` anywhere, strings included) or its quotes are odd:
    see ``fast_columns``. One vectorized pass per byte value: ``bytes.__contains__`` took about
    10 us for each word on a 100-row body (19 KB), a quarter of orjson's parse."""
    text = np.frombuffer(raw, np.uint8)
    quotes = int(np.count_nonzero(text == 34))  # "
    if quotes % 2:
        return None
    for first, word in ((116, b"true"), (102, b"false")):  # t, f
        at = np.flatnonzero(text == first)
        if len(at) > 64:  # many: let the C search decide
            if word in raw:
                return None
        elif any(raw.startswith(word, i) for i in at.tolist()):
            return None
    return quotes // 2


def _may_count_strings(raw: bytes, fields: Fields) -> bool:
    """Whether ``parse_fast`` counts a body's strings (``fast_columns``): only bodies that may
    reach CONVERT_ROWS rows, at least 8 bytes a value."""
    return len(raw) >= 8 * CONVERT_ROWS * len(fields)


def parse_fast(raw: bytes, fields: Fields | None, ids: frozenset[str], max_rows: int) -> Parsed | None:
    """On the event loop, for small JSON bodies: orjson and the fast path, or None (then
    `parse_request` decides off the loop)."""
    import orjson

    if not fields:
        return None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    strings = _json_strings(raw) if _may_count_strings(raw, fields) and b"\\" not in raw else None
    cols = fast_columns(body, fields, ids, strings) if type(body) is dict else None
    if cols is None:
        return None
    rows = len(cols.doubles) if type(cols) is Block else len(next(iter(cols.values())))
    carried = bool(ids) and not ids.isdisjoint(cols)
    _rows_limit(rows, max_rows)
    return Parsed(rows, columns=cols, ids=carried)


def parse_request(raw: bytes, mime: str, fields: Fields | None, ids: frozenset[str], schema_json: str | None,
                  max_rows: int, arrays: bool = False) -> Parsed:
    """A body read and checked, off the event loop (a thread, or a worker process with `arrays`:
    then the columns come back as numpy arrays, quick to pickle). Raises Refused."""
    try:
        return _parse_request(raw, mime, fields, ids, schema_json, max_rows, arrays)
    except Refused:
        raise
    except RecursionError:
        raise Refused(400, "body is nested too deeply") from None
    except Exception as e:  # MLflow's parser and schema check, pandas, pyarrow: the input is wrong
        from mlflow.exceptions import MlflowException

        if isinstance(e, MlflowException):
            raise Refused(400, clean(e.message)) from None
        if isinstance(e, (ValueError, TypeError, KeyError, IndexError, OverflowError, UnicodeDecodeError)) or \
                type(e).__module__.startswith(("pyarrow", "pandas")):
            raise Refused(400, f"could not read the body: {clean(e, 500)}") from None
        raise


def _parse_request(raw: bytes, mime: str, fields: Fields | None, ids: frozenset[str], schema_json: str | None,
                   max_rows: int, arrays: bool) -> Parsed:
    schema = _schema(schema_json) if schema_json else None
    if mime == JSON_TYPE:
        body, exact = _parse_json(raw)
        if not isinstance(body, dict):
            raise Refused(400, f"body must be an object with one of {', '.join(FORMATS)}")
        if fields and (cols := fast_columns(body, fields, ids)) is not None:
            rows = len(next(iter(cols.values())))
            _rows_limit(rows, max_rows)
            cols = dict(cols)
            if not exact or arrays:
                _finite_doubles(cols, fields)
            if arrays:
                cols = {k: v if isinstance(v, np.ndarray) else np.array(v, dtype=object) for k, v in cols.items()}
            return Parsed(rows, columns=cols, ids=not ids.isdisjoint(cols))
        from mlflow.pyfunc.scoring_server import infer_and_parse_data

        _rows_limit(_json_rows(body), max_rows)  # before pandas builds anything
        frame = infer_and_parse_data(body, cast("Schema", schema))  # annotated Schema, defaults to None
    elif mime == CSV_TYPE:
        from io import StringIO

        from mlflow.pyfunc.scoring_server import parse_csv_input

        text = raw.decode("utf-8")
        _rows_limit(text.rstrip("\n").count("\n") - text.count('"') // 2, max_rows)  # before pandas builds anything
        frame = parse_csv_input(StringIO(text), cast("Schema", schema))  # annotated Schema, defaults to None
    else:
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        f = pq.ParquetFile(io.BytesIO(raw))
        _rows_limit(f.metadata.num_rows, max_rows)
        budget = 16 * len(raw) + 2**20
        too_big = "the Parquet body unpacks to far more than it weighs; send it less compressed"
        unpacked = sum(f.metadata.row_group(k).total_byte_size for k in range(f.metadata.num_row_groups))
        if unpacked > budget:
            raise Refused(413, too_big)
        # The footer is the client's word: read batch by batch, counting rows and Arrow bytes as
        # they come, so a footer that understates either is stopped at the budget.
        batches, rows, nbytes = [], 0, 0
        for batch in f.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            rows += batch.num_rows
            nbytes += batch.nbytes
            _rows_limit(rows, max_rows)
            if nbytes > budget:
                raise Refused(413, too_big)
            batches.append(batch)
        frame = pa.Table.from_batches(batches, schema=f.schema_arrow).to_pandas()
    if not isinstance(frame, pd.DataFrame):
        frame = pd.DataFrame(frame)
    _rows_limit(len(frame), max_rows)
    _finite_frame(frame)
    if schema is not None:
        from mlflow.models.utils import _enforce_schema

        _finite_frame(_enforce_schema(frame, schema))  # what the model would be given
    # (an empty frame counts as a row: the batcher waits for rows, and MLflow's model answers it)
    return Parsed(max(len(frame), 1), frame=frame, ids=not ids.isdisjoint(frame.columns))


def _json_rows(body: dict) -> int:
    """The rows a JSON body holds, as far as they can be counted before parsing (0 if unknown)."""
    for key in (*FORMATS, "instances"):
        data = body.get(key)
        if isinstance(data, list):
            return len(data)
        if isinstance(data, dict):
            inner = data.get("data")
            if isinstance(inner, list):
                return len(inner)
            return max((len(v) for v in data.values() if isinstance(v, list)), default=0)
    return 0


def _parse_worker(server: int) -> None:
    """A parse worker yields the CPU to the serving process: on a machine with few cores, the
    event loop and the predict thread answering everyone come before one client's big body. It
    ends with the server: a pool's worker holds both ends of its task pipe, so it never sees the
    server go (killed, or ended by uvicorn's re-raised SIGTERM before the pool said stop), and was
    left running, 130 MB each. (`server`: its pid, given by the server: a worker's own view of its
    parent comes after its imports, and a server gone by then would leave init as the parent.)
    A SIGINT or SIGTERM to the server's process group (Ctrl-C, a service manager's stop) is the
    server's: its graceful shutdown answers the requests in flight, a body being parsed included."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        os.nice(10)
    except OSError:
        pass

    def watch() -> None:
        while os.getppid() == server:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _warm() -> None:
    """Imports a parse worker needs, before the first big body."""
    import orjson  # noqa: F401
    import pandas  # noqa: F401


class ModelHolder:
    def __init__(self, spec: Spec, ctx: RunContext, freeze_gc: bool = False):
        self.spec, self.ctx, self.freeze_gc = spec, ctx, freeze_gc
        self.current: Loaded | None = None
        self.last_error: str | None = None
        self.swaps = self.swap_failures = self.poll_errors = 0  # metrics: read by _metrics.py at scrape time
        self._stop = threading.Event()
        self._wake = threading.Event()  # ``check_soon``: check the alias now, not at the next poll
        self._lock = threading.Lock()
        self._client: Any = None
        self._next: Future[bool] = Future()  # resolved when the next check to start has finished
        self._next_lock = threading.Lock()
        self._last_check = float("-inf")  # time.monotonic() when the last check started
        # The last champion version that failed to load: when, and why (not reloaded at every check)
        self._failed: tuple[str, float, str] | None = None

    def champion_version(self) -> str | None:
        self._client = self._client or registry.client(self.ctx)  # one client (and HTTP session) for every poll
        mv = registry.alias_version(self._client, self.spec.model.name, self.spec.promotion.alias)
        return None if mv is None else str(mv.version)

    def refresh(self) -> bool:
        """Load the champion if it changed. Returns True when a new version went live."""
        with self._lock:
            try:
                version = self.champion_version()
            except Exception:
                self.poll_errors += 1  # metrics
                raise
            if version is None or (self.current and self.current.version == version):
                return False
            failed, retry = self._failed, self.spec.serving.poll_seconds / 2
            if failed is not None and failed[0] == version and time.monotonic() - failed[1] < retry:
                raise RuntimeError(f"champion version {version} failed to load {time.monotonic() - failed[1]:.0f} s "
                                   f"ago; tried again {retry:g} s after that (at a poll): {failed[2]}")
            try:
                loaded = self.load(version)
            except Exception as e:
                self.swap_failures += 1  # metrics
                self._failed = (version, time.monotonic(), redact(f"{type(e).__name__}: {e}"))
                raise
            self._failed = None
            self.install(loaded)
            return True

    def load(self, version: str) -> Loaded:
        """A version loaded and warmed up, off the request path; not serving yet (``install``)."""
        model = registry.load_model(self.ctx, self.spec.model.name, version)
        self._warm_up(model)
        fields = fast_fields(model)
        return Loaded(version, model, time.time(), fields, fast_predict(model, fields))

    def install(self, loaded: Loaded, refreeze: bool = True) -> None:
        """Serve `loaded` from the next batch on (one reference assignment)."""
        if self.current is not None and self.current.version != loaded.version:
            self.swaps += 1  # metrics
        self.current = loaded
        if self.freeze_gc and refreeze:
            self.refreeze()
        log.info("serving %s v%s", self.spec.model.name, loaded.version)

    def refreeze(self) -> None:
        """The model is long-lived: keep it out of the collector's full passes. Unfreeze first, so
        the cycles of the model it replaced can be collected once."""
        gc.unfreeze()
        gc.collect()
        gc.freeze()

    def _warm_up(self, model: Any) -> None:
        """One prediction on the logged input example before the model takes traffic."""
        example = getattr(model, "input_example", None)
        if example is not None:
            model.predict(example)

    def check_soon(self) -> Future[bool]:
        """Wake the watch for a check of the alias now (or, within CHECK_INTERVAL of the last one,
        when it ends); the future is resolved once a check that started after this call has
        finished (True: it succeeded). Callers that come while no check has started share one: a
        burst of calls makes one registry lookup."""
        with self._next_lock:
            fut = self._next
        self._wake.set()
        return fut

    def watch(self) -> None:
        """Check the alias every ``poll_seconds``, or at once when ``check_soon`` wakes it."""
        while not self._stop.is_set():
            self._wake.wait(self.spec.serving.poll_seconds)
            if self._stop.is_set():
                break
            # at most one check every CHECK_INTERVAL: calls until then join the check that starts then
            rest = self._last_check + CHECK_INTERVAL - time.monotonic()
            if rest > 0 and self._stop.wait(rest):
                break
            self._wake.clear()
            with self._next_lock:  # the check starts: calls from now on wait for the one after
                done, self._next = self._next, Future()
            self._last_check = time.monotonic()
            ok = self.check()
            if not done.done():  # (never cancelled: callers wait on it shielded)
                done.set_result(ok)

    def check(self) -> bool:
        """One check of the alias (a new version loaded and swapped in); False if it failed."""
        try:
            self.refresh()
            self.last_error = None
            return True
        except Exception as e:  # keep serving the current model whatever the registry does
            self.last_error = redact(f"{type(e).__name__}: {e}")
            log.warning("champion refresh failed, still serving %s: %s",
                        self.current.version if self.current else None, self.last_error)
            return False

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()


@dataclass(eq=False)
class Job:
    """One request waiting for the predict thread."""

    fields: Fields | None  # what `columns` was checked against (a new version may differ)
    columns: Columns | None  # None: `frame`, from MLflow's parser
    frame: Any
    rows: int
    future: asyncio.Future[tuple[Answer, str]] | Direct = field(repr=False)
    request_id: str = ""
    logged: bool = False  # sampled for the prediction log
    done: int = 0  # rows handed to batches (a request bigger than a batch goes in slices)
    parts: dict = field(default_factory=dict, repr=False)  # predictions of its slices so far, by first row
    pinned: Loaded | None = None  # the version its slices use
    unlogged: list = field(default_factory=list, repr=False)  # its slices' log records, written once answered
    queued_at: float = 0.0  # time.monotonic() when it queued (only where waits are bounded: replicas)
    carried: bool = True  # carries identity columns (the log keeps them)
    raw: bytes | None = None  # its body, when `parse_fast` read it on the loop (``Parsed.raw``)


Answer = tuple[int, bytes]  # HTTP status and JSON body
Slice = tuple[Job, int, int]  # a job and the rows [start, stop) of it in a batch


def _fast_for(job: Job, cur: Loaded) -> bool:
    """Whether the job's columns (the fast path's) were checked against `cur`'s fields: the same
    object, unless a version changed under it (compared by identity first: a tuple's == walks
    every field)."""
    return job.columns is not None and (job.fields is cur.fields or job.fields == cur.fields)


class Direct:
    """In place of a job's asyncio future (``Batcher.enqueue``): its answer and version go
    straight to `fn` when the batch sets them, with no loop turn and no future per request
    (about half a microsecond of a 1-row request's 40). Once only; an error in `fn` is logged,
    never raised into the batch."""

    __slots__ = ("answered", "fn")

    def __init__(self, fn: Callable[[tuple[Answer, str]], None]) -> None:
        self.fn, self.answered = fn, False

    def done(self) -> bool:
        return self.answered

    def set_result(self, result: tuple[Answer, str]) -> None:
        if self.answered:  # (once: see ``Invocations.fast``)
            return
        self.answered = True
        try:
            self.fn(result)
        except Exception:  # never into the batch: its other requests still get their answers
            log.exception("answering a request failed")


def _json(obj: Any) -> bytes:
    import orjson

    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def error(status: int, message: str) -> Answer:
    """MLflow's error body."""
    return status, _json({"error_code": ERROR_CODES.get(status, "BAD_REQUEST"), "message": message})


def _internal(request_id: str) -> Answer:
    return error(500, f"internal error while predicting; the server log has the details (request id {request_id})")


def _predictions(preds: Any) -> Answer:
    """The 200 answer of predictions (an array, or a list already converted: not copied)."""
    values = preds if type(preds) is list else preds.tolist() if hasattr(preds, "tolist") else list(preds)
    return 200, _json({"predictions": values})


def _one_thread() -> None:
    """xgboost predicts on the predict thread alone: the event loop keeps the other core busy, and
    OpenMP threads waiting on a descheduled sibling turn into latency spikes."""
    try:
        import xgboost

        xgboost.set_config(nthread=1)  # thread-local: only this thread
    except ImportError:
        pass


def _cut(job: Job, start: int, stop: int) -> Columns:
    cols = job.columns
    assert cols is not None  # only jobs of the fast path are cut
    if start == 0 and stop == job.rows:
        return cols
    if type(cols) is Block:
        return cols.cut(start, stop)
    return {k: v[start:stop] for k, v in cols.items()}


class Batcher:
    """Feeds the predict thread: each free moment it takes the waiting jobs (up to
    MAX_BATCH_ROWS rows, a big job a slice at a time) and one model, and answers them all from
    one predict call."""

    def __init__(self, holder: ModelHolder, plog: PredictionLog | None = None, metrics: ServerMetrics | None = None):
        self.holder, self.plog = holder, plog
        self.metrics = metrics  # metrics: batch sizes and durations; reads pending_rows at scrape time
        if metrics is not None:
            metrics.batcher = self
        self.ids = frozenset(holder.spec.id_columns()) if plog is not None else frozenset()
        self.pending: deque[Job] = deque()
        self.pending_rows = 0
        self.big_rows = 0  # of pending_rows, those of requests bigger than a batch (admitted apart)
        self.big: Job | None = None  # the job being predicted in slices
        self._wake = asyncio.Event()
        self._want = 1  # rows the batcher waits for (``_until_rows``): fewer do not wake it
        self._want_jobs = 1 << 62  # ... or this many requests
        self._open = asyncio.Event()  # cleared: start no new batch (``pause``)
        self._open.set()
        # Replicas only (the single process leaves both None): start no batch at or after
        # `lease_until` (time.monotonic(), checked before each batch, so a stalled loop cannot miss
        # it), and answer 503 to a request that waited `max_wait` seconds while batches were held.
        self.lease_until: float | None = None
        self.max_wait: float | None = None
        self._gate = asyncio.Event()  # set by ``resume`` and ``extend_lease``: look at the gate again
        self._idle = asyncio.Event()  # set: no batch being predicted or answered
        self._idle.set()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict", initializer=_one_thread)
        _one_thread()  # the loop's thread predicts small batches (INLINE_PREDICT_ROWS)
        self._row_seconds: tuple[str, float] | None = None  # a version's measured batch seconds per row (``_inline``)

    async def pause(self) -> None:
        """Start no new batch, and return once the batch being predicted (if any) is answered.
        Requests keep queueing meanwhile; ``resume`` answers them. (Replicas use it to switch
        versions together; the single process never pauses.)"""
        self._open.clear()
        await self._idle.wait()

    def resume(self) -> None:
        """Start batches again, with the holder's current model. A big request part-predicted by
        another version starts over with this one: its answer is one version's, and no answer
        comes from a version the server stopped serving."""
        big, cur = self.big, self.holder.current
        if big is not None and big.pinned is not cur:
            self.pending_rows += big.done
            self.big_rows += big.done
            big.done, big.pinned = 0, cur
            big.parts.clear()
            big.unlogged.clear()  # never logged: only what is answered is
        self._open.set()
        self._wake.set()
        self._gate.set()

    def extend_lease(self, until: float) -> None:
        """Batches may start until `until` (time.monotonic()); a lease never shrinks."""
        if self.lease_until is None or until > self.lease_until:
            self.lease_until = until
            self._gate.set()

    def may_start(self) -> bool:
        """Whether a batch may start now: not paused, and within the lease if there is one."""
        return self._open.is_set() and (self.lease_until is None or time.monotonic() < self.lease_until)

    async def _held(self) -> None:
        """Batches may not start: wait for a resume or a lease, answering 503 to the requests that
        waited `max_wait` seconds meanwhile (they may retry; a normal switch takes far less)."""
        self._gate.clear()
        if self.may_start():
            return
        if self.max_wait is None:
            await self._gate.wait()
            return
        try:
            await asyncio.wait_for(self._gate.wait(), max(self.max_wait / 10, 0.01))
        except TimeoutError:
            pass
        if self.may_start():
            return
        too_old = time.monotonic() - self.max_wait
        keep: deque[Job] = deque()
        for job in self.pending:
            if job.queued_at > too_old or job is self.big:
                keep.append(job)
                continue
            self.pending_rows -= job.rows
            if job.columns is not None and job.rows > MAX_BATCH_ROWS:
                self.big_rows -= job.rows
            if not job.future.done():
                job.future.set_result((error(503, f"no version switch finished within {self.max_wait:g} s; "
                                                  f"retry shortly"), ""))
        self.pending = keep
        big = self.big
        if big is not None and big.queued_at <= too_old:
            self._drop_big(big)
            if not big.future.done():
                big.future.set_result((error(503, f"no version switch finished within {self.max_wait:g} s; "
                                                  f"retry shortly"), ""))

    async def submit(self, parsed: Parsed, fields: Fields | None, request_id: str = "",
                     logged: bool = True) -> tuple[Answer, str]:
        """Queue a checked request; returns its answer and the version that answered it."""
        future = self.enqueue(parsed, fields, request_id, logged)
        assert isinstance(future, asyncio.Future)
        return await future

    def enqueue(self, parsed: Parsed, fields: Fields | None, request_id: str = "", logged: bool = True,
                direct: Direct | None = None) -> asyncio.Future[tuple[Answer, str]] | Direct:
        """Queue a checked request; its future (or `direct`) gets its answer and the version that
        answered it."""
        job = Job(fields, parsed.columns, parsed.frame, parsed.rows,
                  direct if direct is not None else asyncio.get_running_loop().create_future(),
                  request_id, logged and self.plog is not None and self.plog.sampled(), carried=parsed.ids,
                  raw=parsed.raw)
        if self.max_wait is not None:
            job.queued_at = time.monotonic()
        self.pending.append(job)
        self.pending_rows += job.rows
        if job.rows > MAX_BATCH_ROWS:
            self.big_rows += job.rows
        if self.pending_rows >= self._want or len(self.pending) >= self._want_jobs:
            self._wake.set()
        return job.future

    async def _until_rows(self, rows: int, timeout: float | None = None, jobs: int | None = None) -> None:
        """Return once `rows` rows (or `jobs` requests) wait, or after `timeout` seconds.
        ``enqueue`` wakes it only once that many wait (``_want``, ``_want_jobs``), and one timer
        bounds the whole wait (no task per request)."""
        want_jobs = jobs if jobs is not None else 1 << 62
        if self.pending_rows >= rows or len(self.pending) >= want_jobs or (timeout is not None and timeout <= 0):
            return
        self._want, self._want_jobs = rows, want_jobs
        try:
            async with asyncio.timeout(timeout):
                while self.pending_rows < rows and len(self.pending) < want_jobs:
                    self._wake.clear()
                    await self._wake.wait()
        except TimeoutError:
            pass
        finally:
            self._want, self._want_jobs = 1, 1 << 62

    def _take(self) -> tuple[Loaded | None, list[Slice]]:
        """The model and the slices of the next batch. While a big job is in slices, each batch
        takes the small jobs waiting (up to half a batch) and then its next slice, with its model."""
        if self.big is None and self.pending[0].columns is not None and self.pending[0].rows > MAX_BATCH_ROWS:
            self.big = self.pending.popleft()
            self.big.pinned = self.holder.current
        big = self.big
        cur = big.pinned if big is not None else self.holder.current
        budget = MAX_BATCH_ROWS // 2 if big is not None else MAX_BATCH_ROWS
        slices: list[Slice] = []
        rows, waiting = 0, []
        while self.pending:
            job = self.pending[0]
            if job.columns is not None and job.rows > MAX_BATCH_ROWS:
                waiting.append(self.pending.popleft())  # after the big job in slices; smaller ones pass it
                continue
            if slices and rows + job.rows > budget:
                break
            self.pending.popleft()
            slices.append((job, 0, job.rows))
            job.done = job.rows
            rows += job.rows
            if job.rows > MAX_BATCH_ROWS:  # MLflow's parser made it: predicted whole
                self.big_rows -= job.rows
        self.pending.extendleft(reversed(waiting))
        if big is not None:
            n = min(big.rows - big.done, max(MAX_BATCH_ROWS - rows, MAX_BATCH_ROWS // 2))
            slices.append((big, big.done, big.done + n))
            big.done += n
            rows += n
            self.big_rows -= n
            if big.done >= big.rows:
                self.big = None
        self.pending_rows -= rows
        return cur, slices

    def _drop_big(self, job: Job) -> None:
        """A big job answered with an error before its last slice: its other slices are not run."""
        if self.big is job:
            self.pending_rows -= job.rows - job.done
            self.big_rows -= job.rows - job.done
            job.done = job.rows
            job.unlogged.clear()
            self.big = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last_jobs, last_seconds, ended = 0, 0.0, 0.0
        while True:
            await self._until_rows(1)
            # Under load (the last batch ended moments ago) its clients are sending their next
            # requests: give them two predicts' time, or GATHER_PER_REQUEST_SECONDS for each one
            # still missing (GATHER_MISSING_SECONDS at most), at most GATHER_SECONDS, to come
            # back, while the loop writes the answers and reads them, rather than paying a batch's
            # fixed cost for the one or two that came first. Waiting for as many requests as the
            # last batch answered (not rows: mixed sizes would wait for rows that are not coming)
            # gave 6% (1 row) and 11% (100 rows) more requests/s than half its rows for once its
            # time (32 connections, same p99). "Moments ago" and the wait were two predicts' time,
            # under a millisecond at 1 row: most batches then started with the first few clients
            # back (a mean of 20 of 32); with LOAD_SECONDS and a least wait of 1 ms, all 32 (1-row
            # requests/s 19,153-19,249 against 16,413-17,737, A/B in the same minutes; 100 rows the
            # same). The wait per missing request that replaced the fixed 1 ms (a light mix of
            # clients no longer waits 1 ms for one not coming) measured within noise of it.
            # An idle server answers a lone request at once.
            if self.big is None and loop.time() - ended < max(2 * last_seconds, LOAD_SECONDS):
                missing = min(GATHER_PER_REQUEST_SECONDS * (last_jobs - len(self.pending)), GATHER_MISSING_SECONDS)
                await self._until_rows(MAX_BATCH_ROWS, min(max(2 * last_seconds, missing), GATHER_SECONDS), last_jobs)
            if not self.may_start():  # paused: the requests wait, then are answered by what serves next
                await self._held()
                continue
            self._idle.clear()
            try:
                last_jobs, last_seconds = await self._batch(loop, last_jobs, last_seconds)
                ended = loop.time()
            finally:
                self._idle.set()

    async def _batch(self, loop: asyncio.AbstractEventLoop, last_jobs: int, last_seconds: float) -> tuple[int, float]:
        """Take, predict and answer one batch; returns its requests (slices) and seconds."""
        cur, slices = self._take()  # one model for the whole batch
        if not slices:
            return last_jobs, last_seconds
        started = loop.time()
        rows = sum(b - a for _, a, b in slices)
        answers: list[Answer | None]  # None: a slice of a big job, more to come
        if cur is None:
            answers = [error(503, "no champion model loaded yet")] * len(slices)
        else:
            try:
                inline = self._inline(cur, slices, rows)
                answers = self._predict(cur, slices, one_by_one=False) if inline else []
                if not answers:  # too slow for the loop, or its batched predict failed: the requests
                    # are predicted one by one on the predict thread, never on the loop that serves everyone
                    answers = await loop.run_in_executor(self._pool, self._predict, cur, slices)
                elif rows > INLINE_PREDICT_ROWS:
                    # A big inline batch: the loop runs its other work (reads, health, answers
                    # already set) before the next, which a backlog or a big request's next slice
                    # would otherwise start at once.
                    await asyncio.sleep(0)
            except Exception:  # a bug here must not stop the loop that serves everyone
                log.exception("prediction batch failed")
                answers = [_internal(j.request_id) for j, _, _ in slices]
        last_seconds = loop.time() - started
        if cur is not None and self.metrics is not None:
            self.metrics.batch(rows, last_seconds)  # metrics
        for (job, _, _), answer in zip(slices, answers, strict=False):
            if answer is None:  # a slice of a big job, more to come
                continue
            if answer[0] != 200:
                self._drop_big(job)
            elif self.metrics is not None:
                self.metrics.rows(job.rows)  # metrics
            if not job.future.done():  # the client may have gone
                job.future.set_result((answer, cur.version if cur else ""))
        return len(slices), last_seconds

    def _inline(self, cur: Loaded, slices: list[Slice], rows: int) -> bool:
        """Whether to predict this batch (of `rows` rows) on the loop: all of the fast path, a fast
        predict, and measured to take at most INLINE_SECONDS for this version, or (not measured)
        small."""
        if cur.fast is None or not all(_fast_for(j, cur) for j, _, _ in slices):
            return False
        measured = self._row_seconds
        if measured is not None and measured[0] == cur.version:
            return rows * measured[1] <= INLINE_SECONDS
        return rows <= INLINE_PREDICT_ROWS

    def _measured(self, version: str, rows: int, seconds: float) -> None:
        """A batch of this version of more than INLINE_PREDICT_ROWS rows (a small batch's fixed
        cost would overstate the rate) took `seconds` of CPU of the thread it ran on (columns,
        predict, answers and log hand-over; not its waits for the GIL) for `rows` rows: the rate
        ``_inline`` expects of the next, the slowest recent one weighing most."""
        rate, last = seconds / rows, self._row_seconds
        if last is not None and last[0] == version:
            rate = max(rate, 0.8 * last[1] + 0.2 * rate)  # a slower batch counts at once, a faster one slowly
        self._row_seconds = (version, rate)

    def _predict(self, cur: Loaded, slices: list[Slice], one_by_one: bool = True) -> list[Answer | None]:
        """In the predict thread: one predict over the fast-path slices, the others one by one.
        None for a slice of a big job that is not its last. Without `one_by_one` (on the loop), a
        failed batched predict returns [] instead of answering each request alone."""
        answers: dict[int, Answer | None] = {}
        fast = [i for i, (j, _, _) in enumerate(slices) if _fast_for(j, cur)]
        if fast:
            try:
                assert cur.fields is not None  # the fast-path jobs' columns were checked against them
                timed = cur.fast is not None and sum(slices[i][2] - slices[i][1] for i in fast) > INLINE_PREDICT_ROWS
                cpu = time.thread_time() if timed else 0.0
                data = batch_columns([_cut(*slices[i]) for i in fast], cur.fields)
                preds = np.asarray(cur.fast(data) if cur.fast is not None else cur.model.predict(pd.DataFrame(data)))
                values = preds.tolist()  # the answers' numbers, converted once a batch
                start = 0
                for i in fast:
                    job, a, b = slices[i]
                    if a == 0 and b == job.rows:  # a whole request (not a big one's slice): the usual
                        answers[i] = _predictions(values[start:start + b])
                    else:
                        answers[i] = self._slice_answer(job, a, b, preds[start:start + b - a])
                    start += b - a
                try:
                    self._log(cur, data, preds, [slices[i] for i in fast])
                except Exception:  # the log never fails a request
                    log.warning("prediction log: a batch was not logged", exc_info=True)
                if timed:
                    self._measured(cur.version, len(preds), time.thread_time() - cpu)
            except Exception:  # one request at a time, so a failure is only that request's
                log.warning("batched predict failed; answering its %d requests one by one", len(fast), exc_info=True)
                answers.clear()
                if not one_by_one:
                    return []
        return [answers[i] if i in answers else self._one(cur, *s) for i, s in enumerate(slices)]

    @staticmethod
    def _slice_answer(job: Job, start: int, stop: int, preds: np.ndarray) -> Answer | None:
        if start == 0 and stop == job.rows:
            return _predictions(preds)
        job.parts[start] = preds  # (by its first row: a slice predicted again, in a batch retried, is kept once)
        return _predictions(np.concatenate([job.parts[k] for k in sorted(job.parts)])) if stop == job.rows else None

    def _log(self, cur: Loaded, data: dict[str, np.ndarray], preds: np.ndarray, slices: list[Slice]) -> None:
        """Hand the sampled requests of a batch to the prediction log (a queue append). The slices
        of a big request are logged once its last slice is predicted (what is answered: a request
        started over on another version is logged with that version's predictions only)."""
        if self.plog is None or not any(j.logged for j, _, _ in slices):
            return
        if any(a != 0 or b != j.rows for j, a, b in slices):
            whole, start = [], 0
            for j, a, b in slices:
                if a == 0 and b == j.rows:
                    whole.append(np.full(b - a, True))
                else:
                    whole.append(np.full(b - a, False))
                    if j.logged:
                        j.unlogged.append((cur.version, {k: v[start:start + b - a] for k, v in data.items()},
                                           preds[start:start + b - a], (j, a, b)))
                    if j.logged and b == j.rows:
                        for version, d, p, part in j.unlogged:
                            self.plog.record(version, d, p, [self._part(*part)])
                        j.unlogged.clear()
                start += b - a
            keep = np.concatenate(whole)
            data, preds = {k: v[keep] for k, v in data.items()}, preds[keep]
            slices = [s for s in slices if s[1] == 0 and s[2] == s[0].rows]
            if not any(j.logged for j, _, _ in slices):
                return
        if not all(j.logged for j, _, _ in slices):
            keep = np.concatenate([np.full(b - a, j.logged) for j, a, b in slices])
            data, preds = {k: v[keep] for k, v in data.items()}, preds[keep]
            slices = [s for s in slices if s[0].logged]
        if self.plog.remote and cur.fields is not None and all(
                j.raw is not None and len(j.raw) <= RAW_BYTES_PER_ROW * (j.rows + 1) for j, _, _ in slices):
            # the child parses the bodies again (same code, same columns): nothing to copy here
            raws = [j.raw for j, _, _ in slices if j.raw is not None]  # (all of them)
            self.plog.record_raw(cur.version, RawBatch(cur.fields, self.ids, raws,
                                                       [j.request_id for j, _, _ in slices]), preds)
            return
        self.plog.record(cur.version, data, preds, [self._part(*s) for s in slices])

    def _part(self, j: Job, a: int, b: int) -> tuple[str, int, dict | None]:
        cols = j.columns
        assert cols is not None  # only fast-path slices are logged here
        ids = ({k: list(cols[k][a:b]) for k in self.ids if k in cols} or None) if j.carried else None
        return j.request_id, b - a, ids

    def _one(self, cur: Loaded, job: Job, start: int, stop: int) -> Answer | None:
        """A request on its own (MLflow's parser made its frame, or its columns no longer match
        the model's), with its errors as 400s without internals."""
        from mlflow.exceptions import MlflowException

        try:
            if job.frame is not None:
                frame = job.frame
            else:
                frame = pd.DataFrame({k: list(v) for k, v in _cut(job, start, stop).items()})
            preds = np.asarray(cur.model.predict(frame))
            if job.frame is not None and self.plog is not None and job.logged and len(frame):
                try:
                    self._log_parsed(cur, frame, preds, job)
                except Exception:  # the log never fails a request
                    log.warning("prediction log: a parsed request was not logged", exc_info=True)
            if job.frame is not None:
                return _predictions(preds)
            answer = self._slice_answer(job, start, stop, preds)
            if job.logged and _fast_for(job, cur):  # (a batch retried request by request)
                try:
                    assert cur.fields is not None
                    self._log(cur, batch_columns([_cut(job, start, stop)], cur.fields), preds, [(job, start, stop)])
                except Exception:  # the log never fails a request
                    log.warning("prediction log: a request was not logged", exc_info=True)
            return answer
        except MlflowException as e:
            log.warning("request %s refused by the model: %s", job.request_id, e.message[:2000])
            return error(400, clean(e.message))
        except (ValueError, KeyError, TypeError) as e:
            log.warning("request %s refused by the model: %s: %s", job.request_id, type(e).__name__, str(e)[:2000])
            return error(400, f"the model could not use these rows: {type(e).__name__}: {clean(e, 500)}")
        except Exception:  # only this request fails, never the others of its batch
            log.exception("prediction failed (request id %s)", job.request_id)
            return _internal(job.request_id)

    def _log_parsed(self, cur: Loaded, frame: Any, preds: np.ndarray, job: Job) -> None:
        """Log a request MLflow's parser read (its frame may carry the identity columns)."""
        if self.plog is None:
            return
        names = [n for n in cur.model.metadata.get_input_schema().input_names() if n in frame.columns]
        if len(preds) != len(frame) or not names:
            return
        ids = {k: frame[k].tolist() for k in self.ids if k in frame.columns} or None
        self.plog.record(cur.version, frame[names].reset_index(drop=True),
                         preds if preds.ndim == 1 else preds.reshape(len(frame), -1),
                         [(job.request_id, len(frame), ids)])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _tracking(receive: Callable) -> tuple[Callable, list[bool]]:
    """`receive`, and a flag set once the whole body was read (an answer sent before then closes
    the connection)."""
    read = [False]

    async def tracked() -> dict:
        message = await receive()
        read[0] = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    return tracked, read


def _request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-Id (printable, at most 128 characters), else a new one."""
    for k, v in headers:
        if k == b"x-request-id":
            rid = v.decode("latin-1")
            if 0 < len(rid) <= 128 and rid.isprintable():
                return rid
            break
    return _new_request_id()


_ids = count(1)
_id_prefix = uuid.uuid4().hex[:20]


def _new_request_id() -> str:
    """A new request id: this process's random prefix and a counter (32 hex digits like a uuid4's,
    without a system call per request)."""
    return f"{_id_prefix}{next(_ids):012x}"


@lru_cache(maxsize=64)  # clients send the same few values (bounded: an odd value costs a parse)
def content_type(value: bytes | None) -> str | None:
    """The media type if MLflow's scoring server reads it (parameter ``charset=utf-8`` only),
    else None. Names are compared without case, as HTTP says."""
    if not value:
        return None
    mime, *params = (p.strip() for p in value.decode("latin-1").split(";"))
    mime = mime.lower()
    for p in params:
        key, _, val = p.partition("=")
        if key.strip().lower() != "charset" or val.strip().strip('"').lower() != "utf-8":
            return None
    return mime if mime in CONTENT_TYPES else None


class ParseWorkers:
    """Where bodies are parsed off the event loop: a thread for small ones, worker processes for
    big ones (a thread would hold the GIL, and so the loop, for the whole parse). A worker that
    dies is replaced."""

    def __init__(self, processes: int):
        self.processes = processes
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parse")
        self._procs: Executor | None = None

    def procs(self) -> Executor:
        if self._procs is None:
            self._procs = ProcessPoolExecutor(max_workers=self.processes,
                                              mp_context=multiprocessing.get_context("spawn"),
                                              initializer=_parse_worker, initargs=(os.getpid(),))
        return self._procs

    def warm(self) -> None:
        if self.processes:
            self.procs().submit(_warm)

    async def parse(self, size: int, raw: bytes, mime: str, fields: Fields | None, ids: frozenset[str],
                    schema_json: str | None, max_rows: int) -> Parsed:
        loop = asyncio.get_running_loop()
        if self.processes and size > INLINE_BYTES:
            pool = self.procs()
            try:
                return await loop.run_in_executor(
                    pool, partial(parse_request, raw, mime, fields, ids, schema_json, max_rows, arrays=True))
            except BrokenProcessPool:
                log.error("a parse worker died (a %d-byte body); starting another", size)
                if self._procs is pool:
                    self._procs = None
                    _end_pool(pool)
                raise
        return await loop.run_in_executor(self.thread, parse_request, raw, mime, fields, ids, schema_json, max_rows)

    def close(self) -> None:
        self.thread.shutdown(wait=False, cancel_futures=True)
        if self._procs is not None:  # (after the graceful shutdown: nothing of the server's is in flight)
            _end_pool(self._procs)


def _end_pool(pool: Executor) -> None:
    """Shut a pool of parse workers down without waiting, and kill its workers: they ignore the
    SIGTERM a broken pool ends its workers with (``_parse_worker``), and one left parsing a big
    body would block for ever writing its result, and the server's exit on the pool's thread."""
    workers = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for w in workers:
        try:
            w.kill()
        except (OSError, ValueError):  # gone already, or closed
            pass


class Hooks:
    """What a server built around this module's pieces adds to them (``_replicas``: a Ray Serve
    replica that switches versions with the others). The single process uses none of it."""

    def bind(self, app: Invocations) -> None:
        """Called once the app is built (before start-up)."""

    async def start(self, batcher: Batcher) -> None:
        """At start-up, once the batcher runs."""

    async def stop(self) -> None:
        """At shut-down."""

    async def status(self, details: bool) -> dict[str, Any]:
        """Fields added to /version (and, when `details`, to /health)."""
        return {}

    def routes(self, api: FastAPI, app: Invocations) -> None:
        """More routes (FastAPI's)."""

    async def refresh(self) -> bool | None:
        """``POST /refresh``: check the alias now; whether the check succeeded, or None when this
        server cannot (then /refresh answers 404 and callers wait for the poll). Replicas: their
        coordinator polls the alias every ``serving.poll_seconds`` (``_replicas``)."""
        return None


def create_app(spec: Spec, ctx: RunContext, token: str | None = None, freeze_gc: bool = False,
               log_process: bool = False, **limits: Any) -> Any:
    """The app. `freeze_gc` is for a process that only serves (``serve``): a full collection
    walks every object of mlflow, pandas and the model (about 0.5 s with every thread stopped);
    frozen after start-up and after each load, they are never walked again. `log_process`: the
    prediction log's files are built and written by a child process (``serve``: see
    ``_predlog._Child``). `limits`: the fields of `Limits` (see the module docstring)."""
    lim = Limits.resolve(**limits)
    holder = ModelHolder(spec, ctx, freeze_gc)
    try:  # a registry that does not answer yet: serve nothing (503), say why on /health, keep polling
        registry.setup_tracking(ctx, spec.name)
        holder.refresh()
    except Exception as e:
        holder.last_error = redact(f"{type(e).__name__}: {e}")
        log.warning("no champion loaded yet: %s", holder.last_error)
    return build_app(spec, ctx, holder, lim, token, freeze_gc, log_process=log_process)


def build_app(spec: Spec, ctx: RunContext, holder: ModelHolder, lim: Limits, token: str | None,
              freeze_gc: bool, hooks: Hooks | None = None, log_process: bool = False) -> Invocations:
    """The app around a holder. Without `hooks`, the holder watches the champion alias itself;
    with them, whoever holds the hooks decides what the holder serves."""
    plog = (PredictionLog(spec, ctx.store, process=log_process) if spec.monitoring.log.sample_rate > 0
            else None)
    workers = ParseWorkers(lim.parse_processes)
    api = FastAPI(title="daybreak", version="1", lifespan=_lifespan(holder, plog, workers, freeze_gc, hooks),
                  docs_url=None, redoc_url=None, openapi_url=None)
    api.state.holder = holder
    api.state.plog = plog
    api.state.limits = lim
    api.state.metrics = ServerMetrics(spec.model.name, spec.promotion.alias, holder, plog)  # metrics
    from daybreak.online import OnlineServing

    online = OnlineServing(spec)  # raw rows and /events (opened on first use)
    api.state.online = online
    api.state.metrics.online = online
    invocations = Invocations(api, holder, workers, lim, token)
    _error_handlers(api)
    _status_routes(api, spec, holder, plog, invocations.authorized, hooks)
    api.add_route("/metrics", api.state.metrics.endpoint(invocations.authorized,  # metrics
                                                         before=partial(_online_fresh, online)), methods=["GET"])
    if hooks is not None:
        hooks.routes(api, invocations)
        hooks.bind(invocations)
    return invocations


def _lifespan(holder: ModelHolder, plog: PredictionLog | None, workers: ParseWorkers,
              freeze_gc: bool, hooks: Hooks | None = None) -> Callable[[FastAPI], Any]:
    """Start-up and shut-down: the batcher, the parse workers, the champion watch (or the
    hooks), the log."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if freeze_gc:
            gc.collect()
            gc.freeze()
        batcher = Batcher(holder, plog, app.state.metrics)  # metrics
        app.state.batcher = batcher
        task = asyncio.create_task(batcher.run(), name="predict-batches")
        workers.warm()
        if hooks is None:
            # The poll runs on its own thread, never the predict thread: a registry that hangs (MLflow
            # retries for minutes by default; ``serve`` shortens that) must not stop predictions.
            thread = threading.Thread(target=holder.watch, name="champion-watch", daemon=True)
            thread.start()
        else:
            await hooks.start(batcher)
        yield
        if hooks is None:
            holder.stop()
        else:
            await hooks.stop()
        task.cancel()
        batcher.close()
        workers.close()
        online = getattr(app.state, "online", None)
        if online is not None:
            online.close()
        if plog is not None:
            plog.close()  # what waits for the writer is written before the process ends

    return lifespan


def _error_handlers(api: FastAPI) -> None:
    """FastAPI's errors in MLflow's error format."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @api.exception_handler(HTTPException)
    async def http_error(request: Any, exc: HTTPException) -> Any:
        status, body = error(exc.status_code, "no such endpoint" if exc.status_code == 404 else clean(exc.detail))
        return JSONResponse(json.loads(body), status_code=status, headers=getattr(exc, "headers", None))

    @api.exception_handler(RequestValidationError)
    async def validation_error(request: Any, exc: RequestValidationError) -> Any:
        status, body = error(400, "invalid request")
        return JSONResponse(json.loads(body), status_code=status)


def _status_routes(api: FastAPI, spec: Spec, holder: ModelHolder, plog: PredictionLog | None,
                   authorized: Callable[[list[tuple[bytes, bytes]]], bool | None], hooks: Hooks | None = None) -> None:
    """GET /ping, /health (details only for the token's holder when there is a token), /version."""

    @api.get("/ping")
    def ping() -> Any:
        if holder.current is None:
            return JSONResponse({"status": "no model"}, status_code=503)
        return {"status": "ok"}

    @api.get("/health")
    async def health(request: Request) -> Any:
        cur = holder.current
        status = 200 if cur else 503
        if authorized(request.scope["headers"]) is False:
            return JSONResponse({"status": "ok" if cur else "no model"}, status_code=status)
        return JSONResponse({
            "status": "ok" if cur else "no model",
            "model": spec.model.name,
            "alias": spec.promotion.alias,
            "version": cur.version if cur else None,
            "loaded_at": cur.loaded_at if cur else None,
            "last_error": holder.last_error,  # redacted when it was recorded
            "prediction_log": plog.stats() if plog is not None else None,
            "online": await _online_fresh(getattr(api.state, "online", None)),
            **(await hooks.status(details=True) if hooks is not None else {}),
        }, status_code=status)

    @api.post("/refresh")
    async def refresh(request: Request) -> Any:
        """Check the champion alias now (a deploy need not wait for the poll): answers once the
        check is done (a new version loaded and swapped in), with the version served then. The
        poll stays as the fallback. Needs the token when there is one; a burst of calls makes one
        registry lookup."""
        if authorized(request.scope["headers"]) is False:
            status, body = error(401, "missing or wrong bearer token")
            return JSONResponse(json.loads(body), status_code=status)
        if hooks is not None:
            ok = await hooks.refresh()
            if ok is None:
                status, body = error(404, f"this server's versions are switched by its coordinator, which polls "
                                          f"the alias every {spec.serving.poll_seconds:g} s (serving.poll_seconds)")
                return JSONResponse(json.loads(body), status_code=status)
        else:
            try:
                # shielded: a caller that gives up must not cancel the check others wait for
                ok = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(holder.check_soon())),
                                            REFRESH_TIMEOUT)
            except TimeoutError:
                ok = None
        cur = holder.current
        if not ok:
            status, body = error(503, "the champion alias could not be checked now" if ok is False else
                                 f"the check did not finish within {REFRESH_TIMEOUT:g} s")
            return JSONResponse(json.loads(body), status_code=status, headers={"Retry-After": "1"})
        return {"model": spec.model.name, "alias": spec.promotion.alias, "version": cur.version if cur else None}

    @api.get("/version")
    async def version() -> Any:
        cur = holder.current
        return {"model": spec.model.name, "alias": spec.promotion.alias, "version": cur.version if cur else None,
                **(await hooks.status(details=False) if hooks is not None else {})}


ONLINE_READ_TIMEOUT = 5.0
"""Seconds /health and /metrics wait for the online store's freshness (a Redis that hangs)."""


async def _online_fresh(online: OnlineServing | None) -> dict[str, Any] | None:
    """The online store's freshness, read on its thread (``OnlineServing.refresh``)."""
    if online is None:
        return None
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(loop.run_in_executor(online.pool, online.refresh), ONLINE_READ_TIMEOUT)
    except TimeoutError:
        online.last = {**online.last, "error": f"not read within {ONLINE_READ_TIMEOUT:g} s"}
        return online.last


class Deadlines:
    """Tasks cancelled when their time is up, swept by one task (``SWEEP_SECONDS`` apart, or a
    quarter of the shortest timeout): a dict entry per request instead of a timer (a timer armed
    and cancelled per request cost 3-5 us, a tenth of a small request's whole cost)."""

    def __init__(self) -> None:
        self.due: dict[asyncio.Task, float] = {}
        self.late: set[asyncio.Task] = set()
        self.tick = SWEEP_SECONDS
        self._sweeper: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, task: asyncio.Task, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        self.due[task] = loop.time() + seconds
        if seconds / 4 < self.tick:
            self.tick = max(seconds / 4, 0.01)
        if self._loop is not loop or self._sweeper is None or self._sweeper.done():
            self._loop = loop
            self._sweeper = loop.create_task(self._sweep(), name="body-deadlines")

    def remove(self, task: asyncio.Task) -> None:
        self.due.pop(task, None)
        self.late.discard(task)

    def expired(self, task: asyncio.Task) -> bool:
        """Whether `task` was cancelled for its deadline (then its cancellation is taken back)."""
        if task not in self.late:
            return False
        self.late.discard(task)
        task.uncancel()
        return True

    async def _sweep(self) -> None:
        """Runs while deadlines wait (``add`` starts it again)."""
        loop = asyncio.get_running_loop()
        while self.due:
            await asyncio.sleep(self.tick)
            now = loop.time()
            for task, due in list(self.due.items()):
                if due <= now and task not in self.late:
                    self.late.add(task)
                    task.cancel()


class Invocations:
    """The ASGI app: POST /invocations in plain ASGI, everything else through FastAPI (``api``):
    FastAPI's routing and request machinery costs about as much per request as a one-row body's
    share of a batch. Holds the bytes in flight across requests."""

    def __init__(self, api: FastAPI, holder: ModelHolder, workers: ParseWorkers, lim: Limits,
                 token: str | None) -> None:
        self.api, self.holder, self.workers, self.lim = api, holder, workers, lim
        self.expected = f"Bearer {token}".encode() if token else None
        self.inflight = 0  # body bytes being read or parsed, all requests together
        self.deadlines = Deadlines()  # of the bodies being read
        self.state = api.state  # what tests and the server read (the holder, the limits)
        self.metrics: ServerMetrics = api.state.metrics
        self.online: OnlineServing | None = getattr(api.state, "online", None)

    def authorized(self, headers: list[tuple[bytes, bytes]]) -> bool | None:
        """Whether the request carries the bearer token; None when the server has no token."""
        if self.expected is None:
            return None
        return self._token_ok(dict(headers))

    def _token_ok(self, headers: Mapping[bytes, bytes]) -> bool:
        return self.expected is not None and hmac.compare_digest(headers.get(b"authorization", b""), self.expected)

    async def read_body(self, receive: Callable, declared: int | None, counted: list[int]) -> bytes:
        """The body within `body_timeout` and `max_body_bytes`. A chunked body's bytes are counted
        in flight as they come, and in `counted` (the caller releases them). Raises Refused."""
        chunks, more, size = [], True, 0
        task = asyncio.current_task()
        assert task is not None
        self.deadlines.add(task, self.lim.body_timeout)
        try:
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise Refused(400, "the client went away")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.lim.max_body_bytes:
                    raise Refused(413, _too_big(self.lim.max_body_bytes))
                if declared is None and size > INLINE_BYTES:  # chunked: counted as it comes, once past small
                    more_bytes = size - counted[0]
                    if self.inflight + more_bytes > self.lim.max_inflight_bytes:
                        raise Refused(503, "overloaded: too many body bytes in flight; retry shortly")
                    self.inflight += more_bytes
                    counted[0] += more_bytes
                chunks.append(chunk)
                more = message.get("more_body", False)
        except asyncio.CancelledError:
            if not self.deadlines.expired(task):
                raise
            raise Refused(408, f"the body did not arrive within {self.lim.body_timeout:g} s "
                               f"(DAYBREAK_SERVE_BODY_TIMEOUT)") from None
        finally:
            self.deadlines.remove(task)
        return b"".join(chunks)

    def _admit(self, headers: dict[bytes, bytes]) -> tuple[Answer | None, str, int | None, Loaded | None]:
        """The checks of a POST /invocations before its body: the token, the media type, a model,
        the declared length, the rows waiting. Returns a refusal, or the media type, the declared
        length and the model."""
        if self.expected and not self._token_ok(headers):
            return error(401, "missing or wrong bearer token"), "", None, None
        mime = content_type(headers.get(b"content-type"))
        if mime is None:
            got = headers.get(b"content-type", b"").decode("latin-1")[:100] or "none"
            return error(415, f"Content-Type must be one of {', '.join(CONTENT_TYPES)} (parameter charset=utf-8 "
                              f"only); got {got}"), "", None, None
        cur = self.holder.current
        if cur is None:
            return error(503, "no champion model loaded yet"), mime, None, None
        try:
            declared = int(headers[b"content-length"]) if b"content-length" in headers else None
        except ValueError:
            return error(400, "invalid Content-Length"), mime, None, None
        if declared is not None and declared > self.lim.max_body_bytes:
            return error(413, _too_big(self.lim.max_body_bytes)), mime, None, None
        batcher = self.api.state.batcher
        if batcher.pending_rows - batcher.big_rows > MAX_PENDING_ROWS:
            return error(503, "overloaded: too many rows waiting; retry shortly"), mime, None, None
        return None, mime, declared, cur

    def _parse_fast(self, raw: bytes, mime: str, cur: Loaded) -> Parsed | None:
        """The usual small JSON shapes, parsed on the loop (None: the rest). Raises Refused."""
        if mime != JSON_TYPE or len(raw) > INLINE_BYTES:
            return None
        parsed = parse_fast(raw, cur.fields, self.api.state.batcher.ids, self.lim.max_rows)
        if parsed is not None:
            parsed.raw = raw
        return parsed

    async def _parsed(self, body: bytes | Awaitable[bytes], mime: str, cur: Loaded, request_id: str,
                      fast_tried: bool = False) -> Parsed | Answer:
        """The body (read whole, or being read) parsed and checked, or the answer its failure
        gets: on the loop when it is of the usual small shapes (unless `fast_tried`), off it
        otherwise."""
        try:
            raw = body if isinstance(body, bytes) else await body
            parsed = None if fast_tried else self._parse_fast(raw, mime, cur)
            if parsed is None:
                schema = cur.model.metadata.get_input_schema()
                parsed = await self.workers.parse(len(raw), raw, mime, cur.fields, self.api.state.batcher.ids,
                                                  schema.to_json() if schema is not None else None,
                                                  self.lim.max_rows)
            return parsed
        except Refused as e:
            return error(e.status, e.message)
        except BrokenProcessPool:
            return _internal(request_id)
        except Exception:
            log.exception("reading request %s failed", request_id)
            return _internal(request_id)

    def _queue(self, parsed: Parsed, fields: Fields | None, request_id: str, logged: bool,
               direct: Direct | None = None) -> Answer | asyncio.Future[tuple[Answer, str]] | Direct:
        """A parsed request's refusal, or its place in the batcher (a future of its answer and the
        version that gave it, or `direct`)."""
        if parsed.ids and self.expected is None:
            return error(403, f"this request carries identity columns ({', '.join(sorted(self.api.state.batcher.ids))}"
                              f"), which the prediction log keeps for the label join: they are accepted only from a "
                              f"caller with the bearer token; set DAYBREAK_SERVE_TOKEN on the server and send "
                              f"'Authorization: Bearer <token>', or leave them out")
        batcher = self.api.state.batcher
        big_budget = max(self.lim.max_rows, MAX_PENDING_ROWS // 2)
        if parsed.rows > MAX_BATCH_ROWS and batcher.big_rows + parsed.rows > big_budget:
            # big requests have a budget of their own: they never crowd out the small ones
            return error(503, "overloaded: too many rows of big requests waiting; retry shortly")
        return batcher.enqueue(parsed, fields, request_id, logged, direct)

    async def answer(self, scope: dict, receive: Callable, request_id: str,
                     logged: bool = True) -> tuple[int, bytes, str | None]:
        """Status, JSON body and serving version of one POST /invocations (`logged` false: never
        sampled for the prediction log, e.g. a deploy check run through every replica)."""
        refused, mime, declared, cur = self._admit(dict(scope["headers"]))
        if refused is not None:
            return *refused, None
        assert cur is not None
        # Bodies over INLINE_BYTES share the in-flight budget; smaller ones (at most max_connections
        # of them, 64 KiB each) are never turned away by a few big ones holding it.
        held, counted = (declared if declared is not None and declared > INLINE_BYTES else 0), [0]
        if held and self.inflight + held > self.lim.max_inflight_bytes:
            return *error(503, "overloaded: too many body bytes in flight; retry shortly"), None
        self.inflight += held
        try:
            parsed = await self._parsed(self.read_body(receive, declared, counted), mime, cur, request_id)
        finally:
            self.inflight -= held + counted[0]
        if isinstance(parsed, tuple):
            return *parsed, None
        queued = self._queue(parsed, cur.fields, request_id, logged)
        if isinstance(queued, tuple):
            return *queued, None
        assert isinstance(queued, asyncio.Future)
        (status, payload), served = await queued
        return status, payload, served if status == 200 else None

    def fast(self, headers: list[tuple[bytes, bytes]], raw: bytes,
             reply: Callable[[int, bytes, str | None, str], None]) -> None:
        """POST /invocations whose whole body (at most INLINE_BYTES) came with its headers, from
        the HTTP protocol itself (``_http.py``), without ASGI's task and messages: the same checks
        and answers as ``answer``. `reply(status, body, version, request_id)` is called once,
        now or when the batch is predicted (never if the server stops first)."""
        started = self.metrics.begin()  # metrics
        request_id = _request_id(headers)

        def answered(status: int, payload: bytes, served: str | None) -> None:
            self.metrics.end(status, started)  # metrics
            reply(status, payload, served if status == 200 else None, request_id)

        def predicted(fut: asyncio.Future[tuple[Answer, str]]) -> None:
            # always a reply: the connection waits for it (a cancelled job: the server stopping)
            try:
                (status, payload), served = fut.result()
            except asyncio.CancelledError:
                status, payload, served = *error(503, "the server is stopping; retry shortly"), None
            except Exception:
                log.exception("request %s failed", request_id)
                status, payload, served = *_internal(request_id), None
            answered(status, payload, served)

        def now(result: tuple[Answer, str]) -> None:  # set by the batch itself (``Direct``)
            (status, payload), served = result
            answered(status, payload, served)

        direct = Direct(now)
        try:
            queued = self._fast(dict(headers), raw, request_id, direct)
        except Exception:  # a bug: this request gets a 500 in MLflow's format, the others go on
            log.exception("request %s failed", request_id)
            direct.answered = True  # (if it was queued before the error, the batch does not answer it again)
            queued = _internal(request_id)
        if isinstance(queued, tuple):
            answered(*queued, None)
        elif isinstance(queued, asyncio.Future):  # (parsed off the loop)
            queued.add_done_callback(predicted)

    def _fast(self, headers: dict[bytes, bytes], raw: bytes, request_id: str,
              direct: Direct) -> Answer | asyncio.Future[tuple[Answer, str]] | Direct:
        refused, mime, _, cur = self._admit(headers)
        if refused is not None:
            return refused
        assert cur is not None
        try:
            parsed = self._parse_fast(raw, mime, cur)
        except Refused as e:
            return error(e.status, e.message)
        if parsed is None:  # not the usual shape: parsed off the loop, as ``answer`` does
            return asyncio.ensure_future(self._parse_queue(raw, mime, cur, request_id))
        return self._queue(parsed, cur.fields, request_id, True, direct)

    async def _parse_queue(self, raw: bytes, mime: str, cur: Loaded, request_id: str) -> tuple[Answer, str]:
        parsed = await self._parsed(raw, mime, cur, request_id, fast_tried=True)
        if isinstance(parsed, tuple):
            return parsed, ""
        queued = self._queue(parsed, cur.fields, request_id, True)
        if isinstance(queued, tuple):
            return queued, ""
        assert isinstance(queued, asyncio.Future)
        return await queued

    async def _online_body(self, scope: dict, receive: Callable) -> tuple[int, bytes] | tuple[None, bytes]:
        """The body of a raw-row request or an event push (JSON only, the limits of
        /invocations), or an error answer. Authorization is the caller's."""
        headers = dict(scope["headers"])
        if content_type(headers.get(b"content-type")) != JSON_TYPE:
            got = headers.get(b"content-type", b"").decode("latin-1")[:100] or "none"
            return error(415, f"Content-Type must be {JSON_TYPE} (parameter charset=utf-8 only); got {got}")
        try:
            declared = int(headers[b"content-length"]) if b"content-length" in headers else None
        except ValueError:
            return error(400, "invalid Content-Length")
        if declared is not None and declared > self.lim.max_body_bytes:
            return error(413, _too_big(self.lim.max_body_bytes))
        held, counted = (declared if declared is not None and declared > INLINE_BYTES else 0), [0]
        if held and self.inflight + held > self.lim.max_inflight_bytes:
            return error(503, "overloaded: too many body bytes in flight; retry shortly")
        self.inflight += held
        try:
            return None, await self.read_body(receive, declared, counted)
        except Refused as e:
            return error(e.status, e.message)
        finally:
            self.inflight -= held + counted[0]

    async def _on_online_thread(self, request_id: str, fn: Callable[..., Any], *args: Any, queued: bool = False) -> Any:
        """`fn(*args)` on the online store's thread (`queued`: `fn` queues the work there itself and
        returns its future); errors become answers (raised as Refused)."""
        from daybreak.online import BodyError, OnlineError

        assert self.online is not None
        loop = asyncio.get_running_loop()
        try:
            if queued:
                return await asyncio.wrap_future(fn(*args))
            return await loop.run_in_executor(self.online.pool, fn, *args)
        except BodyError as e:
            raise Refused(400, clean(e)) from None
        except OnlineError as e:
            raise Refused(503, clean(e)) from None
        except Exception as e:
            if type(e).__module__.startswith("redis"):
                log.warning("online store unavailable (request %s): %s", request_id, redact(e))
                raise Refused(503, f"the online store is unavailable; retry shortly (request id {request_id})") \
                    from None
            log.exception("online request %s failed", request_id)
            raise

    async def answer_raw(self, scope: dict, receive: Callable, request_id: str,
                         logged: bool = True) -> tuple[int, bytes, str | None]:
        """``POST /invocations?raw=1``: rows of the base source; features from the online store
        (see the module docstring)."""
        if self.expected and not self.authorized(scope["headers"]):
            return *error(401, "missing or wrong bearer token"), None
        cur = self.holder.current
        if cur is None:
            return *error(503, "no champion model loaded yet"), None
        if self.online is None:
            return *error(404, "this server has no online store"), None
        batcher = self.api.state.batcher
        if batcher.pending_rows - batcher.big_rows > MAX_PENDING_ROWS:
            return *error(503, "overloaded: too many rows waiting; retry shortly"), None
        status, raw = await self._online_body(scope, receive)
        if status is not None:
            return status, raw, None
        if cur.fields is not None:
            names = [f[0] for f in cur.fields]
        else:
            schema = cur.model.metadata.get_input_schema()
            names = list(schema.input_names()) if schema is not None and schema.has_input_names() else []
        # identities are logged for the label join only from a caller with the token (a server with one)
        ids = sorted(batcher.ids) if self.expected is not None else []
        try:
            got = await self._on_online_thread(request_id, _compute_raw, self.online, raw, self.lim.max_rows,
                                               names, ids, queued=True)
        except Refused as e:
            return *error(e.status, e.message), None
        except Exception:
            return *_internal(request_id), None
        self.metrics.raw(len(got.predicted), len(got.blocked))  # metrics
        if not len(got.predicted):
            from daybreak.online import blocked_message

            body = {"error_code": ERROR_CODES[422], "message": clean(blocked_message(got.blocked), 4000),
                    "blocked": got.blocked}
            return 422, _json(body), None
        rows = len(got.predicted)
        if cur.fields is not None:
            parsed = Parsed(rows, columns=got.columns, ids=bool(ids))
        else:
            parsed = Parsed(rows, frame=pd.DataFrame(got.columns), ids=bool(ids))
        (status, payload), served = await batcher.submit(parsed, cur.fields, request_id, logged)
        if status != 200:
            return status, payload, None
        import orjson

        preds = orjson.loads(payload)["predictions"]
        full: list[Any] = [None] * got.rows
        for i, p in zip(got.predicted.tolist(), preds, strict=True):
            full[i] = p
        return 200, _json({"predictions": full, "blocked": got.blocked, "notes": got.notes}), served

    async def answer_events(self, scope: dict, receive: Callable, request_id: str) -> tuple[int, bytes]:
        """``POST /events``: events pushed to the online store (token only)."""
        if self.expected is None:
            return error(403, "POST /events writes to the online store: it is accepted only from a caller with the "
                              "bearer token; set DAYBREAK_SERVE_TOKEN on the server and send "
                              "'Authorization: Bearer <token>'")
        if not self.authorized(scope["headers"]):
            return error(401, "missing or wrong bearer token")
        if self.online is None:
            return error(404, "this server has no online store")
        status, raw = await self._online_body(scope, receive)
        if status is not None:
            return status, raw
        try:
            out = await self._on_online_thread(request_id, _push_events, self.online, raw, self.lim.max_rows)
        except Refused as e:
            return error(e.status, e.message)
        except Exception:
            return error(500, f"internal error while pushing events; the server log has the details "
                              f"(request id {request_id})")
        return 200, _json(out)

    async def _events(self, scope: dict, receive: Callable, send: Callable) -> None:
        request_id = _request_id(scope["headers"])
        receive_tracked, read = _tracking(receive)

        if scope["method"] != "POST":
            status, payload = error(405, "use POST")
        else:
            try:
                status, payload = await self.answer_events(scope, receive_tracked, request_id)
            except Exception:
                log.exception("request %s failed", request_id)
                status, payload = error(500, f"internal error; the server log has the details (request id "
                                             f"{request_id})")
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload)),
                   (b"x-request-id", request_id.encode())]
        if status == 503:
            headers.append((b"retry-after", b"1"))
        if status == 405:
            headers.append((b"allow", b"POST"))
        if not read[0]:  # refused before its body was read: never parse that as a request
            headers.append((b"connection", b"close"))
        self.metrics.request("/events", status)  # metrics
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        """POST /invocations in plain ASGI, everything else through FastAPI: FastAPI's routing and
        request machinery costs about as much per request as a one-row body's share of a batch."""
        if scope["type"] != "http" or scope["path"] != "/invocations":
            if scope["type"] == "http" and scope["path"] == "/events":
                return await self._events(scope, receive, send)
            return await self.api(scope, receive, self.metrics.counting(scope, send))  # metrics: counting
        started = self.metrics.begin()  # metrics
        answered = False
        try:
            request_id = _request_id(scope["headers"])
            receive_tracked, read = _tracking(receive)

            if scope["method"] != "POST":
                status, payload, served = *error(405, "use POST"), None
            else:
                try:
                    if scope.get("query_string") and _raw_query(scope["query_string"]):
                        status, payload, served = await self.answer_raw(scope, receive_tracked, request_id)
                    else:
                        status, payload, served = await self.answer(scope, receive_tracked, request_id)
                except Exception:  # a bug: this request gets a 500 in MLflow's format, the others go on
                    log.exception("request %s failed", request_id)
                    status, payload, served = *_internal(request_id), None
            headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload)),
                       (b"x-request-id", request_id.encode())]
            if status == 503:
                headers.append((b"retry-after", b"1"))
            if not read[0]:
                # refused before its body was read: never parse that as a request
                headers.append((b"connection", b"close"))
            if status == 405:
                headers.append((b"allow", b"POST"))
            if served is not None:
                headers.append((b"x-model-version", served.encode()))
            self.metrics.end(status, started)  # metrics
            answered = True
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": payload})
        finally:
            if not answered:  # cancelled (the server stopping) before its answer: no longer in flight either
                self.metrics.unanswered()  # metrics


def _raw_query(query: bytes) -> bool:
    """Whether ``?raw=1`` (or ``true``) asks for features from the online store."""
    from urllib.parse import parse_qs

    values = parse_qs(query.decode("latin-1")).get("raw", [])
    return bool(values) and values[-1].lower() in ("1", "true", "yes")


def _compute_raw(online: OnlineServing, raw: bytes, max_rows: int, names: list[str], ids: list[str]) -> Future[Any]:
    """Queue a raw-row body for the online thread, where the raw requests waiting are computed
    together (``OnlineServing.drain``); its body is parsed there too."""
    from daybreak.online import BodyError

    def body() -> Any:
        try:
            return _parse_json(raw)[0]
        except Refused as e:
            raise BodyError(e.message) from None

    return online.submit_raw(body, max_rows, names, ids)


def _push_events(online: OnlineServing, raw: bytes, max_rows: int) -> dict[str, Any]:
    """On the online thread: parse an event body and push it."""
    from daybreak.online import BodyError

    try:
        body, _ = _parse_json(raw)
    except Refused as e:
        raise BodyError(e.message) from None
    return online.push(body, max_rows)


def _too_big(limit: int) -> str:
    return (f"body over {limit / 2**20:g} MiB (DAYBREAK_SERVE_MAX_BODY_BYTES); send fewer rows per request")


def _protocol(header_timeout: float, app: Invocations | None = None) -> type | str:
    """The HTTP protocol (``_http.py``): uvicorn's httptools one with a header timeout (past it:
    408 and the connection closes), and `app`'s ``POST /invocations`` answered below ASGI."""
    from daybreak.deploy._http import protocol

    return protocol(header_timeout, lambda status, message: error(status, message)[1],
                    app.fast if app is not None else None, INLINE_BYTES)


def serve(spec: Spec, ctx: RunContext, host: str | None = None, port: int | None = None,
          token: str | None = None, **limits: Any) -> None:
    """One process: an event loop for HTTP and JSON, one predict thread, a parse worker (see the
    module docstring). The access log is off: at thousands of requests a second it would cost
    more than serving."""
    import uvicorn

    # The champion poll must fail fast when the registry is down or hangs (MLflow's defaults
    # retry for minutes); the next poll tries again, and the current model keeps serving.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    lim = Limits.resolve(**limits)
    use_system_allocator()
    app = create_app(spec, ctx, token=token, freeze_gc=True, log_process=True,
                     **{k: getattr(lim, k) for k in lim.__dataclass_fields__})
    uvicorn.run(app, host=host or spec.serving.host, port=port or spec.serving.port, log_level="info",
                access_log=False, http=_protocol(lim.header_timeout, app),
                limit_concurrency=lim.max_connections or None, timeout_keep_alive=5)
