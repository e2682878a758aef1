"""Prometheus /metrics of `daybreak serve` (issue 25, part 4): the collector on its own, and a real
server scraped over HTTP after known traffic and a hot swap."""

from __future__ import annotations

import asyncio
import gzip
import time
from collections import Counter
from types import SimpleNamespace

import httpx
import pytest
from conftest import Served, until
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from daybreak.deploy._metrics import LATENCY_BUCKETS, ROW_BUCKETS, ServerMetrics, metrics_public

TOKEN = "metrics-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample: (name, sorted labels) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def _holder(version: str | None = "7", loaded_at: float | None = None) -> SimpleNamespace:
    cur = None if version is None else SimpleNamespace(version=version, loaded_at=loaded_at or time.time() - 5)
    return SimpleNamespace(current=cur, swaps=2, swap_failures=1, poll_errors=3)


def _plog() -> SimpleNamespace:
    return SimpleNamespace(cfg=SimpleNamespace(sample_rate=0.5), pending_rows=4, recorded_rows=100,
                           written_rows=90, files=3, queue_full_rows=6, write_errors=1, write_failed_rows=2)


def test_collector_reads_the_counters_at_scrape_time() -> None:
    m = ServerMetrics("flights_delay", "champion", _holder(), _plog())
    m.batcher = SimpleNamespace(pending_rows=12)
    for status, seconds in ((200, 0.0004), (200, 0.003), (400, 0.02), (503, 7.0)):
        started = m.begin()
        m.end(status, started - seconds)  # as if it began `seconds` ago
    m.begin()  # one still in flight
    for n in (1, 1, 100, 101):
        m.rows(n)
    m.batch(2, 0.001)
    m.batch(201, 0.004)
    m.request("/ping", 200)
    m.request("/ping", 200)
    m.request("/wp-admin/../../etc/passwd?token=x", 404)  # never a label value

    s = parse(generate_latest(m.registry).decode())
    assert value(s, "daybreak_requests_total", path="/invocations", code="200") == 2
    assert value(s, "daybreak_requests_total", path="/invocations", code="400") == 1
    assert value(s, "daybreak_requests_total", path="/invocations", code="503") == 1
    assert value(s, "daybreak_requests_total", path="/ping", code="200") == 2
    assert value(s, "daybreak_requests_total", path="other", code="404") == 1
    assert {dict(k[1]).get("path") for k in s if k[0] == "daybreak_requests_total"} == {"/invocations", "/ping",
                                                                                        "other"}
    assert value(s, "daybreak_invocations_in_flight") == 1

    lat = "daybreak_invocation_duration_seconds"
    assert value(s, f"{lat}_count") == 4
    assert value(s, f"{lat}_bucket", le="0.0005") == 1
    assert value(s, f"{lat}_bucket", le="0.005") == 2
    assert value(s, f"{lat}_bucket", le="5.0") == 3
    assert value(s, f"{lat}_bucket", le="+Inf") == 4
    assert value(s, f"{lat}_sum") == pytest.approx(7.0234, abs=1e-3)
    assert len([k for k in s if k[0] == f"{lat}_bucket"]) == len(LATENCY_BUCKETS) + 1

    rows = "daybreak_invocation_rows"
    assert value(s, f"{rows}_count") == 4 and value(s, f"{rows}_sum") == 203
    assert value(s, f"{rows}_bucket", le="1.0") == 2  # le: a bound is inclusive
    assert value(s, f"{rows}_bucket", le="100.0") == 3
    assert value(s, f"{rows}_bucket", le="200.0") == 4
    assert len([k for k in s if k[0] == f"{rows}_bucket"]) == len(ROW_BUCKETS) + 1
    assert value(s, "daybreak_batch_rows_count") == 2 and value(s, "daybreak_batch_rows_sum") == 203
    assert value(s, "daybreak_batch_rows_bucket", le="2.0") == 1
    assert value(s, "daybreak_batch_duration_seconds_count") == 2
    assert value(s, "daybreak_batch_duration_seconds_bucket", le="0.001") == 1
    assert value(s, "daybreak_queued_rows") == 12

    assert value(s, "daybreak_model_version") == 7
    assert value(s, "daybreak_model_info", model="flights_delay", alias="champion", version="7") == 1
    assert value(s, "daybreak_model_loaded") == 1
    assert 4 < value(s, "daybreak_model_age_seconds") < 60
    assert value(s, "daybreak_model_swaps_total") == 2
    assert value(s, "daybreak_model_swap_failures_total") == 1
    assert value(s, "daybreak_champion_poll_errors_total") == 3

    assert value(s, "daybreak_prediction_log_sample_rate") == 0.5
    assert value(s, "daybreak_prediction_log_recorded_rows_total") == 100
    assert value(s, "daybreak_prediction_log_written_rows_total") == 90
    assert value(s, "daybreak_prediction_log_dropped_rows_total", reason="queue_full") == 6
    assert value(s, "daybreak_prediction_log_dropped_rows_total", reason="write_error") == 2
    assert value(s, "daybreak_prediction_log_files_total") == 3
    assert value(s, "daybreak_prediction_log_write_errors_total") == 1
    assert value(s, "daybreak_prediction_log_pending_rows") == 4
    assert ("process_resident_memory_bytes", ()) in s and any(k[0] == "python_info" for k in s)

    # recording after a scrape shows at the next one (nothing is cached)
    m.end(200, m.begin())
    again = parse(generate_latest(m.registry).decode())
    assert value(again, "daybreak_requests_total", path="/invocations", code="200") == 3
    assert value(again, f"{lat}_count") == 5


def test_no_model_no_log_and_two_apps_in_one_process() -> None:
    """Before the first load there is no version; each app has its own registry and counts."""
    a = ServerMetrics("m", "champion", _holder(None))
    b = ServerMetrics("m", "champion", _holder("3"))  # the process collectors too: no duplicate error
    a.end(200, a.begin())
    sa, sb = parse(generate_latest(a.registry).decode()), parse(generate_latest(b.registry).decode())
    assert value(sa, "daybreak_model_loaded") == 0 and ("daybreak_model_version", ()) not in sa
    assert not any(k[0] == "daybreak_model_info" for k in sa)
    assert value(sa, "daybreak_prediction_log_sample_rate") == 0
    assert not any(k[0].startswith("daybreak_prediction_log_") and "sample_rate" not in k[0] for k in sa)
    assert value(sa, "daybreak_requests_total", path="/invocations", code="200") == 1
    assert value(sb, "daybreak_requests_total", path="/invocations", code="200") == 0
    assert value(sb, "daybreak_model_version") == 3


def _get(app, headers: dict[str, str] | None = None) -> tuple[int, dict[bytes, bytes], bytes]:
    """One GET through an ASGI app: status, headers, body."""
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/metrics",
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def test_endpoint_token_rule_and_formats(monkeypatch: pytest.MonkeyPatch) -> None:
    m = ServerMetrics("m", "champion", _holder(), runtime=False)

    def authorized(headers: list[tuple[bytes, bytes]]) -> bool:  # as Invocations.authorized with a token
        return dict(headers).get(b"authorization") == b"Bearer s3cret"

    monkeypatch.delenv("DAYBREAK_METRICS_PUBLIC", raising=False)
    guarded = m.endpoint(authorized)
    status, headers, body = _get(guarded)
    assert status == 401 and b"UNAUTHENTICATED" in body and b"s3cret" not in body
    assert _get(guarded, {"Authorization": "Bearer wrong"})[0] == 401
    status, headers, body = _get(guarded, {"Authorization": "Bearer s3cret"})
    assert status == 200 and headers[b"content-type"].startswith(b"text/plain")
    assert value(parse(body.decode()), "daybreak_model_version") == 7
    # no token on the server: open, like /invocations
    assert _get(m.endpoint(lambda h: None))[0] == 200
    # DAYBREAK_METRICS_PUBLIC=1: no token needed even when the server has one
    monkeypatch.setenv("DAYBREAK_METRICS_PUBLIC", "1")
    assert _get(m.endpoint(authorized))[0] == 200
    # what Prometheus asks for: OpenMetrics, gzipped
    status, headers, body = _get(guarded, {"Authorization": "Bearer s3cret", "Accept-Encoding": "gzip",
                                           "Accept": "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"})
    assert headers[b"content-encoding"] == b"gzip"
    assert headers[b"content-type"].startswith(b"application/openmetrics-text")
    assert gzip.decompress(body).rstrip().endswith(b"# EOF")


def test_metrics_public_values() -> None:
    assert metrics_public({}) is False
    assert metrics_public({"DAYBREAK_METRICS_PUBLIC": "1"}) is True
    assert metrics_public({"DAYBREAK_METRICS_PUBLIC": "true"}) is True
    assert metrics_public({"DAYBREAK_METRICS_PUBLIC": "0"}) is False
    with pytest.raises(ValueError, match="DAYBREAK_METRICS_PUBLIC"):
        metrics_public({"DAYBREAK_METRICS_PUBLIC": "maybe"})


def test_the_holder_counts_swaps_failed_loads_and_failed_polls(spec) -> None:
    """The counters ModelHolder keeps for the collector (``_serve.py``'s ``# metrics`` lines)."""
    from daybreak.deploy._serve import Loaded, ModelHolder

    holder = ModelHolder(spec, None)  # type: ignore[arg-type]
    answers: list = ["1"]
    holder.champion_version = lambda: answers[0]  # type: ignore[method-assign]

    def load(version: str) -> Loaded:
        if version == "bad":
            raise RuntimeError("cannot load")
        return Loaded(version, object(), time.time(), None)

    holder.load = load  # type: ignore[method-assign]
    assert holder.refresh() and holder.swaps == 0  # the first load is not a swap
    answers[0] = "2"
    assert holder.refresh() and holder.swaps == 1
    assert not holder.refresh() and holder.swaps == 1  # the same version: nothing to do
    answers[0] = "bad"
    for _ in range(2):
        with pytest.raises(RuntimeError):
            holder.refresh()
    # (a version that failed to load is not loaded again by the next check: one failure)
    assert holder.swap_failures == 1 and holder.current.version == "2"

    def down() -> str:
        raise ConnectionError("registry down")

    holder.champion_version = down  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        holder.refresh()
    assert (holder.swaps, holder.swap_failures, holder.poll_errors) == (1, 1, 1)
    holder.install(Loaded("1", object(), time.time(), None))  # a rollback is a swap (replicas install directly)
    assert holder.swaps == 2


def test_the_app_serves_metrics_with_the_token_unless_public(use_cycled: dict, spec,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The wiring in ``create_app``, in process: the route, the token rule, the environment."""
    from fastapi.testclient import TestClient

    from daybreak.deploy._serve import create_app
    from daybreak.infra.context import RunContext

    monkeypatch.delenv("DAYBREAK_METRICS_PUBLIC", raising=False)
    ctx = RunContext.create("2013-01-04")
    with TestClient(create_app(spec, ctx, token="s3cret")) as c:
        assert c.get("/metrics").status_code == 401
        r = c.get("/metrics", headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and value(parse(r.text), "daybreak_model_loaded") == 1
        assert c.post("/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 405
    monkeypatch.setenv("DAYBREAK_METRICS_PUBLIC", "1")
    with TestClient(create_app(spec, ctx, token="s3cret")) as c:
        assert c.get("/metrics").status_code == 200
    monkeypatch.setenv("DAYBREAK_METRICS_PUBLIC", "perhaps")
    with pytest.raises(ValueError, match="DAYBREAK_METRICS_PUBLIC"):
        create_app(spec, ctx, token="s3cret")


# --- a real server ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(cycled: dict, spec, tmp_path_factory: pytest.TempPathFactory):
    s = Served(spec, cycled["home"], tmp_path_factory.mktemp("metrics-serve"), {"DAYBREAK_SERVE_TOKEN": TOKEN})
    yield s
    s.stop()


class Tally:
    """An HTTP client that counts what it got, (path, status), to compare with the server's counts."""

    def __init__(self, url: str) -> None:
        self.url, self.seen = url, Counter()
        self.client = httpx.Client(timeout=30)

    def request(self, method: str, path: str, **kw) -> httpx.Response:
        r = self.client.request(method, f"{self.url}{path}", **kw)
        self.seen[(path if path in ("/invocations", "/ping", "/version", "/metrics") else "other",
                   str(r.status_code))] += 1
        return r

    def scrape(self) -> dict:
        r = self.request("GET", "/metrics", headers=AUTH)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text[:300]
        return parse(r.text)


def test_a_served_model_is_scraped_after_known_traffic_and_a_swap(served: Served, use_cycled: dict, spec) -> None:
    from daybreak.gate import holdout
    from daybreak.infra import registry
    from daybreak.infra.context import RunContext

    ctx = RunContext.create("2013-01-04")
    cl = registry.client(ctx)
    champ = str(registry.alias_version(cl, spec.model.name, "champion").version)
    other = next(str(mv.version) for mv in registry.versions(cl, spec.model.name) if str(mv.version) != champ)
    X = holdout(spec, ctx)[spec.features.feature_names()].head(100)
    cols, data = list(X.columns), X.astype(object).where(X.notna(), None).values.tolist()
    t = Tally(served.url)

    # the token rule: /metrics takes the server's token, as /invocations does
    assert t.request("GET", "/metrics").status_code == 401
    assert t.request("GET", "/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    before = t.scrape()
    t.seen = Counter({("/metrics", "200"): 1})  # from here, what the next scrapes count (this one's 200 too)
    assert value(before, "daybreak_model_version") == int(champ)
    assert value(before, "daybreak_model_swaps_total") == 0

    def invoke(rows: list, headers: dict = AUTH) -> int:
        body = {"dataframe_split": {"columns": cols, "data": rows}}
        return t.request("POST", "/invocations", json=body, headers=headers).status_code

    sent_rows = 0
    for k in range(3):  # 1-row requests
        assert invoke(data[k:k + 1]) == 200
        sent_rows += 1
    for _ in range(2):  # 100-row requests
        assert invoke(data) == 200
        sent_rows += 100
    bad = {"rows": data[:1]}
    assert t.request("POST", "/invocations", json=bad, headers=AUTH).status_code == 400
    assert invoke([r[1:] for r in data[:2]]) == 400  # a column short
    assert invoke(data[:1], headers={}) == 401
    assert t.request("GET", "/ping").status_code == 200
    assert t.request("GET", "/no/such/path").status_code == 404

    try:
        cl.set_registered_model_alias(spec.model.name, "champion", other)  # promote another version: a swap
        swapped = time.time()
        until(lambda: t.request("GET", "/version").json()["version"] == other, 60, "the server never swapped")
        assert invoke(data[:1]) == 200
        sent_rows += 1
        until(lambda: value(t.scrape(), "daybreak_prediction_log_written_rows_total") >= sent_rows, 30,
              "the prediction log never wrote the rows")
        after = t.scrape()
    finally:
        cl.set_registered_model_alias(spec.model.name, "champion", champ)  # other tests expect it served
        until(lambda: httpx.get(f"{served.url}/version", timeout=10).json()["version"] == champ, 60,
              "the server never went back to the champion")

    # every response since the first scrape, counted once under its path and status (a scrape's own
    # 200 is counted after its body was made)
    counted = {(dict(k[1])["path"], dict(k[1])["code"]): v - before.get(k, 0)
               for k, v in after.items() if k[0] == "daybreak_requests_total"}
    expected = t.seen.copy()
    expected[("/metrics", "200")] -= 1
    assert {k: v for k, v in counted.items() if v} == {k: v for k, v in expected.items() if v}
    invocations = sum(v for (path, _), v in t.seen.items() if path == "/invocations")
    assert value(after, "daybreak_requests_total", path="/invocations", code="200") == 6  # from the server's start
    assert value(after, "daybreak_requests_total", path="/metrics", code="401") == 2
    assert value(after, "daybreak_invocation_duration_seconds_count") == invocations == 9
    assert value(after, "daybreak_invocation_duration_seconds_sum") < 60
    assert value(after, "daybreak_invocation_rows_count") == 6
    assert value(after, "daybreak_invocation_rows_sum") == sent_rows == 204
    assert value(after, "daybreak_invocation_rows_bucket", le="1.0") == 4
    assert value(after, "daybreak_invocation_rows_bucket", le="50.0") == 4
    assert value(after, "daybreak_invocation_rows_bucket", le="100.0") == 6
    assert value(after, "daybreak_batch_rows_sum") == 204  # refused bodies never reach a batch
    assert 1 <= value(after, "daybreak_batch_rows_count") <= 6
    assert value(after, "daybreak_batch_duration_seconds_count") == value(after, "daybreak_batch_rows_count")
    assert value(after, "daybreak_invocations_in_flight") == 0
    assert value(after, "daybreak_queued_rows") == 0

    assert value(after, "daybreak_model_version") == int(other)
    assert value(after, "daybreak_model_info", model=spec.model.name, alias="champion", version=other) == 1
    assert value(after, "daybreak_model_swaps_total") == 1
    assert value(after, "daybreak_model_swap_failures_total") == 0
    assert value(after, "daybreak_champion_poll_errors_total") == 0
    assert value(after, "daybreak_model_age_seconds") <= time.time() - swapped + 1
    assert value(after, "daybreak_model_loaded_timestamp_seconds") >= swapped - 1

    assert value(after, "daybreak_prediction_log_sample_rate") == 1
    assert value(after, "daybreak_prediction_log_recorded_rows_total") == 204
    assert value(after, "daybreak_prediction_log_written_rows_total") == 204
    assert value(after, "daybreak_prediction_log_files_total") >= 1
    assert value(after, "daybreak_prediction_log_dropped_rows_total", reason="queue_full") == 0
    assert value(after, "daybreak_prediction_log_dropped_rows_total", reason="write_error") == 0
    assert value(after, "daybreak_prediction_log_write_errors_total") == 0
    assert value(after, "process_resident_memory_bytes") > 0
    # no label value came from a request, a path outside the fixed set, or the token
    labels = {v for _, ls in after for _, v in ls}
    assert "/no/such/path" not in labels and not any(TOKEN in v for v in labels)
