"""`daybreak serve`'s own HTTP path (``deploy/_http.py``) on raw sockets: ``POST /invocations``
answered below ASGI when its body comes whole with its headers, through uvicorn's ASGI cycle
otherwise, with the same answers either way, in order on one connection, and a client that never
reads its answers held back without holding the others or the server's memory."""

from __future__ import annotations

import json
import select
import socket
import time

import psutil
import pytest
from conftest import Served, until

from daybreak.deploy._http import MAX_HEADER_BYTES
from daybreak.deploy._serve import INLINE_BYTES

HEADER_TIMEOUT = 7  # s; uvicorn's keep-alive timeout is 5 s


@pytest.fixture(scope="module")
def server(cycled: dict, spec, tmp_path_factory: pytest.TempPathFactory):
    # a header timeout past uvicorn's 5 s keep-alive: which of them closes a connection shows
    s = Served(spec, cycled["home"], tmp_path_factory.mktemp("serve-http"),
               {"DAYBREAK_SERVE_HEADER_TIMEOUT": str(HEADER_TIMEOUT)})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def split(holdout_features):
    """`split(n)`: a dataframe_split body of n holdout rows (the model's columns), as bytes."""
    columns, data = holdout_features

    def body(n: int, start: int = 0) -> bytes:
        rows = [data[(start + i) % len(data)] for i in range(n)]
        return json.dumps({"dataframe_split": {"columns": columns, "data": rows}}).encode()

    return body


def _post(body: bytes, extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    return (b"POST /invocations HTTP/%s\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (version, len(body), extra, body))


class Reader:
    """HTTP/1.1 responses off one socket, one at a time (Content-Length bodies)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf = sock, b""

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            assert self._fill(), f"connection closed before a response: {self.buf[:200]!r}"
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers["content-length"])
        while len(self.buf) < length:
            assert self._fill(), "connection closed inside a body"
        body, self.buf = self.buf[:length], self.buf[length:]
        return int(lines[0].split()[1]), headers, body

    def closed(self) -> bool:
        """True once the server closed the connection (after what was read)."""
        return not self.buf and not self._fill()


def _connect(server: Served) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _predictions(answer: tuple[int, dict[str, str], bytes]) -> list:
    status, _, body = answer
    assert status == 200, body[:300]
    return json.loads(body)["predictions"]


def test_whole_and_piecewise_bodies_get_the_same_answer(server: Served, split) -> None:
    """The fast path (the body with its headers), uvicorn's cycle (the body after a pause, and a
    chunked body), a body over INLINE_BYTES and HTTP/1.0 all answer the same rows alike."""
    body = split(5)
    with _connect(server) as s:
        r = Reader(s)
        s.sendall(_post(body, b"X-Request-Id: whole-1\r\n"))
        whole = r.response()
        head, rest = _post(body, b"X-Request-Id: pieces-1\r\n").split(b"\r\n\r\n", 1)
        s.sendall(head + b"\r\n\r\n" + rest[:10])
        time.sleep(0.2)  # the rest of the body in a later read: uvicorn's ASGI cycle answers it
        s.sendall(rest[10:])
        pieces = r.response()
        chunked = (b"POST /invocations HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        s.sendall(chunked)
        by_chunks = r.response()
    assert whole[1]["x-request-id"] == "whole-1" and pieces[1]["x-request-id"] == "pieces-1"
    for answer in (whole, pieces, by_chunks):
        assert answer[1]["content-type"] == "application/json"
        assert answer[1]["x-model-version"] == whole[1]["x-model-version"]
        assert "date" in answer[1]
    assert _predictions(whole) == _predictions(pieces) == _predictions(by_chunks)
    assert len(_predictions(whole)) == 5

    big = split(600)  # over INLINE_BYTES: the ASGI path with its accounting
    assert len(big) > INLINE_BYTES
    with _connect(server) as s:
        s.sendall(_post(big))
        got = _predictions(Reader(s).response())
    assert got[:5] == _predictions(whole) and len(got) == len(json.loads(big)["dataframe_split"]["data"])

    with _connect(server) as s:  # HTTP/1.0: answered, then closed
        r = Reader(s)
        s.sendall(_post(body, version=b"1.0"))
        assert _predictions(r.response()) == _predictions(whole)
        assert r.closed()


def test_pipelined_requests_are_answered_in_order(server: Served, split) -> None:
    """Requests sent back to back on one connection, mixing fast-path ones and ASGI ones, are
    answered in the order sent; ``Connection: close`` closes after its answer."""
    one, three = split(1, start=7), split(3, start=11)
    with _connect(server) as s:
        r = Reader(s)
        s.sendall(_post(one) + b"GET /ping HTTP/1.1\r\nHost: t\r\n\r\n" + _post(three)
                  + _post(one, b"X-Request-Id: last\r\n") + _post(three, b"Connection: close\r\n"))
        first, ping, second, last, closing = (r.response() for _ in range(5))
        assert r.closed()
    assert len(_predictions(first)) == 1 and len(_predictions(second)) == 3
    assert ping[0] == 200
    assert last[1]["x-request-id"] == "last" and _predictions(last) == _predictions(first)
    assert closing[1].get("connection") == "close" and _predictions(closing) == _predictions(second)
    with _connect(server) as s:  # the same rows alone on a connection: the same answers
        r = Reader(s)
        s.sendall(_post(three))
        assert _predictions(r.response()) == _predictions(second)
    bad = _post(one).replace(b"application/json", b"text/plain", 1)
    with _connect(server) as s:  # refused on the fast path: MLflow's error, and the connection stays
        r = Reader(s)
        s.sendall(bad)
        status, _, body = r.response()
        assert status == 415 and "Content-Type" in json.loads(body)["message"]
        s.sendall(_post(one))
        assert _predictions(r.response()) == _predictions(first)


def test_a_client_that_never_reads_is_held_back(server: Served, split) -> None:
    """A client pipelining requests without reading the answers: once its answers fill the
    socket, the server stops reading from it (its sending stalls) instead of buffering answers,
    its memory stays bounded, and other clients are answered meanwhile."""
    proc = psutil.Process(server.proc.pid)
    before = proc.memory_info().rss
    request = _post(split(1))
    burst = request * 2000  # about 1 MB a send
    sent, total = 0, 400 * len(burst)  # ~400 MB if the server kept reading
    with _connect(server) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.setblocking(False)
        view, offset = memoryview(burst), 0
        while sent < total:
            _, writable, _ = select.select([], [s], [], 3.0)
            if not writable:
                break  # no progress for 3 s: the server stopped reading
            try:
                n = s.send(view[offset:])
            except BlockingIOError:
                continue
            sent += n
            offset = (offset + n) % len(burst)
            view = memoryview(burst)
        assert sent < total, "the server read everything a client that never reads sent it"
        grown = proc.memory_info().rss - before
        assert grown < 200 * 2**20, f"the server grew by {grown / 2**20:.0f} MiB for a client that never reads"
        with _connect(server) as other:  # the others are answered meanwhile
            other.sendall(_post(split(2)))
            assert len(_predictions(Reader(other).response())) == 2
    until(lambda: server.proc.poll() is None, 5, "the server died")


def test_a_refusal_does_not_cut_off_the_next_request_of_the_same_read(server: Served, split) -> None:
    """A fast-path request refused at once, then the start of another in the same write: the
    second one's headers get the header timeout's 408, not a silent close by the keep-alive timer
    the refusal armed (review finding: closed at 5 s with no answer)."""
    bad = _post(split(1)).replace(b"application/json", b"text/plain", 1)
    with _connect(server) as s:
        r = Reader(s)
        started = time.monotonic()
        s.sendall(bad + b"POST /invocations HTTP/1.1\r\nHost: t\r\n")
        assert r.response()[0] == 415
        status, headers, body = r.response()  # then nothing until the header timeout
        assert status == 408 and headers.get("connection") == "close", (status, body[:200])
        assert time.monotonic() - started >= HEADER_TIMEOUT - 1
        assert r.closed()


def test_headers_past_the_limit_get_431(server: Served, split) -> None:
    """Headers that keep growing are cut off at MAX_HEADER_BYTES (uvicorn's protocol has no limit:
    a 64 MiB header was read whole), and the other clients are answered."""
    with _connect(server) as s:
        s.sendall(b"POST /invocations HTTP/1.1\r\nHost: t\r\nX-Big: ")
        started = time.monotonic()
        for _ in range(64):  # up to 1 MiB more, 16 KiB at a time, until the server answers
            try:
                s.sendall(b"a" * 16384)
            except (BrokenPipeError, ConnectionResetError):
                break
            if select.select([s], [], [], 0.05)[0]:
                break
        try:
            status, headers, _ = Reader(s).response()
        except ConnectionResetError:  # closed with bytes of ours unread: its answer can be lost with them
            status, headers = None, {"connection": "close"}
        assert time.monotonic() - started < HEADER_TIMEOUT - 2, "read until the header timeout"
        assert status in (431, None) and headers.get("connection") == "close", status
    with _connect(server) as s:  # just under the limit, a header is fine
        s.sendall(_post(split(2), b"X-Big: " + b"a" * (MAX_HEADER_BYTES // 2) + b"\r\n"))
        assert len(_predictions(Reader(s).response())) == 2
