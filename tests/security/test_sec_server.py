"""Abusive clients against a real `daybreak serve` on loopback (issue 20, items 4, 5 and 8's /health).

Each test replays one attack the issue reports and checks the server refuses it and keeps serving
the others. Every one of them failed on the server before the fix (see the README's security
table). The servers run with short read timeouts and a small row limit set through the
environment (``DAYBREAK_SERVE_*``), which is also what checks that those settings are read; the
body limits are the defaults. Waits are on conditions with deadlines, never fixed sleeps that
must be long enough.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import ROOT, Served, free_port
from conftest import until as _until

TOKEN = "t0ken-for-the-test"
HEADER_TIMEOUT, BODY_TIMEOUT, MAX_ROWS = 2, 3, 1000
LIMITS = {"DAYBREAK_SERVE_HEADER_TIMEOUT": str(HEADER_TIMEOUT), "DAYBREAK_SERVE_BODY_TIMEOUT": str(BODY_TIMEOUT),
          "DAYBREAK_SERVE_MAX_ROWS": str(MAX_ROWS)}
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def rows(holdout_rows) -> tuple[list[str], list[list]]:
    return holdout_rows


@pytest.fixture(scope="module")
def features(holdout_features) -> tuple[list[str], list[list]]:
    return holdout_features


@pytest.fixture(scope="module")
def open_server(cycled: dict, spec, tmp_path_factory: pytest.TempPathFactory):
    """No token configured (the default), short read timeouts, MAX_ROWS rows per request."""
    s = Served(spec, cycled["home"], tmp_path_factory.mktemp("sec-serve"), LIMITS)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def token_server(cycled: dict, spec, tmp_path_factory: pytest.TempPathFactory):
    """DAYBREAK_SERVE_TOKEN set."""
    s = Served(spec, cycled["home"], tmp_path_factory.mktemp("sec-serve-token"),
               {**LIMITS, "DAYBREAK_SERVE_TOKEN": TOKEN})
    yield s
    s.stop()


def _split(cols: list[str], data: list[list]) -> dict:
    return {"dataframe_split": {"columns": cols, "data": data}}


# Where this machine keeps the interpreter, the checkout and temporary files: none may show in an error.
INSTALL_PATHS = tuple({sys.prefix, sys.base_prefix, str(ROOT), tempfile.gettempdir()})


def _mlflow_error(r: httpx.Response, status: int, code: str | None = None) -> str:
    """The MLflow scoring server's error body, without internals; returns the message."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    body = r.json()
    assert set(body) == {"error_code", "message"}, body
    if code:
        assert body["error_code"] == code, body
    for leak in ("Traceback", "site-packages", "xgboost", "File \"", *INSTALL_PATHS):
        assert leak not in body["message"], body["message"][:500]
    assert not re.search(r"\.py\b", body["message"]), body["message"][:500]
    return body["message"]


def _rss(proc: subprocess.Popen) -> int:
    """The server's resident memory, its children's included (a parse worker)."""
    p = psutil.Process(proc.pid)
    total = p.memory_info().rss
    for child in p.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _raw(port: int, head: bytes, body: bytes = b"", timeout: float = 30) -> tuple[int | None, bytes]:
    """Send `head` (+ `body`) on a fresh connection; the status and the whole answer. A server
    that answers early and closes may cut the sending short: that is not an error here."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(head)
            if body:
                s.sendall(body)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        try:
            while b"\r\n\r\n" not in data or len(data) < _expected_length(data):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except ConnectionResetError:
            pass
    status = int(data[9:12]) if data.startswith(b"HTTP/1.1 ") else None
    return status, data


def _expected_length(data: bytes) -> int:
    head, _, _ = data.partition(b"\r\n\r\n")
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return len(head) + 4 + int(line.split(b":")[1])
    return len(data) + 1


def _post_head(length: int, extra: bytes = b"") -> bytes:
    return (b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n%s\r\n" % (length, extra))


def test_huge_bodies_are_refused_before_they_are_read(open_server: Served, features, use_cycled) -> None:
    """Four 60 MiB bodies at once (about 330k rows each): each is refused with 413 from its declared
    length, /ping keeps answering, and the server's memory does not grow by the bodies."""
    cols, data = features
    row = json.dumps(data[0]).encode()
    prefix = json.dumps({"dataframe_split": {"columns": cols, "data": []}}).encode()[:-3]
    n = (60 * 2**20) // (len(row) + 1)
    huge = prefix + b",".join([row] * n) + b"]}}"
    before = _rss(open_server.proc)
    answers: list[tuple[int | None, bytes]] = []
    peak = [before]

    def send() -> None:
        answers.append(_raw(open_server.port, _post_head(len(huge)), huge, timeout=60))

    senders = [threading.Thread(target=send) for _ in range(4)]
    for t in senders:
        t.start()
    slowest = 0.0
    while any(t.is_alive() for t in senders):
        t0 = time.monotonic()
        assert httpx.get(f"{open_server.url}/ping", timeout=30).status_code == 200
        slowest = max(slowest, time.monotonic() - t0)
        peak.append(_rss(open_server.proc))
        time.sleep(0.05)
    for t in senders:
        t.join()
    assert [a[0] for a in answers] == [413] * 4, [a[1][:300] for a in answers]
    _head, _, body = answers[0][1].partition(b"\r\n\r\n")
    msg = json.loads(body)
    assert msg["error_code"] == "RESOURCE_LIMIT_EXCEEDED" and "MiB" in msg["message"], msg
    # loose bounds: the old server stalled /ping for 18 s and grew by 1.6 GB
    assert slowest < 5, f"/ping took {slowest:.1f}s while the bodies were sent"
    assert max(peak) - before < 300 * 2**20, f"RSS grew by {(max(peak) - before) / 2**20:.0f} MB"


def test_bodies_without_a_length_and_too_many_rows(open_server: Served, features, use_cycled) -> None:
    """A chunked body is cut off at the byte limit; a body over the row limit gets a 413 naming it;
    one at the limit is answered."""
    from daybreak.deploy._serve import MAX_BODY_BYTES

    cols, data = features
    MAX_BODY_BYTES = min(MAX_BODY_BYTES, 16 * 2**20)  # (the server before the fix read 64 MiB)

    def chunks():
        piece = b" " * 2**20
        for _ in range(MAX_BODY_BYTES // len(piece) + 8):
            yield piece

    for _ in range(5):  # more than the in-flight budget in all: what was counted is released each time
        r = httpx.post(f"{open_server.url}/invocations", content=chunks(), headers=JSON, timeout=60)
        _mlflow_error(r, 413, "RESOURCE_LIMIT_EXCEEDED")
    many = [data[k % len(data)] for k in range(MAX_ROWS + 1)]
    r = httpx.post(f"{open_server.url}/invocations", json=_split(cols, many), timeout=60)
    msg = _mlflow_error(r, 413, "RESOURCE_LIMIT_EXCEEDED")
    assert f"{MAX_ROWS:,}" in msg or str(MAX_ROWS) in msg, msg
    r = httpx.post(f"{open_server.url}/invocations", json=_split(cols, many[:MAX_ROWS]), timeout=60)
    assert r.status_code == 200 and len(r.json()["predictions"]) == MAX_ROWS


def test_bytes_in_flight_are_bounded(open_server: Served, use_cycled) -> None:
    """Bodies declared near the limit and sent slowly: past the in-flight budget, new ones get 503
    with Retry-After instead of memory."""
    from daybreak.deploy import _serve as serve

    # (the defaults; the server before the fix had a 64 MiB body limit and no in-flight bound)
    declared = min(getattr(serve, "MAX_BODY_BYTES", 16 * 2**20), 16 * 2**20) - 1
    MAX_INFLIGHT_BYTES = getattr(serve, "MAX_INFLIGHT_BYTES", 64 * 2**20)
    socks = []
    try:
        for _ in range(MAX_INFLIGHT_BYTES // declared):
            s = socket.create_connection(("127.0.0.1", open_server.port), timeout=10)
            s.sendall(_post_head(declared) + b'{"dataframe_split": ')
            socks.append(s)
        # the budget is taken once the server has started reading each: wait until it refuses
        _status, answer = _until(lambda: (lambda a: a if a[0] == 503 else None)(
            _raw(open_server.port, _post_head(declared) + b"{}", timeout=10)), 10, "never refused")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b"retry-after:" in head.lower()
        assert json.loads(body)["error_code"] == "TEMPORARILY_UNAVAILABLE"
        # small bodies are not turned away by the big ones holding the budget
        assert httpx.post(f"{open_server.url}/invocations", content=b"{}", headers=JSON, timeout=10).status_code == 400
    finally:
        for s in socks:
            s.close()
    # once they are gone, the budget is back: a big body is read again (and times out, being 2 bytes)
    _until(lambda: _raw(open_server.port, _post_head(declared) + b"{}", timeout=BODY_TIMEOUT + 10)[0] == 408,
           3 * BODY_TIMEOUT + 10, "budget never released")


def test_slow_connections_are_closed(open_server: Served, features, use_cycled) -> None:
    """60 slow connections (20 trickling headers, 20 declaring a body and sending one byte, 20 idle)
    are closed by the server within its timeouts, while a normal client is answered."""
    cols, data = features
    trickle, one_byte, idle = [], [], []
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", open_server.port), timeout=30)
        s.sendall(b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        trickle.append(s)
        s = socket.create_connection(("127.0.0.1", open_server.port), timeout=30)
        s.sendall(_post_head(1000) + b"{")
        one_byte.append(s)
        idle.append(socket.create_connection(("127.0.0.1", open_server.port), timeout=30))
    everyone = trickle + one_byte + idle
    for s in everyone:
        s.setblocking(False)
    closed: set[int] = set()
    answered = []
    deadline = time.monotonic() + max(HEADER_TIMEOUT, BODY_TIMEOUT) + 15
    try:
        while len(closed) < len(everyone) and time.monotonic() < deadline:
            r = httpx.post(f"{open_server.url}/invocations", json=_split(cols, data[:3]), timeout=30)
            answered.append(r.status_code)
            for k, s in enumerate(everyone):
                if k in closed:
                    continue
                if s in trickle:
                    try:
                        s.send(b"X")  # a byte of a header every round: never completes
                    except OSError:
                        closed.add(k)
                        continue
                try:
                    while True:
                        chunk = s.recv(65536)
                        if not chunk:
                            closed.add(k)
                            break
                except BlockingIOError:
                    pass
                except OSError:
                    closed.add(k)
            time.sleep(0.1)
    finally:
        for s in everyone:
            s.close()
    kinds = {"trickled headers": trickle, "one body byte": one_byte, "idle": idle}
    still = {name: sum(1 for s in group if everyone.index(s) not in closed) for name, group in kinds.items()}
    assert sum(still.values()) == 0, f"still open after the timeouts: {still}"
    assert answered and set(answered) == {200}, answered


def test_non_finite_cells_fail_only_their_request(open_server: Served, features, use_cycled) -> None:
    """Two clients sending one Infinity cell get a 400 naming the column (no native trace); eight
    normal clients are all answered, and no batch fails (nothing is re-predicted one by one)."""
    cols, data = features
    good = _split(cols, data[:20])
    at = cols.index("distance")
    row = list(data[0])
    row[at] = 1e400  # json.dumps writes Infinity
    poisoned = json.dumps(_split(cols, [row, *data[1:20]])).encode()
    assert b"Infinity" in poisoned
    statuses: dict[str, list[int]] = {"good": [], "bad": []}
    messages: list[str] = []

    def client(kind: str, n: int) -> None:
        with httpx.Client(timeout=30) as c:
            for _ in range(n):
                if kind == "good":
                    r = c.post(f"{open_server.url}/invocations", json=good)
                else:
                    r = c.post(f"{open_server.url}/invocations", content=poisoned, headers=JSON)
                    messages.append(_mlflow_error(r, 400, "BAD_REQUEST"))
                statuses[kind].append(r.status_code)

    threads = [threading.Thread(target=client, args=("good", 25)) for _ in range(8)]
    threads += [threading.Thread(target=client, args=("bad", 25)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert statuses["good"] == [200] * 200 and statuses["bad"] == [400] * 50
    assert all("distance" in m for m in messages), messages[0]
    assert "batched predict failed" not in open_server.log()
    # NaN stays what MLflow's parser makes of it (a missing value), -Infinity and huge numbers do not
    row[at] = float("nan")
    r = httpx.post(f"{open_server.url}/invocations", content=json.dumps(_split(cols, [row])).encode(), headers=JSON)
    assert r.status_code == 200, r.text
    for bad in (b"-Infinity", b"1" + b"0" * 400):
        body = json.dumps(_split(cols, [row])).encode().replace(b"NaN", bad)
        r = httpx.post(f"{open_server.url}/invocations", content=body, headers=JSON)
        msg = _mlflow_error(r, 400, "BAD_REQUEST")
        assert "distance" in msg, msg


def test_errors_content_types_and_docs(open_server: Served, features, use_cycled) -> None:
    """Error bodies in MLflow's format; 415 for what MLflow's scoring server does not read (a browser
    can send those cross-site without a preflight); no API docs."""
    cols, data = features
    url = open_server.url
    _mlflow_error(httpx.post(f"{url}/invocations", json={"rows": []}), 400, "BAD_REQUEST")
    _mlflow_error(httpx.post(f"{url}/invocations", content=b"{not json", headers=JSON), 400, "BAD_REQUEST")
    wrong = json.loads(json.dumps(_split(cols, data[:2])))
    wrong["dataframe_split"]["data"][0][cols.index("distance")] = "far"
    _mlflow_error(httpx.post(f"{url}/invocations", json=wrong), 400, "BAD_REQUEST")
    body = json.dumps(_split(cols, data[:2])).encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                  "application/json; format=pandas-split", "application/json; charset=latin-1", None):
        headers = {"Content-Type": ctype} if ctype else {}
        r = httpx.post(f"{url}/invocations", content=body, headers=headers)
        _mlflow_error(r, 415, "BAD_REQUEST")
    for ctype in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
        r = httpx.post(f"{url}/invocations", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 200, (ctype, r.text)
    csv = ",".join(cols) + "\n" + "\n".join(",".join("" if v is None else str(v) for v in r_) for r_ in data[:3])
    r = httpx.post(f"{url}/invocations", content=csv.encode(), headers={"Content-Type": "text/csv"})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 3, r.text
    for path in ("/docs", "/redoc", "/openapi.json", "/nowhere"):
        _mlflow_error(httpx.get(f"{url}{path}"), 404, "ENDPOINT_NOT_FOUND")
    _mlflow_error(httpx.get(f"{url}/invocations"), 405)


def test_identities_need_a_token(open_server: Served, token_server: Served, rows, features, spec,
                                 use_cycled) -> None:
    """Identity columns are what the monitor joins labels on: an anonymous request carrying them is
    refused (the server has no token), and with a token they are logged only for a caller with it."""
    cols, data = rows
    with_ids = _split(cols, data[:5])
    msg = _mlflow_error(httpx.post(f"{open_server.url}/invocations", json=with_ids), 403, "PERMISSION_DENIED")
    assert "DAYBREAK_SERVE_TOKEN" in msg, msg
    # as records too (MLflow's parser path), and without identity columns the request is answered
    records = {"dataframe_records": [dict(zip(cols, r, strict=False)) for r in data[:2]]}
    _mlflow_error(httpx.post(f"{open_server.url}/invocations", json=records), 403, "PERMISSION_DENIED")
    fcols, fdata = features
    assert httpx.post(f"{open_server.url}/invocations", json=_split(fcols, fdata[:5])).status_code == 200

    _mlflow_error(httpx.post(f"{token_server.url}/invocations", json=with_ids), 401, "UNAUTHENTICATED")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = httpx.post(f"{token_server.url}/invocations", json=with_ids, headers=auth)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 5
    stats = _until(lambda: (lambda s: s if s["written_rows"] >= 5 else None)(
        httpx.get(f"{token_server.url}/health", headers=auth, timeout=10).json()["prediction_log"]), 30,
        "the authenticated request was never logged")
    assert stats["written_rows"] == 5


def test_health_details_need_the_token_and_hide_credentials(token_server: Served, spec, cycled: dict,
                                                             tmp_path: Path) -> None:
    r = httpx.get(f"{token_server.url}/health", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ok"}, r.text
    detailed = httpx.get(f"{token_server.url}/health", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert {"loaded_at", "last_error", "prediction_log", "version"} <= set(detailed.json())
    # a tracking server that does not answer, named with credentials: /health says why, without them
    dead = free_port()
    s = Served(spec, cycled["home"], tmp_path, LIMITS, args=("--tracking-uri", f"http://alice:pw-s3cret@127.0.0.1:{dead}"),
               ready="/health")
    try:
        h = _until(lambda: (lambda j: j if j.get("last_error") else None)(
            httpx.get(f"{s.url}/health", timeout=10).json()), 60, "no last_error on /health")
        assert "pw-s3cret" not in json.dumps(h) and "127.0.0.1" in h["last_error"], h
    finally:
        s.stop()



def test_parquet_body_is_bounded_by_what_it_holds_not_its_footer(open_server: Served, features, use_cycled) -> None:
    """The body bound trusted the client's footer (its row groups' sizes). A column of one long
    string, dictionary-encoded, is small in the footer's own sizes and big once read: the body is
    read batch by batch against the same budget and refused with 413; a normal Parquet body is
    still answered."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    cols, data = features
    good = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([dict(zip(cols, r, strict=False)) for r in data[:5]]), good)
    r = httpx.post(f"{open_server.url}/invocations", content=good.getvalue(),
                   headers={"Content-Type": "application/vnd.apache.parquet"}, timeout=60)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 5, r.text[:500]

    wide = io.BytesIO()
    table = pa.table({c: pa.array([v] * MAX_ROWS) for c, v in zip(cols, data[0], strict=False)})
    table = table.append_column("note", pa.array(["x" * 4000] * MAX_ROWS))  # 4 MB once read
    pq.write_table(table, wide, compression="zstd")
    body = wide.getvalue()
    meta = pq.ParquetFile(io.BytesIO(body)).metadata
    footer = sum(meta.row_group(k).total_byte_size for k in range(meta.num_row_groups))
    assert footer < 16 * len(body) + 2**20 < 4 * 10**6, (footer, len(body))  # the footer alone lets it through
    r = httpx.post(f"{open_server.url}/invocations", content=body,
                   headers={"Content-Type": "application/vnd.apache.parquet"}, timeout=60)
    msg = _mlflow_error(r, 413, "RESOURCE_LIMIT_EXCEEDED")
    assert "Parquet" in msg, msg
    assert httpx.get(f"{open_server.url}/ping", timeout=10).status_code == 200
