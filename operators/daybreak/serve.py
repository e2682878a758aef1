"""Online serving of the champion with the MLflow scoring protocol, hot-swapping on alias moves.

A background thread polls the champion alias (with one client, failing fast when the registry
does not answer). When the alias moves, the new version is loaded and warmed up off the
request path, then swapped in with one reference assignment.

Requests are micro-batched. The event loop parses each body; one predict thread takes the
requests waiting when it becomes free, runs one ``model.predict`` over all their rows and hands
each request its slice. A predict costs milliseconds whatever the number of rows (the model's
pandas encoding, MLflow's schema checks, the DMatrix), so under load that cost is paid once per
batch instead of once per request. An idle server answers a lone request at once; under load, a
batch much smaller than the last one waits at most one predict's time for the others to come
back. A batch takes the current model once, so every request in it is answered by exactly one
version (the ``X-Model-Version`` header); batches run one after another, so the version a client
sees never goes back unless the alias itself is moved back (a rollback).

Every answered batch is handed to the prediction log (``predlog.py``): a queue append on the
predict thread; a writer thread converts and writes. Requests may carry the spec's row identity
columns next to the features (logged for the label join, not given to the model).

Bodies of the usual shapes (``dataframe_split``, ``dataframe_records`` or ``inputs`` holding
exactly the signature's columns, numbers in double columns, text in string ones) become columns
directly; anything else goes through MLflow's own parser, one request at a time, so errors and
odd inputs behave exactly as they did before.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import eq, itemgetter
from typing import Any

import numpy as np
import pandas as pd
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from daybreak import registry
from daybreak.context import RunContext
from daybreak.predlog import PredictionLog
from daybreak.spec import Spec

log = logging.getLogger(__name__)

# A bigger request runs alone; smaller ones are grouped up to this many rows per predict call.
MAX_BATCH_ROWS = 2000
# Backpressure: past this many rows waiting, new requests get 503 with Retry-After rather than
# a queue (and latency, and memory) that only grows; bodies over MAX_BODY_BYTES get 413.
MAX_PENDING_ROWS = 50 * MAX_BATCH_ROWS
MAX_BODY_BYTES = 64 * 2**20
# Input column types the fast path builds itself, and the JSON values it accepts for them.
FAST_TYPES: dict[str, tuple[type, ...]] = {"double": (float, int), "string": (str,)}
FORMATS = ("dataframe_split", "dataframe_records", "inputs")

Fields = tuple[tuple[str, str, bool], ...]  # (name, type, optional) of each input column


@dataclass(frozen=True)
class Loaded:
    version: str
    model: Any
    loaded_at: float
    fields: Fields | None  # the input columns when the fast path can build the model's frames


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


def fast_columns(body: dict, fields: Fields, ids: frozenset[str] = frozenset()) -> dict[str, Sequence] | None:
    """The body's rows as one sequence per column, or None to leave the body to MLflow's parser.

    Only bodies whose frame MLflow would build to the same values are taken: one format key and
    nothing else, exactly the signature's columns (any order) plus any of the identity columns
    `ids`, at least one row, and values of the column's JSON type (None only in optional columns).
    The checks run as C loops (``map``, ``set``): a 100-row body is about 2,000 values.
    """
    if len(body) != 1:
        return None
    ((fmt, data),) = body.items()
    names = [f[0] for f in fields]
    wanted = set(names)
    try:
        if fmt == "dataframe_split":
            if type(data) is not dict or data.keys() != {"columns", "data"}:
                return None
            columns, rows = data["columns"], data["data"]
            if (type(columns) is not list or len(set(columns)) != len(columns)
                    or not _columns_ok(set(columns), wanted, ids)
                    or type(rows) is not list or not rows
                    or set(map(type, rows)) != {list} or set(map(len, rows)) != {len(columns)}):
                return None
            cols = dict(zip(columns, zip(*rows)))
        elif fmt == "dataframe_records" or (fmt == "inputs" and type(data) is list):
            if type(data) is not list or not data or set(map(type, data)) != {dict}:
                return None
            given = data[0].keys()
            if not _columns_ok(set(given), wanted, ids) or not all(map(eq, map(dict.keys, data), repeat(given))):
                return None
            keys = list(given)
            cols = dict(zip(keys, zip(*map(itemgetter(*keys), data)))) if len(keys) > 1 else \
                {keys[0]: [r[keys[0]] for r in data]}
        elif fmt == "inputs" and type(data) is dict:
            if (not _columns_ok(set(data.keys()), wanted, ids) or set(map(type, data.values())) != {list}
                    or len(set(map(len, data.values()))) != 1 or not data[names[0]]):
                return None
            cols = data
        else:
            return None
    except TypeError:  # unhashable column names and the like: MLflow's parser says what is wrong
        return None
    for name, kind, optional in fields:
        allowed = FAST_TYPES[kind] + ((type(None),) if optional else ())
        if not set(map(type, cols[name])).issubset(allowed):
            return None
    return cols


def batch_columns(parts: list[dict[str, Sequence]], fields: Fields) -> dict[str, np.ndarray]:
    """Every part's rows as numpy columns, with the dtypes MLflow's parser gives the signature's types."""
    data = {}
    for name, kind, _ in fields:
        values = list(chain.from_iterable(p[name] for p in parts))
        data[name] = np.array(values, dtype=np.float64 if kind == "double" else object)  # None -> NaN
    return data


class ModelHolder:
    def __init__(self, spec: Spec, ctx: RunContext, freeze_gc: bool = False):
        self.spec, self.ctx, self.freeze_gc = spec, ctx, freeze_gc
        self.current: Loaded | None = None
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._client: Any = None

    def champion_version(self) -> str | None:
        self._client = self._client or registry.client(self.ctx)  # one client (and HTTP session) for every poll
        mv = registry.alias_version(self._client, self.spec.model.name, self.spec.promotion.alias)
        return None if mv is None else str(mv.version)

    def refresh(self) -> bool:
        """Load the champion if it changed. Returns True when a new version went live."""
        with self._lock:
            version = self.champion_version()
            if version is None or (self.current and self.current.version == version):
                return False
            model = registry.load_model(self.ctx, self.spec.model.name, version)
            self._warm_up(model)
            self.current = Loaded(version, model, time.time(), fast_fields(model))
            if self.freeze_gc:
                # The model is long-lived: keep it out of the collector's full passes. Unfreeze
                # first, so the cycles of the model it replaced can be collected once.
                gc.unfreeze()
                gc.collect()
                gc.freeze()
            log.info("serving %s v%s", self.spec.model.name, version)
            return True

    def _warm_up(self, model: Any) -> None:
        """One prediction on the logged input example before the model takes traffic."""
        example = getattr(model, "input_example", None)
        if example is not None:
            model.predict(example)

    def watch(self) -> None:
        while not self._stop.wait(self.spec.serving.poll_seconds):
            try:
                self.refresh()
                self.last_error = None
            except Exception as e:  # keep serving the current model whatever the registry does
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("champion refresh failed, still serving %s: %s",
                            self.current.version if self.current else None, self.last_error)

    def stop(self) -> None:
        self._stop.set()


@dataclass(eq=False)
class Job:
    """One request waiting for the predict thread."""

    body: dict
    fields: Fields | None  # what `columns` was checked against (a new version may differ)
    columns: dict[str, Sequence] | None  # None: MLflow's parser
    rows: int
    future: asyncio.Future = field(repr=False)
    request_id: str = ""
    logged: bool = False  # sampled for the prediction log


Answer = tuple[int, bytes]  # HTTP status and JSON body


def _json(obj: Any) -> bytes:
    import orjson

    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def _predictions(preds: Any) -> Answer:
    return 200, _json({"predictions": preds.tolist() if hasattr(preds, "tolist") else list(preds)})


def _one_thread() -> None:
    """xgboost predicts on the predict thread alone: the event loop keeps the other core busy, and
    OpenMP threads waiting on a descheduled sibling turn into latency spikes."""
    try:
        import xgboost

        xgboost.set_config(nthread=1)  # thread-local: only this thread
    except ImportError:
        pass


class Batcher:
    """Feeds the predict thread: each free moment it takes the waiting jobs (up to
    MAX_BATCH_ROWS rows) and the current model, and answers them all from one predict call."""

    def __init__(self, holder: ModelHolder, plog: PredictionLog | None = None):
        self.holder, self.plog = holder, plog
        self.ids = frozenset(holder.spec.id_columns()) if plog is not None else frozenset()
        self.pending: deque[Job] = deque()
        self.pending_rows = 0
        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict", initializer=_one_thread)

    async def submit(self, body: dict, request_id: str = "") -> tuple[Answer, str]:
        """Queue a request; returns its answer and the version that answered it."""
        cur = self.holder.current
        cols = fast_columns(body, cur.fields, self.ids) if cur is not None and cur.fields else None
        rows = len(next(iter(cols.values()))) if cols else 1
        job = Job(body, cur.fields if cur else None, cols, rows, asyncio.get_running_loop().create_future(),
                  request_id, self.plog is not None and self.plog.sampled())
        self.pending.append(job)
        self.pending_rows += rows
        self._wake.set()
        return await job.future

    async def _until_rows(self, rows: int, timeout: float | None = None) -> None:
        """Return once `rows` rows wait, or after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self.pending_rows < rows:
            self._wake.clear()
            if deadline is None:
                await self._wake.wait()
            elif deadline <= loop.time():
                return
            else:
                try:
                    await asyncio.wait_for(self._wake.wait(), deadline - loop.time())
                except TimeoutError:
                    return

    def _take(self) -> list[Job]:
        jobs = [self.pending.popleft()]
        rows = jobs[0].rows
        while self.pending and rows + self.pending[0].rows <= MAX_BATCH_ROWS:
            jobs.append(self.pending.popleft())
            rows += jobs[-1].rows
        self.pending_rows -= rows
        return jobs

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last_rows, last_seconds = 0, 0.0
        while True:
            await self._until_rows(1)
            # Under load the clients of the last batch are sending their next requests: give them
            # up to one predict's time to come back (while the loop writes the answers and reads
            # them), rather than paying a whole predict for the one or two that came first.
            await self._until_rows(min(last_rows // 2, MAX_BATCH_ROWS), last_seconds)
            jobs = self._take()
            cur = self.holder.current  # taken once: the whole batch is answered by this version
            started = loop.time()
            try:
                answers = await loop.run_in_executor(self._pool, self._predict, cur, jobs)
            except Exception as e:  # a bug here must not stop the loop that serves everyone
                log.exception("prediction batch failed")
                answers = [(500, _json({"detail": f"prediction failed: {type(e).__name__}: {e}"}))] * len(jobs)
            last_rows, last_seconds = sum(j.rows for j in jobs), loop.time() - started
            for job, answer in zip(jobs, answers):
                if not job.future.done():  # the client may have gone
                    job.future.set_result((answer, cur.version))

    def _predict(self, cur: Loaded, jobs: list[Job]) -> list[Answer]:
        """In the predict thread: one predict over the fast-path jobs, the others one by one."""
        answers: dict[int, Answer] = {}
        fast = [i for i, j in enumerate(jobs) if j.columns is not None and j.fields == cur.fields]
        if fast:
            try:
                data = batch_columns([jobs[i].columns for i in fast], cur.fields)
                preds = np.asarray(cur.model.predict(pd.DataFrame(data)))
                start = 0
                for i in fast:
                    answers[i] = _predictions(preds[start:start + jobs[i].rows])
                    start += jobs[i].rows
                try:
                    self._log(cur, data, preds, [jobs[i] for i in fast])
                except Exception:  # the log never fails a request
                    log.warning("prediction log: a batch was not logged", exc_info=True)
            except Exception:  # one request at a time, so a failure is only that request's
                log.warning("batched predict failed; answering its %d requests one by one", len(fast), exc_info=True)
                answers.clear()
        return [answers[i] if i in answers else self._one(cur, job) for i, job in enumerate(jobs)]

    def _log(self, cur: Loaded, data: dict[str, np.ndarray], preds: np.ndarray, jobs: list[Job]) -> None:
        """Hand the sampled requests of a batch to the prediction log (a queue append)."""
        if self.plog is None or not any(j.logged for j in jobs):
            return
        if not all(j.logged for j in jobs):
            keep = np.concatenate([np.full(j.rows, j.logged) for j in jobs])
            data, preds, jobs = {k: v[keep] for k, v in data.items()}, preds[keep], [j for j in jobs if j.logged]
        ids = [{k: j.columns[k] for k in self.ids if k in j.columns} or None if j.columns else None for j in jobs]
        self.plog.record(cur.version, data, preds, [(j.request_id, j.rows, c) for j, c in zip(jobs, ids)])

    def _one(self, cur: Loaded, job: Job) -> Answer:
        """A request through MLflow's parser, with its errors as 400s."""
        from mlflow.exceptions import MlflowException
        from mlflow.pyfunc.scoring_server import infer_and_parse_data

        try:
            frame = infer_and_parse_data(job.body, cur.model.metadata.get_input_schema())
            preds = np.asarray(cur.model.predict(frame))
            if self.plog is not None and job.logged and len(frame):
                try:
                    self._log_parsed(cur, frame, preds, job)
                except Exception:  # the log never fails a request
                    log.warning("prediction log: a parsed request was not logged", exc_info=True)
            return _predictions(preds)
        except MlflowException as e:
            return 400, _json({"detail": e.message})
        except (ValueError, KeyError, TypeError) as e:
            return 400, _json({"detail": str(e)})
        except Exception as e:  # only this request fails, never the others of its batch
            log.exception("prediction failed")
            return 500, _json({"detail": f"prediction failed: {type(e).__name__}: {e}"})

    def _log_parsed(self, cur: Loaded, frame: Any, preds: np.ndarray, job: Job) -> None:
        """Log a request MLflow's parser read (its frame may carry the identity columns)."""
        names = [n for n in cur.model.metadata.get_input_schema().input_names() if n in frame.columns]
        if len(preds) != len(frame) or not names:
            return
        ids = {k: frame[k].tolist() for k in self.ids if k in frame.columns} or None
        self.plog.record(cur.version, frame[names].reset_index(drop=True), preds.reshape(len(frame), -1)[:, 0],
                         [(job.request_id, len(frame), ids)])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _request_id(scope: dict) -> str:
    """The client's X-Request-Id (printable, at most 128 characters), else a new one."""
    for k, v in scope["headers"]:
        if k == b"x-request-id":
            rid = v.decode("latin-1")
            if 0 < len(rid) <= 128 and rid.isprintable():
                return rid
            break
    return uuid.uuid4().hex


def _parse_body(raw: bytes) -> Any:
    """orjson, or the standard parser for what only it accepts (NaN, Infinity, huge numbers)."""
    import orjson

    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            return json.loads(raw)
        except RecursionError:
            raise ValueError("body is nested too deeply") from None


def create_app(spec: Spec, ctx: RunContext, token: str | None = None, freeze_gc: bool = False) -> Any:
    """The app. `freeze_gc` is for a process that only serves (``serve``): a full collection
    walks every object of mlflow, pandas and the model (about 0.5 s with every thread stopped);
    frozen after start-up and after each load, they are never walked again."""
    holder = ModelHolder(spec, ctx, freeze_gc)
    plog = PredictionLog(spec, ctx.store) if spec.monitoring.log.sample_rate > 0 else None
    registry.setup_tracking(ctx, spec.name)
    try:
        holder.refresh()
    except Exception as e:
        holder.last_error = f"{type(e).__name__}: {e}"
        log.warning("no champion loaded yet: %s", holder.last_error)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if freeze_gc:
            gc.collect()
            gc.freeze()
        batcher = Batcher(holder, plog)
        app.state.batcher = batcher
        task = asyncio.create_task(batcher.run(), name="predict-batches")
        # The poll runs on its own thread, never the predict thread: a registry that hangs (MLflow
        # retries for minutes by default; ``serve`` shortens that) must not stop predictions.
        thread = threading.Thread(target=holder.watch, name="champion-watch", daemon=True)
        thread.start()
        yield
        holder.stop()
        task.cancel()
        batcher.close()
        if plog is not None:
            plog.close()  # what waits for the writer is written before the process ends

    api = FastAPI(title="daybreak", version="1", lifespan=lifespan)
    api.state.holder = holder
    api.state.plog = plog
    expected = f"Bearer {token}".encode() if token else None

    @api.get("/ping")
    def ping() -> Any:
        if holder.current is None:
            return JSONResponse({"status": "no model"}, status_code=503)
        return {"status": "ok"}

    @api.get("/health")
    def health() -> Any:
        cur = holder.current
        return JSONResponse({
            "status": "ok" if cur else "no model",
            "model": spec.model.name,
            "alias": spec.promotion.alias,
            "version": cur.version if cur else None,
            "loaded_at": cur.loaded_at if cur else None,
            "last_error": holder.last_error,
            "prediction_log": plog.stats() if plog is not None else None,
        }, status_code=200 if cur else 503)

    @api.get("/version")
    def version() -> Any:
        cur = holder.current
        return {"model": spec.model.name, "alias": spec.promotion.alias, "version": cur.version if cur else None}

    async def answer(scope: dict, receive: Callable, request_id: str) -> tuple[int, bytes, str | None]:
        """Status, JSON body and serving version of one POST /invocations."""
        if expected and not hmac.compare_digest(dict(scope["headers"]).get(b"authorization", b""), expected):
            return 401, _json({"detail": "missing or wrong bearer token"}), None
        if holder.current is None:
            return 503, _json({"detail": "no champion model loaded yet"}), None
        if api.state.batcher.pending_rows > MAX_PENDING_ROWS:
            return 503, _json({"detail": "overloaded: too many rows waiting; retry shortly"}), None
        chunks, more, size = [], True, 0
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_BODY_BYTES:
                return 413, _json({"detail": f"body over {MAX_BODY_BYTES // 2**20} MiB; send fewer rows per request"}), None
            more = message.get("more_body", False)
        try:
            body = _parse_body(b"".join(chunks))
        except ValueError:
            return 400, _json({"detail": "body is not valid JSON"}), None
        if not isinstance(body, dict):
            return 400, _json({"detail": f"body must be an object with one of {', '.join(FORMATS)}"}), None
        (status, payload), served = await api.state.batcher.submit(body, request_id)
        return status, payload, served if status == 200 else None

    async def app(scope: dict, receive: Callable, send: Callable) -> None:
        """POST /invocations in plain ASGI, everything else through FastAPI: FastAPI's routing and
        request machinery costs about as much per request as a one-row body's share of a batch."""
        if scope["type"] != "http" or scope["path"] != "/invocations" or scope["method"] != "POST":
            return await api(scope, receive, send)
        request_id = _request_id(scope)
        status, payload, served = await answer(scope, receive, request_id)
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload)),
                   (b"x-request-id", request_id.encode())]
        if status == 503:
            headers.append((b"retry-after", b"1"))
        if served is not None:
            headers.append((b"x-model-version", served.encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    return app


def serve(spec: Spec, ctx: RunContext, host: str | None = None, port: int | None = None,
          token: str | None = None) -> None:
    """One process: an event loop for HTTP and JSON, one predict thread (see the module docstring).
    The access log is off: at thousands of requests a second it would cost more than serving."""
    import os

    import uvicorn

    # The champion poll must fail fast when the registry is down or hangs (MLflow's defaults
    # retry for minutes); the next poll tries again, and the current model keeps serving.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    app = create_app(spec, ctx, token=token, freeze_gc=True)
    uvicorn.run(app, host=host or spec.serving.host, port=port or spec.serving.port, log_level="info",
                access_log=False)
