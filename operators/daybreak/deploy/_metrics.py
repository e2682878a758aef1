"""Prometheus metrics of ``daybreak serve``: ``GET /metrics`` in Prometheus' text format.

The server answers thousands of requests a second on one event loop, so a request pays for its
metrics with a few plain integer and list updates (no locks, no label lookups, no metric objects
from ``prometheus_client``): ``begin``/``end`` around each ``POST /invocations`` (``unanswered``
instead of ``end`` when it is cancelled), ``rows`` for each answered one, ``batch`` for each
predicted batch, ``counting`` on the responses of the other paths. Everything that records runs
on the event loop, and so does the scrape (the endpoint is an ASGI app on the same loop), so
nothing is shared between threads but plain ints.
State that other objects keep already is read at scrape time, never copied on the request path:
the serving version (``ModelHolder.current``), the swap counters of the holder, the rows
waiting for the predict thread (``Batcher.pending_rows``) and the prediction log's counters.

A custom collector (``ServerCollector``) turns all of it into metric families at scrape time, in
a ``CollectorRegistry`` of the app's own (several apps may live in one process: the tests, Ray
Serve replicas), with the process, platform and garbage-collector collectors of
``prometheus_client`` beside it.

``/metrics`` takes the server's bearer token when one is configured (``DAYBREAK_SERVE_TOKEN``),
like ``/invocations``: Prometheus sends it with ``authorization: {credentials: ...}`` in the
scrape config. ``DAYBREAK_METRICS_PUBLIC=1`` serves it without (a scraper on a private network
that cannot hold the token). Label values are bounded and never come from a request: a fixed set
of paths (anything else is ``other``), the status codes the server answers, the model's name,
alias and version.

With the online store (``daybreak.online.OnlineServing``), the state's freshness is exported as
gauges: the date materialized, when, and the newest pushed event's time and age. Reading it
touches the store (SQLite or Redis): it is read off the loop by the endpoint's ``before`` hook
after the token check, once per scrape, and the collector only reads what that left
(``OnlineView.last``).
"""

from __future__ import annotations

import gzip
import os
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

PUBLIC_ENV = "DAYBREAK_METRICS_PUBLIC"

# Seconds: the fast path answers in about a millisecond, a big body or a cold model in seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.25,
                   0.5, 1.0, 2.5, 5.0)
# Rows, of a request (at most DAYBREAK_SERVE_MAX_ROWS, 100,000 by default) or of a predict batch
# (MAX_BATCH_ROWS, 2,000; a request MLflow's parser read is predicted whole).
ROW_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 20000.0,
               50000.0, 100000.0)
# The only values of the ``path`` label: every other path (404s, scanners) counts as ``other``.
PATHS = frozenset({"/invocations", "/ping", "/health", "/version", "/metrics", "/replicas/invocations", "/events"})
OTHER = "other"

_now = time.perf_counter


class HolderView(Protocol):
    """What the collector reads of the ``ModelHolder``."""

    current: Any  # Loaded | None: .version (str), .loaded_at (time.time())
    swaps: int  # times a version replaced another one
    swap_failures: int  # new champion versions that failed to load (the serving one kept serving)
    poll_errors: int  # champion look-ups that failed (registry down, say)


class LogView(Protocol):
    """What the collector reads of the ``PredictionLog`` (``_predlog.py``)."""

    cfg: Any  # .sample_rate
    pending_rows: int
    recorded_rows: int
    written_rows: int
    files: int
    queue_full_rows: int
    write_errors: int
    write_failed_rows: int


class OnlineView(Protocol):
    """What the collector reads of the online store's view (``daybreak.online.OnlineServing``)."""

    last: dict[str, Any]  # freshness() as last read, with newest_event_age_seconds, materialized_age_seconds


class QueueView(Protocol):
    """What the collector reads of the ``Batcher``."""

    pending_rows: int


def metrics_public(environ: dict[str, str] | None = None) -> bool:
    """Whether ``DAYBREAK_METRICS_PUBLIC`` serves /metrics without the token. Raises ValueError
    on a value that is neither yes nor no (a typo must not open or close it silently)."""
    raw = (os.environ if environ is None else environ).get(PUBLIC_ENV, "").strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("", "0", "false", "no", "off"):
        return False
    raise ValueError(f"{PUBLIC_ENV}={raw!r}: use 1 (no token for /metrics) or 0")


class Histogram:
    """Bucket counts (not cumulative: each observation adds one to one slot) and a sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last slot: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bound >= value: Prometheus' le
        self.sum += value

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        counts, total = list(self.counts), self.sum
        buckets, seen = [], 0
        for bound, n in zip((*self.bounds, float("inf")), counts, strict=True):
            seen += n
            buckets.append((floatToGoString(bound), seen))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=total)


class ServerMetrics:
    """The counters of one app, and its registry (``registry``). Recording methods are for the
    event loop's thread (see the module docstring)."""

    def __init__(self, model: str, alias: str, holder: HolderView, plog: LogView | None = None,
                 runtime: bool = True) -> None:
        """`model` and `alias` label the served version; `runtime` adds the process, platform
        and garbage-collector collectors to the registry."""
        self.model, self.alias, self.holder, self.plog = model, alias, holder, plog
        self.batcher: QueueView | None = None  # set once the batcher runs (queued rows)
        self.online: OnlineView | None = None  # set when the server has an online store
        self.raw_rows = {"predicted": 0, "blocked": 0}  # rows of POST /invocations?raw=1 by outcome
        self.begun = 0  # /invocations requests begun; those answered are in `codes`
        self.gone = 0  # of those begun, the ones that ended without an answer (cancelled)
        self.codes: dict[int, int] = {200: 0}  # /invocations answers by status
        self.others: dict[tuple[str, int], int] = {}  # (path, status) of every other response
        self.latency = Histogram(LATENCY_BUCKETS)
        self.request_rows = Histogram(ROW_BUCKETS)
        self.batch_rows = Histogram(ROW_BUCKETS)
        self.batch_seconds = Histogram(LATENCY_BUCKETS)
        self.registry = CollectorRegistry()
        self.registry.register(ServerCollector(self))
        if runtime:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)

    # --- the request path: plain ints and lists ------------------------------------------------
    def begin(self) -> float:
        """A ``POST /invocations`` starts (it is in flight until ``end``); returns its start."""
        self.begun += 1
        return _now()

    def end(self, status: int, started: float) -> None:
        """It is answered with `status` (call before the response is sent): count and latency."""
        seconds = _now() - started
        codes = self.codes
        codes[status] = codes.get(status, 0) + 1
        h = self.latency
        h.counts[bisect_left(h.bounds, seconds)] += 1
        h.sum += seconds

    def unanswered(self) -> None:
        """It ended without an answer (cancelled: the server stopping): no longer in flight."""
        self.gone += 1

    def rows(self, n: int) -> None:
        """The rows of a request answered with predictions."""
        h = self.request_rows
        h.counts[bisect_left(h.bounds, n)] += 1
        h.sum += n

    def raw(self, predicted: int, blocked: int) -> None:
        """A raw-row request's rows: those given features (and predicted), those blocked."""
        self.raw_rows["predicted"] += predicted
        self.raw_rows["blocked"] += blocked

    def batch(self, rows: int, seconds: float) -> None:
        """One predict batch: its rows and the seconds from hand-off to the predict thread until
        its answers were back."""
        self.batch_rows.observe(rows)
        self.batch_seconds.observe(seconds)

    def request(self, path: str, status: int) -> None:
        """A response of a path other than /invocations (``counting`` calls it)."""
        key = (path if path in PATHS else OTHER, status)
        self.others[key] = self.others.get(key, 0) + 1

    def counting(self, scope: dict, send: Callable) -> Callable:
        """`send`, counting the response's status under the request's path (HTTP only)."""
        if scope["type"] != "http":
            return send
        path = scope["path"]

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.request(path, message["status"])
            await send(message)

        return counted

    # --- the endpoint ---------------------------------------------------------------------------
    def endpoint(self, authorized: Callable[[list[tuple[bytes, bytes]]], bool | None],
                 public: bool | None = None, before: Callable[[], Awaitable[Any]] | None = None) -> MetricsEndpoint:
        """The ASGI app of ``GET /metrics``. `authorized(headers)` says whether the request
        carries the server's token (None: the server has none); `public` (default:
        ``DAYBREAK_METRICS_PUBLIC``) serves it without the token; `before` is awaited once an
        allowed scrape starts (the online store's freshness is read then, off the loop)."""
        return MetricsEndpoint(self.registry, authorized, metrics_public() if public is None else public, before)


class MetricsEndpoint:
    """``GET /metrics``: the registry in the format the scraper asks for (Prometheus' text format,
    or OpenMetrics when its Accept header prefers it), gzipped when it accepts gzip, as
    ``prometheus_client``'s own ASGI app does; 401 without the token unless public."""

    def __init__(self, registry: CollectorRegistry, authorized: Callable[[list[tuple[bytes, bytes]]], bool | None],
                 public: bool, before: Callable[[], Awaitable[Any]] | None = None) -> None:
        self.registry, self.authorized, self.public, self.before = registry, authorized, public, before

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        headers = scope["headers"]
        if not self.public and self.authorized(headers) is False:
            body = (b'{"error_code": "UNAUTHENTICATED", "message": "missing or wrong bearer token (or set '
                    + PUBLIC_ENV.encode() + b'=1 on the server)"}')
            await _respond(send, 401, [(b"content-type", b"application/json")], body)
            return
        if self.before is not None:
            await self.before()
        accept = b",".join(v for k, v in headers if k == b"accept").decode("latin-1")
        encoding = b",".join(v for k, v in headers if k == b"accept-encoding").decode("latin-1")
        encoder, content_type = choose_encoder(accept)
        output = encoder(self.registry)
        out_headers = [(b"content-type", content_type.encode())]
        if gzip_accepted(encoding):
            output = gzip.compress(output, compresslevel=1)
            out_headers.append((b"content-encoding", b"gzip"))
        await _respond(send, 200, out_headers, output)


async def _respond(send: Callable, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    headers = [*headers, (b"content-length", b"%d" % len(body)), (b"cache-control", b"no-store")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ServerCollector(Collector):
    """Reads a ``ServerMetrics`` (and the objects it watches) into metric families at scrape time."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.m = metrics

    def describe(self) -> list[Metric]:
        """The families' names, so ``/metrics?name[]=...`` finds them (collecting is cheap)."""
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        m = self.m
        yield from self._requests(m)
        cur = m.holder.current
        yield from self._model(m, cur)
        if m.plog is not None:
            yield from self._log(m.plog)
        else:
            yield GaugeMetricFamily("daybreak_prediction_log_sample_rate",
                                    "Share of requests written to the prediction log (0: no log).", value=0)
        if m.online is not None:
            yield from self._online(m.online.last)
            raw = CounterMetricFamily("daybreak_online_rows", "Rows of raw-row requests (POST /invocations?raw=1) "
                                      "by outcome: predicted, or blocked (no features: stale state, no event "
                                      "time, a missing column).", labels=["outcome"])
            for outcome, n in sorted(m.raw_rows.items()):
                raw.add_metric([outcome], n)
            yield raw

    @staticmethod
    def _online(last: dict[str, Any]) -> Iterator[Metric]:
        """The online store's freshness as last read (absent values: no gauge sample)."""
        from datetime import UTC, date, datetime

        def seconds(iso: str | None) -> float | None:
            return None if not iso else datetime.fromisoformat(iso).timestamp()

        day = last.get("materialized_date")
        yield GaugeMetricFamily("daybreak_online_state", "1 when the online store has a materialized state, "
                                "0 when it has none (raw-row requests get 503) or could not be read.",
                                value=1 if day and not last.get("error") else 0)
        values = {
            "daybreak_online_materialized_date_timestamp_seconds": (
                "Unix time of the start (00:00 UTC) of the last date materialized into the online store.",
                None if not day else datetime.combine(date.fromisoformat(day), datetime.min.time(), UTC).timestamp()),
            "daybreak_online_materialized_timestamp_seconds": (
                "Unix time the online store's current state was materialized.", seconds(last.get("materialized_at"))),
            "daybreak_online_newest_event_timestamp_seconds": (
                "Unix time (event time) of the newest event pushed to the online store.",
                seconds(last.get("newest_event"))),
            "daybreak_online_newest_event_age_seconds": (
                "Seconds from the newest pushed event's time until the scrape.", last.get("newest_event_age_seconds")),
        }
        for name, (doc, value) in values.items():
            family = GaugeMetricFamily(name, doc)
            if value is not None:
                family.add_metric([], value)
            yield family

    @staticmethod
    def _requests(m: ServerMetrics) -> Iterator[Metric]:
        codes, others = dict(m.codes), dict(m.others)
        requests = CounterMetricFamily("daybreak_requests", "HTTP responses by path (a fixed set; anything else "
                                       "is 'other') and status code.", labels=["path", "code"])
        for code, n in sorted(codes.items()):
            requests.add_metric(["/invocations", str(code)], n)
        for (path, code), n in sorted(others.items()):
            requests.add_metric([path, str(code)], n)
        yield requests
        yield m.latency.family("daybreak_invocation_duration_seconds",
                               "Seconds from a POST /invocations' arrival until its answer is sent, any status.")
        yield m.request_rows.family("daybreak_invocation_rows", "Rows of each POST /invocations answered with "
                                    "predictions.")
        yield m.batch_rows.family("daybreak_batch_rows", "Rows of each predict batch (several requests, or a "
                                  "slice of a big one).")
        yield m.batch_seconds.family("daybreak_batch_duration_seconds", "Seconds of each predict batch, from "
                                     "hand-off to the predict thread until its answers are back.")
        yield GaugeMetricFamily("daybreak_invocations_in_flight", "POST /invocations requests begun and not yet "
                                "answered.", value=m.begun - m.gone - sum(codes.values()))
        batcher = m.batcher
        yield GaugeMetricFamily("daybreak_queued_rows", "Rows of queued requests waiting for the predict thread.",
                                value=batcher.pending_rows if batcher is not None else 0)

    @staticmethod
    def _model(m: ServerMetrics, cur: Any) -> Iterator[Metric]:
        h = m.holder
        if cur is not None:
            try:
                number = float(cur.version)
            except (TypeError, ValueError):
                number = float("nan")
            yield GaugeMetricFamily("daybreak_model_version", "Registry version of the model being served.",
                                    value=number)
            info = GaugeMetricFamily("daybreak_model_info", "The model being served (always 1), labelled by "
                                     "registered model name, alias and version.", labels=["model", "alias", "version"])
            info.add_metric([m.model, m.alias, str(cur.version)], 1)
            yield info
            yield GaugeMetricFamily("daybreak_model_loaded_timestamp_seconds", "Unix time the version being "
                                    "served was loaded.", value=cur.loaded_at)
            yield GaugeMetricFamily("daybreak_model_age_seconds", "Seconds since the version being served was "
                                    "loaded (its swap, or the server's first load).",
                                    value=max(time.time() - cur.loaded_at, 0.0))
        yield GaugeMetricFamily("daybreak_model_loaded", "1 when a model is being served, 0 before the first "
                                "load succeeds.", value=0 if cur is None else 1)
        yield CounterMetricFamily("daybreak_model_swaps", "Times a new version replaced the one being served.",
                                  value=h.swaps)
        yield CounterMetricFamily("daybreak_model_swap_failures", "New champion versions that failed to load "
                                  "(the version being served kept serving; retried at the next poll).",
                                  value=h.swap_failures)
        yield CounterMetricFamily("daybreak_champion_poll_errors", "Champion alias look-ups in the registry "
                                  "that failed.", value=h.poll_errors)

    @staticmethod
    def _log(plog: LogView) -> Iterator[Metric]:
        yield GaugeMetricFamily("daybreak_prediction_log_sample_rate", "Share of requests written to the "
                                "prediction log (0: no log).", value=plog.cfg.sample_rate)
        yield CounterMetricFamily("daybreak_prediction_log_recorded_rows", "Rows queued for the prediction log.",
                                  value=plog.recorded_rows)
        yield CounterMetricFamily("daybreak_prediction_log_written_rows", "Rows written to prediction log files.",
                                  value=plog.written_rows)
        dropped = CounterMetricFamily("daybreak_prediction_log_dropped_rows", "Answered rows the prediction log "
                                      "lost: its queue was full (queue_full) or their file could not be written "
                                      "(write_error).", labels=["reason"])
        dropped.add_metric(["queue_full"], plog.queue_full_rows)
        dropped.add_metric(["write_error"], plog.write_failed_rows)
        yield dropped
        yield CounterMetricFamily("daybreak_prediction_log_files", "Prediction log files written.", value=plog.files)
        yield CounterMetricFamily("daybreak_prediction_log_write_errors", "Prediction log flushes that failed.",
                                  value=plog.write_errors)
        yield GaugeMetricFamily("daybreak_prediction_log_pending_rows", "Rows waiting for the prediction log's "
                                "writer.", value=plog.pending_rows)
