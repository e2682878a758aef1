"""The prediction log: what the server answered, as date-partitioned Parquet in the store.

``daybreak serve`` hands every answered batch to a ``PredictionLog`` (an append to a queue on the
predict thread: nothing is converted or written on the request path). Every
``monitoring.log.flush_seconds`` (or once ``flush_rows`` rows wait) a writer thread turns what
waits into one Arrow table and writes one Parquet file per date it holds. In ``daybreak serve``
the table is built and written by a child process the writer thread sends the batches to
(``_Child``), and a batch of requests the event loop parsed is sent as their bodies, which the
child parses again with the same code: the server's interpreter lock is not held for the log.
Replicas (``--replicas``) and apps made in process keep the thread doing it all:

    predlog/<model>/date=D/<time>-<host>-<pid>-<n>.parquet

Each row: ``request_id``, ``served_at`` (UTC), ``model_version``, ``source`` (``online``),
``prediction`` (with ``prediction_scores`` for a model answering several scores a row, see
``_prediction_columns``), the row identity the request carried next to the features (``monitoring.log.
id_columns``, default the feature keys and ``event_time``; kept as the text the client sent), and
the features as the model saw them. D is the date of the row's ``event_time`` when the request
sent one, else of when it was served, in the base source's ``date_timezone`` (as staging counts
days; UTC if none): the monitor for a date reads the partitions around it and joins the labels
on the row identity.

Files appear whole (written under a ``_`` name, then renamed; on S3 one PUT). A crash loses at
most what waited for the writer (``flush_seconds``). When the writer cannot keep up (or the store
is down) the queue is bounded by ``max_pending_rows``: past it predictions are dropped from the
log and counted, and requests are never slowed. Logging whole requests at ``sample_rate`` keeps
the log small on busy servers. Retention is the monitor's job (``prune``): it runs daily.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import posixpath
import random
import signal
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from daybreak.infra.errors import redact
from daybreak.infra.store import Store
from daybreak.spec import Spec

log = logging.getLogger(__name__)

ONLINE = "online"


def log_zone(spec: Spec) -> str:
    return f"predlog/{spec.model.name}"


Requests = Sequence[tuple[str, int, Mapping[str, Sequence[Any]] | None]]
"""Per request of a batch, in row order: its id, row count and the identity columns it carried."""


class Entry:
    """One answered batch, as the predict thread handed it over (converted later, by the writer)."""

    __slots__ = ("features", "predictions", "requests", "served_at", "version")

    def __init__(self, version: str, features: Any, predictions: np.ndarray,
                 requests: Requests) -> None:
        self.served_at = time.time()
        self.version, self.features, self.predictions, self.requests = version, features, predictions, requests


def _text(values: Sequence) -> pa.Array:
    """Identity values as text, whatever JSON type the client used (1545 and "1545" agree)."""
    try:
        return pa.array(values).cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError):
        return pa.array([None if v is None else str(v) for v in values], pa.string())


def _feature(values: np.ndarray) -> pa.Array:
    """A feature column as Arrow. Text columns (object arrays of str and None, what the fast path
    builds) are converted as strings: Arrow's type inference costs 15x the conversion itself."""
    if values.dtype == object:
        try:
            return pa.array(values, pa.string(), from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            pass  # not all text (a body MLflow's parser read): inferred
    return pa.array(values, from_pandas=True)


def _prediction_columns(predictions: list[np.ndarray]) -> tuple[pa.Array, pa.Array | None]:
    """One row per request row. A single output a row (1-D, or an (n, 1) matrix) is ``prediction``,
    a number, as the monitor reads it; several a row (class scores) are kept whole in
    ``prediction_scores`` (a list a row, null for the other rows), with ``prediction`` null."""
    if all(p.ndim == 1 for p in predictions):
        return pa.array(np.concatenate(predictions)), None
    rows = [p.reshape(len(p), -1) for p in predictions]
    single = np.concatenate([r[:, 0] if r.shape[1] == 1 else np.full(len(r), np.nan) for r in rows])
    several = np.concatenate([np.full(len(r), r.shape[1] != 1) for r in rows])
    scores: list[Any] = []
    for r in rows:
        scores.extend(r.tolist() if r.shape[1] != 1 else [None] * len(r))
    return pa.array(single, mask=several), pa.array(scores, pa.list_(pa.float64()))


def _parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """How the log's files are written: zstd; dictionaries for the text columns only (a float
    column's dictionary is built and thrown away: most of a write's time), and the float columns
    byte-stream-split, which zstd compresses better. Measured on 100,000 rows of the flights log
    (``benchmarks/serving.py``'s rows): 29 ms instead of 42 ms a write, files 29% smaller."""
    floats = [f.name for f in schema if pa.types.is_floating(f.type)]
    return {"compression": "zstd", "use_dictionary": [f.name for f in schema if f.name not in floats],
            "column_encoding": dict.fromkeys(floats, "BYTE_STREAM_SPLIT")}


class PredictionLog:
    def __init__(self, spec: Spec, store: Store, source: str = ONLINE, process: bool = False,
                 thread: bool = True) -> None:
        """`process`: tables are built and written by a child process (``_Child``), not by the
        writer thread itself, so the server's interpreter lock is not held for them. `thread`:
        False for that child's own writer (no thread: it writes when told)."""
        self.spec = spec
        self.cfg = spec.monitoring.log
        self.store, self.zone, self.source = store, log_zone(spec), source
        self.ids = spec.id_columns()
        et = spec.sources[spec.features.base].event_time
        self.tz = (et.date_timezone or et.timezone if et is not None else None) or "UTC"  # as staging counts days
        self.pending: deque[Entry] = deque()
        self.pending_rows = self.written_rows = self.dropped_rows = self.files = 0
        # For /metrics (_metrics.py): dropped_rows split by why, rows queued, failed flushes
        self.recorded_rows = self.queue_full_rows = self.write_failed_rows = self.write_errors = 0
        self.last_error: str | None = None
        self._count = threading.Lock()
        self._flushing = threading.Lock()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._stem = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._seq = 0
        self._child = _Child(self) if process else None
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        if thread:
            self._thread.start()

    # --- the predict thread's side: cheap --------------------------------------------------
    def sampled(self) -> bool:
        """Whether to log the next request (whole requests are sampled)."""
        rate = self.cfg.sample_rate
        return rate >= 1.0 or (rate > 0.0 and random.random() < rate)

    def record(self, version: str, features: Any, predictions: np.ndarray,
               requests: Requests) -> None:
        """Queue one batch: its features (the model's input: a dict of numpy columns, or a pandas
        frame), predictions, and per request (in row order) its id, row count and the identity
        columns it carried."""
        if hasattr(features, "columns"):  # pandas: columns now, so the writer never touches pandas
            features = {str(c): features[c].to_numpy() for c in features.columns}
        self._queue(Entry(version, features, predictions, requests))

    def _queue(self, entry: Entry) -> None:
        n = len(entry.predictions)
        with self._count:
            if self.pending_rows + n > self.cfg.max_pending_rows:
                self.dropped_rows += n
                self.queue_full_rows += n
                return
            self.pending_rows += n
            self.recorded_rows += n
        self.pending.append(entry)
        if self.pending_rows >= self.cfg.flush_rows:
            self._wake.set()

    @property
    def remote(self) -> bool:
        """Tables are built in a child process: ``record_raw`` may be used."""
        return self._child is not None

    def record_raw(self, version: str, batch: Any, predictions: np.ndarray) -> None:
        """Queue one batch as its requests' bodies (``_serve.RawBatch``): the child process reads
        them again into the features and requests ``record`` takes (only when ``remote``)."""
        self._queue(Entry(version, batch, predictions, ()))

    def stats(self) -> dict[str, Any]:
        out = {"sample_rate": self.cfg.sample_rate, "written_rows": self.written_rows, "files": self.files,
               "pending_rows": self.pending_rows, "dropped_rows": self.dropped_rows, "last_error": self.last_error}
        if self._child is not None:
            out["writer"] = "process" if self._child.failed_starts == 0 else "thread (the writer process failed)"
        return out

    # --- the writer thread --------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.cfg.flush_seconds)
            self._wake.clear()
            self.flush()

    def flush(self) -> int:
        """Write what waits; returns the rows written. Safe from any thread."""
        with self._flushing:
            entries = []
            while self.pending:
                entries.append(self.pending.popleft())
            if not entries:
                return 0
            rows = sum(len(e.predictions) for e in entries)
            with self._count:
                self.pending_rows -= rows
            try:
                if self._child is not None and self._child.available():  # (it may write some and say why not the rest)
                    try:
                        written, error = self._child.write(entries)
                    except NotStarted as e:  # the rows are not lost for it
                        log.warning("prediction log: %s; this server's writer thread writes the log until it "
                                    "starts (tried again in %.0f s)", e, self._child.retry_at - time.monotonic())
                        written, error = self._write_here(entries)
                else:
                    written, error = self._write_here(entries)
            except Exception as e:  # the store is down, say: the server goes on, the rows are counted
                written, error = 0, f"{type(e).__name__}: {e}"
            self.written_rows += written
            if error is None:
                self.last_error = None
                return written
            self.last_error = redact(error)
            with self._count:  # the predict thread adds to dropped_rows too
                self.dropped_rows += rows - written
                self.write_failed_rows += rows - written
                self.write_errors += 1
            log.warning("prediction log: %d rows not written: %s", rows - written, self.last_error)
            return written

    def _write_here(self, entries: list[Entry]) -> tuple[int, str | None]:
        """Write the entries in this process (the child's work, or the writer thread's): the rows
        written, and why not the others. A batch of bodies that does not read again costs its
        rows, not the write's."""
        ready, error = [], None
        for e in entries:
            if not isinstance(e.features, dict):  # a RawBatch: the bodies read again
                try:
                    e.features, e.requests = e.features.columns()
                except Exception as x:
                    error = error or f"{type(x).__name__}: {x}"
                    continue
            ready.append(e)
        if not ready:
            return 0, error
        written, failed = self._write(self.table(ready))
        return written, failed or error

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self.flush()
        if self._child is not None:
            self._child.stop()

    def table(self, entries: list[Entry]) -> pa.Table:
        """All entries as one table, built column by column (one Arrow conversion per column, not
        per batch: at a few thousand batches a flush, per-batch conversions cost more than serving)."""
        groups: dict[tuple[str, ...], list[Entry]] = {}
        for e in entries:  # a new version may take other features: one table per set of columns
            groups.setdefault(tuple(e.features), []).append(e)
        return pa.concat_tables([self._columns(g) for g in groups.values()], promote_options="permissive")

    def _columns(self, entries: list[Entry]) -> pa.Table:
        counts = np.array([len(e.predictions) for e in entries])
        n = int(counts.sum())
        requests = [r for e in entries for r in e.requests]

        def repeated(values: list[Any], times: Any) -> pa.Array:
            """values[i] `times[i]` times: one Arrow take, no Python object per row."""
            return pa.array(values, pa.string()).take(pa.array(np.repeat(np.arange(len(values)), times)))

        def per_entry(values: list[Any], kind: pa.DataType) -> pa.Array:
            return repeated(values, counts)

        served = np.repeat(np.array([int(e.served_at * 1000) for e in entries], np.int64), counts)
        cols: dict[str, Any] = {
            "request_id": repeated([r[0] for r in requests], [r[1] for r in requests]),
            "served_at": pa.array(served).cast(pa.timestamp("ms", tz="UTC")),
            "model_version": per_entry([e.version for e in entries], pa.string()),
            "source": per_entry([self.source] * len(entries), pa.string()),
        }
        cols["prediction"], scores = _prediction_columns([np.asarray(e.predictions, np.float64) for e in entries])
        if scores is not None:
            cols["prediction_scores"] = scores
        for name in self.ids:
            if not any(c is not None and name in c for _, _, c in requests):
                cols[name] = pa.nulls(n, pa.string())
                continue
            values: list[Any] = []
            for _, k, carried in requests:
                col = None if carried is None else carried.get(name)
                values.extend(col if col is not None else [None] * k)
            cols[name] = _text(values)
        for name in entries[0].features:
            if name not in cols:
                cols[name] = _feature(np.concatenate([e.features[name] for e in entries]))
        return pa.table(cols)

    def _days(self, t: pa.Table) -> np.ndarray:
        """Each row's partition date (datetime64[D]): its event time's date when sent, else the
        date it was served, both in the base source's zone."""
        import pandas as pd

        served = pd.DatetimeIndex(pd.to_datetime(t.column("served_at").to_numpy(), utc=True))
        days = served.tz_convert(self.tz).tz_localize(None).to_numpy().astype("datetime64[D]")
        if "event_time" in t.column_names and t.column("event_time").null_count < t.num_rows:
            sent = pd.to_datetime(t.column("event_time").to_pandas(), utc=True, errors="coerce", format="ISO8601")
            local = pd.DatetimeIndex(sent).tz_convert(self.tz).tz_localize(None).to_numpy().astype("datetime64[D]")
            days = np.where(np.isnat(local), days, local)
        return days

    def _write(self, t: pa.Table) -> tuple[int, str | None]:
        """Write a file a day; returns the rows written and why not the others (None: all
        written). A day that fails after others were written stops the write: the days before are
        on disk, counted written. Raises when nothing was written."""
        days = self._days(t)
        written = 0
        for day in np.unique(days):
            part = t if len(days) and (days == day).all() else t.filter(pa.array(days == day))
            try:
                self._write_day(part, day)
            except Exception as e:
                if not written:
                    raise
                return written, f"{type(e).__name__}: {e}"
            written += part.num_rows
        return written, None

    def _write_day(self, part: pa.Table, day: Any) -> None:
        folder = self.store.path(self.zone, f"date={day}")
        self._seq += 1
        name = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{self._stem}-{self._seq:06d}.parquet"
        if self.store.kind == "local":
            self.store.fs.create_dir(folder, recursive=True)  # (on S3 it would PUT a marker per level)
            tmp = posixpath.join(folder, f"_{name}")
            pq.write_table(part, tmp, **_parquet_options(part.schema))
            os.replace(tmp, posixpath.join(folder, name))
        else:  # one PUT: the object appears whole
            pq.write_table(part, posixpath.join(folder, name), filesystem=self.store.fs,
                           **_parquet_options(part.schema))
        self.files += 1


START_TIMEOUT = 120.0
"""The log's child process has this long to start (import pyarrow and daybreak)."""

WRITE_TIMEOUT = 120.0
"""A write the log's child has not answered in this many seconds (or ten ``flush_seconds``, if
more) ends it: its rows are counted as not written, and the next write starts another."""

START_RETRY_SECONDS = 30.0
"""After a failed start of the log's child, the server's writer thread writes the log itself (as
in replicas) and the child is started again this long after, doubling with each failed start up
to ``START_RETRY_MAX`` (a start costs seconds of CPU: imports)."""

START_RETRY_MAX = 3600.0


class NotStarted(RuntimeError):
    """The log's child process could not be started (now, or in its back-off after a failed start)."""


SEND_ROWS = 1000
"""The log's writer thread sends entries to its child process in messages of about this many rows
(one entry when bigger): at 1 row a request an entry a message made a flush thousands of sends,
each taking the interpreter lock back from the event loop."""


class _Child:
    """The log's tables built and written in a child process. The writer thread sends the entries
    pickled, about ``SEND_ROWS`` rows a message, then asks for the write and waits for the rows
    written. An entry of the fast path is its requests' bodies (``_serve.RawBatch``: a reference
    each on the server's side); others are their columns (pickling a text value costs about 40 ns
    under the lock, about what the table build costs: shipping columns alone gained nothing).
    Measured on the flights model at 100 rows a request with the table built in the writer
    thread: the build held the lock about 20 us a request, in long C calls the event loop waited
    behind, and the Parquet write took about 35 us of a core; the server answered 17% fewer
    requests with the log on, and its p99 was 2.4x. The child is started on the first write (a
    server that logs nothing starts none) and again after it died; what it had not written is
    counted as failed, like a store that is down."""

    def __init__(self, plog: PredictionLog) -> None:
        self.plog = plog
        self.proc: Any = None
        self.conn: Any = None
        self.failed_starts = 0
        self.retry_at = 0.0  # time.monotonic() from when a start may be tried again

    def available(self) -> bool:
        """Running, or it may be started now (not in the back-off after a failed start)."""
        return (self.proc is not None and self.proc.is_alive()) or time.monotonic() >= self.retry_at

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # threads run here: no fork
        ours, theirs = ctx.Pipe()
        p = self.plog
        proc = ctx.Process(target=_child_main, name="prediction-log-writer", daemon=True,
                           args=(theirs, p.spec, p.store.uri(p.store.base), p.store.options, p.source, p._stem))
        try:
            proc.start()  # (no processes or files left, say: the next write tries again)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.proc, self.conn = proc, ours
        # started (imports done) before any write's clock runs
        if not ours.poll(START_TIMEOUT) or ours.recv() != "ready":
            self.stop()
            raise NotStarted(f"no answer within {START_TIMEOUT:g} s")

    def write(self, entries: list[Entry]) -> tuple[int, str | None]:
        """The rows the child wrote, and why not the others (None: all written). Each write is
        whole or not at all on this side: whatever goes wrong midway (the child ends, a pickle
        fails, no answer within ``timeout``) ends the child, so it never writes those rows later."""
        fresh = self.proc is None or not self.proc.is_alive()
        if fresh:
            self.stop()
            try:
                self._start()
            except (OSError, EOFError, ValueError, NotStarted) as e:
                self.stop()
                self._back_off()
                why = str(e) if isinstance(e, NotStarted) else f"{type(e).__name__}: {e}"
                raise NotStarted(f"the log's writer process did not start ({why})") from None
        timeout = max(WRITE_TIMEOUT, 10 * self.plog.cfg.flush_seconds)
        proc, late = self.proc, threading.Event()

        def end() -> None:  # a hung child or store: the send or the wait fails
            late.set()
            proc.kill()

        watchdog = threading.Timer(timeout, end)
        watchdog.daemon = True
        watchdog.start()
        told = False  # the child was told to write (then it may have written some)
        try:
            chunk: list[Entry] = []
            rows = 0
            for entry in entries:
                chunk.append(entry)
                rows += len(entry.predictions)
                if rows >= SEND_ROWS:
                    self.conn.send_bytes(pickle.dumps(chunk, pickle.HIGHEST_PROTOCOL))
                    chunk, rows = [], 0
            if chunk:
                self.conn.send_bytes(pickle.dumps(chunk, pickle.HIGHEST_PROTOCOL))
            self.conn.send_bytes(b"")  # write what you hold
            told = True
            written, files, error = self.conn.recv()
        except BaseException as e:
            self.stop()
            if fresh and isinstance(e, OSError | EOFError) and not late.is_set():
                # started, and died before its first answer (an import, memory): as a failed start
                self._back_off()
                if not told:  # it wrote nothing: the writer thread writes them
                    raise NotStarted(f"it ended before its first write ({type(e).__name__})") from None
            if not isinstance(e, OSError | EOFError):
                raise
            if late.is_set():
                raise RuntimeError(f"the log's writer process did not answer within {timeout:g} s") from None
            raise RuntimeError(f"the log's writer process ended ({type(e).__name__})") from None
        finally:
            watchdog.cancel()
        self.failed_starts = 0
        self.plog.files += files
        return written, error

    def _back_off(self) -> None:
        """Not started again before START_RETRY_SECONDS, doubling with each failed start."""
        self.failed_starts += 1
        wait = min(START_RETRY_MAX, START_RETRY_SECONDS * 2 ** min(self.failed_starts - 1, 20))
        self.retry_at = time.monotonic() + wait

    def stop(self) -> None:
        if self.conn is not None:
            try:
                self.conn.send_bytes(b"stop")
            except OSError:
                pass
            self.conn.close()
            self.conn = None
        if self.proc is not None:
            self.proc.join(timeout=30)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(timeout=5)
            self.proc = None


def _child_main(conn: Any, spec: Spec, root: str, options: Any, source: str, stem: str) -> None:
    """The log's writer process: entries in, one write per request for it, (rows, files, error) out.
    It runs at nice 10: a busy server's event loop and its clients come first (at 100 rows a
    request, 4-5% more requests answered than at the same priority)."""
    # The server's stop (Ctrl-C, SIGTERM to the group) is for the server: it flushes, then says
    # "stop" (or dies, and the pipe ends). A signal here would lose what this holds.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    use_system_allocator()
    try:
        os.nice(10)
    except OSError:  # (a sandbox may refuse it: then at the server's priority)
        pass
    plog = PredictionLog(spec, Store(root, options), source, thread=False)
    plog._stem = f"{stem}-w{os.getpid()}"
    conn.send("ready")
    entries: list[Entry] = []
    while True:
        try:
            msg = conn.recv_bytes()
        except (EOFError, OSError):  # the server is gone
            return
        if msg == b"stop":
            return
        if msg:
            entries += pickle.loads(msg)
            continue
        files = plog.files
        try:
            written, error = plog._write_here(entries)
        except Exception as x:  # the parent counts them as not written
            written, error = 0, f"{type(x).__name__}: {x}"
        entries = []
        conn.send((written, plog.files - files, error))


def use_system_allocator() -> None:
    """pyarrow allocates with the C library's malloc in this process (a server's: ``serve`` and each
    replica). The buffers Arrow C++ takes from its own default pool (the Parquet writer's, say)
    follow ARROW_DEFAULT_MEMORY_POOL instead, read when pyarrow loads: ``daybreak serve`` sets it
    first (``cli._system_allocator``); a Ray Serve replica's worker has loaded pyarrow before it
    starts, so there those stay on mimalloc. pyarrow's default, mimalloc, gives freed memory back
    to the system soon after a flush and takes it again as fresh (transparent huge) pages, each
    zeroed by the kernel: on the flights model at 100 rows a request, the log's table build took
    55 us a request with malloc against 95 us with mimalloc, and the server answered about 7% more
    requests a second."""
    pa.set_memory_pool(pa.system_memory_pool())


def log_files(store: Store, zone: str, day: date) -> list[str]:
    folder = store.path(zone, f"date={day.isoformat()}")
    infos = store.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
                  and not i.base_name.startswith(("_", ".")))


def read_log(spec: Spec, store: Store, days: list[date], columns: list[str] | None = None) -> pa.Table | None:
    """The logged rows of these partition dates (None if there are none). A file that cannot be
    read is skipped with a warning: one bad file must not hide a day's log."""
    tables = []
    for day in days:
        for path in log_files(store, log_zone(spec), day):
            try:
                t = pq.read_table(path, filesystem=store.fs)
            except (OSError, pa.ArrowInvalid) as e:
                log.warning("prediction log: skipping unreadable %s: %s", path, e)
                continue
            if columns is not None:
                t = t.select([c for c in columns if c in t.column_names])
            tables.append(t)
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="permissive")


def prune(spec: Spec, store: Store, today: date) -> list[str]:
    """Delete log partitions older than ``monitoring.log.retention_days`` before `today`."""
    days = spec.monitoring.log.retention_days
    if days is None:
        return []
    cutoff = today - timedelta(days=days)
    root = store.path(log_zone(spec))
    gone = []
    for info in store.fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        name = info.base_name
        if info.type != pafs.FileType.Directory or not name.startswith("date="):
            continue
        try:
            d = date.fromisoformat(name[5:])
        except ValueError:
            continue
        if d < cutoff:
            store.fs.delete_dir(info.path)
            gone.append(d.isoformat())
    if gone:
        log.info("prediction log: deleted %d partitions older than %s (retention_days=%d)", len(gone), cutoff, days)
    return sorted(gone)
